"""Learning from reflection: rollouts -> reflection -> a measured, curated lesson base in the prompt -> distilled
into the weights.

One round (one step of the stage, `rounds` in all):

    prompts   = next(iterator)                              # prompts_per_round task prompts, lessons injected
    attempts  = sample(policy, prompts) x group_size        # the task's reward and verdict per completion
    lessons   = reflector(contexts of `reflect.attempts` attempts)   # candidate lessons (`reflect.kind`)
    for each candidate (near-duplicates of the base merged, over-long ones rejected):
        d_p   = R(prompt p | base + candidate) - R(prompt p | base)  # score.num_prompts validation prompts,
                                                                      # the same sampling key for both
        keep iff the lower end of the score.confidence t-interval of mean(d) > score.min_gain
        (kept: the base grows; over base.token_budget the lowest-gain lessons are evicted)
    distill.steps updates: teacher = frozen snapshot with the kept lessons in its system prompt, student =
        the policy without them, per-token divergence on the student's (or the teacher's) samples
    the distilled lessons leave the prompt (distill.drop_lessons)

Validation prompts are `score.num_prompts` train-split prompts outside the training ones (the held-out test
split stays for evaluation). R(p | lessons) is the mean task reward of `score.samples` completions of prompt p
(greedy by default) under the round's scoring key: every measurement of a round is paired with every other.

Reflectors (`reflect.kind`): "policy" (the policy itself reads a reflection prompt, `lessons.reflect`),
"model" (a second model from `reflect.path`, HF directory or GGUF file, with its own tokenizer), "function"
(`reflect.function`, "package.module:name" or "file.py:name", called as fn(attempts, round) -> [texts]) and
"fixed" (`reflect.lessons`, hand-written, proposed every round and merged when already in the base).

The lesson base is a plain JSON file (`lessons.base.LessonBase`): every lesson proposed, with its provenance
(round, source, the attempts it came from), measured gain and interval, and status (kept, rejected, merged,
evicted, distilled). Written after every round as runs/<name>/lessons/<stage>/v<round>.json (and base.json, the
latest); a resumed run reads the version of its checkpoint's round. `base.path` starts the stage from a file
(JSON base or text, one lesson per line), e.g. a base a person edited.

Distillation (`algos.distill`): reverse KL sum_v p_s (log p_s - log p_t) on the student's own samples
(on-policy, the default), forward KL sum_v p_t (log p_t - log p_s) or NLL (SFT) on the teacher's samples.

Metrics per round: lessons/proposed, lessons/kept, lessons/merged, lessons/rejected, lessons/active,
lessons/tokens (the active block's tokens per prompt), lessons/gain_kept (mean gain of this round's kept
lessons); val/reward_plain (no lessons, before distillation), val/reward_lessons (the kept base injected),
val/reward_plain_after (no lessons, after distillation), val/retention ((after - plain) / (lessons - plain));
rollout/reward_mean; distill/* (the update's metrics averaged over the round's steps), lessons/prompt_tokens_saved
(the prompt tokens of the lessons distilled and dropped, per call); tokens/sampled and
tokens/sampled_total (every token this stage sampled: rollouts, reflections, scoring, distillation). Held-out
evaluation: eval/accuracy (plain prompts) and eval/accuracy_with_lessons (the active lessons injected; in a round
that distills, measured before the distillation).

Randomness: round i uses fold_in(fold_in(stage key, i), j) with j = 0 rollouts, 1 reflection, 2 scoring,
3 + step distillation sampling, 1000 + step distillation updates. Resuming from a round's checkpoint and its
base file equals never stopping. Runs on one process.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np

from jaxrl_llm.algos import distill
from jaxrl_llm.algos.train_state import jit_update, with_frozen
from jaxrl_llm.data.iterator import tokenize_batch
from jaxrl_llm.errors import ResumeError
from jaxrl_llm.lessons.base import Lesson, LessonBase, decide, fit_budget, near_duplicate, paired_gain
from jaxrl_llm.lessons.inject import InjectConfig, inject_example, token_counter
from jaxrl_llm.lessons.reflect import (REFLECTION_PROMPT, Attempt, call_lesson_function, fixed_lessons, parse_lesson,
                                       pick_attempts, prompt_text, reflection_prompt, resolve_function)
from jaxrl_llm.rewards.rollout import RolloutScorer
from jaxrl_llm.rollout import SamplingConfig, make_sampler
from jaxrl_llm.sharding import multihost
from jaxrl_llm.tasks.base import Example
from jaxrl_llm.tokenizer import decode_completions, tokenizer_info
from jaxrl_llm.train.build import jnp_tree_copy, make_evaluator, prompt_iterator, stage_sampler
from jaxrl_llm.train.config import ConfigError, optimizer_config, optimizer_from, to_dataclass
from jaxrl_llm.train.experience import step_metrics
from jaxrl_llm.train.stage import Stage, StageKind
from jaxrl_llm.train.stages.rl import sampling_section
from jaxrl_llm.train.validation import choice, flag, integer, number, run_steps, short, unread

REFLECTORS = ("policy", "model", "function", "fixed")
SAMPLES = ("student", "teacher")


def lessons_stage(rounds: int = 2, prompts_per_round: int = 8, group_size: int = 4, max_new_tokens: int = 16,
                  reflector: str = "policy", distill_steps: int = 0, learning_rate: float = 1e-5,
                  **kw) -> mc.ConfigDict:
    """A lessons stage: `rounds` rounds of (group_size samples of prompts_per_round prompts, reflection by
    `reflector`, paired scoring of each candidate lesson, `distill_steps` distillation updates); `kw` sets
    other section keys."""
    s = mc.ConfigDict(dict(
        kind="lessons", rounds=rounds, prompts_per_round=prompts_per_round, group_size=group_size,
        max_prompt_len=16, num_train_examples=0, sampling=sampling_section(max_new_tokens),
        reflect=mc.ConfigDict(dict(kind=reflector, lessons=(), function="", path="", contexts=2, attempts=4,
                                   samples=2, temperature=0.7, max_new_tokens=48, max_prompt_len=512, template="")),
        base=mc.ConfigDict(dict(path="", token_budget=128, similarity=0.8)),
        score=mc.ConfigDict(dict(num_prompts=32, samples=1, temperature=0.0, confidence=0.9, min_gain=0.0)),
        inject=mc.ConfigDict(dict(header=InjectConfig.header, bullet=InjectConfig.bullet, system_prompt="",
                                  position=InjectConfig.position, max_prompt_len=0)),
        distill=mc.ConfigDict(dict(steps=distill_steps, batch_size=16, samples="student",
                                   divergence="reverse_kl", drop_lessons=True, num_micro_batches=1,
                                   logprob_chunk=128, optimizer=optimizer_config(learning_rate)))))
    s.update(kw)
    return s


def lesson_prompt_len(s: mc.ConfigDict) -> int:
    """The prompt width with lessons injected: inject.max_prompt_len, or (0) max_prompt_len + the base's token
    budget + 64 tokens for the header and the system-message markup."""
    return int(s.inject.max_prompt_len) or int(s.max_prompt_len) + int(s.base.token_budget) + 64


def inject_config(s: mc.ConfigDict, where: str) -> InjectConfig:
    """How the section's lessons go into prompts (`lessons.inject.InjectConfig`), checked."""
    i, iw = s.inject, f"{where}.inject"
    for key in ("header", "bullet", "system_prompt"):
        if not isinstance(i[key], str):
            raise ConfigError(f"{iw}.{key}={i[key]!r} must be a string")
    choice(i.position, f"{iw}.position", ("system", "prefix"), means="where the lessons go in a chat prompt")
    return InjectConfig(header=i.header, bullet=i.bullet, system_prompt=i.system_prompt, position=i.position)


