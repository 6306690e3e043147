"""Creating a model's parameters (sharded) from a config."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.transformer import CausalLM
from jaxrl_llm.sharding.params import init_sharded
from jaxrl_llm.sharding.rules import ShardingEnv


def init_fn_for(module: nn.Module, seq_len: int = 8):
    """`rng -> boxed variables` for any model of the family (dummy [1, seq_len] input)."""
    def init(rng):
        return module.init(rng, jnp.zeros((1, seq_len), jnp.int32))
    return init


def create_model(cfg: ModelConfig, rng: jax.Array, env: ShardingEnv, module: nn.Module | None = None):
    """Returns (module, params, shardings), params created directly in their shardings."""
    module = CausalLM(cfg) if module is None else module
    params, shardings = init_sharded(init_fn_for(module), rng, env)
    return module, params, shardings
