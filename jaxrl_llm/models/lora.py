"""LoRA adapters on the decoder's projections: the spec, and the parameter-tree operations around them.

With `ModelConfig.lora` set, each targeted projection (q/k/v/o of attention, gate/up/down of the MLP) gets
two more parameters beside its `kernel`, in its own scope (`.../q_proj/lora_a`, `.../q_proj/lora_b`):

    y = x W (+ bias) + (alpha / rank) * dropout(x) A B

A has the kernel's input axes and `rank` columns ([embed, r] for q_proj, [heads, head_dim, r] for o_proj),
initialised like PEFT's default (kaiming-uniform: U(-1/sqrt(fan_in), 1/sqrt(fan_in))); B has `rank` rows and
the kernel's output axes, initialised to zeros, so a fresh adapter leaves the model's output exactly as the
base's. The adapter path is computed as (x A) B, never as a merged [in, out] weight, so its gradients and
optimiser state are adapter-sized. Dropout applies to the adapter's input only, and only when the forward is
given a "dropout" rng (the training losses, through `train_state.accumulate`); rollouts, old/reference
log-probs and evaluation run without it.

A params tree without the adapter leaves runs the same module as the base model (adapters off): that is how
the reference policy is computed, from the frozen base the trained adapters sit on, with no second copy.

Tree operations (plain nested dicts of arrays, as flax returns them):
* `split(tree)`: (trainable, frozen): the adapters and every head the base model does not have ("score" of a
  reward or value model) are trained; everything else is frozen.
* `merge_trees(a, b)`: the union of two such trees (what the model applies).
* `merge_adapters(tree, scale)`: W + scale * A B in each kernel's layout, adapters removed (export to a
  Hugging Face directory, and the start of the next stage).
* `init_adapters(module, key, env)`: fresh adapter leaves of `module`, created in their shardings.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

# The projections an adapter can sit on, in the order the docs list them.
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS
ADAPTER_KEYS = ("lora_a", "lora_b")
# Heads a trained model has that the base language model does not: trained with the adapters.
HEAD_KEYS = ("score",)


def resolve_targets(patterns, where: str = "targets") -> tuple[str, ...]:
    """The projection names `patterns` select: each entry is a name (q_proj, ...), a group ("attention",
    "mlp", "all") or a regular expression matched against the whole name. An entry that selects nothing is an
    error naming the valid names."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    groups = {"attention": ATTENTION_TARGETS, "mlp": MLP_TARGETS, "all": TARGETS}
    chosen: set[str] = set()
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise ValueError(f"{where}: entry {p!r} is not a projection name or pattern")
        if p in groups:
            chosen.update(groups[p])
            continue
        try:
            rx = re.compile(p)
        except re.error as e:
            raise ValueError(f"{where}: {p!r} is not a projection name nor a valid regular expression ({e}); "
                             f"valid names: {', '.join(TARGETS)} (or attention, mlp, all)") from None
        hit = [t for t in TARGETS if rx.fullmatch(t)]
        if not hit:
            raise ValueError(f"{where}: {p!r} matches no projection; valid names: {', '.join(TARGETS)} "
                             "(or attention, mlp, all, or a regex over them)")
        chosen.update(hit)
    if not chosen:
        raise ValueError(f"{where} is empty: name at least one of {', '.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in chosen)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapters of rank `rank` on the projections named in `targets`, scaled by alpha / rank, with dropout
    `dropout` on their input while training. `base_dtype` (None: the model's param_dtype) is the storage
    dtype of the frozen base weights; adapters and new heads stay in the model's param_dtype. Hashable (a
    field of the static ModelConfig)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    base_dtype: str | None = None

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r}: must be an integer >= 1")
        if not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha!r}: must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r}: must be in [0, 1)")
        object.__setattr__(self, "targets", resolve_targets(tuple(self.targets)))
        if self.base_dtype is not None:
            from jaxrl_llm.models.config import dtype_of
            dtype_of(self.base_dtype)

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)


# ----------------------------------------------------------------------------- trees


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def is_adapter(path) -> bool:
    return any(n in ADAPTER_KEYS for n in _names(path))


def is_trainable(path) -> bool:
    """Under LoRA: adapter leaves and the heads the base language model does not have."""
    return any(n in ADAPTER_KEYS or n in HEAD_KEYS for n in _names(path))


def _filter(tree, keep, path=()):
    """The subtree of the leaves where keep(path); None when nothing is kept (empty dicts pruned)."""
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            sub = _filter(v, keep, path + (jax.tree_util.DictKey(k),))
            if sub is not None:
                out[k] = sub
        return out or None
    return tree if keep(path) else None


def split(tree) -> tuple[Any, Any]:
    """(trainable, frozen) of a params tree (see `is_trainable`); either may be {}."""
    return (_filter(tree, is_trainable) or {}), (_filter(tree, lambda p: not is_trainable(p)) or {})


def adapters_of(tree) -> Any:
    return _filter(tree, is_adapter) or {}


