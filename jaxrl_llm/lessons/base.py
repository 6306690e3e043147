"""Lessons: short texts learned by reflection, the base that keeps them, and the test that decides which stay.

    base = LessonBase.load("run/lessons.json")          # or a .txt file: one hand-written lesson a line
    base.add(Lesson.create("Carry the one when a column sums past 9.", round=3, source="policy", tokens=14))
    g = paired_gain(with_lesson_rewards, without_rewards, confidence=0.9)   # one mean reward per prompt each
    keep, note = decide(g, min_gain=0.0)
    base.replace(lesson_id, status="kept" if keep else "rejected", gain=g.mean, ci=(g.lo, g.hi), n=g.n, note=note)
    base, evicted = fit_budget(base, budget=256)         # the lowest-gain kept lessons leave first
    base.save("run/lessons.json")

A lesson's life: proposed ("candidate"), then measured on paired prompts and "kept" or "rejected"; a kept one
may later be "merged" into a near duplicate (`merged_into` names it), "evicted" to fit the token budget, or
"distilled" into the weights. Only "kept" lessons are active: they are what is injected into prompts.

Paired gain. The same n prompts are answered with and without the lesson; r_with_i and r_without_i are each
the mean reward over prompt i's samples. With d_i = r_with_i - r_without_i:

    mean = (1/n) sum_i d_i,   std = sqrt(sum_i (d_i - mean)^2 / (n - 1)),
    [lo, hi] = mean -/+ t_{(1+c)/2, n-1} * std / sqrt(n)      (two-sided Student-t interval, confidence c)

A lesson is kept iff lo > min_gain (and mean > 0): its effect is positive with confidence (1+c)/2 one-sided.
When std is 0 (every d_i equal, or n == 1, where no spread can be estimated) the interval is (mean, mean):
decide's `min_n` is how a caller refuses to keep a lesson measured on too few prompts.

The file is plain JSON that a person can read and edit: {"version", "token_budget", "lessons": [...]}, each
lesson's "text" first. An entry needs only "text"; every other field has a default (id: the hash of the text,
status "kept", source "file"), so a hand-added lesson is one line. Editing a lesson's text keeps its id.

Layering: imports only jaxrl_llm.errors and jaxrl_llm.records (json_type, for messages).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import pathlib
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxrl_llm.errors import DataError
from jaxrl_llm.records import json_type

STATUSES = ("candidate", "kept", "rejected", "merged", "evicted", "distilled")
SOURCES = ("fixed", "function:<name>", "policy", "model:<path>", "file")
TEXT_SUFFIXES = (".txt",)
_FIELDS = ("text", "id", "status", "round", "source", "gain", "ci", "n", "tokens", "merged_into", "note", "evidence")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]\s+)")


def normalise(text: str) -> str:
    """Lowercased, punctuation replaced by spaces, whitespace collapsed: the form ids and similarity use."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def lesson_id(text: str) -> str:
    """A stable short id: the first 12 hex digits of the SHA-1 of the normalised text."""
    return hashlib.sha1(normalise(text).encode("utf-8")).hexdigest()[:12]


def _valid_source(source: Any) -> bool:
    if not isinstance(source, str):
        return False
    if source in ("fixed", "policy", "file"):
        return True
    kind, _, rest = source.partition(":")
    return kind in ("function", "model") and bool(rest)


