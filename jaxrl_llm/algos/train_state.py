"""Train state, optimisers from config, gradient accumulation and the jitted update machinery.

Every algorithm's update is a pure `(state, batch, rng) -> (state, metrics)`
built from three pieces here:

* `accumulate(loss_fn, params, batch, rng, num_micro)`: the loss function
  returns a *globally weighted* contribution (weights computed from the whole
  minibatch before it is split, see `aggregation`), so summing gradients over
  micro-batches equals the un-accumulated gradient for every aggregation mode.
  Micro-batch m takes rows m, m + M, m + 2M, ... so each micro-batch stays
  spread over all data-parallel devices. Under pure data parallelism (the
  parameters replicated on every mesh axis that shards the batch) each device
  sums its own rows' micro-batches and the gradient is all-reduced once
  (`shard_map` + `psum`), not after every micro-batch.
* `apply_gradients(state, grads, metrics)`: optax update (global-norm clipping
  inside the optimiser), grad/update norms, learning rate, and a skipped step
  (parameters and optimiser state unchanged) when the loss or gradient is not
  finite.
* `jit_update(step, state, batch_example, env)`: `jax.jit` with explicit
  shardings and the state donated (`aux_example`: an extra argument the step
  reads, such as a frozen teacher's params, placed and never donated).

`make_epoch_runner` runs epochs x minibatches of a step over one rollout batch
inside a single jitted `lax.scan`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl_llm.sharding.multihost import place
from jaxrl_llm.sharding.rules import ShardingEnv, current_env

Metrics = dict[str, jax.Array]

# ----------------------------------------------------------------------------- optimiser


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimiser and schedule. `max_grad_norm=None` disables clipping."""

    name: str = "adamw"           # adamw | adam | sgd | lion
    learning_rate: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "constant"    # constant | linear | cosine (decay to end_lr_ratio * lr at total_steps)
    warmup_steps: int = 0
    total_steps: int | None = None
    end_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        import difflib

        def near(value, choices):
            m = difflib.get_close_matches(str(value), choices, n=1)
            return f" (did you mean {m[0]!r}?)" if m else ""
        names, schedules = ("adamw", "adam", "sgd", "lion"), ("constant", "linear", "cosine")
        if self.name not in names:
            raise ValueError(f"optimizer.name={self.name!r}{near(self.name, names)}; expected adamw, adam, sgd or lion")
        if self.schedule not in schedules:
            raise ValueError(f"optimizer.schedule={self.schedule!r}{near(self.schedule, schedules)}; expected "
                             "constant, linear or cosine")
        if self.schedule != "constant" and not self.total_steps:
            raise ValueError(f"optimizer.schedule={self.schedule!r} needs optimizer.total_steps")
        for f in ("learning_rate", "warmup_steps"):
            if getattr(self, f) < 0:
                raise ValueError(f"optimizer.{f}={getattr(self, f)}: must be >= 0")
        for f in ("b1", "b2"):
            if not 0.0 <= getattr(self, f) < 1.0:
                raise ValueError(f"optimizer.{f}={getattr(self, f)}: must be in [0, 1) (a moment's decay rate)")
        if not self.eps >= 0:
            raise ValueError(f"optimizer.eps={self.eps}: must be >= 0")
        if not self.weight_decay >= 0:
            raise ValueError(f"optimizer.weight_decay={self.weight_decay}: must be >= 0")
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ValueError(f"optimizer.end_lr_ratio={self.end_lr_ratio}: must be in [0, 1] (the final learning "
                             "rate as a fraction of learning_rate)")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"optimizer.total_steps={self.total_steps}: must be None or >= 1")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"optimizer.max_grad_norm={self.max_grad_norm}: must be None (no clipping) or > 0")


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    lr, warm = cfg.learning_rate, cfg.warmup_steps
    if cfg.schedule == "constant":
        main = optax.constant_schedule(lr)
    else:
        decay_steps = max(cfg.total_steps - warm, 1)
        end = lr * cfg.end_lr_ratio
        main = (optax.linear_schedule(lr, end, decay_steps) if cfg.schedule == "linear"
                else optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.end_lr_ratio))
    if warm:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])
    return main


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    sched = make_schedule(cfg)
    if cfg.name == "adamw":
        opt = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "adam":
        opt = optax.adam(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.name == "lion":
        opt = optax.lion(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    else:
        opt = optax.sgd(sched)
    if cfg.max_grad_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), opt)
    return opt


