"""The decoder-only model family and its heads (causal LM, per-token value, reward).

Pure functional at every jit boundary: parameters are a pytree and the forward
pass is `model.apply({"params": params}, tokens, positions, mask, cache)`.

Layers are stacked with `nn.scan` (one compiled layer body whatever the depth;
every layer parameter has a leading "layers" axis), optionally rematerialised.
With a KV cache (prefill and decode) the layers run one after another from the
same stacked parameters, each with its own cache buffers, so that a decode
step updates and reads every layer's keys/values in place.

Masks and positions:
* `mask` [B, T] marks real tokens (1) vs padding (0) of the tokens fed now.
* `positions` [B, T] are RoPE positions; by default `cumsum(mask) - 1`, which
  is right for left-padded batches.
* Without a cache, token j is visible to token i iff j <= i and mask[j].
* With a `KVCache` of S slots, the T new tokens are written at slots
  [index, index + T); slot j is visible to new token t iff
  j <= index + t and the slot holds a real token. `index` is one scalar
  or one per row (each row at its own step).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.layers import (_NEG_INF, DecoderLayer, RMSNorm, _init, rope_tables, rope_tables_below,
                                     write_slots)
from jaxrl_llm.sharding.rules import constrain

# One layer's keys or values. kv_heads before length: attention reads each head's [S, head_dim] block
# contiguously (no transposed copy of the cache per decode step).
CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@flax.struct.dataclass
class KVCache:
    """Keys/values: k, v one [B, kv_heads, S, head_dim] array per layer (tuples); mask [B, S]; index [] (the
    next slot written, the same for every row) or [B] (one per row: continuous batching, rows at different
    steps)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> "KVCache":
        shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
        k = tuple(constrain(jnp.zeros(shape, cfg.jnp_dtype), CACHE_AXES) for _ in range(cfg.num_layers))
        v = tuple(constrain(jnp.zeros(shape, cfg.jnp_dtype), CACHE_AXES) for _ in range(cfg.num_layers))
        mask = constrain(jnp.zeros((batch, length), jnp.bool_), ("batch", "length"))
        return cls(k=k, v=v, mask=mask, index=jnp.zeros((), jnp.int32))

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def repeat(self, n: int) -> "KVCache":
        """Every row repeated n times (row i -> rows i*n .. i*n+n-1), e.g. a prompt's cache for its samples."""
        def rep(a, axes):
            return constrain(jnp.repeat(a, n, axis=0), axes)

        return KVCache(k=tuple(rep(a, CACHE_AXES) for a in self.k), v=tuple(rep(a, CACHE_AXES) for a in self.v),
                       mask=rep(self.mask, ("batch", "length")), index=self.index)

    def grow(self, length: int) -> "KVCache":
        """The same cache with `length` slots (>= the current length); the new slots are empty.

        Each layer's buffers are copied once into the longer ones (the old ones are freed after).
        A decode loop that grows its cache in segments attends over the slots it has filled so far
        instead of the whole buffer (a slice of a longer buffer would be copied at every step).
        """
        extra = length - self.length
        if extra < 0:
            raise ValueError(f"KVCache.grow({length}): the cache already has {self.length} slots")
        if extra == 0:
            return self

        def pad(a):
            return constrain(jnp.pad(a, ((0, 0), (0, 0), (0, extra), (0, 0))), CACHE_AXES)

        mask = constrain(jnp.pad(self.mask, ((0, 0), (0, extra))), ("batch", "length"))
        return KVCache(k=tuple(pad(a) for a in self.k), v=tuple(pad(a) for a in self.v), mask=mask,
                       index=self.index)


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """RoPE positions for a (left- or right-) padded batch: count of real tokens before, minus 1."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def _layer_stack(cfg: ModelConfig):
    layer = DecoderLayer
    if cfg.remat != "none":
        layer = nn.remat(DecoderLayer, policy=_REMAT[cfg.remat], prevent_cse=False)
    return nn.scan(
        layer,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},  # dropout: LoRA's, per layer (models/lora.py)
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        unroll=min(cfg.scan_unroll, cfg.num_layers),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


class Decoder(nn.Module):
    """Token embedding, the stacked decoder layers and the final norm."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.jnp_dtype,
                                     param_dtype=cfg.jnp_param_dtype,
                                     embedding_init=_init(cfg, ("vocab", "embed")))
        self.layers = _layer_stack(cfg)(cfg)
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype)

    def __call__(self, tokens, positions=None, mask=None, cache: KVCache | None = None, rope=None):
        b, t = tokens.shape
        if mask is None:
            mask = jnp.ones((b, t), jnp.bool_)
        mask = mask.astype(jnp.bool_)
        from_mask = positions is None
        if from_mask:
            if cache is not None:
                raise ValueError("positions are required when decoding with a KV cache")
            positions = positions_from_mask(mask)
        x = constrain(self.embed_tokens(tokens), ("batch", "length", "embed"))
        # `rope`: rope_tables(cfg, positions) computed by the caller (a decode loop computes every step's
        # once, before the loop: XLA would otherwise evaluate the cos/sin in each layer's fusions, every step).
        if rope is not None:
            cos, sin = rope
        elif from_mask:  # positions from the mask lie in [0, t)
            cos, sin = rope_tables_below(self.cfg, positions, t)
        else:
            cos, sin = rope_tables(self.cfg, positions)

        if cache is None:
            index, kv_mask = 0, mask
        else:  # one index, or one per row (each row writes at its own slots)
            index = cache.index
            kv_mask = write_slots(cache.mask, mask, index, axis=1)
        q_slot = jnp.reshape(index, (-1, 1)) + jnp.arange(t)[None, :]  # [1 or B, T]
        k_slot = jnp.arange(kv_mask.shape[1])
        allowed = (k_slot[None, None, :] <= q_slot[:, :, None]) & kv_mask[:, None, :]  # [B, T, S]
        bias = jnp.where(allowed, 0.0, _NEG_INF).astype(jnp.float32)[:, None, None]

        if cache is None:
            (x, _), _ = self.layers((x, None), cos, sin, bias, index)
        else:
            x, ks, vs = self._cached_layers(x, cos, sin, bias, cache)
            cache = KVCache(k=ks, v=vs, mask=kv_mask, index=cache.index + t)
        return self.norm(x), cache

    def _cached_layers(self, x, cos, sin, bias, cache: KVCache):
        """The layers in turn, layer i from slice i of the stacked parameters, each with its own cache
        buffers (read and written in place; a slice of one stacked cache would be copied every step)."""
        if self.is_initializing():
            raise ValueError("initialise the model without a KV cache (the cache path needs the parameters)")
        layers = self.layers.variables["params"]
        layer = DecoderLayer(self.cfg, parent=None)
        ks, vs = [], []
        for i in range(self.cfg.num_layers):
            params_i = layers[str(i)] if str(i) in layers else jax.tree.map(lambda p, i=i: p[i], layers)
            # a training forward's dropout (LoRA's): its own key per layer, as the scanned layers get
            rngs = {"dropout": self.make_rng("dropout")} if self.has_rng("dropout") else {}
            (x, (k, v)), _ = layer.apply({"params": params_i}, (x, (cache.k[i], cache.v[i])), cos, sin, bias,
                                         cache.index, rngs=rngs)
            ks.append(constrain(k, CACHE_AXES))
            vs.append(constrain(v, CACHE_AXES))
        return x, tuple(ks), tuple(vs)

    def attend(self, hidden):
        return self.embed_tokens.attend(hidden)


