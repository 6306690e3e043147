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
from jaxrl_llm.models.config import DTYPE_NAMES, ModelConfig
from jaxrl_llm.rollout import SamplingConfig, make_sampler
from jaxrl_llm.sharding import ShardingEnv, check_replication, make_mesh, replication_report
from jaxrl_llm.sharding import multihost
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
    memory: Any = None  # sharding.memory.MemoryEstimate made before the parameters were created

    def abstract_params(self):
        shapes, _ = param_shardings(init_fn_for(self.module), self.env)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self.shardings)


def check_required_paths(cfg: mc.ConfigDict) -> None:
    """Real-scale experiments leave their paths for the user to give (model.preset "" = weights from
    model.path only; a task path kwarg ""): fail before anything is built, naming the key to set. The model's
    dtype names are checked here too."""
    from jaxrl_llm.train.config import ConfigError
    if not cfg.model.path and not cfg.model.preset:
        raise ConfigError("config.model.path is empty and this experiment has no model preset: give the local "
                          "weights with --set model.path=/path/to/Qwen2.5-1.5B-Instruct (a Hugging Face directory)")
    for key in ("dtype", "param_dtype", "matmul_dtype"):
        value = cfg.model.get(key, "")
        if value and value not in DTYPE_NAMES:
            raise ConfigError(f"config.model.{key}={value!r} is not a dtype name; use one of {list(DTYPE_NAMES)}"
                              + ("" if key != "matmul_dtype" else ' (or "" for the compute dtype)'))
    if int(cfg.model.get("scan_unroll", 0)) < 0:
        raise ConfigError(f"config.model.scan_unroll={cfg.model.scan_unroll} must be >= 0 (0: the model's own; "
                          "N: unroll N layers per step of the layer scan, num_layers: fully unrolled)")
    empty = [k for k, v in cfg.task.kwargs.items() if k.endswith("path") and v == ""]
    if empty:
        raise ConfigError(f"{', '.join(f'config.task.kwargs.{k}' for k in empty)} "
                          f"{'is' if len(empty) == 1 else 'are'} empty: give the file(s) with "
                          + " ".join(f"--set task.kwargs.{k}=/path/to/file.jsonl" for k in empty))


def model_numerics(m: mc.ConfigDict) -> dict[str, Any]:
    """ModelConfig fields from the `model` config section: dtypes, remat, and scan_unroll / matmul_dtype
    when set (0 / "": the preset's or checkpoint config's own)."""
    out = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, matmul_dtype=m.get("matmul_dtype") or None)
    if int(m.get("scan_unroll", 0)):
        out["scan_unroll"] = int(m.scan_unroll)
    return out


def build(cfg: mc.ConfigDict) -> tuple[Components, Any]:
    """(components, initial params): params from `model.path` (HF directory) or a preset (random init)."""
    from jaxrl_llm.models.hf_config import config_from_hf, read_hf_config
    from jaxrl_llm.sharding import resolve_axis_sizes
    from jaxrl_llm.sharding.memory import check_memory
    from jaxrl_llm.sharding.presets import mesh_axes_for
    check_required_paths(cfg)
    axes = resolve_axis_sizes(mesh_axes_for(cfg.mesh, jax.device_count()), jax.device_count())
    env = ShardingEnv(make_mesh(axes))
    m = cfg.model
    # The model's shape first (a preset, or the checkpoint's config.json), so memory is checked before any
    # parameter is created or read.
    numerics = model_numerics(m)
    if not m.path:
        model_cfg = get_preset(m.preset, **numerics)
    elif (pathlib.Path(m.path) / "config.json").is_file():
        model_cfg = config_from_hf(read_hf_config(m.path), **numerics)
    else:
        model_cfg = None  # load_hf says what is missing
    memory = None
    if model_cfg is not None and cfg.mesh.get("check_memory", True):
        memory = check_memory(cfg, model_cfg, axes)
    if m.path:
        model_cfg, params = load_hf(m.path, env, **numerics)
    else:
        _, params, _ = create_model(model_cfg, jax.random.key(cfg.seed), env)
    module = CausalLM(model_cfg)
    shapes, shardings = param_shardings(init_fn_for(module), env)
    check_replication(replication_report(shapes, shardings), cfg.mesh.max_replicated_fraction)
    tok_path = cfg.tokenizer.path or (m.path if m.path else "tiny")
    tokenizer = load_tokenizer(tok_path, vocab_size=model_cfg.vocab_size)
    info = tokenizer_info(tokenizer)
    task = get_task(cfg.task.name, **cfg.task.kwargs.to_dict())
    comp = Components(cfg, env, model_cfg, module, shardings, tokenizer, info.pad_id, tuple(info.eos_ids), task,
                      memory)
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
        self.key = multihost.replicated(comp.env, jax.random.key(comp.config.seed + 7919))

    def __call__(self, params) -> dict[str, float]:
        env = self.comp.env  # every process holds the whole held-out set and scores all of it
        ro = self.sampler(params, multihost.replicated_rows(env, self.tokens),
                          multihost.replicated_rows(env, self.mask), self.key)
        tokens, mask = multihost.to_host(ro.tokens), multihost.to_host(ro.mask)
        texts = decode_completions(self.comp.tokenizer, tokens, mask)
        exs = [e for e in self.examples for _ in range(self.n)]
        correct = np.array([self.comp.task.is_correct(t, e) for t, e in zip(texts, exs)], bool)
        return {"eval/accuracy": float(correct.mean()),
                "eval/response_length": float(multihost.to_host(ro.lengths).mean())}