@dataclasses.dataclass(frozen=True)
class Lesson:
    """One lesson and what is known about it.

    id: `lesson_id(text)` when it was made. text: the lesson, one sentence.
    status: one of STATUSES. round: the round it was proposed in.
    source: "fixed", "function:<name>", "policy", "model:<path>" or "file".
    evidence: what the reflection looked at (prompts, rewards, ...), JSON-able.
    gain: mean paired reward difference (None: not measured). ci: its (lo, hi) interval. n: paired prompts.
    tokens: token count of the text. merged_into: the id of the lesson it was merged into.
    note: why it was kept, rejected, evicted or merged.
    """

    id: str
    text: str
    status: str = "candidate"
    round: int = 0
    source: str = "file"
    evidence: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    gain: float | None = None
    ci: tuple[float, float] | None = None
    n: int = 0
    tokens: int = 0
    merged_into: str | None = None
    note: str = ""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"lesson {self.id}: unknown status {self.status!r}; allowed: {', '.join(STATUSES)}")

    @classmethod
    def create(cls, text: str, **fields) -> "Lesson":
        """A lesson whose id is the hash of its (stripped) text."""
        text = text.strip()
        if not text:
            raise ValueError("lesson text is empty; a lesson is one non-empty sentence")
        return cls(id=lesson_id(text), text=text, **fields)

    def to_json(self) -> dict:
        """Fields in a fixed order, text first; evidence with its keys sorted."""
        d = {f: getattr(self, f) for f in _FIELDS}
        d["ci"] = list(self.ci) if self.ci is not None else None
        d["evidence"] = json.loads(json.dumps(dict(self.evidence), sort_keys=True))
        return d

    @classmethod
    def from_json(cls, d: Any, where: str = "lesson") -> "Lesson":
        """Checks every field; a bad one raises DataError naming `where`, the field and how to fix it."""
        if not isinstance(d, Mapping):
            raise DataError(f"{where}: is {json_type(d)}, expected an object "
                            '{"text": "...", "status": "kept", ...}')
        unknown = sorted(set(d) - set(_FIELDS))
        if unknown:
            near = difflib.get_close_matches(unknown[0], _FIELDS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise DataError(f"{where}: unknown field {unknown[0]!r}{hint}; a lesson's fields are {', '.join(_FIELDS)}")
        text = d.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}.text: is {json_type(text) if 'text' in d else 'missing'}; every lesson needs "
                            '"text": a non-empty string')
        where = f"{where} ({_snippet(text)})"

        def bad(field: str, expected: str):
            return DataError(f"{where}.{field}: is {json_type(d[field])} ({json.dumps(d[field])[:60]}); "
                             f"expected {expected}")

        def integer(field: str, default: int) -> int:
            v = d.get(field, default)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad(field, "an integer >= 0")
            return v

        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        status = d.get("status", "kept")
        if status not in STATUSES:
            near = difflib.get_close_matches(str(status), STATUSES, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise DataError(f"{where}.status: unknown status {json.dumps(status)}{hint}; "
                            f"allowed: {', '.join(STATUSES)}")
        lid = d.get("id", lesson_id(text))
        if not isinstance(lid, str) or not lid:
            raise bad("id", "a non-empty string (delete the field to use the hash of the text)")
        source = d.get("source", "file")
        if not _valid_source(source):
            raise bad("source", f"one of {', '.join(SOURCES)}")
        evidence = d.get("evidence", {})
        if not isinstance(evidence, Mapping):
            raise bad("evidence", "an object ({} when there is none)")
        gain = d.get("gain")
        if gain is not None and not number(gain):
            raise bad("gain", "a finite number, or null when not measured")
        ci = d.get("ci")
        if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(number(x) for x in ci)
                                   and ci[0] <= ci[1]):
            raise bad("ci", "[lo, hi] with lo <= hi, or null when not measured")
        merged_into = d.get("merged_into")
        if merged_into is not None and (not isinstance(merged_into, str) or not merged_into):
            raise bad("merged_into", "the id of another lesson, or null")
        note = d.get("note", "")
        if not isinstance(note, str):
            raise bad("note", "a string")
        return cls(id=lid, text=text.strip(), status=status, round=integer("round", 0), source=source,
                   evidence=dict(evidence), gain=None if gain is None else float(gain),
                   ci=None if ci is None else (float(ci[0]), float(ci[1])), n=integer("n", 0),
                   tokens=integer("tokens", 0), merged_into=merged_into, note=note)