@flax.struct.dataclass
class TrainState:
    """Trained parameters (any pytree; e.g. {"policy": ..., "value": ...}), optimiser state and step.

    `frozen`: parameters the model applies but nothing trains (LoRA's base weights, `models.lora`): not in
    the optimiser, not differentiated, not donated by `jit_update`, not checkpointed. The model applies
    `model_params()`, the union of the two trees. None (full fine-tuning): `params` is the whole model.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    schedule: optax.Schedule | None = flax.struct.field(pytree_node=False, default=None)
    frozen: Any = None

    @classmethod
    def create(cls, params: Any, optimizer: OptimizerConfig | optax.GradientTransformation,
               frozen: Any = None) -> "TrainState":
        """Optimiser state is initialised under jit, so it is sharded like the parameters.

        The update steps donate the state: `params` must not be used after the first step (`frozen` is
        never donated).
        """
        if isinstance(optimizer, OptimizerConfig):
            tx, sched = make_optimizer(optimizer), make_schedule(optimizer)
        else:
            tx, sched = optimizer, None
        opt_state = jax.jit(tx.init)(params)
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, tx=tx, schedule=sched,
                   frozen=frozen)

    def model_params(self) -> Any:
        """What the model applies: `params`, with the frozen tree merged in when there is one."""
        return with_frozen(self.params, self.frozen)


def with_frozen(params: Any, frozen: Any) -> Any:
    """The trained tree and the frozen one as one params tree (`params` itself when `frozen` is None)."""
    if frozen is None:
        return params
    from jaxrl_llm.models.lora import merge_trees
    return merge_trees(params, frozen)


# The key of a training forward's dropout (LoRA's): set by `accumulate` around the loss function while it is
# traced, read by the model calls of the losses (`dropout_rngs`). Forwards outside a loss (rollouts, old and
# reference log-probs, evaluation) see none and run without dropout.
_DROPOUT_KEY: list = []


def dropout_rngs() -> dict:
    """`rngs` for a training forward's `module.apply`: {"dropout": key} inside a loss `accumulate` is
    differentiating, else {}."""
    return {"dropout": _DROPOUT_KEY[-1]} if _DROPOUT_KEY else {}


def _with_dropout(loss_fn: Callable) -> Callable:
    def run(params, batch, rng):
        _DROPOUT_KEY.append(jax.random.fold_in(rng, 0x10A))
        try:
            return loss_fn(params, batch, rng)
        finally:
            _DROPOUT_KEY.pop()
    return run


# -------------------------------------------------------------------- accumulation


def _reduction(name: str) -> str:
    """How a metric combines over micro-batches and devices: names ending in _max / _min, else a sum."""
    return "max" if name.endswith("_max") else "min" if name.endswith("_min") else "sum"


def _reduce(name: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return {"max": jnp.maximum, "min": jnp.minimum, "sum": jnp.add}[_reduction(name)](a, b)


def split_micro(batch: Any, num_micro: int, unit: int = 1) -> Any:
    """[B, ...] -> [M, B/M, ...] with micro-batch m = rows m, m+M, m+2M, ... (strided), or with `unit` u > 1
    the units of u consecutive rows strided (unit m, m+M, ...: a unit's rows stay together and in order, as
    a group of samples of one prompt must for `logprobs.completion_logprobs(prompt_group=u)`)."""
    def one(x):
        b = x.shape[0]
        if b % (num_micro * unit):
            raise ValueError(f"batch size {b} is not divisible by num_micro_batches={num_micro}"
                             + (f" x unit={unit}" if unit > 1 else ""))
        y = jnp.swapaxes(x.reshape(b // (num_micro * unit), num_micro, unit, *x.shape[1:]), 0, 1)
        return y.reshape(num_micro, b // num_micro, *x.shape[1:])
    return jax.tree.map(one, batch)


def merge_micro(tree: Any, unit: int = 1) -> Any:
    """The inverse of `split_micro`: [M, B/M, ...] -> [B, ...] in the batch's row order."""
    def one(y):
        m, r = y.shape[:2]
        y = jnp.swapaxes(y.reshape(m, r // unit, unit, *y.shape[2:]), 0, 1)
        return y.reshape(m * r, *y.shape[3:])
    return jax.tree.map(one, tree)


def map_micro(fn: Callable[[Any], Any], batch: Any, num_micro: int = 1, unit: int = 1) -> Any:
    """`fn(batch)` computed one micro-batch at a time (`split_micro`'s strided rows or units, `lax.map`), its
    [B, ...] outputs put back in the batch's row order. For row-wise forwards without gradients (old/reference
    log-probs): one micro-batch's activations are alive at a time, and on a CPU they stay in cache."""
    if num_micro == 1:
        return fn(batch)
    return merge_micro(jax.lax.map(fn, split_micro(batch, num_micro, unit)), unit)


def prompt_unit(group: int, rows: int, parts: int) -> int:
    """The largest divisor u of `group` such that the `rows` split into `parts` equal parts of whole units of
    u rows (rows % (u * parts) == 0): how many samples of one prompt every minibatch, device share and
    micro-batch holds together, so that prompt's forward can run once for them. 1: none."""
    return max((u for u in range(2, group + 1) if group % u == 0 and rows % (u * parts) == 0), default=1)


def accumulate(loss_fn: Callable[[Any, Any, jax.Array], tuple[jax.Array, Metrics]], params: Any, batch: Any,
               rng: jax.Array, num_micro: int = 1, frozen: Any = None, unit: int = 1) -> tuple[Any, Metrics]:
    """Sum of gradients and metrics of `loss_fn` over `num_micro` micro-batches.

    `loss_fn(params, micro_batch, rng) -> (loss, metrics)` must return its
    share of the global loss (weights normalised over the whole batch), and
    metrics as weighted sums (names ending in `_max`/`_min` are reduced by
    max/min). The metric "loss" is added.
    `unit`: micro-batches take units of that many consecutive rows (`split_micro`).
    `frozen` (a `TrainState.frozen`): the loss gets the union of `params` and
    `frozen` and the gradient is of `params` only. The model calls of the loss
    get a dropout key (`dropout_rngs`).
    """
    loss_fn = _with_dropout(loss_fn)
    if frozen is not None:
        inner = loss_fn
        value_and_grad = jax.value_and_grad(lambda p, f, b, r: inner(with_frozen(p, f), b, r), has_aux=True)

        def grad_fn(pf, b, r):  # pf: (trained, frozen); the gradient of the trained tree only
            return value_and_grad(pf[0], pf[1], b, r)

        params = (params, frozen)
    else:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        (loss, metrics), grads = grad_fn(params, batch, rng)
        return grads, {"loss": loss, **metrics}

    axes = _data_parallel_axes(batch, num_micro * unit)
    if axes:
        return _accumulate_per_device(grad_fn, params, batch, rng, num_micro, axes, unit)
    return _accumulate_scan(grad_fn, params, batch, rng, num_micro, unit)


def _data_parallel_axes(batch: Any, num_micro: int) -> tuple[str, ...]:
    """The mesh axes the batch rows are split over, when the parameters are replicated on all of them (pure
    data parallelism: every axis of size > 1 shards the batch and no parameter) and every device's rows
    split into `num_micro` micro-batches; else ()."""
    env = current_env()
    if env is None or env.mesh.size == 1:
        return ()
    batch_axes = tuple(a for a in dict(env.rules).get("batch") or () if env.mesh.shape.get(a, 1) > 1)
    param_axes = {a for name, axes in env.rules if name not in ("batch", "length") for a in axes or ()}
    big = {a for a, n in env.mesh.shape.items() if n > 1}
    devices = math.prod(env.mesh.shape[a] for a in batch_axes)
    rows = {x.shape[0] if x.ndim else 0 for x in jax.tree.leaves(batch)}  # 0: a scalar, not rows
    n = rows.pop() if len(rows) == 1 else 0
    if big != set(batch_axes) or big & param_axes or not n or n % (devices * num_micro):
        return ()
    return batch_axes


def _accumulate_per_device(grad_fn, params, batch, rng, num_micro: int, axes: tuple[str, ...], unit: int):
    """Each device sums the gradients of its own rows' micro-batches, then one all-reduce (`psum`) over
    `axes`: the gradient of replicated parameters is otherwise all-reduced after every micro-batch (what
    DDP's `no_sync` avoids). Same rows, same sum, in a different order than `_accumulate_scan`."""
    env = current_env()
    spec = PartitionSpec(axes)

    def local(params, batch, rng):
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axes))
        with env.deactivate():  # inside, arrays are this device's: no mesh constraints
            grads, metrics = _accumulate_scan(grad_fn, params, batch, rng, num_micro, unit)

        across = {"max": jax.lax.pmax, "min": jax.lax.pmin, "sum": jax.lax.psum}
        metrics = {k: across[_reduction(k)](v, axes) for k, v in metrics.items()}
        return jax.lax.psum(grads, axes), metrics

    return jax.shard_map(local, mesh=env.mesh, in_specs=(PartitionSpec(), spec, PartitionSpec()),
                         out_specs=PartitionSpec(), check_vma=False)(params, batch, rng)


