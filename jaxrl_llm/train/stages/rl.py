"""What every RL stage shares: prompts, the sampler, the reward scorer, the evaluator, sample logging.

One iteration of an RL stage (GRPO family, PPO):

    exp = self.experience(i, policy_params)      # train.experience.collect: prompts -> rollout -> rewards
    ...                                          # the algorithm: forwards, advantages, the update
    return self.iteration_metrics(i, exp, update_metrics)

The sampling temperature is the trainer's: the training forward divides logits by it, so the sampler's
raw log-probs and the trainer's agree (their difference is logged as mismatch_kl / mismatch_abs). An
algorithm config that sets another temperature is an error (`resolve_temperature`).

What every RL section is checked for before anything is built (`check_rl_section`, run by each kind's
`check_config`): iterations, prompts and lengths >= 1; the sampling keys in their ranges (`SamplingConfig`);
greedy sampling (temperature 0) with several completions per prompt is an error (they would be identical:
a group without reward variance learns nothing), as are top_k / top_p with greedy sampling (not read); the
reward keys (`HostRewardRunner.check_options`), and with an in-jit reward no non-default host-reward key
(`check_reward_data`).

While a stage trains, `RewardWatch` looks at every iteration's rewards:

* every call of a host reward failed in an iteration (raised, timed out, returned bad values): a warning,
  printed once per stage (later ones are counted);
* every group of completions (the whole batch with one completion per prompt) had identical rewards
  (zero variance: zero advantages) for ZERO_VARIANCE_PATIENCE = 5 iterations in a row: a warning, printed
  once per stage;
* every reward call of the first REWARD_FAILURE_ABORT = 3 iterations of the stage failed (or of all its
  iterations, when it has fewer), with no call succeeding: the stage stops with `errors.RewardFailureError`
  (exit code 9) naming the reward and its first failure. (Not with a trained reward model as the reward:
  the task's reward then only gives the accuracy.)

Warnings go to stderr as one `warning: ...` line, to the stage summary's `warnings` list (kind, message,
first_step, last_step, count; in summary.json and the checkpoints' meta) and to the metrics as
`warn/reward_calls_failed` (fraction of this iteration's host-reward calls) and `warn/zero_variance_streak`.
The watch's counters are in the checkpoints' meta: a resumed stage goes on counting where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mc

from jaxrl_llm.algos.aggregation import NORM_MODES
from jaxrl_llm.errors import RewardFailureError
from jaxrl_llm.rewards.rollout import RolloutScorer
from jaxrl_llm.rewards.runner import HostRewardRunner
from jaxrl_llm.rollout.sampling import SamplingConfig
from jaxrl_llm.tasks.base import Example
from jaxrl_llm.train.build import make_evaluator, prompt_iterator, stage_sampler
from jaxrl_llm.train.config import ConfigError, keyed, to_dataclass
from jaxrl_llm.train.experience import Experience, collect, encode_prompts
from jaxrl_llm.train.stage import Stage
from jaxrl_llm.train.stages.episodes import EpisodeRunner, check_env_section, env_for_task, has_env
from jaxrl_llm.train.stages.overlap import RolloutPipeline, check_overlap, overlap_section  # noqa: F401
from jaxrl_llm.train.validation import choice, flag, integer, record_warning, run_steps, short, unread

ZERO_VARIANCE_PATIENCE = 5  # iterations in a row with no reward variance in any group before the warning
REWARD_FAILURE_ABORT = 3    # iterations whose every reward call failed (and none succeeded before) that stop a stage


def sampling_section(max_new_tokens: int) -> mc.ConfigDict:
    """The `sampling` section of an RL stage."""
    return mc.ConfigDict(dict(max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                              split_layer_weights=True, cache_segments=4, slots=0))


def training_temperature(s: mc.ConfigDict) -> float:
    """The temperature the training forward divides logits by: the sampler's (1.0 when it samples greedily)."""
    t = float(s.sampling.temperature)
    return t if t > 0 else 1.0


def resolve_temperature(algo_section: mc.ConfigDict, s: mc.ConfigDict, where: str) -> tuple[dict, float]:
    """(the algo section as a dict without `temperature`, the training temperature). An explicit
    `algo.temperature` must equal the sampler's: one value, two keys would disagree silently otherwise."""
    data = algo_section.to_dict()
    given = data.pop("temperature", None)
    t = training_temperature(s)
    if given is not None and float(given) != t:
        raise ConfigError(f"{where}.algo.temperature={given} differs from the sampler's temperature "
                          f"{where}.sampling.temperature={s.sampling.temperature} (training uses {t}): the training "
                          f"forward divides logits by the sampling temperature; set {where}.sampling.temperature "
                          f"only (leave {where}.algo.temperature unset)")
    return data, t


