"""Weighted sums of reward terms: `combine(("answer", fn, 1.0), ("format", format_reward(...), 0.5), task)`.

A term is a function `RewardInputs -> float [B]` (any array-like: a list of
floats, a numpy array), a function returning a `RewardOutput`, or a `Task`
(its `reward()` is the term, named `task.name`, and its `correct` becomes the
combined `correct`). The combined reward is itself a `RewardInputs ->
RewardOutput` callable:

    scores     = sum_j weight_j * term_j          (float32 [B])
    components = {name_j: term_j}                 (unweighted), plus "name_j/sub" for the
                 components of a term that returns a RewardOutput (for logging only)
    correct    = the task term's correct (or the term named by correct_from)

Every term's value is checked: one finite float per completion, or a
`RewardError` that names the term and shows what it returned. Called
directly, a combined reward runs its terms one after the other with no time
limit and raises on the first failure; `HostRewardRunner` runs the same
terms with a time limit per term and per chunk, and turns failures into
error scores or a `RewardError` as configured.
"""

from __future__ import annotations

import dataclasses
import math
import traceback
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jaxrl_llm.tasks.base import RewardInputs, RewardOutput, Task


class RewardError(RuntimeError):
    """A reward term failed (raised, timed out, or returned something other than B finite floats)."""


@dataclasses.dataclass(frozen=True)
class Term:
    """One reward term. fn is what is called (`task.reward` for a Task term); weight multiplies it in the sum."""

    name: str
    fn: Callable[[RewardInputs], Any]
    weight: float
    is_task: bool = False


@dataclasses.dataclass
class TermValue:
    """A term's value on some rows: scores float64 [b]; correct bool [b] or None; the term's own
    components/errors/timeouts when it returned a RewardOutput."""

    scores: np.ndarray
    correct: np.ndarray | None = None
    components: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    timeouts: dict[str, int] = dataclasses.field(default_factory=dict)


class BadReturn(Exception):
    """The function returned something that is not an array of numbers (message: what it returned)."""


def _describe(x: Any, limit: int = 200) -> str:
    r = repr(x)
    r = r if len(r) <= limit else r[:limit] + "..."
    return f"{type(x).__name__} {r}"


def _as_floats(x: Any) -> np.ndarray:
    if x is None:
        raise BadReturn("None (did the function forget to `return` its list of scores?)")
    if isinstance(x, (str, bytes, dict)):
        raise BadReturn(f"{_describe(x)}, not a sequence of numbers")
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise BadReturn(f"{_describe(x)}, which does not convert to floats ({e})") from None
    if a.ndim != 1:
        raise BadReturn(f"an array of shape {a.shape} ({_describe(x)}); expected one number per completion, shape [B]")
    return a


def normalize(result: Any) -> TermValue:
    """A term function's return value -> TermValue (raises BadReturn). Runs where the function ran
    (worker thread or process), so only arrays travel back."""
    if isinstance(result, RewardOutput):
        correct = None if result.correct is None else np.asarray(result.correct).astype(bool)
        return TermValue(_as_floats(result.scores), correct,
                         {k: np.asarray(v, np.float64) for k, v in result.components.items()},
                         dict(result.errors), dict(result.timeouts))
    return TermValue(_as_floats(result))


def execute(fn: Callable, inputs: RewardInputs) -> tuple:
    """Calls fn and catches everything: ("ok", TermValue) | ("bad", what it returned) | ("error", exc, traceback)."""
    try:
        result = fn(inputs)
    except (Exception, SystemExit) as e:  # SystemExit: a user's sys.exit() must not end a worker silently
        return ("error", f"{type(e).__name__}: {e}", traceback.format_exc())
    try:
        return ("ok", normalize(result))
    except BadReturn as e:
        return ("bad", str(e))


def check(name: str, value: TermValue, b: int) -> str | None:
    """None if value holds b finite floats (and b bools for correct), else what is wrong, naming the term."""
    if value.scores.shape[0] != b:
        return (f"reward term {name!r} returned {value.scores.shape[0]} values for a batch of {b} completions "
                f"({_describe(value.scores.tolist())}); a reward function must return one float per "
                f"entry of inputs.completions")
    bad = np.flatnonzero(~np.isfinite(value.scores))
    if bad.size:
        return (f"reward term {name!r} returned non-finite values at rows {bad[:10].tolist()} "
                f"({value.scores[bad[:10]].tolist()}); rewards must be finite floats")
    if value.correct is not None and value.correct.shape != (b,):
        return f"reward term {name!r} returned `correct` of shape {value.correct.shape}; expected ({b},)"
    return None


