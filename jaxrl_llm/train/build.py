"""Builds what a run needs from its config: mesh, model, tokenizer, task, encoders, evaluator."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np

from jaxrl_llm.models import CausalLM, create_model, get_preset, load_hf
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.rollout import SamplingConfig, make_sampler
from jaxrl_llm.sharding import ShardingEnv, check_replication, make_mesh, replication_report
from jaxrl_llm.sharding.params import param_shardings
from jaxrl_llm.models.api import init_fn_for
from jaxrl_llm.tasks import Example, RewardInputs, Task, get_task
from jaxrl_llm.tokenizer import decode_completions, encode_prompts, load_tokenizer, tokenizer_info


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

    def abstract_params(self):
        shapes, _ = param_shardings(init_fn_for(self.module), self.env)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self.shardings)


def check_required_paths(cfg: mc.ConfigDict) -> None:
    """Real-scale experiments leave their paths for the user to give (model.preset "" = weights from
    model.path only; a task path kwarg ""): fail before anything is built, naming the key to set."""
    from jaxrl_llm.train.config import ConfigError
    if not cfg.model.path and not cfg.model.preset:
        raise ConfigError("config.model.path is empty and this experiment has no model preset: give the local "
                          "weights with --set model.path=/path/to/Qwen2.5-1.5B-Instruct (a Hugging Face directory)")
    empty = [k for k, v in cfg.task.kwargs.items() if k.endswith("path") and v == ""]
    if empty:
        raise ConfigError(f"{', '.join(f'config.task.kwargs.{k}' for k in empty)} "
                          f"{'is' if len(empty) == 1 else 'are'} empty: give the file(s) with "
                          + " ".join(f"--set task.kwargs.{k}=/path/to/file.jsonl" for k in empty))


def build(cfg: mc.ConfigDict) -> tuple[Components, Any]:
    """(components, initial params): params from `model.path` (HF directory) or a preset (random init)."""
    check_required_paths(cfg)
    env = ShardingEnv(make_mesh(cfg.mesh.axes.to_dict()))
    m = cfg.model
    if m.path:
        model_cfg, params = load_hf(m.path, env, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    else:
        model_cfg = get_preset(m.preset, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
        _, params, _ = create_model(model_cfg, jax.random.key(cfg.seed), env)
    module = CausalLM(model_cfg)
    shapes, shardings = param_shardings(init_fn_for(module), env)
    check_replication(replication_report(shapes, shardings), cfg.mesh.max_replicated_fraction)
    tok_path = cfg.tokenizer.path or (m.path if m.path else "tiny")
    tokenizer = load_tokenizer(tok_path, vocab_size=model_cfg.vocab_size)
    info = tokenizer_info(tokenizer)
    task = get_task(cfg.task.name, **cfg.task.kwargs.to_dict())
    comp = Components(cfg, env, model_cfg, module, shardings, tokenizer, info.pad_id, tuple(info.eos_ids), task)
    return comp, params


def encode_prompt_batch(comp: Components, examples: Sequence[Example], max_len: int):
    """Left-padded int32 tokens and bool mask [B, max_len] (over-long prompts keep their end)."""
    prompts = [e.prompt for e in examples]
    chat = bool(comp.config.task.chat) or not isinstance(prompts[0], str)
    enc = encode_prompts(comp.tokenizer, prompts, max_len, chat=chat)
    return enc.tokens, enc.mask, enc.num_truncated


def encode_answers(comp: Components, examples: Sequence[Example], max_len: int):
    """Right-padded answer + EOS tokens [B, max_len] and mask, for SFT on a task's gold answers."""
    toks = np.full((len(examples), max_len), comp.pad_id, np.int32)
    mask = np.zeros((len(examples), max_len), np.int32)
    for i, e in enumerate(examples):
        ids = comp.tokenizer.encode(e.answer, add_special_tokens=False)[:max_len - 1] + [comp.eos_ids[0]]
        toks[i, :len(ids)] = ids
        mask[i, :len(ids)] = 1
    return toks, mask


class Evaluator:
    """Greedy (or sampled) accuracy of the policy on a fixed held-out set of the task."""

    def __init__(self, comp: Components, max_prompt_len: int):
        ev = comp.config.eval
        self.comp = comp
        self.examples = comp.task.examples("test", ev.num_examples, comp.config.seed)
        self.tokens, self.mask, _ = encode_prompt_batch(comp, self.examples, max_prompt_len)
        self.n = ev.n_samples
        sc = SamplingConfig(max_new_tokens=ev.max_new_tokens, temperature=ev.temperature, n_samples=self.n,
                            eos_token_ids=comp.eos_ids, pad_token_id=comp.pad_id)
        self.sampler = make_sampler(comp.module, comp.model_cfg, sc, env=comp.env, param_shardings=comp.shardings)
        self.key = jax.random.key(comp.config.seed + 7919)

    def __call__(self, params) -> dict[str, float]:
        ro = self.sampler(params, self.tokens, self.mask, self.key)
        tokens, mask = np.asarray(ro.tokens), np.asarray(ro.mask)
        texts = decode_completions(self.comp.tokenizer, tokens, mask)
        exs = [e for e in self.examples for _ in range(self.n)]
        correct = np.array([self.comp.task.is_correct(t, e) for t, e in zip(texts, exs)], bool)
        return {"eval/accuracy": float(correct.mean()),
                "eval/response_length": float(np.asarray(ro.lengths).mean())}


def reward_inputs(comp: Components, rollout, examples: Sequence[Example], max_new_tokens: int) -> RewardInputs:
    tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
    texts = decode_completions(comp.tokenizer, tokens, mask)
    return RewardInputs(texts, list(examples), np.asarray(rollout.lengths), np.asarray(rollout.finished),
                        max_new_tokens)


def keys_for(seed: int, stage_index: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), stage_index)


def jnp_tree_copy(tree):
    return jax.tree.map(jnp.copy, tree)


def run_name_path(cfg: mc.ConfigDict) -> pathlib.Path:
    return pathlib.Path(cfg.run_root) / cfg.name