def with_norm_length(loss, s: mc.ConfigDict):
    """`loss` (a PolicyLossConfig) with norm_length = sampling.max_new_tokens for the aggregations that divide
    by a constant length (`aggregation.NORM_MODES`) when it is unset: derived when the stage is built, so
    `--set <stage>.sampling.max_new_tokens=...` moves it too (an explicit value wins)."""
    if loss.loss_agg in NORM_MODES and loss.norm_length is None:
        return dataclasses.replace(loss, norm_length=float(s.sampling.max_new_tokens))
    return loss


def optional_temperature(algo: mc.ConfigDict) -> mc.ConfigDict:
    """An algo section whose `temperature` is unset (None: the sampler's)."""
    del algo["temperature"]
    algo.temperature = mc.FieldReference(None, field_type=float)
    return algo


def reward_section(**extra) -> mc.ConfigDict:
    """The `reward` section of an RL stage: the task's in-jit reward when it has one, else its host reward
    with a time limit (`rewards.RolloutScorer`)."""
    return mc.ConfigDict(dict(**extra, in_jit=True, timeout_s=30.0, on_error="score", error_score=0.0))


_HOST_REWARD_KEYS = ("timeout_s", "on_error", "error_score")


def check_rl_section(cfg: mc.ConfigDict, name: str, n: int, n_key: str) -> None:
    """The keys every RL section has (see the module docstring); `n` (>= 1) completions per prompt, set by
    `n_key`."""
    s, where = cfg[name], f"config.{name}"
    run_steps(s, "iterations", where, "RL iterations")
    integer(s.prompts_per_iter, f"{where}.prompts_per_iter", 1, means="prompts per iteration", example=32)
    integer(s.max_prompt_len, f"{where}.max_prompt_len", 1, means="prompt tokens", example=16)
    if s.get("num_train_examples") is not None:
        integer(s.num_train_examples, f"{where}.num_train_examples", 0,
                means="training prompts drawn from the task; 0 = 64 batches' worth", example=0)
    sampling = to_dataclass(SamplingConfig, s.sampling, f"{where}.sampling")
    if sampling.temperature == 0:
        if n > 1:
            raise ConfigError(
                f"{where}.sampling.temperature=0.0 (greedy) with {n_key}={n}: the {n} completions of each prompt "
                "would be identical (greedy decoding is deterministic), so their rewards never differ: a group "
                f"baseline leaves zero advantage (nothing is learned) and the repeats are wasted; set "
                f"{short(where)}.sampling.temperature > 0 (e.g. --set "
                f"{short(where)}.sampling.temperature=1.0) or {short(n_key)}=1")
        for key, default in (("top_k", 0), ("top_p", 1.0)):
            unread(s.sampling, key, f"{where}.sampling", default,
                   "with sampling.temperature=0.0 (greedy decoding takes the most likely token)")
    if s.get("lessons"):
        from jaxrl_llm.train.stages.lessons import check_lessons_from
        check_lessons_from(cfg, name)
    if s.get("env") is not None:
        check_env_section(cfg, name, int(s.sampling.max_new_tokens), f"{where}.sampling.max_new_tokens")
    r, rw = s.reward, f"{where}.reward"
    flag(r.in_jit, f"{rw}.in_jit")
    choice(r.on_error, f"{rw}.on_error", ("score", "abort"),
           means="a reward failure policy ('score': failed completions get error_score; 'abort': stop)")
    try:
        HostRewardRunner.check_options(r.timeout_s, r.on_error, r.error_score)
    except ValueError as e:
        raise ConfigError(keyed(str(e), _HOST_REWARD_KEYS, rw)) from None
    check_overlap(cfg, name)


