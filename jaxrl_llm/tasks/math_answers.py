"""Math word problems (GSM8K, MATH) from local files, scored by final-answer equivalence.

    task = get_task("math", path="gsm8k.jsonl", test_fraction=0.1)         # or train_path=..., test_path=...
    exs = task.examples("train", 1000, seed=0)        # Example(prompt=[{"role": "user", ...}], answer="72")
    out = task.reward(RewardInputs(completions, exs, lengths, finished, 512))   # 1.0 correct, 0.0 wrong

    extract_final_answer("... \\boxed{\\frac{1}{2}}")  # Extraction(answer="\\frac{1}{2}", source="boxed")
    answers_equal("\\dfrac12", "0.5")                  # True (numeric and symbolic, via math-verify + sympy)

Extraction is ours (last `\\boxed{}`/`\\fbox{}` with nested braces, or GSM8K's `#### N`, whichever comes
last; optionally "the answer is X"); a failure is reported as `Extraction(answer=None, failure=...)`, never
as a parsed wrong answer. Equivalence is Hugging Face's math-verify (latex2sympy2_extended + sympy) after a
small normalisation (unicode minus, plain-text units, percent policy), with an exact fast path for plain
numerals. math-verify times out with SIGALRM, which only works in the main thread: off the main thread we
call it with its timeouts disabled (the host reward runner owns the time limit), and answers whose sympy
evaluation could run unboundedly (power towers, huge factorials) are compared as strings instead, because a
C-level big-integer computation holds the GIL and no thread time limit could stop it.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
import threading
from collections.abc import Sequence
from fractions import Fraction
from typing import Literal

import numpy as np

from jaxrl_llm.records import DataError, json_type, read_records
from jaxrl_llm.tasks.base import Example, RewardInputs, RewardOutput, register_task, split_on_separator
from jaxrl_llm.tasks.wrong_answers import wrong_number

PercentMode = Literal["lenient", "value", "strip"]
DEFAULT_TEMPLATE = "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
_MAX_ANSWER_CHARS = 400   # longer "answers" are compared as strings: a sympy parse of them is slow and never needed
_MAX_DIGITS = 1e5         # a number with more decimal digits than this is not evaluated (larger ones are slow to evaluate)


# ---------------------------------------------------------------------------------------------- extraction

@dataclasses.dataclass(frozen=True)
class Extraction:
    """answer: the final answer text (None: none found); source: "boxed", "gsm8k" or "answer_is";
    failure: why nothing was extracted (None on success)."""

    answer: str | None
    source: str | None = None
    failure: str | None = None


_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_TOKEN = re.compile(r"[^\s$]+")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS = re.compile(r"(?i)\b(?:final\s+answer|answer)\s*(?:is|:)\s*:?\s*([^\n]+)")


def _boxed_content(text: str, start: int) -> tuple[str | None, str | None, int]:
    """(content, failure, end) of the \\boxed at `start`; braces balanced, `\\{` `\\}` are literal."""
    i = _BOXED.match(text, start).end()
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None, "\\boxed at the end of the text (truncated?)", i
    if text[i] != "{":  # `\boxed 5`: one token
        m = _TOKEN.match(text, i)
        return (m.group(0), None, m.end()) if m else (None, "\\boxed not followed by an answer", i)
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        depth += (c == "{") - (c == "}")
        if depth == 0:
            content = text[i + 1:j].strip()
            return (content, None, j + 1) if content else (None, "empty \\boxed{}", j + 1)
        j += 1
    return None, "unclosed \\boxed{ (truncated completion?)", len(text)


def extract_final_answer(text: str, answer_is_fallback: bool = True) -> Extraction:
    """The final answer of a solution: the last `\\boxed{...}`/`\\fbox{...}` (outermost when nested) or
    `#### N`, whichever is later; with `answer_is_fallback`, else the last "the answer is X" /
    "final answer: X" (up to the end of the sentence)."""
    box, box_start, covered = None, -1, 0
    for m in _BOXED.finditer(text):
        if m.start() >= covered:  # skip boxes nested inside the previous one
            box, box_start = _boxed_content(text, m.start()), m.start()
            covered = box[2]
    hashes = list(_HASHES.finditer(text))
    hash_start = hashes[-1].start() if hashes else -1
    if box is not None and box_start > hash_start:
        return Extraction(box[0], "boxed", box[1])
    if hashes:
        answer = _strip_sentence_end(hashes[-1].group(1))
        return Extraction(answer, "gsm8k") if answer else Extraction(None, "gsm8k", "nothing after ####")
    if answer_is_fallback:
        found = list(_ANSWER_IS.finditer(text))
        if found:
            answer = _strip_sentence_end(re.split(r"\.\s", found[-1].group(1))[0].replace("**", ""))
            if answer:
                return Extraction(answer, "answer_is")
    tried = "\\boxed{}, ####" + (", 'the answer is'" if answer_is_fallback else "")
    return Extraction(None, None, f"no final answer found (looked for {tried})")


def _strip_sentence_end(s: str) -> str:
    return re.sub(r"[\s.]+$", "", s.strip())


# ----------------------------------------------------------------------------------- normalisation, parsing

_NUMBER = r"[-+]?(?:\\\$|\$)?\s*\d[\d,]*(?:\.\d+)?"
_PLAIN_NUMBER = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?|[-+]?\d+(?:\.\d+)?|[-+]?\.\d+")
_PERCENT = re.compile(rf"({_NUMBER})\s*(?:\\?%|percent|pct)")
_UNIT_WORD = r"[A-Za-z]{2,}[A-Za-z./^\d-]*"
_WITH_UNITS = re.compile(rf"({_NUMBER}\s*(?:\\?%)?)\s*({_UNIT_WORD}(?:\s+{_UNIT_WORD}){{0,3}})")
_NOT_UNITS = {"pi", "sqrt", "inf", "infty", "infinity", "and", "or", "to", "times", "percent", "pct"}
_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\{([^{}]*)\}")


def normalize_answer(answer: str, percent: PercentMode = "lenient", strip_units: bool = True) -> str:
    """Text-level clean-up before sympy parsing (see docs/tasks.md, "math"): unicode minus, `$...$`,
    a whole-answer `\\text{}`, trailing plain-text units ("18 eggs" -> "18"), and the percent policy for a
    whole-answer percentage: "lenient" keeps it (math-verify then accepts 50% == 50 and 50% == 0.5),
    "value" makes 50% mean 0.5 only, "strip" makes it mean 50 only."""
    s = answer.strip().replace("\u2212", "-").replace("\u2013", "-").replace("\\!", "")
    s = re.sub(r"(?<=\d)\\,(?=\d{3})", ",", s)  # 1\,000
    for pre, post in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(pre) and s.endswith(post) and len(s) > len(pre) + len(post):
            s = s[len(pre):-len(post)].strip()
            break
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    m = _WRAPPERS.fullmatch(s)
    if m:
        s = m.group(1).strip()
    s = _strip_sentence_end(s)
    if strip_units:
        m = _WITH_UNITS.fullmatch(s)
        if m and m.group(2).split()[0].lower() not in _NOT_UNITS:
            s = m.group(1).strip()
    m = _PERCENT.fullmatch(s)
    if m:
        number = m.group(1).replace("\\$", "").replace("$", "").replace(",", "").replace(" ", "")
        s = {"lenient": number + "\\%", "strip": number, "value": f"\\frac{{{number}}}{{100}}"}[percent]
    return s


def _plain_number(s: str) -> Fraction | None:
    """1,000 / -3 / 0.5 / $1,000.00 as an exact Fraction; None for anything else."""
    s = s.replace("\\$", "").replace("$", "").replace(" ", "")
    return Fraction(s.replace(",", "")) if _PLAIN_NUMBER.fullmatch(s) else None


def _timeout_s(main_thread_timeout_s: int | None) -> int | None:
    # math-verify's timeouts are signal.alarm, which raises ValueError off the main thread.
    return main_thread_timeout_s if threading.current_thread() is threading.main_thread() else None


def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise ImportError("the 'math' task needs math-verify: `pip install math-verify==0.9.0`") from None
    return math_verify


@functools.lru_cache(maxsize=4096)
def _parse(normalized: str, timeout_s: int | None) -> tuple:
    """math-verify's parse of one answer: (sympy object, source text) or (text,) when it does not parse;
    () for an empty answer. Only sympy objects that are safe to evaluate are kept."""
    if not normalized or len(normalized) > _MAX_ANSWER_CHARS:
        return (normalized,) if normalized else ()
    mv = _math_verify()
    parsed = mv.parse("\\boxed{" + normalized + "}", extraction_config=[mv.LatexExtractionConfig()],
                      parsing_timeout=timeout_s)
    return tuple(p for p in parsed if isinstance(p, str) or _safe_to_evaluate(p)) or (normalized,)


def _digits(expr) -> float:
    """An upper bound guess of the decimal digits of expr's value, evaluating nothing big."""
    import sympy

    if isinstance(expr, sympy.Integer):
        return max(1.0, int(expr).bit_length() * 0.30103)
    if isinstance(expr, sympy.Rational):
        return max(_digits(sympy.Integer(expr.p)), _digits(sympy.Integer(expr.q)))
    if isinstance(expr, sympy.Float):
        return 1.0 + abs(float(sympy.log(abs(expr), 10))) if expr != 0 else 1.0
    if isinstance(expr, sympy.Pow):
        e = _small_value(expr.exp)
        return _digits(expr.base) + _digits(expr.exp) if e is None else max(1.0, e * _digits(expr.base))
    if isinstance(expr, (sympy.factorial, sympy.factorial2, sympy.gamma, sympy.subfactorial)):
        n = _small_value(expr.args[0])
        return _digits(expr.args[0]) if n is None else max(1.0, n * np.log10(max(n, 2.0)))
    return sum(_digits(a) for a in getattr(expr, "args", ())) + 1.0


