"""Model configuration for the decoder-only family (Llama 2/3, Qwen2/2.5, Qwen3).

One frozen dataclass describes every supported architecture; the differences
between families are data (`qkv_bias` for Qwen2, `qk_norm` for Qwen3,
`rope_scaling` for Llama 3.x), not subclasses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from jaxrl_llm.errors import ModelPresetError
from jaxrl_llm.kernels.dense import BACKWARDS as DENSE_BACKWARDS
from jaxrl_llm.models.lora import LoraConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DTYPE_NAMES = tuple(sorted(_DTYPES))  # what a config's dtype fields accept
REMAT_POLICIES = ("none", "full", "dots")
ROPE_TYPES = ("default", "llama3", "linear")


def dtype_of(name: str):
    """Maps a dtype name from config ('float32', 'bfloat16') to a jnp dtype."""
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {list(DTYPE_NAMES)}")
    return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of one decoder-only transformer.

    `rope_scaling` follows the Hugging Face dictionary, e.g.
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}.
    `param_dtype` is the storage dtype of parameters, `dtype` the compute dtype.
    `matmul_dtype` (None: the compute dtype) is the dtype of the operands of the
    projection and MLP matmuls, forward and backward; they accumulate and return
    in the compute dtype, so with dtype="float32", matmul_dtype="bfloat16"
    the residual stream, norms, RoPE, softmax and log-probs stay float32 (what
    a float32 matmul at default precision does on a TPU).
    `remat` is one of "none", "full" (recompute the whole layer in the
    backward pass) or "dots" (keep matmul outputs, recompute the rest).
    `lora` (a `models.lora.LoraConfig`) adds adapters to the projections it
    targets; `num_params` counts the base model only.
    `dense_backward` is how the dense layers' backward is computed (`kernels.dense`): "custom" (a weight
    gradient written for XLA:CPU's row-major matmul kernels) or "xla" (XLA's autodiff); the forward and the
    gradients are the same up to float rounding. bench/cpu_choices.py measures both on a CPU
    (docs/performance.md has the figures).
    """

    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    param_dtype: str = "float32"
    dtype: str = "float32"
    matmul_dtype: str | None = None
    remat: str = "none"
    scan_unroll: int = 1  # layers are a lax.scan; unroll this many per iteration (num_layers: fully unrolled)
    family: str = "qwen2"  # the HF architecture written on export: llama, qwen2, qwen3
    lora: LoraConfig | None = None  # LoRA adapters on the projections (models/lora.py); None: none
    dense_backward: str = "custom"  # the dense layers' backward: "custom" or "xla" (kernels.dense.BACKWARDS)

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                    "set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} (GQA)")
        if self.scan_unroll < 1:
            raise ValueError(f"scan_unroll={self.scan_unroll} must be >= 1 (1: one compiled layer body)")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.family not in ("llama", "qwen2", "qwen3"):
            raise ValueError(f"family={self.family!r}; expected one of 'llama', 'qwen2', 'qwen3'")
        dtype_of(self.param_dtype)
        dtype_of(self.dtype)
        if self.matmul_dtype is not None:
            dtype_of(self.matmul_dtype)
        if self.dense_backward not in DENSE_BACKWARDS:
            raise ValueError(f"dense_backward={self.dense_backward!r}; expected one of {DENSE_BACKWARDS}")
        if self.lora is not None and not isinstance(self.lora, LoraConfig):
            raise ValueError(f"lora={self.lora!r}: expected a models.lora.LoraConfig or None")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
            # Frozen dataclasses must stay hashable (they are static jit arguments).
            object.__setattr__(self, "rope_scaling", _FrozenDict(self.rope_scaling))

    @property
    def jnp_dtype(self):
        return dtype_of(self.dtype)

    @property
    def jnp_param_dtype(self):
        return dtype_of(self.param_dtype)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        """Parameter count computed from the shapes (no allocation)."""
        e, h, k, d, m, v = (self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                            self.intermediate_size, self.vocab_size)
        attn = e * h * d + 2 * e * k * d + h * d * e
        if self.qkv_bias:
            attn += h * d + 2 * k * d
        if self.qk_norm:
            attn += 2 * d
        layer = attn + 3 * e * m + 2 * e
        total = self.num_layers * layer + v * e + e
        if not self.tie_word_embeddings:
            total += e * v
        return total


class _FrozenDict(dict):
    """A dict that hashes by content, so configs holding one stay static-jit friendly."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))

    def __setitem__(self, *a):
        raise TypeError("rope_scaling is frozen")


def _llama3_scaling(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# Real shapes (random weights are fine for benchmarks; load real weights with models.hf).
PRESETS: dict[str, ModelConfig] = {
    # The embedded default: the tiny-qwen2 shape of bench/BENCHMARK_WORKLOAD (4,067,584 params).
    "tiny": ModelConfig(qkv_bias=True, family="qwen2", scan_unroll=4),
    # The tiny shape cut to 2 narrow layers (the tiny tokenizer's 512 ids kept): a model that compiles in a
    # fraction of tiny's time, for runs that check the machinery, not what a model learns (smoke runs, tests).
    "dummy": ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, qkv_bias=True, family="qwen2"),
    "qwen2.5-0.5b": ModelConfig(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
        num_kv_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, qkv_bias=True,
        max_position_embeddings=32768, family="qwen2"),
    "qwen2.5-1.5b": ModelConfig(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
        num_kv_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, qkv_bias=True,
        max_position_embeddings=32768, family="qwen2"),
    "qwen2.5-7b": ModelConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False, qkv_bias=True,
        max_position_embeddings=32768, family="qwen2"),
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, rope_theta=500000.0, rope_scaling=_llama3_scaling(32.0),
        rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=131072, family="llama"),
    "llama-3.2-3b": ModelConfig(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0, rope_scaling=_llama3_scaling(32.0),
        rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=131072, family="llama"),
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0, rope_scaling=_llama3_scaling(8.0),
        rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=131072, family="llama"),
    "qwen3-0.6b": ModelConfig(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
        num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
        qk_norm=True, max_position_embeddings=40960, family="qwen3"),
    "qwen3-1.7b": ModelConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
        num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
        qk_norm=True, max_position_embeddings=40960, family="qwen3"),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """Returns a named preset, optionally with fields replaced (e.g. dtype='bfloat16')."""
    key = name.lower()
    if key not in PRESETS:
        import difflib
        near = difflib.get_close_matches(key, PRESETS, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ModelPresetError(f"unknown model preset {name!r}.{hint} Available: {', '.join(PRESETS)}")
    return PRESETS[key].replace(**overrides) if overrides else PRESETS[key]