def stage_sampler(comp: Components, sc: mc.ConfigDict, n_samples: int):
    """(SamplingConfig, sampler) of an RL stage from its `sampling` section, `n_samples` completions per
    prompt, stopping at the tokenizer's EOS."""
    sampling = SamplingConfig(max_new_tokens=int(sc.max_new_tokens), temperature=float(sc.temperature),
                              top_k=int(sc.top_k), top_p=float(sc.top_p), n_samples=n_samples,
                              eos_token_ids=comp.eos_ids, pad_token_id=comp.pad_id,
                              split_layer_weights=bool(sc.get("split_layer_weights", SamplingConfig.split_layer_weights)),
                              cache_segments=int(sc.get("cache_segments", SamplingConfig.cache_segments)))
    return sampling, make_sampler(comp.module, comp.model_cfg, sampling, env=comp.env,
                                  param_shardings=comp.shardings)


def prompt_iterator(comp: Components, examples: Sequence[Example], global_batch: int, seed: int):
    """A PromptIterator over `examples` that yields this process's rows of each global batch."""
    from jaxrl_llm.data.iterator import PromptIterator
    index, count = multihost.data_shard(comp.env, global_batch)
    return PromptIterator(examples, global_batch, seed=seed, process_index=index, process_count=count)


def global_prompt_batch(comp: Components, examples: Sequence[Example], max_len: int, global_batch: int):
    """(tokens, mask, prompts truncated over all processes): this process's prompts encoded and assembled
    into the global [global_batch, max_len] batch."""
    pt, pm, n_trunc = encode_prompt_batch(comp, examples, max_len)
    g = lambda x: multihost.to_global(comp.env, x, global_batch)  # noqa: E731
    return g(pt), g(pm), multihost.process_sum(n_trunc)


def rollout_examples(comp: Components, rollout, examples: Sequence[Example], n: int) -> list[Example]:
    """The example of each rollout row this process holds (rows are prompt-major: prompt i has rows
    i*n .. i*n+n-1); `examples` are this process's prompts, as fed to the sampler."""
    rows = rollout.tokens.shape[0]
    start, stop = multihost.row_range(rollout.tokens.sharding, rollout.tokens.shape)
    first = multihost.batch_rows(comp.env, rows // n, (rollout.prompt_tokens.shape[1],)).start
    return [examples[r // n - first] for r in range(start, stop)]


def rollout_rewards(comp: Components, rollout, examples: Sequence[Example], n: int, jax_reward, runner,
                    max_new_tokens: int):
    """(rewards [B*n], correct [B*n], host metrics) of a rollout of n completions per prompt: inside jit when
    `jax_reward` is given (the task's JAX verifier), else the task's host reward through `runner` on this
    process's rows, assembled into global arrays."""
    rows = rollout.tokens.shape[0]
    mine = rollout_examples(comp, rollout, examples, n)
    g = lambda x: multihost.to_global(comp.env, x, rows)  # noqa: E731
    if jax_reward is not None:
        tb, tl = comp.task.encode_targets(mine)
        rewards = jax_reward(rollout.tokens, rollout.mask, g(tb), g(tl))
        return rewards, rewards >= comp.task.correct_score, {}
    out = runner(reward_inputs(comp, rollout, mine, max_new_tokens))
    correct = out.correct if out.correct is not None else np.zeros(len(out.scores), bool)
    on_device = ("reward/mean", "reward/std", "reward/accuracy")  # the stages compute these over all rows
    extra = multihost.process_mean({k: v for k, v in out.metrics("reward").items() if k not in on_device})
    extra = {k: v * jax.process_count() if ("/errors/" in k or "/timeouts/" in k) else v  # counts: summed
             for k, v in extra.items()}
    return g(np.asarray(out.scores, np.float32)), g(np.asarray(correct, bool)), extra


def log_rollout_samples(comp: Components, run, stage: str, step: int, rollout, examples: Sequence[Example],
                        n: int, rewards) -> None:
    """The first `log.num_samples` rollout rows of this process to samples.jsonl (process 0 writes)."""
    mine = rollout_examples(comp, rollout, examples, n)
    k = min(comp.config.log.num_samples, len(mine))
    toks, mask = multihost.local_rows(rollout.tokens)[:k], multihost.local_rows(rollout.mask)[:k]
    texts = decode_completions(comp.tokenizer, toks, mask)
    r = multihost.local_rows(rewards)[:k]
    run.log_samples(stage, step, [
        {"prompt": mine[j].prompt, "completion": t, "reward": float(r[j]),
         "correct": bool(comp.task.is_correct(t, mine[j]))} for j, t in enumerate(texts)])


def reward_inputs(comp: Components, rollout, examples: Sequence[Example], max_new_tokens: int) -> RewardInputs:
    """What host rewards score: this process's rollout rows, decoded; `examples` one per row."""
    tokens, mask = multihost.local_rows(rollout.tokens), multihost.local_rows(rollout.mask)
    texts = decode_completions(comp.tokenizer, tokens, mask)
    return RewardInputs(texts, list(examples), multihost.local_rows(rollout.lengths),
                        multihost.local_rows(rollout.finished), max_new_tokens)


def keys_for(seed: int, stage_index: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), stage_index)


def jnp_tree_copy(tree):
    return jax.tree.map(jnp.copy, tree)


def run_name_path(cfg: mc.ConfigDict) -> pathlib.Path:
    return pathlib.Path(cfg.run_root) / cfg.name
