"""Evaluation: the held-out `Evaluator` (sample with the policy, score with the task), pass@k (unbiased),
maj@k, and per-example / per-stratum results of n samples per prompt."""

from jaxrl_llm.eval.evaluator import Evaluator, Generations
from jaxrl_llm.eval.metrics import (EvalResult, evaluate_samples, maj_at_k, majority_vote, pass_at_k,
                                    pass_at_k_table)

__all__ = ["EvalResult", "Evaluator", "Generations", "evaluate_samples", "maj_at_k", "majority_vote", "pass_at_k", "pass_at_k_table"]