def _accumulate_scan(grad_fn, params, batch, rng, num_micro: int, unit: int = 1):
    micro = split_micro(batch, num_micro, unit)
    first = jax.tree.map(lambda x: x[0], micro)
    (_, m_shape), g_shape = jax.eval_shape(grad_fn, params, first, rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), g_shape)
    init_metrics = {"loss": jnp.zeros((), jnp.float32)}
    for k, s in m_shape.items():
        fill = {"max": -jnp.inf, "min": jnp.inf, "sum": 0.0}[_reduction(k)]
        init_metrics[k] = jnp.full(s.shape, fill, s.dtype)

    def body(carry, xs):
        g_acc, m_acc = carry
        i, mb = xs
        (loss, metrics), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
        metrics = {"loss": loss, **metrics}
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        m_acc = {k: _reduce(k, m_acc[k], metrics[k]) for k in m_acc}
        return (g_acc, m_acc), None

    (grads, metrics), _ = jax.lax.scan(body, (zeros, init_metrics), (jnp.arange(num_micro), micro))
    return grads, metrics


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def apply_gradients(state: TrainState, grads: Any, metrics: Metrics) -> tuple[TrainState, Metrics]:
    """One optimiser step; skipped (state unchanged but the step counter) when anything is non-finite."""
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(grad_norm) & jnp.isfinite(metrics.get("loss", 0.0)) & _all_finite(updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    metrics = dict(metrics)
    metrics["grad_norm"] = grad_norm
    metrics["update_norm"] = jnp.where(ok, optax.tree.norm(updates), 0.0)
    metrics["skipped"] = (~ok).astype(jnp.float32)
    if state.schedule is not None:
        metrics["learning_rate"] = jnp.asarray(state.schedule(state.step), jnp.float32)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state))
    return new_state, metrics


