"""What every RL stage shares: prompts, the sampler, the reward scorer, the evaluator, sample logging.

One iteration of an RL stage (GRPO family, PPO):

    exp = self.experience(i, policy_params)      # train.experience.collect: prompts -> rollout -> rewards
    ...                                          # the algorithm: forwards, advantages, the update
    return self.iteration_metrics(i, exp, update_metrics)

The sampling temperature is the trainer's: the training forward divides logits by it, so the sampler's
raw log-probs and the trainer's agree (their difference is logged as mismatch_kl / mismatch_abs). An
algorithm config that sets another temperature is an error (`resolve_temperature`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections as mc

from jaxrl_llm.algos.aggregation import NORM_MODES
from jaxrl_llm.rewards.rollout import RolloutScorer
from jaxrl_llm.train.build import make_evaluator, prompt_iterator, stage_sampler
from jaxrl_llm.train.config import ConfigError
from jaxrl_llm.train.experience import Experience, collect, encode_prompts
from jaxrl_llm.train.stage import Stage


def sampling_section(max_new_tokens: int) -> mc.ConfigDict:
    """The `sampling` section of an RL stage."""
    return mc.ConfigDict(dict(max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                              split_layer_weights=True, cache_segments=4))


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
        self.evaluator = make_evaluator(comp, s.max_prompt_len) if self.cfg.eval.every > 0 else None

    def algo_config(self) -> Any:
        raise NotImplementedError

    def samples_per_prompt(self) -> int:
        raise NotImplementedError

    def experience(self, i: int, params, scorer=None, **kw) -> Experience:
        """Iteration i's prompts, sampled with `params` (key fold_in(stage key, i), 0) and scored."""
        examples = next(self.iterator)
        prompts = encode_prompts(self.comp.tokenizer, self.comp.env, examples, int(self.section.max_prompt_len),
                                 self.prompts, chat=self.comp.chat)
        key = jax.random.fold_in(jax.random.fold_in(self.key, i), 0)
        return collect(self.sampler, params, prompts, key, scorer or self.scorer, self.n, **kw)

    def update_key(self, i: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(self.key, i), 1)

    def iteration_metrics(self, i: int, exp: Experience, update_metrics: dict[str, Any]) -> dict[str, Any]:
        """The update's metrics and the experience's; samples to samples.jsonl every log.samples_every."""
        if self.cfg.log.samples_every > 0 and (i + 1) % self.cfg.log.samples_every == 0:
            self.run.log_samples(self.name, i + 1, exp.sample_records(self.comp.env, self.comp.tokenizer,
                                                                      self.comp.task, self.cfg.log.num_samples))
        return {**update_metrics, **exp.metrics}

    def close(self) -> None:
        self.scorer.close()
