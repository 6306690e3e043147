"""Host-side rewards: composable terms (`combine`), shaping terms, and the time-limited `HostRewardRunner`.

    reward = combine(task, ("format", format_reward(r"<think>.*?</think>.*"), 0.5),
                     ("overlong", overlong_penalty(max_len=1024, cache_len=256), 1.0))
    with HostRewardRunner(reward, timeout_s=10.0, on_error="score") as runner:
        out = runner(inputs)              # RewardOutput: scores, components, correct, errors, timeouts

    scorer = RolloutScorer(task, tokenizer, env)  # a rollout's rewards: in jit when the task can, else on the host
    rewards, correct, metrics = scorer(rollout, examples, n)

See docs/tasks.md ("Rewards") for writing, composing and running reward functions.
"""

from jaxrl_llm.rewards.combine import CombinedReward, RewardError, Term, combine
from jaxrl_llm.rewards.rollout import RolloutScorer
from jaxrl_llm.rewards.runner import HostRewardRunner
from jaxrl_llm.rewards.shaping import format_reward, no_eos_penalty, overlong_penalty, repetition_penalty

__all__ = ["CombinedReward", "HostRewardRunner", "RewardError", "RolloutScorer", "Term", "combine", "format_reward",
           "no_eos_penalty", "overlong_penalty", "repetition_penalty"]