def _snippet(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return json.dumps(text if len(text) <= width else text[:width - 3] + "...")


@dataclasses.dataclass
class LessonBase:
    """An ordered list of lessons, the base's version and its token budget (0: no limit).

    `add` and `replace` change the base in place; `fit_budget` returns a new one. The caller bumps `version`
    when a round changes the base.
    """

    lessons: list[Lesson] = dataclasses.field(default_factory=list)
    version: int = 0
    token_budget: int = 0

    def __len__(self) -> int:
        return len(self.lessons)

    def __iter__(self) -> Iterator[Lesson]:
        return iter(self.lessons)

    def active(self) -> list[Lesson]:
        """The kept lessons, in order: what is injected into prompts."""
        return [les for les in self.lessons if les.status == "kept"]

    def active_texts(self) -> list[str]:
        return [les.text for les in self.active()]

    def tokens(self) -> int:
        """Tokens of the active lessons' texts."""
        return sum(les.tokens for les in self.active())

    def index(self, lesson_id: str) -> int:
        for i, les in enumerate(self.lessons):
            if les.id == lesson_id:
                return i
        raise KeyError(f"no lesson with id {lesson_id!r} in the base ({len(self.lessons)} lessons)")

    def get(self, lesson_id: str) -> Lesson:
        return self.lessons[self.index(lesson_id)]

    def add(self, lesson: Lesson) -> Lesson:
        """Appends a lesson; one whose id is already there raises ValueError (use `replace`)."""
        if any(les.id == lesson.id for les in self.lessons):
            raise ValueError(f"lesson {lesson.id} ({_snippet(lesson.text)}) is already in the base; "
                             "use replace() to change it")
        self.lessons.append(lesson)
        return lesson

    def replace(self, lesson_id: str, **changes) -> Lesson:
        """dataclasses.replace of the lesson with this id, put in its place; returns the new lesson."""
        i = self.index(lesson_id)
        self.lessons[i] = dataclasses.replace(self.lessons[i], **changes)
        return self.lessons[i]

    def to_json(self) -> dict:
        return {"version": self.version, "token_budget": self.token_budget,
                "lessons": [les.to_json() for les in self.lessons]}

    def save(self, path: str | os.PathLike) -> None:
        """Writes the base as indented JSON, atomically (a temporary file in the same folder, then os.replace)."""
        path = pathlib.Path(path)
        text = json.dumps(self.to_json(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def from_texts(cls, texts: Iterable[str], count_tokens: Callable[[str], int] | None = None,
                   source: str = "file", token_budget: int = 0) -> "LessonBase":
        """A base of kept, hand-written lessons; tokens from `count_tokens` (0 without it).

        An empty text or two texts that normalise alike raise ValueError naming them.
        """
        if not _valid_source(source):
            raise ValueError(f"lesson source {source!r}: expected one of {', '.join(SOURCES)}")
        base = cls(token_budget=token_budget)
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"lesson {i} is {text!r}; each lesson must be a non-empty string")
            lesson = Lesson.create(text, status="kept", source=source,
                                   tokens=int(count_tokens(text.strip())) if count_tokens else 0)
            if any(les.id == lesson.id for les in base.lessons):
                raise ValueError(f"lesson {i} ({_snippet(text)}) repeats an earlier one; remove one of them")
            base.lessons.append(lesson)
        return base

    @classmethod
    def load(cls, path: str | os.PathLike, count_tokens: Callable[[str], int] | None = None) -> "LessonBase":
        """Reads a base saved by `save` (JSON), or a .txt file of hand-written lessons.

        .txt: one kept lesson per non-empty line; lines starting with '#' are comments, a leading "- " or
        "* " bullet is dropped. With `count_tokens`, every lesson's tokens are counted again (a person may have
        edited the texts). Any malformed file or field raises DataError naming the file, the entry and the field.
        """
        path = pathlib.Path(path).expanduser()
        if not path.is_file():
            raise DataError(f"{path}: no such lesson file; give a .json file written by LessonBase.save, or a .txt "
                            "file with one lesson per line")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: invalid UTF-8 byte at byte {e.start}; re-encode the file as UTF-8") from None
        if path.suffix in TEXT_SUFFIXES:
            return _load_txt(path, text, count_tokens)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); a lesson file is one "
                            'object {"version": 0, "token_budget": 0, "lessons": [{"text": "..."}, ...]}') from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: holds {json_type(data)}, expected an object "
                            '{"version": 0, "token_budget": 0, "lessons": [...]}')
        unknown = sorted(set(data) - {"version", "token_budget", "lessons"})
        if unknown:
            raise DataError(f"{path}: unknown top-level field {unknown[0]!r}; expected version, token_budget, lessons")
        for field in ("version", "token_budget"):
            v = data.get(field, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise DataError(f"{path}: {field} is {json.dumps(v)}; expected an integer >= 0"
                                + (" (0: no limit)" if field == "token_budget" else ""))
        entries = data.get("lessons")
        if not isinstance(entries, list):
            raise DataError(f"{path}: lessons is {json_type(entries) if 'lessons' in data else 'missing'}; "
                            'expected an array of lesson objects [{"text": "..."}, ...]')
        base = cls(version=data.get("version", 0), token_budget=data.get("token_budget", 0))
        seen: dict[str, int] = {}
        for i, entry in enumerate(entries):
            lesson = Lesson.from_json(entry, where=f"{path}: lessons[{i}]")
            if lesson.id in seen:
                raise DataError(f"{path}: lessons[{i}] ({_snippet(lesson.text)}) has id {lesson.id!r}, the same as "
                                f"lessons[{seen[lesson.id]}]; ids must be unique (delete the id field of a new "
                                "lesson to use the hash of its text)")
            seen[lesson.id] = i
            if count_tokens is not None:
                lesson = dataclasses.replace(lesson, tokens=int(count_tokens(lesson.text)))
            base.lessons.append(lesson)
        for i, lesson in enumerate(base.lessons):
            if lesson.merged_into is not None and lesson.merged_into not in seen:
                raise DataError(f"{path}: lessons[{i}].merged_into: no lesson has id {lesson.merged_into!r}; "
                                "name the id of the lesson it was merged into, or null")
        return base


def _load_txt(path: pathlib.Path, text: str, count_tokens) -> LessonBase:
    base = LessonBase()
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = _BULLET.sub("", line).strip()
        if not line or line.startswith("#"):
            continue
        lesson = Lesson.create(line, status="kept", source="file",
                               tokens=int(count_tokens(line)) if count_tokens else 0)
        if lesson.id in seen:
            raise DataError(f"{path}:{lineno}: repeats the lesson of line {seen[lesson.id]}; remove one of them")
        seen[lesson.id] = lineno
        base.lessons.append(lesson)
    if not base.lessons:
        raise DataError(f"{path}: no lessons; write one lesson per line (lines starting with '#' are comments)")
    return base


# ----------------------------------------------------------------------------------------- near duplicates


def similarity(a: str, b: str) -> float:
    """In [0, 1] on normalised texts: the larger of word-set Jaccard and difflib's SequenceMatcher ratio.

    Two texts that normalise to the same string give 1.0; an empty text against a non-empty one gives 0.0.
    """
    na, nb = normalise(a), normalise(b)
    if na == nb:
        return 1.0
    if not na or not nb:
        return 0.0
    wa, wb = set(na.split()), set(nb.split())
    jaccard = len(wa & wb) / len(wa | wb)
    return max(jaccard, difflib.SequenceMatcher(None, na, nb, autojunk=False).ratio())


def near_duplicate(text: str, texts: Sequence[str], threshold: float = 0.8) -> int | None:
    """The index of the text most similar to `text` when that similarity is >= threshold (ties: the first)."""
    best, best_sim = None, -1.0
    for i, other in enumerate(texts):
        s = similarity(text, other)
        if s >= threshold and s > best_sim:
            best, best_sim = i, s
    return best


# ---------------------------------------------------------------------------------------------- budget


def fit_budget(base: LessonBase, budget: int | None = None) -> tuple[LessonBase, list[str]]:
    """(a new base whose active lessons take at most `budget` tokens, the ids evicted, in eviction order).

    budget: None takes base.token_budget; 0 means no limit. While the active lessons take more tokens, the
    active lesson with the lowest gain is evicted (an unmeasured gain counts as 0.0; ties: the newest first,
    i.e. the latest round, then the later in the list). `base` is not changed.
    """
    budget = base.token_budget if budget is None else budget
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"token budget {budget!r}: expected an integer >= 0 (0: no limit)")
    lessons = list(base.lessons)
    evicted: list[str] = []
    total = sum(les.tokens for les in lessons if les.status == "kept")
    while budget and total > budget:
        active = [(i, les) for i, les in enumerate(lessons) if les.status == "kept"]
        i, les = min(active, key=lambda il: (il[1].gain if il[1].gain is not None else 0.0, -il[1].round, -il[0]))
        gain = "unmeasured" if les.gain is None else f"{les.gain:+.4g}"
        lessons[i] = dataclasses.replace(les, status="evicted", note=(
            f"evicted to fit the token budget of {budget} (active lessons took {total} tokens; lowest gain "
            f"{gain}, {les.tokens} tokens)"))
        evicted.append(les.id)
        total -= les.tokens
    return dataclasses.replace(base, lessons=lessons), evicted