def _small_value(expr) -> float | None:
    """|value| of a constant expression with at most 6 digits (inf when larger); None if it has symbols."""
    if getattr(expr, "free_symbols", None):
        return None
    if _digits(expr) > 6:
        return float("inf")
    return abs(complex(expr.evalf(15)))


def _safe_to_evaluate(expr) -> bool:
    try:
        return _digits(expr) <= _MAX_DIGITS
    except Exception:  # noqa: BLE001  (a node our size guess cannot read, e.g. a matrix: let math-verify try it)
        return True


# ------------------------------------------------------------------------------------------------ equivalence

@dataclasses.dataclass(frozen=True)
class AnswerPolicy:
    """How answers are extracted and compared. percent: see `normalize_answer`. main_thread_timeout_s:
    math-verify's SIGALRM limit (whole seconds) on the main thread; off it there is none (the caller's)."""

    answer_is_fallback: bool = True
    percent: PercentMode = "lenient"
    strip_units: bool = True
    float_rounding: int = 6
    main_thread_timeout_s: int | None = 5

    def __post_init__(self):
        if self.percent not in ("lenient", "value", "strip"):
            raise ValueError(f"percent={self.percent!r}; expected 'lenient', 'value' or 'strip'")


def answers_equal(pred: str, gold: str, policy: AnswerPolicy = AnswerPolicy()) -> bool:
    """Whether two extracted answers are mathematically the same (math-verify is called as verify(gold, pred))."""
    p = normalize_answer(pred, policy.percent, policy.strip_units)
    g = normalize_answer(gold, policy.percent, policy.strip_units)
    if not p or not g:
        return False
    if p == g:
        return True
    pn, gn = _plain_number(p), _plain_number(g)
    if pn is not None and gn is not None:
        return pn == gn
    t = _timeout_s(policy.main_thread_timeout_s)
    mv = _math_verify()
    return bool(mv.verify(list(_parse(g, t)), list(_parse(p, t)), float_rounding=policy.float_rounding,
                          timeout_seconds=t))