@jax.custom_vjp
def _unstack(x: jax.Array) -> tuple[jax.Array, ...]:
    """x [L, ...] -> its L slices. The gradient is one stack of the slices' cotangents (autodiff of L static
    slices would add L zero-padded [L, ...] arrays)."""
    return tuple(x[i] for i in range(x.shape[0]))


def _unstack_fwd(x):
    return _unstack(x), None


def _unstack_bwd(_, cts):
    return (jnp.stack(cts),)


_unstack.defvjp(_unstack_fwd, _unstack_bwd)


def unstack_layers(params: Any) -> Any:
    """`params` with every stacked "layers" subtree split into {"0": layer 0, "1": ...}, for the KV-cache path
    only. A decode loop calls this once, before the loop: slicing the stacked weights inside the loop body
    would copy every layer's weights at every step (XLA does not hoist those slices)."""
    if not isinstance(params, Mapping):
        return params
    out = {}
    for name, sub in params.items():
        if name == "layers" and isinstance(sub, Mapping) and "0" not in sub:
            n = jax.tree.leaves(sub)[0].shape[0]
            parts = jax.tree.map(_unstack, sub)
            out[name] = {str(i): jax.tree.map(lambda p, i=i: p[i], parts, is_leaf=lambda x: isinstance(x, tuple))
                         for i in range(n)}
        else:
            out[name] = unstack_layers(sub)
    return out