# -------------------------------------------------------------------- jit with shardings


def batch_shardings(batch: Any, env: ShardingEnv) -> Any:
    """Rows over the batch axes; [B, T] arrays get ("batch", "length"), the rest ("batch", None, ...)."""
    def one(x):
        names = ("batch", "length") if x.ndim == 2 else ("batch",) + (None,) * (x.ndim - 1)
        return env.sharding(names[:x.ndim], x.shape)
    return jax.tree.map(one, batch)


def state_shardings(state: TrainState, env: ShardingEnv) -> Any:
    """Each leaf's own sharding when it lives on `env`'s mesh; otherwise (scalars such as the step
    counter, created on one device) replicated over the mesh."""
    replicated = NamedSharding(env.mesh, PartitionSpec())
    mesh_devices = set(env.mesh.devices.flat)

    def one(x):
        sh = getattr(x, "sharding", None)
        if isinstance(sh, NamedSharding) and sh.device_set == mesh_devices:
            return sh
        return replicated
    return jax.tree.map(one, state)


def jit_update(step: Callable, state: TrainState, batch_example: Any, env: ShardingEnv | None = None,
               donate: bool = True, aux_example: Any = None) -> Callable:
    """`jax.jit(step)` with explicit shardings (state as it is placed, batch by logical axes), state donated.

    The step is traced inside `env.activate()` so the model places its
    activations by logical axis names.

    `aux_example`: a pytree the step reads but does not update (e.g. a frozen teacher's params). When given,
    the step is `step(state, batch, rng, aux)` and so is the returned update; aux is placed with its own
    shardings (each leaf's sharding when it lives on the mesh, else replicated) and never donated.
    """
    donate_argnums = (0,) if donate else ()
    if state.frozen is not None:
        return _jit_update_frozen(step, state, batch_example, env, donate_argnums, aux_example)
    if env is None:
        return jax.jit(step, donate_argnums=donate_argnums)

    def traced(state, batch, rng, *aux):
        with env.activate():
            return step(state, batch, rng, *aux)

    replicated = NamedSharding(env.mesh, PartitionSpec())
    st_sh = state_shardings(state, env)
    b_sh = batch_shardings(batch_example, env)
    aux_sh = () if aux_example is None else (state_shardings(aux_example, env),)
    jitted = jax.jit(traced, in_shardings=(st_sh, b_sh, replicated, *aux_sh), out_shardings=(st_sh, replicated),
                     donate_argnums=donate_argnums)

    def update(state, batch, rng, *aux):
        # Host arrays, or arrays placed elsewhere, are put on the batch shardings (a no-op when already there).
        return jitted(place(state, st_sh), place(batch, b_sh), place(rng, replicated), *_place_aux(aux, aux_sh))

    update.jitted = jitted
    return update