def strip_adapters(tree) -> Any:
    """`tree` without its adapter leaves: the base the adapters sit on (the same arrays, no copy)."""
    return _filter(tree, lambda p: not is_adapter(p)) or {}


def has_adapters(tree) -> bool:
    return bool(jax.tree_util.tree_leaves(adapters_of(tree)))


def merge_trees(a, b):
    """The union of two nested dicts of arrays (a leaf in both is an error)."""
    if a is None or (isinstance(a, Mapping) and not a):
        return b
    if b is None or (isinstance(b, Mapping) and not b):
        return a
    if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
        raise ValueError("merge_trees: a leaf is in both trees")
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_trees(a[k], v) if k in a else v
    return out


def _delta(a, b, kernel_shape):
    """scale-free A B in the kernel's layout: A [*lead, *in, r], B [*lead, r, *out] -> [*lead, *in, *out]."""
    r = a.shape[-1]
    for lead in range(a.ndim):
        in_shape, out_shape = a.shape[lead:-1], b.shape[lead + 1:]
        if (a.shape[:lead] == b.shape[:lead] and b.shape[lead] == r
                and tuple(kernel_shape) == a.shape[:lead] + in_shape + out_shape):
            n_lead = a.shape[:lead]
            a2 = a.reshape(*n_lead, -1, r).astype(jnp.float32)
            b2 = b.reshape(*n_lead, r, -1).astype(jnp.float32)
            return jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(kernel_shape)
    raise ValueError(f"adapter shapes {a.shape} x {b.shape} do not fit kernel {tuple(kernel_shape)}")


def merged(tree, scale: float, dtype=None):
    """`tree` with every kernel that has adapters replaced by W + scale * A B (computed in float32, stored in
    `dtype`, default: the kernel's dtype) and the adapter leaves removed. Pure (jit it)."""
    if not isinstance(tree, Mapping):
        return tree
    if "lora_a" in tree and "kernel" in tree:
        k = tree["kernel"]
        w = k.astype(jnp.float32) + scale * _delta(tree["lora_a"], tree["lora_b"], k.shape)
        out = {n: v for n, v in tree.items() if n not in ADAPTER_KEYS}
        out["kernel"] = w.astype(dtype or k.dtype)
        return out
    return {n: merged(v, scale, dtype) for n, v in tree.items()}


def merge_adapters(tree, scale: float, dtype=None):
    """`merged` under jit, each output in the sharding of the input leaf it replaces (a tree without
    adapters is returned as it is)."""
    if not has_adapters(tree):
        return tree
    base = strip_adapters(tree)
    shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), base)
    if any(s is None for s in jax.tree.leaves(shardings, is_leaf=lambda x: x is None)):
        return jax.jit(lambda t: merged(t, scale, dtype))(tree)
    return jax.jit(lambda t: merged(t, scale, dtype), out_shardings=shardings)(tree)


def cast_tree(tree, dtype):
    """Floating leaves in `dtype`, each in its own sharding (leaves already in it are kept as they are)."""
    dtype = jnp.dtype(dtype)
    if all(jnp.dtype(x.dtype) == dtype for x in jax.tree.leaves(tree)):
        return tree

    def one(x):
        if jnp.dtype(x.dtype) == dtype or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        sh = getattr(x, "sharding", None)
        return jax.jit(lambda y: y.astype(dtype), out_shardings=sh)(x) if sh is not None else x.astype(dtype)
    return jax.tree.map(one, tree)


def init_adapters(module, key: jax.Array, env) -> Any:
    """Fresh adapter leaves of `module` (a model of the family with `cfg.lora` set), created directly in
    their shardings on `env`'s mesh; the base parameters of the init are never materialised (only the
    adapters are outputs of the jitted init)."""
    import flax.linen as nn

    from jaxrl_llm.models.api import init_fn_for
    from jaxrl_llm.sharding.params import param_shardings
    init_fn = init_fn_for(module)
    _, shardings = param_shardings(init_fn, env, key)

    def init(k):
        with env.activate():
            return adapters_of(nn.unbox(init_fn(k)["params"]))

    return jax.jit(init, out_shardings=adapters_of(shardings))(key)


def prepare(params, adapters, lora: LoraConfig) -> tuple[Any, Any]:
    """(trainable, frozen) for a LoRA stage starting from `params`: adapters already in `params` (a previous
    LoRA stage's) are merged into its kernels first, so the frozen base is the policy the stage starts from
    (its reference); the base is stored in `lora.base_dtype`; the trainable tree is `adapters` (fresh) plus
    copies of the heads the base language model does not have."""
    base = merge_adapters(params, lora.scale)
    heads, frozen = split(base)
    if lora.base_dtype is not None:
        frozen = cast_tree(frozen, lora.base_dtype)
    heads = jax.tree.map(jnp.copy, heads)  # the update donates the trainable tree
    return merge_trees(heads, adapters), frozen


def num_adapter_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(adapters_of(tree)))