class CausalLM(nn.Module):
    """Decoder + LM head (tied to the embedding or separate)."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.model = Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.jnp_dtype,
                                    param_dtype=cfg.jnp_param_dtype,
                                    kernel_init=_init(cfg, ("embed", "vocab")))

    def __call__(self, tokens, positions=None, mask=None, cache: KVCache | None = None, *,
                 return_hidden: bool = False, rope=None):
        """Returns (logits [B, T, V] in the compute dtype, or final hidden [B, T, E]; new cache).

        `rope`: optional precomputed `rope_tables(cfg, positions)` (cos, sin), [B, T, head_dim / 2] each."""
        hidden, cache = self.model(tokens, positions, mask, cache, rope)
        if return_hidden:
            return hidden, cache
        return self.logits(hidden), cache

    def logits(self, hidden):
        if self.cfg.tie_word_embeddings:
            out = self.model.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return constrain(out, ("batch", "length", "vocab"))


class ScalarHeadModel(nn.Module):
    """Decoder + scalar head: per-token values (`per_token=True`) or one reward per sequence.

    The reward is read at the last real token of each row (the last position
    where mask == 1), which works for left and right padding alike.
    """

    cfg: ModelConfig
    per_token: bool = True
    zero_init_head: bool = True

    def setup(self):
        cfg = self.cfg
        init = nn.initializers.zeros if self.zero_init_head else nn.initializers.normal(
            1.0 / (cfg.hidden_size + 1))
        self.model = Decoder(cfg)
        self.score = nn.Dense(1, use_bias=True, dtype=jnp.float32, param_dtype=cfg.jnp_param_dtype,
                              kernel_init=nn.with_logical_partitioning(init, ("embed", None)),
                              bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))

    def __call__(self, tokens, positions=None, mask=None):
        b, t = tokens.shape
        if mask is None:
            mask = jnp.ones((b, t), jnp.bool_)
        hidden, _ = self.model(tokens, positions, mask)
        values = self.score(hidden.astype(jnp.float32))[..., 0]  # [B, T] float32
        if self.per_token:
            return values
        last = jnp.max(jnp.where(mask.astype(bool), jnp.arange(t)[None, :], 0), axis=-1)
        return jnp.take_along_axis(values, last[:, None], axis=-1)[:, 0]  # [B]


def value_model(cfg: ModelConfig, **kw) -> ScalarHeadModel:
    return ScalarHeadModel(cfg, per_token=True, **kw)


def reward_model(cfg: ModelConfig, **kw) -> ScalarHeadModel:
    return ScalarHeadModel(cfg, per_token=False, **kw)


def process_reward_model(cfg: ModelConfig, **kw) -> ScalarHeadModel:
    """A process reward model: per-token logits [B, T], read at each step's end token (algos/prm.py)."""
    return ScalarHeadModel(cfg, per_token=True, **kw)


def unembedding(params: Any, cfg: ModelConfig) -> jax.Array:
    """The [embed, vocab] output matrix of a CausalLM's params (for chunked log-probs)."""
    if cfg.tie_word_embeddings:
        return params["model"]["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]


class PolicyValueModel(nn.Module):
    """PPO with a shared backbone: one Decoder, the LM head of `CausalLM`, and a scalar value head.

    The parameter tree is a CausalLM's ("model", and "lm_head" when untied)
    plus the "score" head of `ScalarHeadModel`, so a policy checkpoint loads
    straight in (add a "score" entry; zeros reproduce the policy exactly).
    `__call__` returns the final hidden states [B, T, E] (compute dtype) and
    per-token values [B, T] float32; `logits(hidden)` applies the LM head, so
    callers can run it chunked over only the positions they need.
    """

    cfg: ModelConfig
    zero_init_head: bool = True

    def setup(self):
        cfg = self.cfg
        self.model = Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.jnp_dtype,
                                    param_dtype=cfg.jnp_param_dtype,
                                    kernel_init=_init(cfg, ("embed", "vocab")))
        init = nn.initializers.zeros if self.zero_init_head else nn.initializers.normal(
            1.0 / (cfg.hidden_size + 1))
        self.score = nn.Dense(1, use_bias=True, dtype=jnp.float32, param_dtype=cfg.jnp_param_dtype,
                              kernel_init=nn.with_logical_partitioning(init, ("embed", None)),
                              bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))

    def __call__(self, tokens, positions=None, mask=None):
        hidden, _ = self.model(tokens, positions, mask)
        values = self.score(hidden.astype(jnp.float32))[..., 0]  # [B, T] float32
        if self.is_initializing() and not self.cfg.tie_word_embeddings:
            self.logits(hidden[:, :1])  # create lm_head's parameters; __call__ never runs the head
        return hidden, values

    def logits(self, hidden):
        if self.cfg.tie_word_embeddings:
            out = self.model.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return constrain(out, ("batch", "length", "vocab"))
