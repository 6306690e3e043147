"""Reflection: show a model some attempts with their rewards, ask for one general lesson, parse its answer.

    picks = pick_attempts(rewards_by_prompt, k=4, seed=round)           # [(prompt index, sample index), ...]
    attempts = [Attempt(examples[p].prompt, completions[p][s], rewards[p][s], feedback[p][s]) for p, s in picks]
    prompt = reflection_prompt(attempts)                                 # [{"role": "user", "content": ...}]
    lesson = parse_lesson(generated_text)                                # "Check the carry ..." or None

Lessons can also come from code instead of a model: `resolve_function("my_pkg.lessons:propose")` or
`resolve_function("experiments/lessons.py:propose")` gives a callable with the contract

    fn(attempts: list[Attempt], round: int) -> list[str]      # candidate lessons

and `fixed_lessons(texts)` makes one that always proposes the same hand-written texts.

Choosing attempts. A reflection learns most from contrast, so `pick_attempts` takes half of its k from the
highest rewards and half from the lowest (the odd one from the top), over all samples of all prompts; equal
rewards are ordered by a random permutation from numpy's default_rng(seed), so the choice is deterministic
for a seed and still varies between rounds.

Layering: imports only jaxrl_llm.errors and jaxrl_llm.tasks (Prompt).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import pathlib
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxrl_llm.errors import ConfigError
from jaxrl_llm.tasks.base import Prompt

PLACEHOLDER = "{attempts}"
MIN_WORDS = 3

REFLECTION_PROMPT = """Here are some attempts at tasks of one kind, each with the reward it got and feedback.

{attempts}

Think about what worked, what failed, and what should be done differently next time. Then write ONE short, \
general lesson (one sentence) that would help on new tasks of this kind. Do not mention the particular \
numbers or names of these tasks.

Lesson:"""


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One sampled completion: its prompt (text or messages), the completion, its reward, and feedback
    (e.g. "correct" or "wrong; expected 56"; "" for none)."""

    prompt: Prompt
    completion: str
    reward: float
    feedback: str = ""


def prompt_text(prompt: Prompt) -> str:
    """A text prompt itself; for messages, the content of the last user message (else of the last message)."""
    if isinstance(prompt, str):
        return prompt
    messages = list(prompt)
    if not messages:
        return ""
    user = [m for m in messages if m.get("role") == "user"]
    return str((user or messages)[-1].get("content", ""))