def canonical_answer(answer: str, policy: AnswerPolicy = AnswerPolicy()) -> str:
    """One string per equivalence class where sympy allows (for majority voting): 0.5, 1/2 and
    \\dfrac12 -> "1/2"; 1,000 and $1,000.00 -> "1000"; x+1 and 1+x -> "x + 1". A lenient percentage
    is written as its number (50% -> "50"). Unparseable answers come back normalised."""
    import sympy

    s = normalize_answer(answer, policy.percent, policy.strip_units)
    n = _plain_number(s)
    if n is not None:
        return str(n)
    parsed = _parse(s, _timeout_s(policy.main_thread_timeout_s))
    expr = parsed[0] if parsed else s
    if not isinstance(expr, sympy.Basic):
        return s
    try:
        if policy.percent == "lenient":  # latex2sympy writes X% as X*UnevaluatedExpr(1/100)
            expr = expr.xreplace({sympy.UnevaluatedExpr(sympy.Rational(1, 100)): sympy.Integer(1)})
        expr = expr.doit()
        expr = expr.xreplace({f: (sympy.Integer(int(f)) if f == int(f) else sympy.Rational(str(f)))
                              for f in expr.atoms(sympy.Float)})
        return str(expr)
    except Exception:  # noqa: BLE001  (sympy refuses, e.g. an odd set: the text is the best we have)
        return s