def failure_message(name: str, outcome: tuple, b: int) -> str:
    """The message for a failed ("error" / "bad") outcome of term `name` on b completions."""
    if outcome[0] == "error":
        return (f"reward term {name!r} raised {outcome[1]} (on a batch of {b} completions).\n"
                f"Traceback from the reward function:\n{outcome[2].rstrip()}")
    return f"reward term {name!r} returned {outcome[1]}; a reward function must return one float per completion"


def _as_term(t: Any) -> Term:
    if isinstance(t, Term):
        return t
    if isinstance(t, Task):
        return Term(t.name, t.reward, 1.0, is_task=True)
    if isinstance(t, tuple) and len(t) in (2, 3) and isinstance(t[0], str):
        name, fn, weight = t if len(t) == 3 else (*t, 1.0)
        is_task = isinstance(fn, Task)
        fn = fn.reward if is_task else fn
        if not callable(fn):
            raise TypeError(f"reward term {name!r}: {_describe(fn)} is not callable; expected a function "
                            f"RewardInputs -> float [B] or a Task")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise TypeError(f"reward term {name!r}: weight must be a finite number, got {_describe(weight)}")
        return Term(name, fn, float(weight), is_task)
    if callable(t):
        name = getattr(t, "__name__", None)
        return Term(name if name and name != "<lambda>" else "reward", t, 1.0)
    raise TypeError(f"cannot use {_describe(t)} as a reward term; a term is (name, fn, weight), (name, fn), "
                    f"a Task, or a function RewardInputs -> float [B]")


class CombinedReward:
    """sum_j weight_j * term_j; see the module docstring. Picklable when its terms are."""

    def __init__(self, terms: Sequence[Term], correct_from: str | None = None):
        self.terms = list(terms)
        names = [t.name for t in self.terms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"reward term names must be unique; {dup} appear more than once: {names}")
        if correct_from is None:
            tasks = [t.name for t in self.terms if t.is_task]
            if len(tasks) > 1:
                raise ValueError(f"several Task terms {tasks}: say which one decides `correct` with "
                                 f"combine(..., correct_from=NAME)")
            correct_from = tasks[0] if tasks else None
        elif correct_from not in names:
            raise ValueError(f"correct_from={correct_from!r} is not a term; terms: {names}")
        self.correct_from = correct_from

    def __repr__(self) -> str:
        return "combine(" + ", ".join(f"({t.name!r}, {t.weight:g})" for t in self.terms) + ")"

    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        b = len(inputs)
        values = {}
        for t in self.terms:
            outcome = execute(t.fn, inputs)
            if outcome[0] != "ok":
                raise RewardError(failure_message(t.name, outcome, b))
            problem = check(t.name, outcome[1], b)
            if problem:
                raise RewardError(problem)
            values[t.name] = outcome[1]
        return self.assemble(values, b)

    def assemble(self, values: Mapping[str, TermValue], b: int, errors: Mapping[str, int] | None = None,
                 timeouts: Mapping[str, int] | None = None) -> RewardOutput:
        """Weighted sum of checked term values (one per term, each over all b rows)."""
        scores = np.zeros((b,), np.float64)
        components, errs, tos = {}, dict(errors or {}), dict(timeouts or {})
        for t in self.terms:
            v = values[t.name]
            scores += t.weight * v.scores
            components[t.name] = v.scores.astype(np.float32)
            for sub, arr in v.components.items():
                components[f"{t.name}/{sub}"] = np.asarray(arr, np.float32)
            for sub, n in v.errors.items():
                errs[f"{t.name}/{sub}"] = errs.get(f"{t.name}/{sub}", 0) + n
            for sub, n in v.timeouts.items():
                tos[f"{t.name}/{sub}"] = tos.get(f"{t.name}/{sub}", 0) + n
        correct = None
        if self.correct_from is not None and values[self.correct_from].correct is not None:
            correct = np.asarray(values[self.correct_from].correct, bool)
        return RewardOutput(scores.astype(np.float32), components, correct, errs, tos)


def combine(*terms: Any, correct_from: str | None = None) -> CombinedReward:
    """Builds a weighted sum of reward terms.

        def my_reward(inp):
            return [1.0 if "42" in c else 0.0 for c in inp.completions]

        reward = combine(("answer", my_reward, 1.0), ("format", format_reward(r"<think>.*</think>", mode="search"), 0.5))
        out = reward(inputs)      # RewardOutput; out.components["format"] is the unweighted format term

    Each term is (name, fn, weight), (name, fn) (weight 1), a Task (named task.name, weight 1; its
    `correct` is the combined `correct`), or a bare function (named by its __name__, weight 1).
    correct_from names the term whose `correct` to use when there are several Task terms.
    """
    if not terms:
        raise ValueError("combine() needs at least one term, e.g. combine(('answer', my_reward, 1.0))")
    return CombinedReward([_as_term(t) for t in terms], correct_from=correct_from)
