"""Algorithms: functional losses, advantage estimators and pure jitted update steps.

    from jaxrl_llm.algos import grpo, ppo, dpo, sft, reward_model

One file per algorithm family; docs/algorithms.md gives every formula, knob,
default and the peers' defaults.
"""

from jaxrl_llm.algos import (advantages, aggregation, dpo, grpo, kl, logprobs, policy_loss, ppo, preference,
                             reward_model, sft, train_state)

__all__ = ["advantages", "aggregation", "dpo", "grpo", "kl", "logprobs", "policy_loss", "ppo", "preference",
           "reward_model", "sft", "train_state"]