def check_loss(loss, where: str) -> None:
    """Keys of a PolicyLossConfig (`where` = "config.<stage>.algo.loss") that its other keys leave unread."""
    d = type(loss)()
    if loss.loss_agg not in NORM_MODES:
        unread(loss, "norm_length", where, None, f"by loss_agg={loss.loss_agg!r} (only by {NORM_MODES})")
    if loss.kl_coef == 0:
        for key in ("kl_estimator", "kl_clamp", "kl_bias_correction"):
            unread(loss, key, where, getattr(d, key), "with kl_coef=0.0 (no KL term in the loss)")
    fn = f"by loss_fn={loss.loss_fn!r}"
    if loss.loss_fn != "clip":
        unread(loss, "dual_clip", where, d.dual_clip, f"{fn} (only by 'clip')")
    if loss.loss_fn == "sapo":
        for key in ("clip_eps_low", "clip_eps_high"):
            unread(loss, key, where, getattr(d, key), f"{fn} (its gate has no clip range; only 'clip' and "
                                                       "'cispo' read it)")
    else:
        for key in ("sapo_tau_pos", "sapo_tau_neg"):
            unread(loss, key, where, getattr(d, key), f"{fn} (only by 'sapo')")
    if loss.ratio_level != "sequence":
        unread(loss, "seq_log_ratio_clamp", where, None, f"by ratio_level={loss.ratio_level!r} (only by 'sequence')")


def check_divisible_rows(s: mc.ConfigDict, where: str, n: int, n_key: str, algo) -> None:
    """prompts_per_iter x n rollout rows split into num_minibatches x num_micro_batches equal parts."""
    rows, parts = int(s.prompts_per_iter) * n, algo.num_minibatches * algo.num_micro_batches
    if rows % parts:
        raise ConfigError(f"{where}.prompts_per_iter x {short(n_key)} = {s.prompts_per_iter} x {n} = {rows} rollout "
                          f"rows are not divisible by {where}.algo.num_minibatches x num_micro_batches = "
                          f"{algo.num_minibatches} x {algo.num_micro_batches} = {parts}; make prompts_per_iter a "
                          f"multiple of {parts // math.gcd(parts, n)} or change those counts")


def check_reward_data(cfg: mc.ConfigDict, name: str, task) -> None:
    """With the task's in-jit reward (reward.in_jit and a task that has one) the host-reward keys are not read."""
    from jaxrl_llm.tasks.base import has_in_jit_reward
    s, default = cfg[name], reward_section()
    if task is not None and s.reward.in_jit and has_in_jit_reward(task):
        for key in _HOST_REWARD_KEYS:
            unread(s.reward, key, f"config.{name}.reward", default[key],
                   f"with the in-jit reward of task {cfg.task.name!r} (it runs on the device and cannot fail or "
                   f"time out; reward.in_jit=False scores on the host, where {key} applies)")


class RewardWatch:
    """Watches each iteration's rewards for what is legal but suspicious (see the module docstring); keeps
    its warnings in `stage.summary["warnings"]` and returns per-iteration metrics."""

    STATE = ("zero_streak", "failing_iterations", "any_success", "calls", "failed")

    def __init__(self, stage: "RLStage", abort_on_failure: bool = True):
        self.stage, self.abort_on_failure = stage, abort_on_failure
        self.zero_streak = 0            # iterations in a row without reward variance
        self.failing_iterations = 0     # iterations in a row whose every reward call failed
        self.any_success = False        # some host reward call of this stage succeeded
        self.calls = self.failed = 0    # host reward calls of this stage, and the failed ones
        self.first_failure: str | None = None  # this process's first failure message (not checkpointed)

    def state(self) -> dict:
        """The counters, for the checkpoint's meta: a resumed stage watches on as if it had never stopped."""
        return {k: getattr(self, k) for k in self.STATE}

    def restore(self, state: dict | None) -> None:
        for k, v in (state or {}).items():
            if k in self.STATE:
                setattr(self, k, v)

    def warn(self, kind: str, step: int, message: str, detail: str = "") -> None:
        """A warning; `detail` (this process's own, e.g. a failure message) is printed, and kept in the summary
        only with one process (the summary, in the checkpoints' meta, is the same on every process)."""
        if detail and jax.process_count() == 1:
            message, detail = f"{message}. {detail}", ""
        record_warning(self.stage, kind, step, message, detail)

    def __call__(self, i: int, exp: Experience, zero_variance: jax.Array) -> dict[str, float]:
        stage, scorer, step = self.stage, self.stage.scorer, i + 1
        out: dict[str, float] = {}
        calls, failed = scorer.last_calls, scorer.last_failed
        if calls:
            out["warn/reward_calls_failed"] = failed / calls
            self.calls, self.failed = self.calls + calls, self.failed + failed
            if self.first_failure is None and scorer.last_failure:
                self.first_failure = scorer.last_failure.splitlines()[0].rstrip(".")
            if failed < calls:
                self.any_success = True
                self.failing_iterations = 0
            else:
                self.failing_iterations += 1
                first = scorer.last_failure.splitlines()[0].rstrip(".") if scorer.last_failure else "see the log"
                r = stage.section.reward
                self.warn("reward_all_failed", step,
                          f"every call of the reward {scorer.name!r} failed in this iteration ({failed} of {calls}); "
                          f"its completions got reward.error_score={r.error_score}", f"First failure: {first}")
                if self.abort_on_failure and not self.any_success and (
                        self.failing_iterations >= REWARD_FAILURE_ABORT or step == stage.total_steps):
                    raise RewardFailureError(
                        f"stage {stage.name!r}: every call of the reward function {scorer.name!r} failed in "
                        f"{self.failing_iterations} iteration(s) in a row from the stage's start ({self.failed} of "
                        f"{self.calls} calls), so the run learned nothing; the first failure: "
                        f"{self.first_failure or first}. Fix the reward function (its traceback is in the log "
                        "above) and run the same command again")
        if bool(jax.device_get(zero_variance)):
            self.zero_streak += 1
        else:
            self.zero_streak = 0
        out["warn/zero_variance_streak"] = float(self.zero_streak)
        if self.zero_streak == ZERO_VARIANCE_PATIENCE:
            groups = (f"every group of {exp.n} completions" if exp.n > 1
                      else "every completion of the batch")
            self.warn("zero_reward_variance", step,
                      f"for {ZERO_VARIANCE_PATIENCE} iterations in a row {groups} got identical rewards (reward "
                      f"mean {float(jax.device_get(jnp.nanmean(exp.rewards))):.4g}): the advantages are zero and "
                      "nothing is learned. The task may be too hard or too easy for the model, the reward "
                      "constant, or sampling.temperature too low")
        return out


