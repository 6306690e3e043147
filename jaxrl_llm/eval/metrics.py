"""Evaluation metrics over n sampled completions per prompt: pass@k, maj@k, mean reward, per-stratum tables.

    result = evaluate_samples(task, examples, completions_per_prompt, ks=(1, 4, 8), stratify_by="n_people")
    print(result.table())               # markdown: one row per n_people, then "all"
    result.to_json("runs/x/eval.json")  # metrics, strata and per-example records
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jaxrl_llm.tasks.base import Example, RewardInputs, RewardOutput, Task


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, arXiv 2107.03374, eq. 1):

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

    the probability that k samples drawn without replacement from the n contain a correct one. The
    product form (the paper's numpy snippet) avoids the huge binomials. Needs 0 <= c <= n, 1 <= k <= n.
    """
    n, c, k = int(n), int(c), int(k)
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n (k samples out of the n drawn), got n={n}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k_table(correct_matrix: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict[int, float]:
    """Mean over prompts of pass@k for each k; correct_matrix [P, n] (rows may differ in n)."""
    rows = [np.asarray(r, bool) for r in correct_matrix]
    if not rows:
        raise ValueError("pass_at_k_table: no prompts")
    out = {}
    for k in ks:
        short = [i for i, r in enumerate(rows) if len(r) < k]
        if short:
            raise ValueError(f"pass@{k} needs at least {k} samples per prompt; prompt {short[0]} has "
                             f"{len(rows[short[0]])}")
        out[int(k)] = float(np.mean([pass_at_k(len(r), int(r.sum()), k) for r in rows]))
    return out


def majority_vote(answers: Sequence[Any], is_equal: Callable[[Any, Any], bool] = operator.eq) -> int | None:
    """Index of the representative (first occurrence) of the most frequent answer; None if all are None.

    Answers are grouped greedily in order: each joins the first group whose representative it
    is_equal()s. None answers (unparseable) never vote. Ties go to the group whose representative
    appears first, so the result does not depend on hashing or on the order of a dict.
    """
    reps: list[int] = []
    counts: list[int] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for g, r in enumerate(reps):
            if is_equal(answers[r], a):
                counts[g] += 1
                break
        else:
            reps.append(i)
            counts.append(1)
    if not reps:
        return None
    best = max(range(len(reps)), key=lambda g: (counts[g], -reps[g]))
    return reps[best]


def maj_at_k(answers: Sequence[Sequence[Any]], golds: Sequence[Any], is_equal: Callable[[Any, Any], bool] = operator.eq,
             k: int | None = None) -> float:
    """Fraction of prompts whose majority answer over the first k samples is_equal()s the gold answer.

    answers [P][n]: extracted answers (None: unparseable); k=None uses all n. A prompt whose first
    k answers are all None counts as wrong. is_equal(answer, other) groups the votes and compares
    the winner with the gold (is_equal(winner, gold)).
    """
    if len(answers) != len(golds):
        raise ValueError(f"maj_at_k: {len(answers)} answer lists but {len(golds)} golds")
    hits = []
    for p, (row, gold) in enumerate(zip(answers, golds)):
        kk = len(row) if k is None else k
        if not 1 <= kk <= len(row):
            raise ValueError(f"maj@{kk} needs at least {kk} samples per prompt; prompt {p} has {len(row)}")
        win = majority_vote(row[:kk], is_equal)
        hits.append(win is not None and bool(is_equal(row[win], gold)))
    return float(np.mean(hits)) if hits else 0.0


@dataclasses.dataclass
class EvalResult:
    """metrics: "pass@1", "pass@k", "maj@k", "reward/mean", "prompts", "samples" over all prompts;
    strata: the same per value of Example.meta[stratify_by]; records: one dict per example."""

    task: str
    ks: tuple[int, ...]
    metrics: dict[str, float]
    strata: dict[Any, dict[str, float]]
    records: list[dict]
    stratify_by: str | None = None

    def to_dict(self) -> dict:
        return {"task": self.task, "ks": list(self.ks), "stratify_by": self.stratify_by, "metrics": self.metrics,
                "strata": {str(v): m for v, m in self.strata.items()}, "records": self.records}

    def to_json(self, path: str | os.PathLike) -> None:
        """Writes to_dict() as JSON (values JSON cannot hold, e.g. tuples in meta, become lists or strings)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, default=str)

    def table(self) -> str:
        """A markdown table: one row per stratum (sorted), then "all"."""
        cols = [c for c in self.metrics if c not in ("prompts", "samples")]
        head = [self.stratify_by or "", "prompts", "samples", *cols]
        rows = [[str(v), *self._cells(m, cols)] for v, m in self.strata.items()]
        rows.append(["all", *self._cells(self.metrics, cols)])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])

    @staticmethod
    def _cells(m: Mapping[str, float], cols: Sequence[str]) -> list[str]:
        return [str(int(m["prompts"])), str(int(m["samples"]))] + [f"{m[c]:.3f}" for c in cols]


def _summary(recs: list[dict], ks: Sequence[int]) -> dict[str, float]:
    m = {"prompts": float(len(recs)), "samples": float(sum(r["n"] for r in recs)),
         "pass@1": float(np.mean([r["n_correct"] / r["n"] for r in recs]))}
    for k in ks:
        m[f"pass@{k}"] = float(np.mean([r[f"pass@{k}"] for r in recs]))
    for k in ks:
        m[f"maj@{k}"] = float(np.mean([r[f"maj@{k}"] for r in recs]))
    m["reward/mean"] = float(np.mean([np.mean(r["rewards"]) for r in recs]))
    return m


def _sort_key(v: Any):
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def evaluate_samples(task: Task, examples: Sequence[Example], completions_per_prompt: Sequence[Sequence[str]],
                     ks: Sequence[int] = (1,), *, stratify_by: str | None = None, reward: Callable | None = None,
                     lengths: Sequence[Sequence[int]] | None = None, finished: Sequence[Sequence[bool]] | None = None,
                     max_new_tokens: int | None = None) -> EvalResult:
    """Scores n completions per example with the task: pass@1 (mean correctness), pass@k, maj@k, mean reward.

    Correctness is task.is_correct; maj@k votes over task.extract_answer of the first k samples
    (see majority_vote) and is right when the winning answer's first sample is correct. The reward is
    `reward` (a RewardFn, combine() result or HostRewardRunner) or task.reward, on all completions at
    once; pass lengths / finished ([P][n], from the sampler) and max_new_tokens for length-dependent
    terms — without them every completion counts as length 0 and finished. stratify_by: an
    Example.meta key (e.g. "n_people") giving one table row per value.
    """
    if len(examples) != len(completions_per_prompt):
        raise ValueError(f"evaluate_samples: {len(examples)} examples but {len(completions_per_prompt)} "
                         f"completion lists (one list per example)")
    if not examples:
        raise ValueError("evaluate_samples: no examples")
    ks = tuple(int(k) for k in ks)
    n_min = min((len(c) for c in completions_per_prompt), default=0)
    if n_min < max(ks, default=1):
        raise ValueError(f"ks={ks} needs at least {max(ks)} completions per prompt; the fewest is {n_min}")
    if stratify_by is not None:
        for i, ex in enumerate(examples):
            if stratify_by not in ex.meta:
                raise KeyError(f"stratify_by={stratify_by!r}, but example {i} has no such meta key "
                               f"(its meta keys: {sorted(ex.meta)})")
    flat = [c for cs in completions_per_prompt for c in cs]
    flat_ex = [ex for ex, cs in zip(examples, completions_per_prompt) for _ in cs]
    flat_len = np.zeros(len(flat), np.int32) if lengths is None else np.concatenate(
        [np.asarray(x, np.int32).reshape(-1) for x in lengths])
    flat_fin = np.ones(len(flat), bool) if finished is None else np.concatenate(
        [np.asarray(x, bool).reshape(-1) for x in finished])
    mnt = max_new_tokens if max_new_tokens is not None else int(flat_len.max(initial=0))
    out = (reward or task.reward)(RewardInputs(flat, flat_ex, flat_len, flat_fin, mnt))
    scores = np.asarray(out.scores if isinstance(out, RewardOutput) else out, np.float64)
    if scores.shape != (len(flat),):
        raise ValueError(f"the reward returned shape {scores.shape} for {len(flat)} completions")

    records, start = [], 0
    for i, (ex, cs) in enumerate(zip(examples, completions_per_prompt)):
        correct = [bool(task.is_correct(c, ex)) for c in cs]
        answers = [task.extract_answer(c) for c in cs]
        rec = {"index": i, "prompt": ex.prompt if isinstance(ex.prompt, str) else [dict(m) for m in ex.prompt],
               "gold": ex.answer, "meta": dict(ex.meta), "n": len(cs), "n_correct": int(sum(correct))}
        for k in ks:
            rec[f"pass@{k}"] = pass_at_k(len(cs), rec["n_correct"], k)
        for k in ks:
            win = majority_vote(answers[:k])
            rec[f"maj@{k}"] = win is not None and correct[win]
            rec[f"maj@{k}_answer"] = None if win is None else answers[win]
        rec.update(completions=list(cs), answers=answers, correct=correct,
                   rewards=scores[start:start + len(cs)].tolist())
        records.append(rec)
        start += len(cs)

    strata: dict[Any, dict[str, float]] = {}
    if stratify_by is not None:
        groups: dict[Any, list[dict]] = {}
        for r, ex in zip(records, examples):
            groups.setdefault(ex.meta[stratify_by], []).append(r)
        strata = {v: _summary(groups[v], ks) for v in sorted(groups, key=_sort_key)}
    return EvalResult(task=getattr(task, "name", type(task).__name__), ks=ks, metrics=_summary(records, ks),
                      strata=strata, records=records, stratify_by=stratify_by)