def _place_aux(aux: tuple, aux_sh: tuple) -> tuple:
    """The optional non-donated argument of `jit_update`'s update, placed on its shardings."""
    if len(aux) != len(aux_sh):
        raise TypeError(f"update takes (state, batch, rng{', aux' if aux_sh else ''}); got {3 + len(aux)} "
                        "arguments (pass aux_example to jit_update for a step with an aux argument)")
    return tuple(place(a, s) for a, s in zip(aux, aux_sh))


def _jit_update_frozen(step: Callable, state: TrainState, batch_example: Any, env: ShardingEnv | None,
                       donate_argnums: tuple, aux_example: Any = None) -> Callable:
    """`jit_update` of a state with a frozen tree: the jitted function takes it as an argument of its own,
    `jitted(state without frozen, frozen, batch, rng[, aux])`, so the donated state holds only what the step
    changes and the frozen arrays stay valid (and shared, e.g. as the reference policy)."""
    def split_step(st, frozen, batch, rng, *aux):
        new, metrics = step(st.replace(frozen=frozen), batch, rng, *aux)
        return new.replace(frozen=None), metrics

    if env is None:
        jitted = jax.jit(split_step, donate_argnums=donate_argnums)

        def update(state, batch, rng, *aux):
            new, metrics = jitted(state.replace(frozen=None), state.frozen, batch, rng, *aux)
            return new.replace(frozen=state.frozen), metrics
    else:
        def traced(st, frozen, batch, rng, *aux):
            with env.activate():
                return split_step(st, frozen, batch, rng, *aux)

        replicated = NamedSharding(env.mesh, PartitionSpec())
        st_sh = state_shardings(state.replace(frozen=None), env)
        fr_sh = state_shardings(state.frozen, env)
        b_sh = batch_shardings(batch_example, env)
        aux_sh = () if aux_example is None else (state_shardings(aux_example, env),)
        jitted = jax.jit(traced, in_shardings=(st_sh, fr_sh, b_sh, replicated, *aux_sh),
                         out_shardings=(st_sh, replicated), donate_argnums=donate_argnums)

        def update(state, batch, rng, *aux):
            frozen = place(state.frozen, fr_sh)
            new, metrics = jitted(place(state.replace(frozen=None), st_sh), frozen, place(batch, b_sh),
                                  place(rng, replicated), *_place_aux(aux, aux_sh))
            return new.replace(frozen=frozen), metrics

    update.jitted = jitted
    return update


def make_epoch_runner(step: Callable, num_minibatches: int, epochs: int = 1, shuffle: bool = True,
                      unit: int = 1) -> Callable:
    """(state, batch, rng) -> (state, metrics stacked over the epochs x minibatches updates).

    Each epoch draws a fresh permutation of the rows (`fold_in(rng, epoch)`)
    when `shuffle`, then updates on `num_minibatches` equal minibatches.
    `unit` u > 1: the permutation moves units of u consecutive rows (a prompt's samples stay together).
    """
    def run(state, batch, rng):
        frozen = state.frozen  # loop-invariant: not a carry of the scans
        state = state.replace(frozen=None)
        b = jax.tree.leaves(batch)[0].shape[0]
        if b % (num_minibatches * unit):
            raise ValueError(f"rollout batch of {b} rows is not divisible by num_minibatches={num_minibatches}"
                             + (f" x unit={unit}" if unit > 1 else ""))
        mb = b // num_minibatches

        def epoch(state, e):
            erng = jax.random.fold_in(rng, e)
            perm = jnp.arange(b)
            if shuffle:
                perm = (jax.random.permutation(erng, b // unit)[:, None] * unit + jnp.arange(unit)).reshape(b)
            shuffled = jax.tree.map(lambda x: x[perm].reshape(num_minibatches, mb, *x.shape[1:]), batch)

            def one(state, xs):
                i, minibatch = xs
                new, metrics = step(state.replace(frozen=frozen), minibatch, jax.random.fold_in(erng, i + 1))
                return new.replace(frozen=None), metrics

            return jax.lax.scan(one, state, (jnp.arange(num_minibatches), shuffled))

        state, metrics = jax.lax.scan(epoch, state, jnp.arange(epochs))
        metrics = jax.tree.map(lambda x: x.reshape(epochs * num_minibatches, *x.shape[2:]), metrics)
        return state.replace(frozen=frozen), metrics

    return run
