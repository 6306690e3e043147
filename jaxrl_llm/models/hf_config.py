"""Hugging Face `config.json` <-> `ModelConfig` for the supported families.

Supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM. Anything the
model cannot represent exactly (other activations, MLP biases, sliding window,
other RoPE types, ...) is refused with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxrl_llm.errors import ModelError, ModelNotFoundError
from jaxrl_llm.models.config import ModelConfig

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_ARCH_OF_FAMILY = {fam: arch for arch, fam in SUPPORTED_ARCHITECTURES.items()}
# HF class defaults for keys a config.json may leave out.
_FAMILY_DEFAULTS = {"llama": {"max_position_embeddings": 2048, "head_dim": None},
                    "qwen2": {"max_position_embeddings": 32768, "head_dim": None},
                    "qwen3": {"max_position_embeddings": 32768, "head_dim": 128}}


def _dtype_name(dtype: Any) -> str:
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def _family_of(c: Mapping[str, Any]) -> str:
    archs = c.get("architectures") or []
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if archs:
        for arch in archs:
            if arch in SUPPORTED_ARCHITECTURES:
                return SUPPORTED_ARCHITECTURES[arch]
        raise ModelError(f"unsupported architecture {', '.join(map(str, archs))}; "
                         f"supported architectures: {supported}")
    model_type = c.get("model_type")
    if model_type in _FAMILY_DEFAULTS:
        return model_type
    raise ModelError(f"unsupported model_type {model_type!r} (config has no 'architectures'); "
                     f"supported: model_type llama, qwen2, qwen3 / architectures {supported}")


def _rope_from_hf(c: Mapping[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from legacy `rope_theta`/`rope_scaling` or v5 `rope_parameters`."""
    # transformers v5 gives the legacy `rope_scaling` priority over `rope_parameters`.
    key = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
    sc = dict(c.get(key) or {})
    if any(isinstance(v, Mapping) for v in sc.values()):
        raise ModelError(f"config.json {key} is nested per layer type; only one global RoPE is supported")
    theta = float(sc.pop("rope_theta", c.get("rope_theta", 10000.0)))
    rope_type = sc.pop("rope_type", None) or sc.pop("type", None) or "default"
    partial = sc.pop("partial_rotary_factor", c.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ModelError(f"config.json partial_rotary_factor={partial} is not supported (only 1.0)")
    if rope_type == "default":
        return theta, None
    if rope_type not in ("linear", "llama3"):
        raise ModelError(f"config.json {key}: rope type {rope_type!r} is not supported; "
                         "supported rope types: default, llama3, linear")
    needed = ("factor",) if rope_type == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if rope_type == "llama3":  # as HF: a top-level value wins, else max_position_embeddings
        sc["original_max_position_embeddings"] = c.get("original_max_position_embeddings") or sc.get(
            "original_max_position_embeddings", c.get("max_position_embeddings"))
    missing = [k for k in needed if sc.get(k) is None]
    if missing:
        raise ModelError(f"config.json {key} with rope_type {rope_type!r} lacks {missing}")
    return theta, {"rope_type": rope_type, **{k: _rope_number(k, sc[k]) for k in needed}}


def _rope_number(key: str, value: Any) -> float | int:
    """RoPE-scaling values as HF types them: a position count is an int, factors are floats."""
    return int(value) if key == "original_max_position_embeddings" else float(value)


def config_from_hf(hf_config: Mapping[str, Any], **overrides) -> ModelConfig:
    """Builds a `ModelConfig` from a Hugging Face `config.json` dict.

    `overrides` replace fields afterwards (e.g. `param_dtype="bfloat16"`,
    `remat="full"`; dtypes may be names or numpy/jnp dtypes). Configurations
    the model cannot reproduce exactly raise a `ModelError` that says why.
    Numerics default to float32 whatever `torch_dtype` the checkpoint records.
    """
    c = dict(hf_config)
    family = _family_of(c)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if c.get(key) is None:
            raise ModelError(f"config.json lacks the required key {key!r}")
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelError(f"config.json hidden_act={act!r} is not supported; only 'silu' (SwiGLU) is")
    if c.get("mlp_bias"):
        raise ModelError("config.json mlp_bias=true is not supported (the MLP has no biases)")
    if family in ("llama", "qwen3") and c.get("attention_bias"):
        raise ModelError(f"config.json attention_bias=true is not supported for {family}: HF then also "
                         "biases o_proj, which this model does not have")
    if c.get("use_sliding_window"):
        raise ModelError("config.json use_sliding_window=true is not supported (sliding-window attention "
                         "is not implemented); full attention would silently change the model")
    layer_types = set(c.get("layer_types") or ()) - {"full_attention"}
    if layer_types:
        raise ModelError(f"config.json layer_types {sorted(layer_types)} are not supported; "
                         "only full_attention")
    heads = c["num_attention_heads"]
    head_dim = c["head_dim"] if "head_dim" in c else _FAMILY_DEFAULTS[family]["head_dim"]
    rope_theta, rope_scaling = _rope_from_hf(c)
    fields = dict(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"], num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=head_dim or c["hidden_size"] // heads, rope_theta=rope_theta, rope_scaling=rope_scaling,
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
        max_position_embeddings=c.get("max_position_embeddings")
        or _FAMILY_DEFAULTS[family]["max_position_embeddings"],
        initializer_range=float(c.get("initializer_range", 0.02)), family=family)
    return ModelConfig(**with_overrides(fields, overrides))


def with_overrides(fields: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`fields` (a checkpoint's ModelConfig fields) with the caller's `overrides` (None: keep the checkpoint's)
    put over them; dtypes may be given as jnp dtypes or names. An override that is no ModelConfig field is a
    TypeError."""
    overrides = {k: (_dtype_name(v) if k in ("dtype", "param_dtype", "matmul_dtype") and v is not None else v)
                 for k, v in overrides.items()}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise TypeError(f"unknown ModelConfig field(s) {sorted(unknown)} in overrides")
    return {**fields, **{k: v for k, v in overrides.items() if v is not None}}


def config_to_hf(cfg: ModelConfig, *, dtype: Any = None) -> dict[str, Any]:
    """A `config.json` dict that transformers (v4 and v5) load as the family's *ForCausalLM.

    RoPE is written both ways: legacy `rope_theta`/`rope_scaling` (read by v4,
    and preferred by v5 when set) and v5 `rope_parameters`.
    """
    if cfg.qk_norm != (cfg.family == "qwen3"):
        raise ValueError(f"qk_norm={cfg.qk_norm} cannot be exported as family {cfg.family!r}: "
                         "HF has q/k norms exactly in Qwen3")
    if cfg.qkv_bias and cfg.family != "qwen2":
        raise ValueError(f"qkv_bias=True cannot be exported as family {cfg.family!r} (HF's attention_bias "
                         "would add an o_proj bias too); use family='qwen2'")
    dtype = _dtype_name(dtype) if dtype is not None else cfg.param_dtype
    sc, scaling = dict(cfg.rope_scaling or {}), None
    if sc:  # ModelConfig also accepts HF's older "type" key
        scaling = {k: _rope_number(k, v) for k, v in sc.items() if k not in ("type", "rope_type")}
        scaling["rope_type"] = sc.get("rope_type", sc.get("type"))
    out: dict[str, Any] = {
        "architectures": [_ARCH_OF_FAMILY[cfg.family]], "model_type": cfg.family,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range, "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": cfg.rope_theta},
        "attention_dropout": 0.0, "use_cache": True, "dtype": dtype, "torch_dtype": dtype,
    }
    if cfg.family in ("llama", "qwen3"):
        out["attention_bias"] = False
    if cfg.family == "llama":
        out["mlp_bias"] = False
    if cfg.family in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    return out


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed `config.json` of a checkpoint directory (clear errors when absent or invalid)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ModelNotFoundError(f"no config.json in {Path(path)} (expected a Hugging Face model directory)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{file} is not valid JSON: line {e.lineno}: {e.msg}") from None


def config_at(path: str | os.PathLike, **overrides) -> ModelConfig:
    """`config_from_hf(read_hf_config(path), **overrides)`; an error names the directory's config.json."""
    hf = read_hf_config(path)
    try:
        return config_from_hf(hf, **overrides)
    except ValueError as e:  # ours, or ModelConfig's own checks (head counts that do not divide, ...)
        raise ModelError(f"{Path(path) / 'config.json'}: {str(e).removeprefix('config.json ')}") from None