def lengths_by_outcome(lengths: jax.Array, correct: jax.Array) -> dict[str, jax.Array]:
    """`response_length/correct` and `response_length/wrong`: the mean completion length (tokens) of the
    completions the task judged correct and of the others (NaN when there are none), to watch a length bias
    of the loss aggregation (Dr. GRPO, arXiv 2503.20783, section 3.1: under the per-sequence 1/|o| mean,
    wrong answers drift longer). With a reward that gives no verdicts every completion counts as wrong."""
    lengths, right = lengths.astype(jnp.float32), correct.astype(jnp.float32)
    n_right = jnp.sum(right)
    n_wrong = right.size - n_right
    return {"response_length/correct": jnp.where(n_right > 0, jnp.sum(lengths * right) / n_right, jnp.nan),
            "response_length/wrong": jnp.where(n_wrong > 0, jnp.sum(lengths * (1 - right)) / n_wrong, jnp.nan)}


def zero_variance(rewards: jax.Array, n: int) -> jax.Array:
    """bool scalar: no group of n completions (the whole batch when n == 1) has two different scored
    (finite) rewards; unscored (NaN) completions are left out."""
    r = rewards.reshape(-1, n) if n > 1 else rewards.reshape(1, -1)
    scored = jnp.isfinite(r)
    return jnp.all(jnp.max(jnp.where(scored, r, -jnp.inf), axis=-1) <= jnp.min(jnp.where(scored, r, jnp.inf), axis=-1))