def distill_config(s: mc.ConfigDict, where: str) -> distill.DistillConfig:
    d = s.distill
    try:
        return distill.DistillConfig(divergence=d.divergence, logprob_chunk=int(d.logprob_chunk))
    except ValueError as e:
        raise ConfigError(f"{where}.distill: {e}") from None


def check_section(cfg: mc.ConfigDict, name: str) -> None:
    """Every key of a lessons section."""
    s, where = cfg[name], f"config.{name}"
    run_steps(s, "rounds", where, "reflection rounds")
    integer(s.prompts_per_round, f"{where}.prompts_per_round", 1, means="prompts sampled per round", example=8)
    integer(s.group_size, f"{where}.group_size", 1, means="samples per prompt the reflector sees", example=4)
    integer(s.max_prompt_len, f"{where}.max_prompt_len", 1, means="prompt tokens without lessons", example=16)
    integer(s.num_train_examples, f"{where}.num_train_examples", 0,
            means="training prompts drawn from the task; 0 = 64 rounds' worth", example=0)
    sampling = to_dataclass(SamplingConfig, s.sampling, f"{where}.sampling")
    if sampling.temperature == 0 and s.group_size > 1:
        raise ConfigError(f"{where}.sampling.temperature=0.0 (greedy) with {where}.group_size={s.group_size}: the "
                          f"samples of a prompt would be identical; set {short(where)}.sampling.temperature > 0 "
                          f"or {short(where)}.group_size=1")
    r, rw = s.reflect, f"{where}.reflect"
    kind = choice(r.kind, f"{rw}.kind", REFLECTORS, means="a reflector")
    d = lessons_stage().reflect
    need = {"fixed": ("lessons",), "function": ("function",), "model": ("path",), "policy": ()}[kind]
    sampled = kind in ("policy", "model")
    for key in ("lessons", "function", "path"):
        if key not in need:
            unread(r, key, rw, d[key], f"by reflect.kind={kind!r}")
    if kind == "fixed":
        texts = tuple(r.lessons)
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ConfigError(f"{rw}.lessons={texts!r}: reflect.kind='fixed' needs one or more non-empty lesson "
                              f"texts, e.g. --set {short(rw)}.lessons='(\"Answer with just the number.\",)'")
    if kind == "function":
        try:
            resolve_function(r.function)
        except (ValueError, ImportError, AttributeError, FileNotFoundError) as e:
            raise ConfigError(f"{rw}.function={r.function!r}: {e}") from None
    if kind == "model" and not pathlib.Path(r.path).exists():
        raise ConfigError(f"{rw}.path={r.path!r} does not exist: give the reflector model's HF directory or "
                          f".gguf file")
    for key in ("samples", "temperature", "max_new_tokens", "max_prompt_len", "template"):
        if not sampled:
            unread(r, key, rw, d[key], f"by reflect.kind={kind!r} (only by the sampled reflectors 'policy' "
                                       "and 'model')")
    if sampled:
        integer(r.samples, f"{rw}.samples", 1, means="lessons sampled per reflection context", example=2)
        number(r.temperature, f"{rw}.temperature", 0.0, means="the reflector's sampling temperature", example=0.7)
        if r.temperature == 0 and r.samples > 1:
            raise ConfigError(f"{rw}.temperature=0.0 (greedy) with {rw}.samples={r.samples}: the lessons of a "
                              f"context would be identical; set {short(rw)}.samples=1 or a temperature > 0")
        integer(r.max_new_tokens, f"{rw}.max_new_tokens", 1, means="tokens of a lesson", example=48)
        integer(r.max_prompt_len, f"{rw}.max_prompt_len", 1, means="tokens of a reflection prompt", example=512)
        if r.template and "{attempts}" not in r.template:
            raise ConfigError(f"{rw}.template must contain {{attempts}} (where the attempts go); leave it '' for "
                              "the default reflection prompt")
    integer(r.contexts, f"{rw}.contexts", 1, means="reflection contexts per round", example=2)
    integer(r.attempts, f"{rw}.attempts", 1, s.prompts_per_round * s.group_size,
            means="attempts shown in one reflection context, at most the round's samples", example=4)
    b, bw = s.base, f"{where}.base"
    if b.path and not pathlib.Path(b.path).is_file():
        raise ConfigError(f"{bw}.path={b.path!r} is not a file: give a lesson base (.json) or a text file with "
                          "one lesson per line, or leave it '' to start empty")
    integer(b.token_budget, f"{bw}.token_budget", 1, means="tokens of the injected lessons at most", example=128)
    number(b.similarity, f"{bw}.similarity", 0.0, 1.0, lo_open=True, means="text similarity at which two "
           "lessons are the same", example=0.8)
    sc, scw = s.score, f"{where}.score"
    integer(sc.num_prompts, f"{scw}.num_prompts", 2, means="validation prompts a lesson is scored on", example=32)
    integer(sc.samples, f"{scw}.samples", 1, means="completions per validation prompt", example=1)
    number(sc.temperature, f"{scw}.temperature", 0.0, means="scoring temperature (0: greedy)", example=0.0)
    if sc.temperature == 0 and sc.samples > 1:
        raise ConfigError(f"{scw}.temperature=0.0 (greedy) with {scw}.samples={sc.samples}: the samples would be "
                          f"identical; set {short(scw)}.samples=1 or a temperature > 0")
    number(sc.confidence, f"{scw}.confidence", 0.0, 1.0, lo_open=True, hi_open=True,
           means="the confidence of the gain's interval", example=0.9)
    number(sc.min_gain, f"{scw}.min_gain", 0.0, means="the gain the interval's lower end must exceed", example=0.0)
    iw = f"{where}.inject"
    inject_config(s, where)
    integer(s.inject.max_prompt_len, f"{iw}.max_prompt_len", 0,
            means="prompt tokens with lessons; 0 = max_prompt_len + base.token_budget + 64", example=0)
    if s.inject.max_prompt_len and s.inject.max_prompt_len < s.max_prompt_len:
        raise ConfigError(f"{iw}.max_prompt_len={s.inject.max_prompt_len} is shorter than {where}.max_prompt_len="
                          f"{s.max_prompt_len}: a prompt with lessons is longer than without")
    dd, dw = s.distill, f"{where}.distill"
    integer(dd.steps, f"{dw}.steps", 0, means="distillation updates per round (0: none)", example=10)
    dflt = lessons_stage().distill
    if dd.steps == 0:
        for key in ("batch_size", "samples", "divergence", "drop_lessons", "num_micro_batches", "logprob_chunk"):
            unread(dd, key, dw, dflt[key], "with distill.steps=0 (no distillation)")
    integer(dd.batch_size, f"{dw}.batch_size", 1, means="prompts per distillation update", example=16)
    samples = choice(dd.samples, f"{dw}.samples", SAMPLES, means="whose samples distillation trains on")
    dc = distill_config(s, where)
    if samples == "student" and dc.divergence == "nll":
        raise ConfigError(f"{dw}.divergence='nll' with {dw}.samples='student' would train the policy on its own "
                          "samples; use samples='teacher' (SFT on the teacher's completions) or a KL divergence")
    flag(dd.drop_lessons, f"{dw}.drop_lessons")
    integer(dd.num_micro_batches, f"{dw}.num_micro_batches", 1, means="gradient-accumulation parts", example=1)
    if dd.batch_size % dd.num_micro_batches:
        raise ConfigError(f"{dw}.batch_size={dd.batch_size} is not divisible by {dw}.num_micro_batches="
                          f"{dd.num_micro_batches}")
    optimizer_from(dd.optimizer, f"{dw}.optimizer")


