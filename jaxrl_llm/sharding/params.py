"""Parameters created already sharded: shapes from `jax.eval_shape`, init jitted with out_shardings."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax

from jaxrl_llm.sharding.rules import ShardingEnv, logical_to_sharding


def abstract_params(init_fn: Callable[[jax.Array], Any], rng: jax.Array):
    """(ShapeDtypeStruct tree, logical PartitionSpec tree) of the params `init_fn` returns.

    `init_fn(rng)` returns boxed variables (e.g. `model.init(...)`); only the
    "params" collection is kept.
    """
    boxed = jax.eval_shape(init_fn, rng)["params"]
    return nn.unbox(boxed), nn.get_partition_spec(boxed)


def param_shardings(init_fn: Callable[[jax.Array], Any], env: ShardingEnv, rng: jax.Array | None = None):
    """(ShapeDtypeStruct tree, NamedSharding tree) of the params on `env`'s mesh."""
    rng = jax.random.key(0) if rng is None else rng
    with env.activate():
        shapes, logical = abstract_params(init_fn, rng)
    return shapes, logical_to_sharding(logical, shapes, env.mesh, env.rules)


def init_sharded(init_fn: Callable[[jax.Array], Any], rng: jax.Array, env: ShardingEnv):
    """Initialises params directly into their shardings; nothing is materialised whole first.

    Returns (params, shardings).
    """
    _, shardings = param_shardings(init_fn, env, rng)

    def init(r):
        with env.activate():
            return nn.unbox(init_fn(r)["params"])

    return jax.jit(init, out_shardings=shardings)(rng), shardings
