"""Chain arithmetic: a multi-step task whose every step can be checked, for search and process reward models.

Prompt "12+7-3+9=", gold completion "12+7=19;19-3=16;16+9=25": one step
"x op y = z" per operation, x the running value, the steps separated by
`step_separator`, nothing after the last (EOS ends it). `Example.answer` is
the final value ("25"); `Example.meta` holds the chain (start, ops, operands,
values after each operation), the gold steps, their number ("n_steps", for
stratified evaluation) and the gold completion ("sft_target", what an SFT
warm start trains on instead of the bare answer).

Every intermediate value stays in min_value..max_value (default 0..99, each
a single token of the shipped tokenizer): at each step the (op, operand)
pair is drawn uniformly among those that keep the value in range, so no
chain is thrown away half-made (+0 always fits).

Grading has two independent parts:

* the answer: the number after the last "=" of the last step equals the
  final value (`extract_answer`, `is_correct`); skipped or garbled steps do
  not matter to it;
* the steps (`grade_steps`): step i is right iff it reads "x op y = z"
  (spaces allowed) with x the true value before operation i, op and y the
  prompt's i-th operation and z the true value after it. A step that carries
  an earlier mistake forward is wrong too, so `first_error` is where the
  solution first goes wrong. Steps beyond the last operation are wrong.

Splits: a problem belongs to "test" iff a stable hash of its prompt falls in
`test_fraction`; "train" rejects those, so the splits are disjoint whatever
the seeds and the difficulty. "test@steps=6" (or "train@...") draws the split
at another difficulty: its overrides replace the task's knobs for that call,
and the hash keeps the problems out of every train split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from typing import Callable

import numpy as np

from jaxrl_llm.tasks.base import Example, RewardInputs, RewardOutput, register_task, split_on_separator
from jaxrl_llm.tasks.wrong_answers import wrong_number

_OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                               "*": lambda a, b: a * b}
_STEP_RE = re.compile(r"(-?\d+)\s*([-+*])\s*(\d+)\s*=\s*(-?\d+)")
_INT_RE = re.compile(r"-?\d+")
# what a split string may change: "steps" sets min_steps and max_steps at once
_SPLIT_KEYS = ("steps", "min_steps", "max_steps", "max_operand", "min_start", "max_start", "min_value",
               "max_value", "operators")
_SPLIT_FORMS = "'train', 'test', or e.g. 'test@steps=6', 'test@max_operand=20', 'test@steps=5,max_operand=20'"


def _stable_fraction(problem: str) -> float:
    return int.from_bytes(hashlib.sha256(problem.encode()).digest()[:8], "little") / 2**64


@register_task("chain_arithmetic")
@dataclasses.dataclass(frozen=True)
class ChainArithmeticTask:
    """A chain of min_steps..max_steps operations on a running value, solved one step per operation.

    The start is drawn from min_start..max_start, each operand from 0..max_operand, each operator from
    `operators` ("+", "-", "*"); the running value stays in min_value..max_value. step_separator (";"
    by default; "\\n", "; " or any text without digits, operators or "=") stands between the steps.
    Reward: correct_score / wrong_score on the final answer (component "answer"), plus, when step_score
    is not 0, step_score times the fraction of steps that are right (component "steps", out of
    max(operations, steps written), so padding a solution with extra steps does not pay); the fraction
    itself is always reported as the diagnostic component "step_accuracy" (not added to the score).

    For chat models: `templates` (strings with {problem}, the chain without "=", e.g. "12+7-3+9", and
    optionally {separator}; one per problem, picked by a hash of it) make each prompt a user message, e.g. "Compute
    {problem} one operation per line, each written as a+b=c." with step_separator="\n". The splits do not
    change (they hash the plain chain).
    """

    min_steps: int = 2
    max_steps: int = 4
    max_operand: int = 9
    min_start: int = 0
    max_start: int = 20
    operators: tuple[str, ...] = ("+", "-")
    min_value: int = 0
    max_value: int = 99
    step_separator: str = ";"
    test_fraction: float = 0.1
    correct_score: float = 1.0
    wrong_score: float = 0.0
    step_score: float = 0.0
    templates: tuple[str, ...] = ()
    name: str = "chain_arithmetic"

    def __post_init__(self):
        object.__setattr__(self, "operators", tuple(self.operators))
        templates = (self.templates,) if isinstance(self.templates, str) else tuple(self.templates)
        object.__setattr__(self, "templates", templates)
        for t in templates:
            if not isinstance(t, str) or "{problem}" not in t:
                raise ValueError(f"chain_arithmetic: template {t!r} must be a string with {{problem}} (the chain, "
                                 "e.g. '12+7-3+9'); {separator} may name the step separator")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"chain_arithmetic: need 1 <= min_steps ({self.min_steps}) <= max_steps "
                             f"({self.max_steps})")
        if self.max_operand < 0:
            raise ValueError(f"chain_arithmetic: max_operand={self.max_operand}; operands are drawn from "
                             "0..max_operand, so it must be >= 0")
        if not self.min_value <= self.min_start <= self.max_start <= self.max_value:
            raise ValueError(f"chain_arithmetic: need min_value ({self.min_value}) <= min_start ({self.min_start}) "
                             f"<= max_start ({self.max_start}) <= max_value ({self.max_value})")
        bad = [op for op in self.operators if op not in _OPS]
        if bad or not self.operators:
            raise ValueError(f"chain_arithmetic: operators {self.operators!r}; each must be one of {sorted(_OPS)}")
        sep = self.step_separator
        if not isinstance(sep, str) or not sep or any(c.isdigit() or c in "+-*=" for c in sep):
            raise ValueError(f"chain_arithmetic: step_separator={sep!r}; it must be non-empty text without digits, "
                             "'+', '-', '*' or '=' (e.g. ';', '; ' or '\\n')")
        if not sep.strip() and "\n" not in sep:
            raise ValueError(f"chain_arithmetic: step_separator={sep!r} is spaces only, which cannot be told from "
                             "the spaces a step may contain; use ';', '; ' or '\\n'")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"chain_arithmetic: test_fraction={self.test_fraction} must be in (0, 1)")

    # ------------------------------------------------------------------ examples

    def _at_difficulty(self, split: str) -> tuple[str, "ChainArithmeticTask"]:
        """("train" | "test", the task with the split's overrides) for "test" or "test@key=value,...". """
        base, _, spec = split.partition("@")
        if base not in ("train", "test") or ("@" in split and not spec):
            raise ValueError(f"chain_arithmetic: split {split!r}; expected {_SPLIT_FORMS}")
        changes: dict = {}
        for item in spec.split(",") if spec else ():
            key, eq, value = (s.strip() for s in item.partition("="))
            if key not in _SPLIT_KEYS or not eq or key in changes:
                raise ValueError(f"chain_arithmetic: split {split!r}: {item.strip()!r} is not one key=value of "
                                 f"{', '.join(_SPLIT_KEYS)} (each once); expected {_SPLIT_FORMS}")
            if key != "operators":
                try:
                    value = int(value)
                except ValueError:
                    raise ValueError(f"chain_arithmetic: split {split!r}: {key}={value!r} is not an integer; "
                                     f"expected {_SPLIT_FORMS}") from None
            changes[key] = value
        if "steps" in changes:
            if "min_steps" in changes or "max_steps" in changes:
                raise ValueError(f"chain_arithmetic: split {split!r}: give steps or min_steps/max_steps, not both")
            changes["min_steps"] = changes["max_steps"] = changes.pop("steps")
        if "min_steps" in changes and "max_steps" not in changes:  # "test@min_steps=6" means 6 and up to it
            changes["max_steps"] = max(changes["min_steps"], self.max_steps)
        if "max_steps" in changes and "min_steps" not in changes:
            changes["min_steps"] = min(changes["max_steps"], self.min_steps)
        try:
            return base, dataclasses.replace(self, **changes)
        except ValueError as e:
            raise ValueError(f"chain_arithmetic: split {split!r} makes an invalid task: "
                             f"{str(e).removeprefix('chain_arithmetic: ')}") from None

    def examples(self, split: str, num: int, seed: int) -> list[Example]:
        """`num` chains of `split` ("train", "test", or either with difficulty overrides such as
        "test@steps=6,max_operand=20"), deterministic for (split, num, seed). Not deduplicated."""
        base, task = self._at_difficulty(split)
        want_test = base == "test"
        rng = random.Random(f"chain_arithmetic/{seed}/{split}")
        out, tries = [], 0
        while len(out) < num:
            tries += 1
            if tries > 1000 * num + 10_000:
                raise ValueError(f"chain_arithmetic: could not draw {num} {split!r} problems in {tries - 1} tries; "
                                 "the problem space is too small for the split: widen the steps/operand range "
                                 "or move test_fraction")
            start, ops, operands, values = task._draw(rng)
            prompt = f"{start}" + "".join(f"{op}{y}" for op, y in zip(ops, operands)) + "="
            if (_stable_fraction(prompt) < self.test_fraction) != want_test:
                continue
            steps = _steps(start, ops, operands, values)
            if self.templates:  # a chat prompt; the split is still decided by the plain chain's hash
                pick = self.templates[int(_stable_fraction("template/" + prompt) * len(self.templates))]
                text = pick.format(problem=prompt[:-1], separator=self.step_separator)
                prompt = [{"role": "user", "content": text}]
            out.append(Example(prompt=prompt, answer=str(values[-1]),
                               meta={"start": start, "ops": ops, "operands": operands, "values": values,
                                     "n_steps": len(ops), "steps": steps,
                                     "sft_target": self.step_separator.join(steps)}))
        return out

    def _draw(self, rng: random.Random) -> tuple[int, list[str], list[int], list[int]]:
        x = rng.randint(self.min_start, self.max_start)
        start, ops, operands, values = x, [], [], []
        for _ in range(rng.randint(self.min_steps, self.max_steps)):
            fits = [(op, y) for op in self.operators for y in range(self.max_operand + 1)
                    if self.min_value <= _OPS[op](x, y) <= self.max_value]
            op, y = rng.choice(fits)  # never empty: x + 0, x - 0 and x * 1 stay at x
            x = _OPS[op](x, y)
            ops.append(op)
            operands.append(y)
            values.append(x)
        return start, ops, operands, values

    # ------------------------------------------------------------------ steps

    def split_steps(self, completion: str) -> list[str]:
        """The completion's steps: split on `step_separator` (`base.split_on_separator`), each stripped; an
        empty step inside the completion stays (it is a wrong step), a trailing one is dropped."""
        return split_on_separator(completion, self.step_separator)

    def grade_steps(self, completion: str, example: Example) -> list[bool]:
        """One flag per step of `split_steps(completion)`: "x op y = z" with x the true value before the
        operation, op and y the prompt's operation, z the true value after it. Extra steps are wrong."""
        start, ops, operands, values = _chain(example)
        before = [start] + values[:-1]
        grades = []
        for i, step in enumerate(self.split_steps(completion)):
            m = _STEP_RE.fullmatch(step)
            grades.append(m is not None and i < len(ops)
                          and (int(m[1]), m[2], int(m[3]), int(m[4])) == (before[i], ops[i], operands[i], values[i]))
        return grades

    def first_error(self, completion: str, example: Example) -> int | None:
        """The index of the first wrong step; when every written step is right but some are missing, the
        index of the first missing one; None when the solution is right and complete."""
        grades = self.grade_steps(completion, example)
        wrong = [i for i, ok in enumerate(grades) if not ok]
        if wrong:
            return wrong[0]
        return None if len(grades) == len(_chain(example)[1]) else len(grades)

    # ------------------------------------------------------------------ verification

    def extract_answer(self, completion: str) -> str | None:
        """The integer after the last "=" of the last step, canonical ("07" -> "7"); None without one."""
        steps = self.split_steps(completion)
        if not steps or "=" not in steps[-1]:
            return None
        tail = steps[-1].rpartition("=")[2].strip()
        return str(int(tail)) if _INT_RE.fullmatch(tail) else None

    def is_correct(self, completion: str, example: Example) -> bool:
        """The final value is right, whatever the steps (`grade_steps` grades those)."""
        return self.extract_answer(completion) == example.answer

    def step_accuracy(self, completion: str, example: Example) -> float:
        """The fraction of steps that are right, out of max(operations, steps written)."""
        grades = self.grade_steps(completion, example)
        return sum(grades) / max(len(_chain(example)[1]), len(grades))

    def reward(self, inputs: RewardInputs) -> RewardOutput:
        correct = np.array([self.is_correct(c, e) for c, e in zip(inputs.completions, inputs.examples)], bool)
        answer = np.where(correct, self.correct_score, self.wrong_score).astype(np.float32)
        frac = np.array([self.step_accuracy(c, e) for c, e in zip(inputs.completions, inputs.examples)], np.float32)
        components, scores = {"answer": answer, "step_accuracy": frac}, answer
        if self.step_score:
            components["steps"] = (self.step_score * frac).astype(np.float32)
            scores = scores + components["steps"]
        return RewardOutput(scores=scores, components=components, correct=correct)

    # ------------------------------------------------------------------ preference pairs

    def preference_pair(self, example: Example, rng: random.Random) -> tuple[str, str]:
        """(gold solution, the solution with one step's result wrong and the mistake carried to the end):
        the result of a random step k is a near miss (`wrong_number`, kept in min_value..max_value when it
        can be), every later step computes correctly from it, so the steps before k are right and the
        final answer is wrong."""
        start, ops, operands, values = _chain(example)
        n = len(ops)
        for attempt in range(20):  # a later "*0" can erase a mistake; a mistake in the last step cannot vanish
            k = rng.randrange(n) if attempt < 19 else n - 1
            bad = int(wrong_number(str(values[k]), rng))
            if not self.min_value <= bad <= self.max_value and attempt < 19:
                continue
            wrong = values[:k] + [bad]
            for op, y in zip(ops[k + 1:], operands[k + 1:]):
                wrong.append(_OPS[op](wrong[-1], y))
            if wrong[-1] != values[-1]:
                break
        gold = self.step_separator.join(_steps(start, ops, operands, values))
        return gold, self.step_separator.join(_steps(start, ops, operands, wrong))


def _steps(start: int, ops: list[str], operands: list[int], values: list[int]) -> list[str]:
    """The step texts "x op y = z", x the value before each operation as `values` has it."""
    before = [start] + values[:-1]
    return [f"{x}{op}{y}={z}" for x, op, y, z in zip(before, ops, operands, values)]


def _chain(example: Example) -> tuple[int, list[str], list[int], list[int]]:
    m = example.meta
    try:
        return int(m["start"]), list(m["ops"]), [int(y) for y in m["operands"]], [int(v) for v in m["values"]]
    except KeyError as e:
        raise ValueError(f"chain_arithmetic: example {example.prompt!r} has no meta[{e.args[0]!r}]; grade examples "
                         "this task made (examples(), or a dataset built from them)") from None
