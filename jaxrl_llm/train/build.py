"""Builds what a run needs from its config: mesh and rules, model, tokenizer, task; prompt and answer encoders,
the samplers and evaluator a stage makes from them."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np

from jaxrl_llm.data.iterator import tokenize_batch
from jaxrl_llm.models import CausalLM, create_model, get_preset, load_hf
from jaxrl_llm.models.api import init_fn_for
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.rollout import SamplingConfig, make_sampler
from jaxrl_llm.sharding import ShardingEnv, check_replication, make_mesh, multihost, replication_report
from jaxrl_llm.sharding.params import param_shardings
from jaxrl_llm.tasks import Example, Task, get_task
from jaxrl_llm.tokenizer import is_gguf_path, load_tokenizer, tokenizer_info


@dataclasses.dataclass
class Components:
    """Everything stages share: placement, the model family, tokenizer and task."""

    config: mc.ConfigDict
    env: ShardingEnv
    model_cfg: ModelConfig
    module: CausalLM
    shardings: Any
    tokenizer: Any
    pad_id: int
    eos_ids: tuple[int, ...]
    task: Task
    memory: Any = None  # train.memory.MemoryEstimate made before the parameters were created
    rollout_env: Any = None  # the rollout mesh's ShardingEnv when RL stages disaggregate (overlap.rollout_devices)

    @property
    def chat(self) -> bool | None:
        """How prompts are rendered: always with the chat template (task.chat), or by their type (None:
        message lists with it, text as it is)."""
        return True if self.config.task.chat else None

    def abstract_params(self):
        shapes, _ = param_shardings(init_fn_for(self.module), self.env)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self.shardings)


def check_required_paths(cfg: mc.ConfigDict) -> None:
    """Real-scale experiments leave their paths for the user to give (model.preset "" = weights from
    model.path only; a task path kwarg ""): fail before anything is built, naming the key to set. The model's
    numerics keys are checked here too (`validation.check_model_numerics`)."""
    from jaxrl_llm.train.config import ConfigError
    if not cfg.model.path and not cfg.model.preset:
        raise ConfigError("config.model.path is empty and this experiment has no model preset: give the local "
                          "weights with --set model.path=/path/to/Qwen2.5-1.5B-Instruct (a Hugging Face directory)")
    from jaxrl_llm.train.validation import check_model_numerics
    check_model_numerics(cfg.model)
    empty = [k for k, v in cfg.task.kwargs.items() if k.endswith("path") and v == ""]
    if empty:
        raise ConfigError(f"{', '.join(f'config.task.kwargs.{k}' for k in empty)} "
                          f"{'is' if len(empty) == 1 else 'are'} empty: give the file(s) with "
                          + " ".join(f"--set task.kwargs.{k}=/path/to/file.jsonl" for k in empty))


def model_numerics(m: mc.ConfigDict) -> dict[str, Any]:
    """ModelConfig fields from the `model` config section: dtypes, remat, the dense layers' backward, and
    scan_unroll / matmul_dtype when set (0 / "": the preset's or checkpoint config's own)."""
    out = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, matmul_dtype=m.get("matmul_dtype") or None,
               dense_backward=m.get("dense_backward", ModelConfig.dense_backward))
    if int(m.get("scan_unroll", 0)):
        out["scan_unroll"] = int(m.scan_unroll)
    return out


def build(cfg: mc.ConfigDict) -> tuple[Components, Any]:
    """(components, initial params): params from `model.path` (HF directory or .gguf file) or a preset (random
    init)."""
    from jaxrl_llm.models.gguf import gguf_config, load_gguf
    from jaxrl_llm.models.hf_config import config_at
    from jaxrl_llm.sharding import resolve_axis_sizes
    from jaxrl_llm.sharding.presets import mesh_axes_for
    from jaxrl_llm.train.config import mesh_env
    from jaxrl_llm.train.memory import check_memory
    from jaxrl_llm.train.stages.overlap import rollout_env, split_devices
    check_required_paths(cfg)
    # overlap.rollout_devices = r > 0: the last r devices roll out, the mesh of everything else is the others
    devices, rollout_devices = split_devices(cfg, jax.devices())
    axes = resolve_axis_sizes(mesh_axes_for(cfg.mesh, len(devices)), len(devices))
    env = mesh_env(cfg, make_mesh(axes, devices) if rollout_devices else make_mesh(axes))
    m = cfg.model
    # The model's shape first (a preset, or the checkpoint's config.json), so memory is checked before any
    # parameter is created or read.
    numerics = model_numerics(m)
    gguf = bool(m.path) and is_gguf_path(m.path)  # a llama.cpp file: config from its metadata
    if not m.path:
        model_cfg = get_preset(m.preset, **numerics)
    elif gguf:
        model_cfg = gguf_config(m.path, **numerics)
    elif (pathlib.Path(m.path) / "config.json").is_file():
        model_cfg = config_at(m.path, **numerics)
    else:
        model_cfg = None  # load_hf says what is missing
    memory = None
    if model_cfg is not None and cfg.mesh.get("check_memory", True):
        memory = check_memory(cfg, model_cfg, axes)
    from jaxrl_llm.train.validation import lora_config
    lora = lora_config(m)
    # LoRA (models/lora.py): the base is built (read, or initialised) directly in lora.base_dtype, frozen;
    # adapters are added per stage, in model.param_dtype
    base = {**numerics, "param_dtype": lora.base_dtype} if lora is not None and lora.base_dtype else numerics
    if m.path:
        model_cfg, params = (load_gguf if gguf else load_hf)(m.path, env, **base)
    else:
        _, params, _ = create_model(model_cfg.replace(param_dtype=base["param_dtype"]), jax.random.key(cfg.seed), env)
    if lora is not None:
        model_cfg = model_cfg.replace(lora=lora, param_dtype=numerics["param_dtype"])
    module = CausalLM(model_cfg)
    shapes, shardings = param_shardings(init_fn_for(module), env)
    try:
        check_replication(replication_report(shapes, shardings, env), float(cfg.mesh.max_replicated_fraction))
    except ValueError as e:
        from jaxrl_llm.train.config import ConfigError
        raise ConfigError(f"mesh {dict(env.mesh.shape)}: {e}") from None
    tok_path = cfg.tokenizer.path or (m.path if m.path else "tiny")
    tokenizer = load_tokenizer(tok_path, vocab_size=model_cfg.vocab_size)
    from jaxrl_llm.train.validation import check_vocab
    check_vocab(model_cfg.vocab_size, tokenizer, f"model.path={m.path!r}" if m.path else f"model.preset={m.preset!r}",
                f"tokenizer {tok_path!r}")
    info = tokenizer_info(tokenizer)
    task = get_task(cfg.task.name, **cfg.task.kwargs.to_dict())
    comp = Components(cfg, env, model_cfg, module, shardings, tokenizer, info.pad_id, tuple(info.eos_ids), task,
                      memory, rollout_env(cfg, rollout_devices, mesh_env) if rollout_devices else None)
    return comp, params


def encode_prompt_batch(comp: Components, examples: Sequence[Example], max_len: int):
    """Left-padded int32 tokens and bool mask [B, max_len] (over-long prompts keep their end), and how many
    prompts were cut."""
    enc = tokenize_batch(comp.tokenizer, examples, max_len, chat=comp.chat)
    return enc.tokens, enc.mask, enc.num_truncated


def encode_answers(comp: Components, examples: Sequence[Example], max_len: int):
    """Right-padded target + EOS tokens [B, max_len] and mask, for SFT on a task's gold completions: the
    example's `meta["sft_target"]` when it has one (a worked solution, e.g. chain_arithmetic's steps), else
    its answer."""
    toks = np.full((len(examples), max_len), comp.pad_id, np.int32)
    mask = np.zeros((len(examples), max_len), np.int32)
    for i, e in enumerate(examples):
        target = e.meta.get("sft_target", e.answer)
        ids = comp.tokenizer.encode(target, add_special_tokens=False)[:max_len - 1] + [comp.eos_ids[0]]
        toks[i, :len(ids)] = ids
        mask[i, :len(ids)] = 1
    return toks, mask


def make_evaluator(comp: Components, max_prompt_len: int, prompts: Callable[[list], list] | None = None):
    """The held-out evaluator of a stage (`eval.Evaluator`): `config.eval`'s examples of the task's test split,
    samples and temperature, prompts of `max_prompt_len` tokens. `prompts`: maps the examples to the ones
    evaluated (e.g. lessons injected into their prompts; the answers stay)."""
    from jaxrl_llm.eval.evaluator import Evaluator
    ev, seed = comp.config.eval, int(comp.config.seed)
    examples = comp.task.examples("test", ev.num_examples, seed)
    return Evaluator(comp.module, comp.model_cfg, comp.env, comp.tokenizer, comp.task,
                     prompts(examples) if prompts is not None else examples, max_prompt_len=int(max_prompt_len),
                     max_new_tokens=int(ev.max_new_tokens), n_samples=int(ev.n_samples),
                     temperature=float(ev.temperature), chat=comp.chat, seed=seed + 7919,
                     param_shardings=comp.shardings)


def stage_sampler(comp: Components, sc: mc.ConfigDict, n_samples: int):
    """(SamplingConfig, sampler) of an RL stage from its `sampling` section, `n_samples` completions per
    prompt, stopping at the tokenizer's EOS."""
    sampling = SamplingConfig(max_new_tokens=int(sc.max_new_tokens), temperature=float(sc.temperature),
                              top_k=int(sc.top_k), top_p=float(sc.top_p), n_samples=n_samples,
                              eos_token_ids=comp.eos_ids, pad_token_id=comp.pad_id,
                              split_layer_weights=bool(sc.get("split_layer_weights", SamplingConfig.split_layer_weights)),
                              cache_segments=int(sc.get("cache_segments", SamplingConfig.cache_segments)),
                              slots=int(sc.get("slots", SamplingConfig.slots)))
    return sampling, make_sampler(comp.module, comp.model_cfg, sampling, env=comp.env,
                                  param_shardings=comp.shardings)


def prompt_iterator(comp: Components, examples: Sequence[Example], global_batch: int, seed: int):
    """A PromptIterator over `examples` that yields this process's rows of each global batch."""
    from jaxrl_llm.data.iterator import PromptIterator
    index, count = multihost.data_shard(comp.env, global_batch)
    return PromptIterator(examples, global_batch, seed=seed, process_index=index, process_count=count)


def keys_for(seed: int, stage_index: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), stage_index)


def jnp_tree_copy(tree):
    return jax.tree.map(jnp.copy, tree)


def run_name_path(cfg: mc.ConfigDict) -> pathlib.Path:
    return pathlib.Path(cfg.run_root) / cfg.name