def start_base(s: mc.ConfigDict, where: str, count_tokens) -> LessonBase:
    """The base a lessons stage starts from: base.path (JSON base or text, one lesson per line) or empty."""
    budget = int(s.base.token_budget)
    if not s.base.path:
        return LessonBase([], version=0, token_budget=budget)
    base = LessonBase.load(s.base.path, count_tokens)
    base.token_budget = budget
    if base.tokens() > budget:
        raise ConfigError(f"{where}.base.path={s.base.path!r}: its active lessons take {base.tokens()} tokens, more "
                          f"than {where}.base.token_budget={budget}; raise the budget or shorten the file")
    return base


def check_lessons_from(cfg: mc.ConfigDict, name: str) -> None:
    """An RL section's `lessons`: an earlier lessons stage, or a lesson file (.json base or .txt)."""
    value, key = cfg[name].lessons, f"config.{name}.lessons"
    stages = tuple(cfg.stages)
    before = stages[:stages.index(name)] if name in stages else ()
    if value in stages:
        if value not in before or cfg[value].get("kind") != "lessons":
            earlier = [x for x in before if cfg[x].get("kind") == "lessons"]
            raise ConfigError(f"{key}={value!r} must name a lessons stage that runs before {name!r} (earlier lessons "
                              f"stages: {earlier or 'none'}) or a lesson file")
        return
    if not pathlib.Path(value).is_file():
        raise ConfigError(f"{key}={value!r} is neither a lessons stage of this run nor a file: give the name of an "
                          "earlier lessons stage, a lesson base (.json) or a text file with one lesson per line")


