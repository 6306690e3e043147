"""Evaluation: pass@k (unbiased), maj@k, and per-example / per-stratum results of n samples per prompt."""

from jaxrl_llm.eval.metrics import (EvalResult, evaluate_samples, maj_at_k, majority_vote, pass_at_k,
                                    pass_at_k_table)

__all__ = ["EvalResult", "evaluate_samples", "maj_at_k", "majority_vote", "pass_at_k", "pass_at_k_table"]
