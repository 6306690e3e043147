"""One RL iteration's data side: prompts -> rollout -> rewards -> a scored batch with masks and metrics.

    prompts = encode_prompts(tokenizer, env, examples, max_prompt_len, global_prompts)  # this process's examples
    exp = collect(sampler, params, prompts, key, scorer, n)                        # Experience
    exp.batch        # prompt_tokens, prompt_mask, completion_tokens, completion_mask, sampler_logprobs
    exp.rewards      # [B*n] float32; exp.correct [B*n] bool; exp.metrics: reward, accuracy, lengths, ...

What a stage does with it (old / reference log-probs, values, advantages, the update) is the algorithm's;
this part is the same for every RL stage (GRPO family, PPO) and for the benchmark that times it
(bench/ours_grpo.py), which passes `on_phase` to block on and time each phase.

Rows are prompt-major: prompt i owns rows i*n .. i*n+n-1. With `keep_groups_with_signal` (DAPO's dynamic
sampling) the completion mask of every group whose rewards are all equal is zeroed: those rows stay in the
batch (static shapes) but carry no loss. A NaN reward marks an unscored completion (an in-jit reward or a
reward model may give one; host rewards must be finite): the reward metrics use the scored ones and count
the others (`reward/unscored`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxrl_llm.algos.advantages import nonzero_std_groups
from jaxrl_llm.algos.logprobs import CONTEXT_KEY
from jaxrl_llm.data.iterator import tokenize_batch
from jaxrl_llm.rollout import Rollout
from jaxrl_llm.sharding import multihost
from jaxrl_llm.tasks.base import Example
from jaxrl_llm.tokenizer import decode_completions


class PromptBatch(NamedTuple):
    """A global batch of left-padded prompts and this process's examples behind its rows."""

    tokens: jax.Array        # int32 [B, P]
    mask: jax.Array          # bool [B, P]
    examples: list[Example]  # this process's prompts, in row order
    num_truncated: Any       # prompts cut to max_prompt_len, over all processes


def encode_prompts(tokenizer, env, examples: Sequence[Example], max_prompt_len: int, global_prompts: int,
                   chat: bool | None = None) -> PromptBatch:
    """This process's `examples` encoded (left-padded, over-long prompts keep their end) and assembled into
    the global [global_prompts, max_prompt_len] batch. chat=None: chat template for message-list prompts."""
    enc = tokenize_batch(tokenizer, examples, max_prompt_len, chat=chat)
    g = lambda x: multihost.to_global(env, x, global_prompts)  # noqa: E731
    return PromptBatch(g(enc.tokens), g(enc.mask), list(examples),
                       multihost.process_sum(enc.num_truncated))


@dataclasses.dataclass
class Experience:
    """A scored rollout: the training batch's data side, the rewards and what is logged about them."""

    batch: dict[str, jax.Array]
    rollout: Rollout
    examples: list[Example]
    rewards: jax.Array
    correct: jax.Array
    metrics: dict[str, Any]
    n: int
    step_rewards: jax.Array | None = None  # [B*n, N] multi-turn: the non-final turns' rewards at their last tokens

    def outcome(self) -> tuple[jax.Array, jax.Array | None]:
        """(outcome rewards [B*n], dense rewards [B*n, N] or None): for episodes the last turn's reward and the
        earlier turns' at their last tokens (they sum to `rewards`); else (rewards, None)."""
        if self.step_rewards is None:
            return self.rewards, None
        return self.rewards - jnp.sum(self.step_rewards, axis=-1), self.step_rewards

    def sample_records(self, env, tokenizer, task, k: int) -> list[dict]:
        """The first `k` rollout rows of this process as samples.jsonl records (prompt, completion, reward,
        correct); an episode's completion is its transcript (turns and observations)."""
        from jaxrl_llm.rewards.rollout import rollout_examples
        mine = rollout_examples(env, self.rollout, self.examples, self.n)
        k = min(k, len(mine))
        if CONTEXT_KEY in self.batch:
            from jaxrl_llm.envs.rollout import transcripts
            texts = transcripts(tokenizer, self.rollout.tokens, self.batch[CONTEXT_KEY], range(k))
            r, c = self.rewards[:k], self.correct[:k]
            return [{"prompt": mine[j].prompt, "completion": t, "reward": float(r[j]), "correct": bool(c[j])}
                    for j, t in enumerate(texts)]
        toks, mask = multihost.local_rows(self.rollout.tokens)[:k], multihost.local_rows(self.rollout.mask)[:k]
        texts = decode_completions(tokenizer, toks, mask)
        r = multihost.local_rows(self.rewards)[:k]
        return [{"prompt": mine[j].prompt, "completion": t, "reward": float(r[j]),
                 "correct": bool(task.is_correct(t, mine[j]))} for j, t in enumerate(texts)]