def lessons_for(cfg: mc.ConfigDict, name: str, run) -> tuple[list[str], InjectConfig]:
    """(the active lessons, how they are injected) of an RL section's `lessons`: the final base of that
    lessons stage (its inject settings) or a lesson file (the default settings)."""
    value = cfg[name].lessons
    if value in tuple(cfg.stages):
        path = run.path / "lessons" / value / "base.json"
        if not path.is_file():
            raise ResumeError(f"config.{name}.lessons={value!r}: the stage's lesson base {path} is missing; run "
                              f"stage {value!r} first (or restore the file)")
        return LessonBase.load(path).active_texts(), inject_config(cfg[value], f"config.{value}")
    return LessonBase.load(value).active_texts(), InjectConfig()


@dataclasses.dataclass
class _Scored:
    """Completions of some prompts under one set of lessons: per-prompt mean reward [P], rewards [P, n], texts."""

    per_prompt: np.ndarray
    rewards: np.ndarray
    correct: np.ndarray
    texts: list[str]


class LessonsStage(Stage):
    kind = "lessons"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        s, comp, where = self.section, self.comp, f"config.{self.name}"
        if jax.process_count() > 1:
            raise ConfigError(f"{where}: a lessons stage runs on one process; this run has {jax.process_count()}")
        self.total_steps = int(s.rounds)
        self.prompts, self.n = int(s.prompts_per_round), int(s.group_size)
        n_train = max(int(s.num_train_examples), self.prompts * 64)
        n_val = int(s.score.num_prompts)
        pool = comp.task.examples("train", n_train + n_val, self.cfg.seed)
        self.examples, self.val_examples = list(pool[:n_train]), list(pool[n_train:n_train + n_val])
        self.iterator = prompt_iterator(comp, self.examples, self.prompts, self.cfg.seed + self.index)
        self.inject_cfg = inject_config(s, where)
        self.width = int(s.max_prompt_len)
        self.lesson_width = lesson_prompt_len(s)
        self.count_tokens = token_counter(comp.tokenizer)
        self.rollout_sampler = self._sampler(self.n)
        self.score_sampler = self._sampler(int(s.score.samples), temperature=float(s.score.temperature), top_k=0,
                                           top_p=1.0)
        self.scorer = RolloutScorer(comp.task, comp.tokenizer, comp.env, vocab_size=comp.model_cfg.vocab_size,
                                    in_jit=False)
        self.reflector = self._reflector()
        d = s.distill
        self.distill_steps = int(d.steps)
        self.opt_cfg = optimizer_from(d.optimizer, f"{where}.distill.optimizer")
        if self.distill_steps:
            self.distill_iterator = prompt_iterator(comp, self.examples, int(d.batch_size),
                                                    self.cfg.seed + self.index + 7919)
            self.distill_sampler = self._sampler(1)
            self.step_fn = distill.make_distill_step(comp.module, comp.model_cfg, distill_config(s, where),
                                                     num_micro_batches=int(d.num_micro_batches))
        else:
            self.distill_iterator = None
        self.update = None
        self.sampled_tokens = 0
        self.evaluator = make_evaluator(comp, s.max_prompt_len) if self.cfg.eval.every > 0 else None
        self._lesson_evaluators: dict[tuple[str, ...], Any] = {}

    @classmethod
    def check_config(cls, cfg: mc.ConfigDict, name: str) -> None:
        check_section(cfg, name)

    # --------------------------------------------------------------------------- pieces

    def _sampler(self, n: int, **override):
        """The policy's sampler from the stage's `sampling` section (its KV-cache and weight-split settings
        included) with the keys in `override`, n completions per prompt."""
        return stage_sampler(self.comp, mc.ConfigDict({**self.section.sampling.to_dict(), **override}), n)[1]

    def _reflector(self):
        """(fn(contexts, round, key) -> the candidate lesson texts of each context, the source name lessons are
        recorded with)."""
        r = self.section.reflect
        if r.kind in ("fixed", "function"):
            fn = fixed_lessons(tuple(r.lessons)) if r.kind == "fixed" else resolve_function(r.function)
            name = "fixed" if r.kind == "fixed" else f"function:{r.function}"

            def propose(contexts, i, key):  # one call per context, as a sampled reflector reads each
                return [call_lesson_function(fn, attempts, i, name) for attempts in contexts]
            return propose, name
        if r.kind == "policy":
            return self._sampled_reflector(None), "policy"
        return self._sampled_reflector(r.path), f"model:{r.path}"

    def _sampled_reflector(self, path: str | None):
        """Lessons sampled from the policy (path None) or from a second model read from `path`."""
        r, comp = self.section.reflect, self.comp
        over = dict(max_new_tokens=int(r.max_new_tokens), temperature=float(r.temperature), top_k=0, top_p=1.0)
        if path is None:
            tokenizer, sampler, params = comp.tokenizer, self._sampler(int(r.samples), **over), None
        else:
            tokenizer, sampler, params = self._reflector_model(path, int(r.samples), over)
        template = r.template or REFLECTION_PROMPT
        chat = bool(getattr(tokenizer, "chat_template", None))
        width = int(r.max_prompt_len)

        def reflect(attempts: list[list[Attempt]], i: int, key) -> list[list[str]]:
            prompts = [Example(reflection_prompt(a, template, chat=chat), "") for a in attempts]
            enc = tokenize_batch(tokenizer, prompts, width, chat=chat)
            if enc.num_truncated:
                raise ConfigError(f"config.{self.name}.reflect.max_prompt_len={width}: {enc.num_truncated} reflection "
                                  f"prompt(s) are longer; raise it or show fewer attempts (reflect.attempts)")
            g = lambda x: multihost.to_global(comp.env, x, len(prompts))  # noqa: E731
            ro = sampler(self.model_params() if params is None else params, g(enc.tokens), g(enc.mask), key)
            self.sampled_tokens += int(np.sum(multihost.local_rows(ro.lengths)))
            texts = decode_completions(tokenizer, multihost.local_rows(ro.tokens), multihost.local_rows(ro.mask),
                                       skip_special_tokens=True)
            k = int(r.samples)
            return [texts[c * k:(c + 1) * k] for c in range(len(prompts))]
        return reflect

    def _reflector_model(self, path: str, n: int, over: dict):
        from jaxrl_llm.models import CausalLM, load_hf
        from jaxrl_llm.models.gguf import load_gguf
        from jaxrl_llm.tokenizer import is_gguf_path, load_tokenizer
        from jaxrl_llm.train.build import model_numerics
        comp = self.comp
        model_cfg, params = (load_gguf if is_gguf_path(path) else load_hf)(path, comp.env,
                                                                          **model_numerics(self.cfg.model))
        tokenizer = load_tokenizer(path, vocab_size=model_cfg.vocab_size)
        info = tokenizer_info(tokenizer)
        sc = SamplingConfig(n_samples=n, eos_token_ids=tuple(info.eos_ids), pad_token_id=info.pad_id, **over)
        return tokenizer, make_sampler(CausalLM(model_cfg), model_cfg, sc, env=comp.env), params

    def _encode(self, examples: Sequence[Example], texts: Sequence[str], width: int):
        """Prompts of `examples` with lessons `texts` injected, [B, width] left-padded (global arrays)."""
        exs = [inject_example(e, list(texts), self.inject_cfg) for e in examples]
        enc = tokenize_batch(self.comp.tokenizer, exs, width, chat=self.comp.chat)
        if enc.num_truncated:
            key = "inject.max_prompt_len" if texts else "max_prompt_len"
            raise ConfigError(f"config.{self.name}.{key}={width}: {enc.num_truncated} prompt(s) with "
                              f"{len(texts)} lesson(s) are longer (left truncation would cut the lessons); raise it")
        g = lambda x: multihost.to_global(self.comp.env, x, len(exs))  # noqa: E731
        return g(enc.tokens), g(enc.mask)

    def _sample_scored(self, sampler, params, examples: Sequence[Example], texts: Sequence[str], n: int,
                       key) -> _Scored:
        tokens, mask = self._encode(examples, texts, self.lesson_width)
        ro = sampler(params, tokens, mask, key)
        rewards, correct, _ = self.scorer(ro, list(examples), n)
        rewards, correct = np.asarray(rewards, np.float64), np.asarray(correct, bool)
        toks = multihost.local_rows(ro.tokens)
        texts_out = decode_completions(self.comp.tokenizer, toks, multihost.local_rows(ro.mask))
        used = int(np.sum(multihost.local_rows(ro.lengths)))
        self.sampled_tokens += used
        r = rewards.reshape(-1, n)
        return _Scored(r.mean(axis=1), r, correct.reshape(-1, n), texts_out)

    def validation_rewards(self, params, texts: Sequence[str], key) -> np.ndarray:
        """Mean reward of each validation prompt with `texts` injected, sampled with `key` [num_prompts]."""
        scored = self._sample_scored(self.score_sampler, params, self.val_examples, texts,
                                        int(self.section.score.samples), key)
        return scored.per_prompt

    # --------------------------------------------------------------------------- state

    def init(self, params) -> None:
        self.state = self.make_state(params, self.opt_cfg)
        self.base = start_base(self.section, f"config.{self.name}", self.count_tokens)
        self.sampled_tokens = 0

    def _base_dir(self) -> pathlib.Path:
        return self.run.path / "lessons" / self.name

    def _save_base(self, n: int) -> None:
        if not self.run.writer:
            return
        d = self._base_dir()
        d.mkdir(parents=True, exist_ok=True)
        self.base.version = n
        self.base.save(d / f"v{n:04d}.json")
        self.base.save(d / "base.json")

    def meta(self) -> dict:
        m = {**super().meta(), "sampled_tokens": self.sampled_tokens, "base_version": self.base.version}
        if self.distill_iterator is not None:
            m["distill_iterator"] = self.distill_iterator.state()
        return m

    def restore(self, tree: dict, meta: dict) -> None:
        super().restore(tree, meta)
        self.sampled_tokens = int(meta.get("sampled_tokens", 0))
        if self.distill_iterator is not None:
            self.distill_iterator.restore(meta["distill_iterator"])
        version = int(meta.get("base_version", 0))
        f = self._base_dir() / f"v{version:04d}.json"
        if version and not f.is_file():
            raise ResumeError(f"stage {self.name!r}: the checkpoint is of round {version} but its lesson base {f} is "
                              "missing; restore the file, or start the run anew (--fresh)")
        if version:
            self.base = LessonBase.load(f)

    # --------------------------------------------------------------------------- one round

    def round_key(self, i: int, which: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(self.key, i), which)

    def step(self, i: int) -> dict:
        s = self.section
        tokens_before = self.sampled_tokens
        params = self.model_params()
        metrics: dict[str, float] = {}
        # 1. rollouts with the active lessons
        examples = next(self.iterator)
        active = self.base.active_texts()
        rolled = self._sample_scored(self.rollout_sampler, params, examples, active, self.n, self.round_key(i, 0))
        metrics["rollout/reward_mean"] = float(rolled.rewards.mean())
        metrics["rollout/accuracy"] = float(rolled.correct.mean())
        # 2. reflection
        candidates = self._reflect(i, examples, rolled)
        # 3. curation
        metrics.update(self._curate(i, params, candidates))
        # 4. distillation
        if self.distill_steps and self.base.active_texts():
            every = int(self.cfg.eval.every)
            if every > 0 and ((i + 1) % every == 0 or i + 1 == self.total_steps):
                # the held-out accuracy with the lessons in the prompt, before they go into the weights
                metrics["eval/accuracy_with_lessons"] = self._accuracy_with(self.base.active_texts(), params)
            metrics.update(self._distill(i))
            after = float(np.mean(self.validation_rewards(self.model_params(), [], self.round_key(i, 2))))
            gap = metrics["val/reward_lessons"] - metrics["val/reward_plain"]
            metrics["val/reward_plain_after"] = after
            metrics["val/retention"] = (after - metrics["val/reward_plain"]) / gap if gap > 0 else float("nan")
        metrics["lessons/active"] = float(len(self.base.active()))
        metrics["lessons/tokens"] = float(self._block_tokens(self.base.active_texts()))
        metrics["tokens/sampled"] = float(self.sampled_tokens - tokens_before)
        metrics["tokens/sampled_total"] = float(self.sampled_tokens)
        self._save_base(i + 1)
        return metrics

    def _block_tokens(self, texts: Sequence[str]) -> int:
        """Prompt tokens the lessons add to one prompt (the chat markup of an added system message included)."""
        if not texts:
            return 0
        e = self.val_examples[0]
        plain = tokenize_batch(self.comp.tokenizer, [e], self.lesson_width, chat=self.comp.chat).mask.sum()
        with_ = tokenize_batch(self.comp.tokenizer, [inject_example(e, list(texts), self.inject_cfg)],
                               self.lesson_width, chat=self.comp.chat).mask.sum()
        return int(with_ - plain)

    def _reflect(self, i: int, examples: Sequence[Example], rolled: _Scored) -> list[tuple[str, dict]]:
        """Candidate lessons of round i with their evidence: (text, evidence)."""
        r = self.section.reflect
        contexts, evidence = [], []
        for c in range(int(r.contexts)):
            seed = ((int(self.cfg.seed) * 1009 + self.index) * 100003 + i) * 1009 + c
            picks = pick_attempts(rolled.rewards, int(r.attempts), seed)
            attempts = []
            for p, j in picks:
                ex, row = examples[p], p * self.n + j
                ok = bool(rolled.correct[p, j])
                attempts.append(Attempt(ex.prompt, rolled.texts[row], float(rolled.rewards[p, j]),
                                        "correct" if ok else f"wrong; the expected answer is {ex.answer}"))
            contexts.append(attempts)
            evidence.append({"context": c, "attempts": [
                {"prompt": prompt_text(a.prompt), "completion": a.completion, "reward": a.reward,
                 "feedback": a.feedback} for a in attempts]})
        fn, _ = self.reflector
        sampled = self.section.reflect.kind in ("policy", "model")
        out = []
        for c, texts in enumerate(fn(contexts, i, self.round_key(i, 1))):
            for text in texts:
                lesson = parse_lesson(text) if sampled else text.strip()
                if lesson:
                    out.append((lesson, {**evidence[c], "raw": text} if sampled else dict(evidence[c])))
        return out

    def _record(self, text: str, **fields) -> Lesson:
        """Adds a lesson to the base, or updates the record of one with the same text proposed before (its
        earlier verdicts kept in evidence["earlier"])."""
        lesson = Lesson.create(text, **fields)
        try:
            old = self.base.get(lesson.id)
        except KeyError:
            return self.base.add(lesson)
        earlier = list(old.evidence.get("earlier", [])) + [
            {"round": old.round, "status": old.status, "gain": old.gain, "ci": list(old.ci) if old.ci else None}]
        changes = {k: v for k, v in dataclasses.asdict(lesson).items() if k not in ("id", "text")}
        changes["evidence"] = {**lesson.evidence, "earlier": earlier}
        return self.base.replace(lesson.id, **changes)

    def _curate(self, i: int, params, candidates: list[tuple[str, dict]]) -> dict[str, float]:
        """Scores round i's candidates one after another against the base as it grows; returns the metrics."""
        s = self.section
        key = self.round_key(i, 2)
        budget, sim = int(s.base.token_budget), float(s.base.similarity)
        active = self.base.active_texts()
        without = self.validation_rewards(params, active, key)
        plain = without if not active else self.validation_rewards(params, [], key)
        counts = {"proposed": len(candidates), "kept": 0, "merged": 0, "rejected": 0, "evicted": 0}
        gains = []
        _, source = self.reflector
        for text, evidence in candidates:
            # what the base holds already: the lessons in the prompt or in the weights, and this round's verdicts
            held = [x for x in self.base.lessons if x.status in ("kept", "distilled")
                    or (x.round == i + 1 and x.status != "merged")]
            common = dict(round=i + 1, source=source, evidence=evidence, tokens=self.count_tokens(text))
            dup = near_duplicate(text, [x.text for x in held], sim)
            if dup is not None:
                counts["merged"] += 1
                if held[dup].text.strip() != text.strip():  # the same text again leaves no second record
                    self._record(text, status="merged", merged_into=held[dup].id,
                                 note=f"near-duplicate (similarity >= {sim}) of {held[dup].id}", **common)
                continue
            if common["tokens"] > budget:
                self._record(text, status="rejected", note=f"alone longer than base.token_budget={budget} tokens",
                             **common)
                counts["rejected"] += 1
                continue
            with_ = self.validation_rewards(params, self.base.active_texts() + [text], key)
            g = paired_gain(with_, without, float(s.score.confidence))
            keep, note = decide(g, float(s.score.min_gain))
            lesson = self._record(text, status="kept" if keep else "rejected", gain=g.mean, ci=(g.lo, g.hi), n=g.n,
                                  note=note, **common)
            if not keep:
                counts["rejected"] += 1
                continue
            counts["kept"] += 1
            gains.append(g.mean)
            self.base, evicted = fit_budget(self.base, budget)
            counts["evicted"] += len(evicted)
            if lesson.id in evicted:  # the lowest gain of all: not kept after all
                counts["kept"] -= 1
                gains.pop()
            without = with_ if not evicted else self.validation_rewards(params, self.base.active_texts(), key)
        out = {f"lessons/{k}": float(v) for k, v in counts.items()}
        out["lessons/gain_kept"] = float(np.mean(gains)) if gains else 0.0
        out["val/reward_plain"] = float(np.mean(plain))
        out["val/reward_lessons"] = float(np.mean(without))
        return out

    def _distill(self, i: int) -> dict[str, float]:
        """distill.steps updates towards the policy with the active lessons in its prompt; the lessons are then
        marked distilled (distill.drop_lessons)."""
        d, comp = self.section.distill, self.comp
        texts = self.base.active_texts()
        # a frozen snapshot of the policy (under LoRA the adapters copied, the frozen base shared)
        teacher = with_frozen(jnp_tree_copy(self.state.params), self.state.frozen)
        stacked = []
        for j in range(self.distill_steps):
            exs = next(self.distill_iterator)
            st, sm = self._encode(exs, [], self.width)
            tt, tm = self._encode(exs, texts, self.lesson_width)
            key = self.round_key(i, 3 + j)
            if d.samples == "student":
                ro = self.distill_sampler(self.model_params(), st, sm, key)
            else:
                ro = self.distill_sampler(teacher, tt, tm, key)
            self.sampled_tokens += int(np.sum(multihost.local_rows(ro.lengths)))
            batch = {"student_prompt_tokens": st, "student_prompt_mask": sm.astype(jnp.int32),
                     "teacher_prompt_tokens": tt, "teacher_prompt_mask": tm.astype(jnp.int32),
                     "completion_tokens": ro.tokens, "completion_mask": ro.mask}
            if self.update is None:
                self.update = jit_update(self.step_fn, self.state, batch, comp.env, aux_example=teacher)
            self.state, m = self.update(self.state, batch, self.round_key(i, 1000 + j), teacher)
            stacked.append(m)
        out = {f"distill/{k}" if not k.startswith("distill/") else k: float(v) for k, v in
               jax.device_get(step_metrics(jax.tree.map(lambda *x: jnp.stack(x), *stacked))).items()}
        if d.drop_lessons:  # the prompt tokens each call no longer spends on them
            out["lessons/prompt_tokens_saved"] = float(self._block_tokens(texts))
            for lesson in self.base.active():
                self.base.replace(lesson.id, status="distilled", note=f"{lesson.note}; distilled in round {i + 1}")
        return out

    # --------------------------------------------------------------------------- evaluation

    def evaluate(self) -> dict:
        if self.evaluator is None:
            return {}
        params = self.model_params()
        out = self.evaluator(params)
        if self.base.active_texts():
            out["eval/accuracy_with_lessons"] = self._accuracy_with(self.base.active_texts(), params)
        return out

    def _accuracy_with(self, texts: Sequence[str], params) -> float:
        """Held-out accuracy of `params` with `texts` in the prompts (one evaluator per set of lessons)."""
        texts = tuple(texts)
        ev = self._lesson_evaluators.get(texts)
        if ev is None:
            ev = make_evaluator(self.comp, self.lesson_width,
                                lambda exs: [inject_example(x, list(texts), self.inject_cfg) for x in exs])
            self._lesson_evaluators = {texts: ev}
        return ev(params)["eval/accuracy"]

    def close(self) -> None:
        self.scorer.close()


