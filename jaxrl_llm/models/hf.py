"""Hugging Face interop: `config.json` <-> `ModelConfig`, safetensors <-> sharded params.

Supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM (the families of
`models.config`). Only safetensors are read; pickle-based `.bin`/`.pt` files
are refused and no remote code is ever run. Torch is not imported.

`load_hf` creates every parameter directly in its target sharding: each device
shard is read from the memory-mapped safetensors files for just the layers and
rows/columns it holds (`jax.make_array_from_callback`), so the full model is
never materialised on one host. `save_hf` streams one parameter at a time to
the host and writes into a temporary directory that is renamed into place at
the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxrl_llm.errors import ModelError, ModelNotFoundError
from jaxrl_llm.models.api import init_fn_for
from jaxrl_llm.models.config import ModelConfig, dtype_of
from jaxrl_llm.models.hf_config import (SUPPORTED_ARCHITECTURES, _dtype_name, config_at, config_from_hf,
                                        config_to_hf, read_hf_config)
from jaxrl_llm.models.transformer import CausalLM
from jaxrl_llm.sharding.params import abstract_params, param_shardings
from jaxrl_llm.sharding.rules import ShardingEnv

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old exports saved; recomputed here
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


class CheckpointError(ModelError):
    """A checkpoint's tensors do not match its config.json (missing, extra, wrong shape or dtype)."""




# ------------------------------------------------------------------- tensor name map
#
# Layouts (ours per layer <- HF), N heads, D = head_dim:
#   copy:       same array (norm scales, embedding)
#   linear:     [in, out] <- [out, in]
#   heads_in:   [E, N, D] <- [N*D, E]     (q/k/v kernels)
#   heads_bias: [N, D]    <- [N*D]
#   heads_out:  [N, D, E] <- [E, N*D]     (o_proj)


@dataclasses.dataclass(frozen=True)
class _Spec:
    path: tuple[str, ...]       # key path in the params tree
    hf_name: str                # may contain {i} (layer index)
    layout: str
    hf_shape: tuple[int, ...]   # one layer's HF shape

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name

    def names(self, num_layers: int) -> list[str]:
        return [self.hf_name.format(i=i) for i in range(num_layers)] if self.stacked else [self.hf_name]