class RLStage(Stage):
    """Base of the RL stages: `samples_per_prompt()` completions of each of `prompts_per_iter` prompts per
    iteration; `algo_config()` is the stage's resolved algorithm config (`self.algo`)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        s, comp = self.section, self.comp
        self.total_steps = int(s.iterations)
        self.algo = self.algo_config()
        self.n = int(self.samples_per_prompt())
        n_train = max(int(s.get("num_train_examples", 0)) or 0, int(s.prompts_per_iter) * 64)
        self.examples = comp.task.examples("train", n_train, self.cfg.seed)
        self.prompts = int(s.prompts_per_iter)  # the global batch of prompts, split over processes
        self.iterator = prompt_iterator(comp, self.examples, self.prompts, self.cfg.seed + self.index)
        self.sampling, self.sampler = stage_sampler(comp, s.sampling, self.n)
        self.scorer = RolloutScorer(comp.task, comp.tokenizer, comp.env, vocab_size=comp.model_cfg.vocab_size,
                                    in_jit=bool(s.reward.in_jit), timeout_s=float(s.reward.timeout_s),
                                    on_error=s.reward.on_error, error_score=float(s.reward.error_score))
        self.lessons = None  # (texts, InjectConfig) injected into every prompt (`lessons`), or None
        if s.get("lessons") and self.run is not None:  # (no run: the policy is only restored, e.g. to evaluate)
            from jaxrl_llm.train.stages.lessons import lessons_for
            self.lessons = lessons_for(self.cfg, self.name, self.run)
        self.evaluator = (make_evaluator(comp, s.max_prompt_len, self.with_lessons) if self.cfg.eval.every > 0
                          else None)
        self.episodes = None  # multi-turn episodes of `env` (train.stages.episodes), or single completions
        if has_env(s):
            self.episodes = EpisodeRunner(comp, s, f"config.{self.name}", self.sampling, self.n)
        self.watch = RewardWatch(self, abort_on_failure=s.reward.get("source", "task") == "task")
        # overlap.staleness > 0: rollouts run ahead of the updates (train/stages/overlap.py); None: on-policy
        self.pipeline = RolloutPipeline.for_stage(self)

    @classmethod
    def check_data(cls, cfg: mc.ConfigDict, name: str, task) -> None:
        check_reward_data(cfg, name, task)
        if task is not None and has_env(cfg[name]):
            env_for_task(task, cfg[name], f"config.{name}")

    def meta(self) -> dict:
        return self.overlap_meta({**super().meta(), "reward_watch": self.watch.state()})

    def overlap_meta(self, meta: dict) -> dict:
        """`meta` with the pipeline's state and its prompt position (the one before the pending rollouts, which
        read the iterator ahead); `meta` itself without a pipeline."""
        if self.pipeline is None:
            return meta
        return {**meta, "iterator": self.pipeline.iterator_state(), "overlap": self.pipeline.meta()}

    def restore(self, tree: dict, meta: dict) -> None:
        super().restore(tree, meta)
        self.watch.restore(meta.get("reward_watch"))

    def algo_config(self) -> Any:
        raise NotImplementedError

    def samples_per_prompt(self) -> int:
        raise NotImplementedError

    def experience(self, i: int, params, scorer=None, **kw) -> Experience:
        """Iteration i's prompts, sampled with `params` (key fold_in(stage key, i), 0) and scored."""
        examples = self.with_lessons(next(self.iterator))
        if self.episodes is not None:
            examples = self.episodes.prompts(examples)
        prompts = encode_prompts(self.comp.tokenizer, self.comp.env, examples, int(self.section.max_prompt_len),
                                 self.prompts, chat=self.comp.chat)
        if self.lessons is not None and self.lessons[0] and int(prompts.num_truncated):
            raise ConfigError(f"config.{self.name}.max_prompt_len={self.section.max_prompt_len}: "
                              f"{int(prompts.num_truncated)} prompt(s) with the injected lessons are longer (left "
                              "truncation would cut the lessons); raise it")
        key = jax.random.fold_in(jax.random.fold_in(self.key, i), 0)
        if self.episodes is not None:
            self.episodes.check_truncation(prompts, f"config.{self.name}.max_prompt_len")
            return self.episodes.experience(params, prompts, key, self.n, **kw)
        return collect(self.sampler, params, prompts, key, scorer or self.scorer, self.n, **kw)

    def evaluate(self) -> dict:
        """The held-out evaluation; with an environment also its greedy episodes (`eval/env/accuracy`)."""
        out = super().evaluate()
        if self.episodes is not None and self.evaluator is not None:
            out.update(self.episodes.evaluate(self.model_params(), self.evaluator.examples,
                                              int(self.section.max_prompt_len), int(self.cfg.seed) + 7919))
        return out

    def with_lessons(self, examples: list[Example]) -> list[Example]:
        """`examples` with the stage's lessons in their prompts (`lessons`; unchanged without)."""
        if self.lessons is None:
            return list(examples)
        from jaxrl_llm.lessons.inject import inject_example
        texts, inject_cfg = self.lessons
        return [inject_example(e, texts, inject_cfg) for e in examples]

    def update_key(self, i: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(self.key, i), 1)

    def iteration_metrics(self, i: int, exp: Experience, update_metrics: dict[str, Any]) -> dict[str, Any]:
        """The update's metrics and the experience's, the lengths of its correct and wrong completions
        (`lengths_by_outcome`), and `RewardWatch`'s (it looks at the rewards once the update is dispatched);
        samples to samples.jsonl every log.samples_every."""
        watched = self.watch(i, exp, zero_variance(exp.rewards, exp.n))
        if self.cfg.log.samples_every > 0 and (i + 1) % self.cfg.log.samples_every == 0:
            self.run.log_samples(self.name, i + 1, exp.sample_records(self.comp.env, self.comp.tokenizer,
                                                                      self.comp.task, self.cfg.log.num_samples))
        return {**update_metrics, **exp.metrics, **lengths_by_outcome(exp.rollout.lengths, exp.correct), **watched}

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
        self.scorer.close()