def render_attempts(attempts: Sequence[Attempt]) -> str:
    """The attempts, numbered from 1, separated by blank lines:

        Attempt 1 (reward 1):
        Task: 12+44=
        Answer: 56
        Feedback: correct
    """
    if not attempts:
        raise ValueError("render_attempts: no attempts; a reflection needs at least one")
    blocks = []
    for i, a in enumerate(attempts, start=1):
        lines = [f"Attempt {i} (reward {float(a.reward):.3g}):", f"Task: {prompt_text(a.prompt).strip()}",
                 f"Answer: {a.completion.strip()}"]
        if a.feedback:
            lines.append(f"Feedback: {a.feedback.strip()}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def reflection_prompt(attempts: Sequence[Attempt], template: str = REFLECTION_PROMPT, chat: bool = True) -> Prompt:
    """The template with {attempts} replaced by `render_attempts`: one user message when chat, else text.

    Only the literal "{attempts}" is replaced (other braces in the template stay as they are).
    """
    if PLACEHOLDER not in template:
        raise ValueError(f"reflection template has no {PLACEHOLDER} placeholder; put {PLACEHOLDER} where the "
                         "attempts should go")
    text = template.replace(PLACEHOLDER, render_attempts(attempts))
    return [{"role": "user", "content": text}] if chat else text


_PREFIX = re.compile(r"""^(?:\s+|[-*\u2022>#]+\s*|\d+[.)]\s+|\*\*|__|["'`\u201c\u201d\u2018\u2019]|"""
                     r"""(?:new\s+|general\s+)?lesson(?:\s*\d+)?\s*(?::|-|\u2013|\u2014|\.)\s*)""", re.IGNORECASE)
_SUFFIX = re.compile(r"""(?:\s+|\*\*|__|["'`\u201c\u201d\u2018\u2019])$""")
_SENTENCE = re.compile(r"^.+?[.!?](?=\s|$)")


def _strip(line: str) -> str:
    while True:
        new = _PREFIX.sub("", line, count=1)
        new = _SUFFIX.sub("", new, count=1)
        if new == line:
            return line
        line = new


def parse_lesson(text: str, max_chars: int = 300) -> str | None:
    """The lesson in a model's reply, or None when there is nothing useful.

    Strips leading "Lesson:" / "lesson -" / "Lesson 2:" cues, bullets, list numbers, markdown bold and quotes,
    and keeps the first line with text left. A line longer than max_chars is cut after its first sentence; if
    that is still longer, None. None too when fewer than 3 words remain.
    """
    for line in text.splitlines():
        line = _strip(line)
        if not line:
            continue
        if len(line) > max_chars:
            m = _SENTENCE.match(line)
            line = m.group(0).strip() if m else line
            if len(line) > max_chars:
                return None
        return line if len(line.split()) >= MIN_WORDS else None
    return None


def pick_attempts(rewards_by_prompt: Sequence[Any], k: int, seed: int) -> list[tuple[int, int]]:
    """k (prompt index, sample index) pairs for one reflection: ceil(k/2) of the highest rewards and floor(k/2)
    of the lowest, ties in random order from default_rng(seed); all of them when there are at most k.

    rewards_by_prompt: one 1-D array-like per prompt, the rewards of its samples. Returned sorted by
    (prompt, sample), so the attempts read in the data's order.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"pick_attempts: k={k!r}; expected an integer >= 1")
    pairs, rewards = [], []
    for p, row in enumerate(rewards_by_prompt):
        row = np.asarray(row, np.float64).reshape(-1)
        pairs += [(p, s) for s in range(row.size)]
        rewards += row.tolist()
    if len(pairs) <= k:
        return pairs
    r = np.asarray(rewards)
    if not np.all(np.isfinite(r)):
        raise ValueError("pick_attempts: non-finite reward (nan or inf); check the reward function")
    tiebreak = np.random.default_rng(seed).permutation(r.size)
    order = np.lexsort((tiebreak, -r))  # best first; equal rewards in the random order
    top = k - k // 2
    chosen = list(order[:top]) + list(order[r.size - k // 2:])
    return sorted(pairs[i] for i in chosen)


# --------------------------------------------------------------------------------------- lesson functions

LessonFn = Callable[[list[Attempt], int], list[str]]
_FORMS = "'package.module:name' or 'path/to/file.py:name'"


def _load_file(spec: str, path_text: str):
    path = pathlib.Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"lesson function {spec!r}: file {path_text!r} does not exist (relative paths are from "
                          f"{pathlib.Path.cwd()}); expected {_FORMS}")
    name = f"jaxrl_llm_lessons_{path.stem}_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ConfigError(f"lesson function {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def resolve_function(spec: str) -> LessonFn:
    """The callable named by "package.module:name" or "path/to/file.py:name" (name may be dotted: "Cls.make").

    Raises ConfigError naming the spec, what is missing (module, file or attribute) and the expected form.
    """
    if not isinstance(spec, str) or spec.count(":") < 1:
        raise ConfigError(f"lesson function {spec!r}: expected {_FORMS}")
    module_text, _, name = spec.rpartition(":")
    if not module_text or not name:
        raise ConfigError(f"lesson function {spec!r}: the {'module' if not module_text else 'name'} is empty; "
                          f"expected {_FORMS}")
    if module_text.endswith(".py") or "/" in module_text or "\\" in module_text:
        module = _load_file(spec, module_text)
    else:
        try:
            module = importlib.import_module(module_text)
        except ModuleNotFoundError as e:
            raise ConfigError(f"lesson function {spec!r}: no module named {e.name!r}; expected {_FORMS} with an "
                              "importable module (or the path of a .py file)") from None
        except Exception as e:
            raise ConfigError(f"lesson function {spec!r}: importing {module_text} failed: "
                              f"{type(e).__name__}: {e}") from e
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            near = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"lesson function {spec!r}: {module_text} has no attribute {part!r}{hint}; "
                              f"expected {_FORMS}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"lesson function {spec!r}: {name} is {type(obj).__name__}, not callable; it must be "
                          "fn(attempts: list[Attempt], round: int) -> list[str]")
    return obj


def call_lesson_function(fn: LessonFn, attempts: list[Attempt], round: int, name: str = "lesson function"
                         ) -> list[str]:
    """fn(attempts, round), checked: a list of strings (empty ones dropped); anything else is a ConfigError."""
    out = fn(list(attempts), round)
    if isinstance(out, str) or not isinstance(out, (list, tuple)) or not all(isinstance(t, str) for t in out):
        raise ConfigError(f"{name} returned {type(out).__name__} {str(out)[:80]!r}; it must return a list of "
                          "lesson strings (fn(attempts, round) -> list[str])")
    return [t.strip() for t in out if t.strip()]


def fixed_lessons(texts: Sequence[str]) -> LessonFn:
    """A lesson function that proposes the same hand-written texts every round."""
    if isinstance(texts, str):
        raise TypeError("fixed_lessons takes a list of lesson texts, not one string")
    texts = [t.strip() for t in texts]
    for i, t in enumerate(texts):
        if not t:
            raise ValueError(f"fixed_lessons: lesson {i} is empty; each lesson must be a non-empty string")

    def propose(attempts: list[Attempt], round: int) -> list[str]:
        return list(texts)

    propose.__name__ = propose.__qualname__ = "fixed_lessons"
    return propose