def _tensor_specs(cfg: ModelConfig) -> list[_Spec]:
    e, h, k, d, m, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.intermediate_size, cfg.vocab_size)
    specs = [_Spec(("model", "embed_tokens", "embedding"), "model.embed_tokens.weight", "copy", (v, e))]

    def layer(path, name, layout, shape):
        specs.append(_Spec(("model", "layers") + path, "model.layers.{i}." + name, layout, shape))

    layer(("input_layernorm", "scale"), "input_layernorm.weight", "copy", (e,))
    for name, n in (("q_proj", h), ("k_proj", k), ("v_proj", k)):
        layer(("self_attn", name, "kernel"), f"self_attn.{name}.weight", "heads_in", (n * d, e))
        if cfg.qkv_bias:
            layer(("self_attn", name, "bias"), f"self_attn.{name}.bias", "heads_bias", (n * d,))
    if cfg.qk_norm:
        layer(("self_attn", "q_norm", "scale"), "self_attn.q_norm.weight", "copy", (d,))
        layer(("self_attn", "k_norm", "scale"), "self_attn.k_norm.weight", "copy", (d,))
    layer(("self_attn", "o_proj", "kernel"), "self_attn.o_proj.weight", "heads_out", (e, h * d))
    layer(("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", "copy", (e,))
    layer(("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", "linear", (m, e))
    layer(("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", "linear", (m, e))
    layer(("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", "linear", (e, m))
    specs.append(_Spec(("model", "norm", "scale"), "model.norm.weight", "copy", (e,)))
    if not cfg.tie_word_embeddings:
        specs.append(_Spec(("lm_head", "kernel"), "lm_head.weight", "linear", (v, e)))
    return specs


def _read_ours(sl, layout: str, d: int, b: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Reads the block `b` ((start, stop) per dim, our layout) of one HF tensor slice `sl`."""
    if layout == "copy":
        return sl[tuple(slice(lo, hi) for lo, hi in b)]
    if layout == "linear":
        (i0, i1), (o0, o1) = b
        return sl[o0:o1, i0:i1].T
    if layout == "heads_in":
        (e0, e1), (h0, h1), (d0, d1) = b
        x = sl[h0 * d:h1 * d, e0:e1].reshape(h1 - h0, d, e1 - e0)
        return x.transpose(2, 0, 1)[:, :, d0:d1]
    if layout == "heads_bias":
        (h0, h1), (d0, d1) = b
        return sl[h0 * d:h1 * d].reshape(h1 - h0, d)[:, d0:d1]
    if layout == "heads_out":
        (h0, h1), (d0, d1), (e0, e1) = b
        x = sl[e0:e1, h0 * d:h1 * d].reshape(e1 - e0, h1 - h0, d)
        return x.transpose(1, 2, 0)[:, d0:d1, :]
    raise AssertionError(layout)


def _to_hf(x: np.ndarray, layout: str) -> np.ndarray:
    """One layer of a parameter, our layout -> HF layout (inverse of `_read_ours`)."""
    if layout == "linear":
        x = x.T
    elif layout == "heads_in":
        x = x.reshape(x.shape[0], -1).T
    elif layout == "heads_bias":
        x = x.reshape(-1)
    elif layout == "heads_out":
        x = x.reshape(-1, x.shape[-1]).T
    return np.ascontiguousarray(x)


def _check_paths(specs: list[_Spec], tree, what: str) -> dict[tuple[str, ...], Any]:
    flat = {tuple(str(getattr(k, "key", k)) for k in p): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    known = {s.path for s in specs}
    if set(flat) != known:
        raise ValueError(f"{what} do not match the HF name map: unmapped {sorted(set(flat) - known)}, "
                         f"absent {sorted(known - set(flat))}")
    return flat


# ------------------------------------------------------------------------- loading


class _Checkpoint:
    """Tensor name -> safetensors file of a checkpoint dir (single file or index.json shards)."""

    def __init__(self, path: Path):
        single, index = path / "model.safetensors", path / "model.safetensors.index.json"
        if single.is_file():
            self.where = {name: single for name in _open_safetensors(single).keys()}
            self.searched = str(single)
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map")
            except (json.JSONDecodeError, AttributeError) as e:
                raise ModelError(f"{index} is not a JSON object with a 'weight_map' ({e})") from None
            if not isinstance(weight_map, dict):
                raise ModelError(f"{index} has no 'weight_map' object")
            self.where = {name: path / f for name, f in weight_map.items()}
            files = sorted(set(self.where.values()))
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise ModelNotFoundError(f"{index} lists shard files missing from {path}: {absent}")
            self.searched = f"{index} (shards {', '.join(f.name for f in files)})"
        else:
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            if pickles:
                raise ModelError(
                    f"{path} holds only pickle-based weights ({', '.join(pickles)}); jaxrl_llm never "
                    "unpickles checkpoints (unpickling can run arbitrary code). Convert them to "
                    "safetensors first, e.g. in a trusted environment: AutoModelForCausalLM."
                    "from_pretrained(path).save_pretrained(out_dir, safe_serialization=True)")
            others = sorted(p.name for p in path.glob("*.safetensors"))
            raise ModelNotFoundError(
                f"no weights found in {path}: expected model.safetensors or model.safetensors.index.json"
                + (f" (found {others}; rename or add an index.json)" if others else ""))
        self._open: dict[Path, Any] = {}

    def slice(self, name: str):
        file = self.where[name]
        if file not in self._open:
            self._open[file] = _open_safetensors(file)
        try:
            return self._open[file].get_slice(name)
        except Exception as e:  # the index points at a file that lacks the tensor
            raise CheckpointError(f"missing tensor {name!r} in {file} (listed there by the index)") from e

    def validate(self, specs: list[_Spec], cfg: ModelConfig) -> None:
        """Every expected tensor present with its shape; no unexpected ones (no silent data loss)."""
        expected = [name for spec in specs for name in spec.names(cfg.num_layers)]
        missing = [name for name in expected if name not in self.where]
        if missing:
            raise CheckpointError(f"missing tensor {_few(missing)}; searched {self.searched}")
        for spec in specs:
            for name in spec.names(cfg.num_layers):
                sl = self.slice(name)
                if tuple(sl.get_shape()) != spec.hf_shape:
                    raise CheckpointError(f"shape mismatch for tensor {name!r} in {self.where[name]}: "
                                          f"expected {spec.hf_shape} from config.json, "
                                          f"found {tuple(sl.get_shape())}")
                if sl.get_dtype() not in _FLOAT_DTYPES:
                    raise CheckpointError(f"tensor {name!r} has dtype {sl.get_dtype()}; expected one of "
                                          f"{_FLOAT_DTYPES} (quantized checkpoints are not supported)")
        ignored = set(expected) | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
        extra = sorted(n for n in self.where if n not in ignored and not n.endswith(_IGNORED_SUFFIXES))
        if extra:
            raise CheckpointError(f"unexpected tensor {_few(extra)} in {self.searched}: config.json "
                                  "describes no parameter for it, and dropping it would silently change "
                                  "the model")


def _open_safetensors(file: Path):
    try:
        return safe_open(file, framework="numpy")
    except Exception as e:  # safetensors' own error type: header too short, incomplete data, not safetensors
        raise ModelError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e}); it is truncated or "
                         "corrupt: copy or download it again") from None


def _few(names: list[str], k: int = 5) -> str:
    return ", ".join(map(repr, names[:k])) + (f" and {len(names) - k} more" if len(names) > k else "")


def load_hf(path: str | os.PathLike, env: ShardingEnv, *, dtype: Any = None, param_dtype: Any = None,
            **config_overrides) -> tuple[ModelConfig, Any]:
    """Loads a Hugging Face checkpoint dir into (ModelConfig, params sharded on `env`'s mesh).

    `dtype` (compute) and `param_dtype` (storage) default to float32; other
    `config_overrides` (e.g. `remat="full"`) go to `config_from_hf`. Every
    parameter is built shard by shard in its target sharding.
    """
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise ModelNotFoundError(f"model directory {path} {what} (config.model.path); give a local Hugging Face "
                                 "directory (config.json + *.safetensors)")
    cfg = config_at(path, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    ckpt, specs = _Checkpoint(path), _tensor_specs(cfg)
    ckpt.validate(specs, cfg)
    return cfg, build_params(cfg, env, specs, ckpt.slice)


def build_params(cfg: ModelConfig, env: ShardingEnv, specs: list[_Spec], read: Callable[[str], Any]) -> Any:
    """The CausalLM params of `cfg`, each built shard by shard in its sharding on `env`'s mesh.

    `read(hf_name)` gives one HF-layout tensor as anything numpy-sliceable (a safetensors slice, an array);
    it is called at most once per tensor and parameter, and what it returns is dropped once that parameter
    is built (so a reader that materialises tensors holds one parameter's worth at a time).
    """
    shapes, shardings = param_shardings(init_fn_for(CausalLM(cfg)), env)
    _check_paths(specs, shapes, "CausalLM parameters")
    by_path = {s.path: s for s in specs}

    def build(key_path, shaped, sharding):
        spec = by_path[tuple(str(k.key) for k in key_path)]
        cache: dict[tuple, np.ndarray] = {}  # replicated shards are read once
        tensors: dict[str, Any] = {}

        def tensor(name: str):
            if name not in tensors:
                tensors[name] = read(name)
            return tensors[name]

        def callback(index) -> np.ndarray:
            bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shaped.shape))
            if bounds not in cache:
                if spec.stacked:
                    (l0, l1), rest = bounds[0], bounds[1:]
                    block = np.stack([_read_ours(tensor(spec.hf_name.format(i=i)), spec.layout,
                                                 cfg.head_dim, rest) for i in range(l0, l1)])
                else:
                    block = _read_ours(tensor(spec.hf_name), spec.layout, cfg.head_dim, bounds)
                cache[bounds] = np.ascontiguousarray(block.astype(shaped.dtype))
            return cache[bounds]

        return jax.make_array_from_callback(shaped.shape, sharding, callback, dtype=shaped.dtype)

    return jax.tree_util.tree_map_with_path(build, shapes, shardings)


# ------------------------------------------------------------------------ exporting


def _to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as one numpy array; collective when not addressable."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_hf(params: Any, cfg: ModelConfig, path: str | os.PathLike, *, dtype: Any = None,
            max_shard_bytes: int = 5 * 2**30, tokenizer_dir: str | os.PathLike | None = None,
            overwrite: bool = False) -> Path:
    """Exports CausalLM params as a Hugging Face checkpoint (config.json + safetensors).

    `dtype` is the file dtype (default: `cfg.param_dtype`). Above
    `max_shard_bytes` the weights are split into `model-0000k-of-0000n`
    shards plus `model.safetensors.index.json`. Parameters are gathered to
    the host one at a time (every process must call this; only process 0
    writes). Files go to a temporary directory beside `path` that is renamed
    into place at the end; an existing non-empty `path` is replaced only with
    `overwrite=True`. Tokenizer files in `tokenizer_dir` are copied along; `tokenizer_dir` may also be a
    `.gguf` file, whose tokenizer and chat template are written as HF tokenizer files.
    """
    from jaxrl_llm.tokenizer import gguf_tokenizer, is_gguf_path
    if tokenizer_dir is not None and is_gguf_path(tokenizer_dir) and Path(tokenizer_dir).is_file():
        # A GGUF's tokenizer lives in its metadata: written out as HF tokenizer files first.
        gguf_tok_dir = Path(tempfile.mkdtemp(prefix="jaxrl_llm-gguf-tokenizer-"))
        try:
            gguf_tokenizer(tokenizer_dir).save_pretrained(gguf_tok_dir)
            return save_hf(params, cfg, path, dtype=dtype, max_shard_bytes=max_shard_bytes,
                           tokenizer_dir=gguf_tok_dir, overwrite=overwrite)
        finally:
            shutil.rmtree(gguf_tok_dir, ignore_errors=True)
    path = Path(path)
    out_dtype = _dtype_name(dtype) if dtype is not None else cfg.param_dtype
    np_dtype = np.dtype(dtype_of(out_dtype))
    params, cfg = _merge_lora(params, cfg, out_dtype)
    hf_config = config_to_hf(cfg, dtype=out_dtype)
    specs = _tensor_specs(cfg)
    flat = _check_paths(specs, params, "params")
    shapes, _ = abstract_params(init_fn_for(CausalLM(cfg)), jax.random.key(0))
    for p, shaped in _check_paths(specs, shapes, "CausalLM parameters").items():
        if tuple(flat[p].shape) != tuple(shaped.shape):
            raise ValueError(f"param {'/'.join(p)} has shape {tuple(flat[p].shape)}; "
                             f"the config expects {tuple(shaped.shape)}")
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
    tok_files = []
    if tokenizer_dir is not None:
        tok_files = [Path(tokenizer_dir) / f for f in TOKENIZER_FILES if (Path(tokenizer_dir) / f).is_file()]
        if not tok_files:
            raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) "
                                    f"in tokenizer_dir {tokenizer_dir}")
        hf_config.update(_special_token_ids(tokenizer_dir, cfg.vocab_size))

    # Plan the shards from shapes alone, so every process issues the same gathers in the same order.
    shards: list[list] = [[]]
    size = total = 0
    for spec in specs:
        nbytes = int(np.prod(spec.hf_shape)) * np_dtype.itemsize
        for i, name in enumerate(spec.names(cfg.num_layers)):
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards, size = shards + [[]], 0
            shards[-1].append((spec, i, name))
            size, total = size + nbytes, total + nbytes
    n = len(shards)
    fnames = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

    writer = jax.process_index() == 0
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    if writer:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    try:
        current: tuple[tuple[str, ...] | None, np.ndarray | None] = (None, None)
        weight_map = {}
        for fname, shard in zip(fnames, shards):
            tensors = {}
            for spec, i, name in shard:
                if current[0] != spec.path:  # items of one param are consecutive: gather it once
                    current = (spec.path, _to_host(flat[spec.path]).astype(np_dtype))
                if writer:
                    tensors[name] = _to_hf(current[1][i] if spec.stacked else current[1], spec.layout)
                weight_map[name] = fname
            if writer:
                save_file(tensors, tmp / fname, metadata={"format": "pt"})
                _fsync(tmp / fname)
        if writer:
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            if n > 1:
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            for f in tok_files:
                shutil.copy2(f, tmp / f.name)
            if tok_files and not (tmp / "generation_config.json").exists():  # what generate() stops at
                gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_config}
                (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            _swap_into_place(tmp, path)
    except BaseException:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxrl_llm.save_hf:{path}")
    return path


def _merge_lora(params: Any, cfg: ModelConfig, out_dtype: str) -> tuple[Any, ModelConfig]:
    """LoRA params (models/lora.py) merged for export: W + alpha/rank A B in each kernel's layout, computed
    in float32 and kept in the file dtype; the config without adapters. Other params pass through."""
    from jaxrl_llm.models import lora
    if lora.has_adapters(params):
        if cfg.lora is None:
            raise ValueError("save_hf: params hold LoRA adapters but cfg.lora is None (pass the config the "
                             "adapters were trained with, to know their scale alpha / rank)")
        params = lora.merge_adapters(params, cfg.lora.scale, dtype=dtype_of(out_dtype))
    return params, cfg.replace(lora=None) if cfg.lora is not None else cfg


def _special_token_ids(tokenizer_dir: str | os.PathLike, vocab_size: int) -> dict[str, Any]:
    """config.json's bos/eos/pad ids from the tokenizer exported with the weights (eos: every id generation
    stops at, generation_config.json's included; pad only when the tokenizer has one of its own)."""
    from jaxrl_llm.tokenizer import load_tokenizer, tokenizer_info
    tok = load_tokenizer(tokenizer_dir, vocab_size=vocab_size)
    info = tokenizer_info(tok)
    out: dict[str, Any] = {"eos_token_id": info.eos_ids[0] if len(info.eos_ids) == 1 else list(info.eos_ids)}
    if tok.bos_token_id is not None:
        out["bos_token_id"] = int(tok.bos_token_id)
    if not info.pad_added:
        out["pad_token_id"] = int(info.pad_id)
    return out


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Renames `tmp` to `path`; an existing `path` is moved aside first and deleted after."""
    _fsync(tmp)
    old = None
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)  # atomic; an empty directory at `path` is replaced
    _fsync(path.parent)
    if old is not None and old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old is not None:
        old.unlink()


__all__ = ["CheckpointError", "SUPPORTED_ARCHITECTURES", "TOKENIZER_FILES", "build_params", "config_from_hf",
           "config_to_hf", "load_hf", "read_hf_config", "save_hf"]