def collect(sampler: Callable, params, prompts: PromptBatch, key: jax.Array, scorer: Callable, n: int, *,
            keep_groups_with_signal: bool = False,
            on_phase: Callable[[str, Any], None] | None = None) -> Experience:
    """Samples n completions per prompt with `params`, scores them, builds the batch and its metrics.

    scorer: (rollout, examples, n) -> (rewards [B*n], correct [B*n], host metrics), e.g.
        `rewards.RolloutScorer`.
    on_phase(name, value): called after "generation" (the rollout) and "reward" (rewards and batch), e.g.
        to block on the value and time the phase; nothing else waits for the device here.
    """
    ro = sampler(params, prompts.tokens, prompts.mask, key)
    if on_phase is not None:
        on_phase("generation", ro)
    rewards, correct, extra = scorer(ro, prompts.examples, n)
    exp = scored(ro, prompts, rewards, correct, extra, n, keep_groups_with_signal=keep_groups_with_signal)
    if on_phase is not None:
        on_phase("reward", (rewards, exp.batch))
    return exp


def episode_experience(ep, prompts: PromptBatch, n: int, *, keep_groups_with_signal: bool = False) -> Experience:
    """An `Experience` of multi-turn episodes (`envs.rollout.Episodes`): the batch carries the context mask
    (observations attended, not trained) and the experience the per-turn rewards."""
    exp = scored(ep.rollout, prompts, jnp.asarray(ep.rewards), jnp.asarray(ep.correct), ep.metrics, n,
                 keep_groups_with_signal=keep_groups_with_signal, context_mask=ep.context_mask)
    exp.step_rewards = jnp.asarray(ep.step_rewards)
    obs = jnp.sum(ep.context_mask.astype(jnp.float32) - ep.rollout.mask.astype(jnp.float32), axis=-1)
    exp.metrics["episode/observation_tokens"] = jnp.mean(obs)
    return exp


def scored(ro: Rollout, prompts: PromptBatch, rewards, correct, extra: dict, n: int, *,
           keep_groups_with_signal: bool = False, context_mask: jax.Array | None = None) -> Experience:
    """The batch and metrics of a scored rollout (`collect`, `episode_experience`)."""
    mask = ro.mask
    metrics = {}
    if keep_groups_with_signal:
        keep = nonzero_std_groups(rewards, n)
        mask = mask * keep[:, None].astype(mask.dtype)
        metrics["groups_kept_fraction"] = jnp.mean(keep.astype(jnp.float32))
    batch = {"prompt_tokens": ro.prompt_tokens, "prompt_mask": ro.prompt_mask,
             "completion_tokens": ro.tokens, "completion_mask": mask, "sampler_logprobs": ro.raw_logprobs}
    if context_mask is not None:
        batch[CONTEXT_KEY] = context_mask
    lengths = ro.lengths.astype(jnp.float32)
    metrics.update({
        **reward_stats(rewards),
        "accuracy": jnp.mean(correct.astype(jnp.float32)),
        "response_length": jnp.mean(lengths), "response_length_max": jnp.max(lengths),
        "truncated_fraction": 1.0 - jnp.mean(ro.finished.astype(jnp.float32)),
        "response_tokens": jnp.sum(lengths), "decode_steps": ro.num_steps,
        "prompts_truncated": prompts.num_truncated,
    })
    metrics.update(extra)
    return Experience(batch, ro, prompts.examples, rewards, correct, metrics, n)


def reward_stats(rewards: jax.Array) -> dict[str, jax.Array]:
    """`reward/mean` and `reward/std` (population) over the scored completions, and `reward/unscored`: how many
    have a non-finite (NaN) reward, which the GRPO family gives advantage 0 (`grpo.compute_advantages`)."""
    r = jnp.asarray(rewards, jnp.float32)
    scored = jnp.isfinite(r)
    n = jnp.sum(scored.astype(jnp.float32))
    mean = jnp.sum(jnp.where(scored, r, 0.0)) / jnp.maximum(n, 1.0)
    var = jnp.sum(jnp.where(scored, jnp.square(r - mean), 0.0)) / jnp.maximum(n, 1.0)
    return {"reward/mean": mean, "reward/std": jnp.sqrt(var), "reward/unscored": r.size - n}


def step_metrics(stacked: dict) -> dict:
    """Per-update metrics of an epochs x minibatches run reduced to one value each (max for *_max keys)."""
    return {k: (jnp.max(v) if k.endswith("_max") else jnp.mean(v)) for k, v in stacked.items()}
