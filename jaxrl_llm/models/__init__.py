"""The decoder-only model family (Llama 2/3, Qwen2/2.5, Qwen3), its heads, and HF interop."""

from jaxrl_llm.models.api import create_model, init_fn_for
from jaxrl_llm.models.config import PRESETS, ModelConfig, get_preset
from jaxrl_llm.models.hf import CheckpointError, load_hf, save_hf
from jaxrl_llm.models.gguf import gguf_config, load_gguf, smollm2_path
from jaxrl_llm.models.hf_config import config_from_hf, config_to_hf
from jaxrl_llm.models.transformer import (
    CausalLM, KVCache, PolicyValueModel, ScalarHeadModel, positions_from_mask, process_reward_model, reward_model,
    unembedding, value_model)

__all__ = [
    "PRESETS", "CausalLM", "CheckpointError", "KVCache", "ModelConfig", "PolicyValueModel", "ScalarHeadModel", "config_from_hf",
    "config_to_hf", "create_model", "get_preset", "gguf_config", "init_fn_for", "load_gguf", "load_hf",
    "positions_from_mask", "process_reward_model", "reward_model", "save_hf", "smollm2_path", "unembedding", "value_model",
]
