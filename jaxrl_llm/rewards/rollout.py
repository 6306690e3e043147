"""Rewards of a rollout: the task's verifier inside jit, or its host reward on this process's rows.

    scorer = RolloutScorer(task, tokenizer, env, in_jit=True, timeout_s=30.0)
    rewards, correct, metrics = scorer(rollout, examples, n)   # [B*n] float32, [B*n] bool, host metrics
    scorer.close()

`examples` are this process's prompts, as fed to the sampler; a rollout row r of prompt i (rows are
prompt-major: prompt i owns rows i*n .. i*n+n-1) is scored against example i.

* in jit: a task with an in-jit reward (`tasks.InJitRewardTask`, e.g. arithmetic) scores the rollout's
  tokens on the device; its targets come from `task.encode_targets`. `in_jit=False`, or a task without one,
  scores on the host.
* on the host: this process's rows are decoded and handed, as `RewardInputs`, to the reward through
  `HostRewardRunner` (batched, time-limited, failures scored or raised as configured); the scores of every
  process are assembled into one global array.

A reward may be a Task (its `reward`, `correct` from its verdicts) or any reward function / combination
`rewards.combine` accepts (then `correct` is all False).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from jaxrl_llm.rewards.runner import HostRewardRunner
from jaxrl_llm.sharding import multihost
from jaxrl_llm.tasks.base import Example, RewardInputs, has_in_jit_reward
from jaxrl_llm.tokenizer import decode_completions, tokenizer_info

# Metrics every RL iteration computes on the device over all rows; the host reward's own versions (over this
# process's rows) are left out.
_ON_DEVICE = ("reward/mean", "reward/std", "reward/accuracy", "accuracy")


def rollout_examples(env, rollout, examples: Sequence[Example], n: int) -> list[Example]:
    """The example of each rollout row this process holds; `examples` are this process's prompts."""
    rows = rollout.tokens.shape[0]
    start, stop = multihost.row_range(rollout.tokens.sharding, rollout.tokens.shape)
    first = multihost.batch_rows(env, rows // n, (rollout.prompt_tokens.shape[1],)).start
    return [examples[r // n - first] for r in range(start, stop)]


def reward_inputs(tokenizer, rollout, examples: Sequence[Example], max_new_tokens: int) -> RewardInputs:
    """What host rewards score: this process's rollout rows, decoded; `examples` one per row."""
    tokens, mask = multihost.local_rows(rollout.tokens), multihost.local_rows(rollout.mask)
    return RewardInputs(decode_completions(tokenizer, tokens, mask), list(examples),
                        multihost.local_rows(rollout.lengths), multihost.local_rows(rollout.finished),
                        max_new_tokens)


class RolloutScorer:
    """Scores rollouts of `reward` (a Task or a reward function); see the module docstring.

    in_jit: use the task's in-jit reward when it has one (`InJitRewardTask`).
    timeout_s, on_error, error_score: the host runner's (see `HostRewardRunner`).

    After each call, `last_calls` / `last_failed` count the host reward's calls over every process and how
    many failed (raised, timed out, returned bad values); `last_failure` is this process's first failure
    message (None when none failed here); all 0 / None for an in-jit reward, which cannot fail.
    """

    last_calls = last_failed = 0
    last_failure: str | None = None

    def __init__(self, reward: Any, tokenizer, env, *, vocab_size: int | None = None, in_jit: bool = True,
                 timeout_s: float | None = 30.0, on_error: str = "score", error_score: float = 0.0):
        self.reward, self.tokenizer, self.env = reward, tokenizer, env
        info = tokenizer_info(tokenizer)
        self.in_jit = bool(in_jit) and has_in_jit_reward(reward)
        self.runner = None
        if self.in_jit:
            vocab = vocab_size if vocab_size is not None else info.vocab_size
            self.jax_reward = jax.jit(reward.jax_reward(tokenizer, vocab, tuple(info.eos_ids)))
        else:
            self.runner = HostRewardRunner(reward, timeout_s=timeout_s, on_error=on_error, error_score=error_score)

    def __call__(self, rollout, examples: Sequence[Example], n: int) -> tuple[jax.Array, jax.Array, dict]:
        """(rewards [R] float32, correct [R] bool, host metrics) of a rollout of n completions per prompt."""
        rows = rollout.tokens.shape[0]
        mine = rollout_examples(self.env, rollout, examples, n)
        g = lambda x: multihost.to_global(self.env, x, rows)  # noqa: E731
        if self.in_jit:
            targets, lengths = self.reward.encode_targets(mine)
            rewards = self.jax_reward(rollout.tokens, rollout.mask, g(targets), g(lengths))
            return rewards, rewards >= self.reward.correct_score, {}
        out = self.runner(reward_inputs(self.tokenizer, rollout, mine, rollout.tokens.shape[1]))
        self.last_calls = int(multihost.process_sum(self.runner.last_calls))
        self.last_failed = int(multihost.process_sum(self.runner.last_failed))
        self.last_failure = self.runner.last_failure
        correct = out.correct if out.correct is not None else np.zeros(len(out.scores), bool)
        extra = multihost.process_mean({k: v for k, v in out.metrics("reward").items() if k not in _ON_DEVICE})
        extra = {k: v * jax.process_count() if ("/errors/" in k or "/timeouts/" in k) else v  # counts: summed
                 for k, v in extra.items()}
        return g(np.asarray(out.scores, np.float32)), g(np.asarray(correct, bool)), extra

    @property
    def name(self) -> str:
        """The reward's name: its terms' names (a Task's is the task's name)."""
        if self.runner is not None:
            return ", ".join(t.name for t in self.runner.reward.terms)
        return getattr(self.reward, "name", type(self.reward).__name__)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None
