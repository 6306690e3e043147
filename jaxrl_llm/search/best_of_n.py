"""Best-of-N: sample N whole solutions per problem, pick one by a score or by a vote.

    cands = sample_candidates(sampler, params, prompt_tokens, prompt_mask, key)   # sampler with n_samples=N
    pick = choose("weighted_majority", answers=answers, scores=scores)            # [B] index into the N

Selection methods (`CHOICES`), each a pure function of per-candidate answers and scores ([B][N]):

* "score": the candidate with the highest score (a verifier, an outcome reward model, a PRM's aggregate over
  steps); ties go to the lower index.
* "majority": self-consistency (Wang et al. 2022): the most frequent extracted answer (None never wins unless
  every answer is None); ties go to the answer whose first sample comes first; the chosen candidate is that
  answer's first sample.
* "weighted_majority": each answer's votes weighted by its candidates' scores (Uesato et al. 2022; Li et al.
  2023); the chosen candidate is the best-scoring sample of the winning answer.

Cost: one sampler call (prompt prefilled once per problem, its KV cache repeated for the N samples) plus the
scorer; N times the tokens of one sample. The search result is a `SearchResult` with K = N candidates, like beam
search's, so every selection rule applies to every search method's candidates.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxrl_llm.errors import ConfigError
from jaxrl_llm.search.beam import SearchResult

CHOICES = ("score", "majority", "weighted_majority")


def sample_candidates(sampler: Callable, params: Any, prompt_tokens, prompt_mask, key: jax.Array,
                      scores: Any = None) -> SearchResult:
    """N samples per problem from a `rollout.make_sampler` sampler (its SamplingConfig.n_samples = N) as a
    `SearchResult` ([B, N] candidates); `scores` ([B * N] or [B, N]) may be filled in later by a scorer."""
    ro = jax.device_get(sampler(params, prompt_tokens, prompt_mask, key))
    b = int(np.shape(prompt_tokens)[0])
    n = ro.tokens.shape[0] // b
    shape = lambda a: np.asarray(a).reshape((b, n) + np.asarray(a).shape[1:])  # noqa: E731
    sc = np.zeros((b, n), np.float32) if scores is None else np.asarray(scores, np.float32).reshape(b, n)
    return SearchResult(tokens=shape(ro.tokens), lengths=shape(ro.lengths), scores=sc,
                        finished=shape(ro.finished), num_steps=np.zeros((b, n), np.int32),
                        logprob=shape(np.sum(ro.raw_logprobs, axis=-1)), best=np.zeros(b, np.int32),
                        generated_tokens=int(np.sum(ro.lengths)), rounds=1)


def _check(answers: Sequence[Sequence[Any]] | None, scores: Any, need_scores: bool, need_answers: bool):
    if need_answers and answers is None:
        raise ConfigError("a vote needs the candidates' answers (task.extract_answer of each completion)")
    if need_scores and scores is None:
        raise ConfigError("this selection needs the candidates' scores (a verifier, reward model or PRM)")
    if answers is not None and scores is not None:
        s = np.asarray(scores)
        if s.shape != (len(answers), len(answers[0]) if len(answers) else 0):
            raise ConfigError(f"scores have shape {s.shape}; expected one per answer "
                              f"({len(answers)}, {len(answers[0]) if len(answers) else 0})")


def best_by_score(scores: Any) -> np.ndarray:
    """[B] index of the highest score per problem (NaN never wins; ties: the lower index)."""
    s = np.asarray(scores, np.float64)
    return np.argmax(np.where(np.isnan(s), -np.inf, s), axis=-1).astype(np.int32)


def majority_vote(answers: Sequence[Sequence[Any]]) -> np.ndarray:
    """[B] index of the first sample of each problem's most frequent answer (None loses to any answer)."""
    out = np.zeros(len(answers), np.int32)
    for b, row in enumerate(answers):
        counts: dict[Any, int] = defaultdict(int)
        first: dict[Any, int] = {}
        for i, a in enumerate(row):
            if a is None:
                continue
            counts[a] += 1
            first.setdefault(a, i)
        if counts:
            out[b] = first[max(counts, key=lambda a: (counts[a], -first[a]))]
    return out


def weighted_majority(answers: Sequence[Sequence[Any]], scores: Any) -> np.ndarray:
    """[B] index of the best-scoring sample of the answer with the largest total score (None never wins
    unless every answer is None; then the best score)."""
    s = np.asarray(scores, np.float64)
    out = best_by_score(s)
    for b, row in enumerate(answers):
        total: dict[Any, float] = defaultdict(float)
        best: dict[Any, int] = {}
        for i, a in enumerate(row):
            if a is None or np.isnan(s[b, i]):
                continue
            total[a] += s[b, i]
            if a not in best or s[b, i] > s[b, best[a]]:
                best[a] = i
        if total:
            out[b] = best[max(total, key=lambda a: (total[a], -best[a]))]
    return out


def choose(method: str, answers: Sequence[Sequence[Any]] | None = None, scores: Any = None) -> np.ndarray:
    """[B] index of the chosen candidate by `method` (one of CHOICES)."""
    if method not in CHOICES:
        raise ConfigError(f"search selection {method!r}: expected one of {CHOICES}")
    _check(answers, scores, need_scores=method != "majority", need_answers=method != "score")
    if method == "score":
        return best_by_score(scores)
    if method == "majority":
        return majority_vote(answers)
    return weighted_majority(answers, scores)