# ------------------------------------------------------------------------------------------- paired gain


class PairedGain(NamedTuple):
    """mean of d = with - without over n prompts, its [lo, hi] Student-t interval at `confidence`, and std."""

    mean: float
    lo: float
    hi: float
    n: int
    std: float
    confidence: float = 0.9


def paired_gain(with_r: Any, without_r: Any, confidence: float = 0.9) -> PairedGain:
    """Paired mean reward difference and its two-sided Student-t interval (formulas in the module docstring).

    with_r, without_r: 1-D, one mean reward per prompt, the same prompts in the same order. std is the sample
    standard deviation (n - 1); when it is 0 (all differences equal, or n == 1) the interval is (mean, mean).
    Raises ValueError on empty, mismatched, non-1-D or non-finite input, or confidence outside (0, 1).
    """
    a, b = np.asarray(with_r, np.float64), np.asarray(without_r, np.float64)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"paired_gain takes 1-D arrays (one mean reward per prompt); got shapes {a.shape} "
                         f"and {b.shape}")
    if a.shape != b.shape:
        raise ValueError(f"paired_gain: {a.size} rewards with the lesson but {b.size} without; the two must "
                         "score the same prompts")
    if a.size == 0:
        raise ValueError("paired_gain: no prompts; measure the lesson on at least one prompt")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("paired_gain: non-finite reward (nan or inf); check the reward function")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_gain: confidence {confidence} must be in (0, 1), e.g. 0.9")
    d = a - b
    n = int(d.size)
    mean = float(d.mean())
    std = float(d.std(ddof=1)) if n > 1 else 0.0
    if std == 0.0:
        return PairedGain(mean, mean, mean, n, 0.0, confidence)
    from scipy.stats import t

    half = float(t.ppf((1.0 + confidence) / 2.0, n - 1)) * std / math.sqrt(n)
    return PairedGain(mean, mean - half, mean + half, n, std, confidence)


def decide(gain: PairedGain, min_gain: float = 0.0, min_n: int = 1) -> tuple[bool, str]:
    """(keep, note): keep iff gain.lo > min_gain, gain.mean > 0 and gain.n >= min_n.

    So a lesson whose mean effect is <= 0 is never kept, whatever min_gain is.
    """
    ci = f"{gain.confidence:.0%} CI [{gain.lo:+.4g}, {gain.hi:+.4g}], n={gain.n}"
    if gain.n < min_n:
        return False, f"rejected: measured on {gain.n} prompts, fewer than {min_n} (gain {gain.mean:+.4g}, {ci})"
    if gain.mean <= 0.0:
        return False, f"rejected: mean gain {gain.mean:+.4g} <= 0 ({ci})"
    if gain.lo > min_gain:
        return True, f"kept: gain {gain.mean:+.4g} ({ci}), lower bound > {min_gain:g}"
    return False, f"rejected: gain {gain.mean:+.4g} ({ci}), lower bound <= {min_gain:g}"