# ------------------------------------------------------------------------------------------------- the task

def _field(where: str, record: dict, names: Sequence[str], what: str) -> str:
    for name in names:
        if name in record:
            value = record[name]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and what != "question":
                return str(value)  # {"answer": 42}
            if not isinstance(value, str):
                raise DataError(f"{where}: field {name!r} is {json_type(value)}, expected the {what} as a string")
            return value
    raise DataError(f"{where}: missing field {' or '.join(map(repr, names))} (the {what}); fields present: "
                    f"{', '.join(map(repr, record)) or 'none'}. Set question_field=/answer_field= to the names "
                    "your file uses")


@register_task("math")
class MathTask:
    """Math word problems from a local .jsonl/.json/.parquet file (see docs/tasks.md, "math").

    Files: `path` with `test_fraction` held out (deterministic in `split_seed`), or `train_path` (+ `test_path`).
    Fields: question_field / answer_field (default: "question" or "problem"; "answer" or "solution").
    gold_format: "auto" (the last \\boxed{} or "#### N" of the answer field, else the field itself when it is
        one line, e.g. MATH-500's "answer"), "extract" (the marker is required), "raw" (the field as is).
    Prompt: `template` with "{question}" replaced (other braces are literal); chat messages unless chat=False.
    Reward: correct_reward / wrong_reward / unparseable_reward (no final answer found), plus
        format_weight x (1 if the answer is in \\boxed{} or after ####).
    Steps (`SteppedTask`): the reasoning's pieces between `step_separator`s (lines by default); there is no
        per-step ground truth.
    """

    name = "math"

    def __init__(self, path: str | None = None, *, train_path: str | None = None, test_path: str | None = None,
                 test_fraction: float = 0.0, split_seed: int = 0, question_field: str | None = None,
                 answer_field: str | None = None, gold_format: Literal["auto", "extract", "raw"] = "auto",
                 template: str = DEFAULT_TEMPLATE, chat: bool = True, system_prompt: str | None = None,
                 correct_reward: float = 1.0, wrong_reward: float = 0.0, unparseable_reward: float = 0.0,
                 format_weight: float = 0.0, step_separator: str = "\n", policy: AnswerPolicy | None = None,
                 **policy_kwargs):
        if (path is None) == (train_path is None):
            raise ValueError("math task: pass exactly one of path= (one file, split by test_fraction) or "
                             "train_path= (with an optional test_path=)")
        if test_path is not None and test_fraction:
            raise ValueError("math task: test_path and test_fraction both given; use one way to get a test split")
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"math task: test_fraction={test_fraction}; expected 0 <= test_fraction < 1")
        if "{question}" not in template:
            raise ValueError(f"math task: template {template!r} has no {{question}} placeholder")
        if gold_format not in ("auto", "extract", "raw"):
            raise ValueError(f"math task: gold_format={gold_format!r}; expected 'auto', 'extract' or 'raw'")
        fields = {f.name for f in dataclasses.fields(AnswerPolicy)}
        if set(policy_kwargs) - fields or (policy is not None and policy_kwargs):
            raise TypeError(f"math task: unexpected arguments {sorted(policy_kwargs)}; besides its own it takes "
                            f"the AnswerPolicy fields {sorted(fields)}, or policy=AnswerPolicy(...), not both")
        if not isinstance(step_separator, str) or not step_separator:
            raise ValueError(f"math task: step_separator={step_separator!r}; expected non-empty text, e.g. '\\n'")
        self.step_separator = step_separator
        self.policy = policy or AnswerPolicy(**policy_kwargs)
        self.template, self.chat, self.system_prompt = template, chat, system_prompt
        self.rewards = (correct_reward, wrong_reward, unparseable_reward, format_weight)
        self._q = (question_field,) if question_field else ("question", "problem")
        self._a = (answer_field,) if answer_field else ("answer", "solution")
        self._gold_format = gold_format
        if path is not None:
            everything = self._load(path)
            order = np.random.default_rng(split_seed).permutation(len(everything))
            n_test = round(len(everything) * test_fraction)
            if test_fraction and not 0 < n_test < len(everything):
                raise ValueError(f"math task: test_fraction={test_fraction} of {len(everything)} examples in "
                                 f"{path} leaves an empty split")
            test_idx = set(order[:n_test].tolist())
            self._splits = {"train": [e for i, e in enumerate(everything) if i not in test_idx],
                            "test": [e for i, e in enumerate(everything) if i in test_idx]}
        else:
            self._splits = {"train": self._load(train_path)}
            if test_path is not None:
                self._splits["test"] = self._load(test_path)
        if not self._splits.get("test", True):
            del self._splits["test"]

    def _prompt(self, question: str):
        text = self.template.replace("{question}", question)
        if not self.chat:
            return text
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": text}]

    def _gold(self, where: str, solution: str) -> tuple[str, str]:
        if self._gold_format == "raw":
            return solution.strip(), "raw"
        ex = extract_final_answer(solution, answer_is_fallback=False)
        if ex.answer is not None:
            return ex.answer, ex.source
        if self._gold_format == "auto" and "\n" not in solution.strip() and solution.strip():
            return solution.strip(), "raw"
        raise DataError(f"{where}: cannot read the gold answer from the answer field ({ex.failure}): "
                        f"{solution[-120:]!r}. Expected '#### N' (GSM8K) or \\boxed{{...}} (MATH); "
                        "use gold_format='raw' if the field holds just the answer")

    def _load(self, path: str) -> list[Example]:
        out = []
        for where, record in read_records(path):
            question = _field(where, record, self._q, "question")
            solution = _field(where, record, self._a, "answer/solution")
            gold, source = self._gold(where, solution)
            out.append(Example(prompt=self._prompt(question), answer=gold,
                               meta={"where": where, "gold_source": source, "solution": solution}))
        return out

    def examples(self, split: str, num: int | None, seed: int) -> list[Example]:
        """The split's examples shuffled by `seed`, the first `num` of them (all when num is None or larger)."""
        if split not in self._splits:
            raise ValueError(f"math task has no {split!r} split; it has {sorted(self._splits)} "
                             "(a test split needs test_path= or test_fraction>0)")
        exs = self._splits[split]
        order = np.random.default_rng(seed).permutation(len(exs))
        return [exs[i] for i in order[:num]]

    def preference_pair(self, example: Example, rng: random.Random) -> tuple[str, str]:
        """(\\boxed{gold}, \\boxed{`wrong_number`(gold)}) for an integer gold answer; ValueError otherwise."""
        try:
            wrong = wrong_number(example.answer, rng)
        except ValueError:
            at = f" ({example.meta['where']})" if example.meta.get("where") else ""
            raise ValueError(f"preference pairs cannot be generated for task {self.name!r}: its gold answer "
                             f"{example.answer!r}{at} is not an integer (generated math pairs need integer "
                             "gold answers); give pairs in a file with data.source='jsonl' and data.path=...") from None
        return f"\\boxed{{{example.answer}}}", f"\\boxed{{{wrong}}}"

    def split_steps(self, completion: str) -> list[str]:
        """The completion's non-empty pieces between `step_separator`s, stripped (blank lines are not steps)."""
        return split_on_separator(completion, self.step_separator, drop_empty=True)

    def extract_answer(self, completion: str) -> str | None:
        """The final answer in canonical form (see `canonical_answer`), None when there is none."""
        ex = extract_final_answer(completion, self.policy.answer_is_fallback)
        return None if ex.answer is None else canonical_answer(ex.answer, self.policy)

    def is_correct(self, completion: str, example: Example) -> bool:
        ex = extract_final_answer(completion, self.policy.answer_is_fallback)
        return ex.answer is not None and answers_equal(ex.answer, example.answer, self.policy)

    def reward(self, inputs: RewardInputs) -> RewardOutput:
        right, wrong, unparseable, format_weight = self.rewards
        b = len(inputs)
        answer, fmt, missing = np.zeros(b, np.float32), np.zeros(b, np.float32), np.zeros(b, np.float32)
        correct = np.zeros(b, bool)
        for i, (completion, example) in enumerate(zip(inputs.completions, inputs.examples)):
            ex = extract_final_answer(completion, self.policy.answer_is_fallback)
            fmt[i] = ex.source in ("boxed", "gsm8k") and ex.answer is not None
            if ex.answer is None:
                missing[i], answer[i] = 1.0, unparseable
                continue
            correct[i] = answers_equal(ex.answer, example.answer, self.policy)
            answer[i] = right if correct[i] else wrong
        return RewardOutput(scores=(answer + format_weight * fmt).astype(np.float32),
                            components={"answer": answer, "format": fmt, "no_answer": missing}, correct=correct)
