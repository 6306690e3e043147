"""The decoder-only model family (Llama 2/3, Qwen2/2.5, Qwen3) and its heads."""

from jaxrl_llm.models.config import PRESETS, ModelConfig, get_preset
from jaxrl_llm.models.transformer import (
    CausalLM, KVCache, ScalarHeadModel, positions_from_mask, reward_model, unembedding, value_model)
from jaxrl_llm.models.api import create_model, init_fn_for

__all__ = [
    "PRESETS", "CausalLM", "KVCache", "ModelConfig", "ScalarHeadModel", "create_model", "get_preset",
    "init_fn_for", "positions_from_mask", "reward_model", "unembedding", "value_model",
]