def memory(cfg, s, z) -> dict[str, int]:
    p, pl, n = int(s.max_prompt_len), lesson_prompt_len(s), int(s.sampling.max_new_tokens)
    t = {"params": z.params("policy"), "input_params": z.copy("policy")}
    rows = max(int(s.prompts_per_round) * int(s.group_size), int(s.score.num_prompts) * int(s.score.samples))
    t.update(z.rollout_terms(rows, max(int(s.prompts_per_round), int(s.score.num_prompts)), pl, n, s.sampling))
    d = s.distill
    if int(d.steps):
        trained = z.trained("policy")
        micro = z.rows(int(d.batch_size) // int(d.num_micro_batches))
        t.update({"reference": z.copy("policy"), "optimizer": z.optimizer(d.optimizer, trained),
                  "gradients": z.gradients(trained, int(d.num_micro_batches)),
                  "activations": z.activations(micro, p + n) + z.activations(micro, pl + n),
                  "logprob_chunks": 2 * z.head(micro, n, int(d.logprob_chunk), True)})
    return t | z.eval_terms(cfg, s)


KIND = StageKind("lessons", LessonsStage, lessons_stage, memory,
                 update_rows=lambda s: int(s.distill.batch_size), micro_batch_key="distill.num_micro_batches",
                 logprob_chunk_key="distill.logprob_chunk", algo=distill_config)
