"""Reading a final integer answer out of a chat model's free-form reply.

An instruct model asked "What is 7 * 8?" answers "7 * 8 = 56." or "The answer is 56" or writes its work and
ends with `\\boxed{56}`: an exact-match verifier scores all of these 0. `extract_integer(text, how)` reads the
answer the way a task is configured to (`ANSWER_FORMATS`):

* "exact": the whole reply (stripped) is the integer ("56"), nothing else;
* "last_number": the last integer anywhere in the reply ("7 * 8 = 56." -> 56; thousands commas allowed);
* "boxed": the content of the last `\\boxed{...}` is one integer;
* "answer_line": the last "Answer: N" (case-insensitive, "**Answer:** N" too) gives N.

It returns (value, stated): `value` is the integer (None: none found in that format), `stated` whether the
reply states an answer in the required format at all (for a format reward term), even one that is no integer
("\\boxed{x}" is stated, unparseable).
"""

from __future__ import annotations

import re

ANSWER_FORMATS = ("exact", "last_number", "boxed", "answer_line")

_INT = r"[-+]?\d{1,3}(?:,\d{3})+(?!\d)|[-+]?\d+"
_LAST_INT = re.compile(rf"(?<![\d.])(?:{_INT})(?![\d]|\.\d)")
_ANSWER_LINE = re.compile(r"(?i)\**answer\**\s*:\s*\**\s*([^\n]*)")
_WHOLE_INT = re.compile(rf"\s*({_INT})\s*\.?\s*")


def _as_int(text: str) -> int | None:
    m = _WHOLE_INT.fullmatch(text.replace("**", "").replace("$", ""))
    return int(m.group(1).replace(",", "")) if m else None


def extract_integer(text: str, how: str = "last_number") -> tuple[int | None, bool]:
    """(the reply's final integer answer or None, whether an answer is stated in the `how` format)."""
    if how == "exact":
        m = re.fullmatch(r"\s*(-?\d+)\s*", text)
        return (int(m.group(1)), True) if m else (None, False)
    if how == "last_number":
        found = _LAST_INT.findall(text)
        return (int(found[-1].replace(",", "")), True) if found else (None, False)
    if how == "boxed":
        from jaxrl_llm.tasks.math_answers import extract_final_answer
        ex = extract_final_answer(text, answer_is_fallback=False)
        if ex.source != "boxed":
            return None, False
        return (_as_int(ex.answer) if ex.answer is not None else None), True
    if how == "answer_line":
        found = _ANSWER_LINE.findall(text)
        if not found:
            return None, False
        return _as_int(found[-1]), True
    raise ValueError(f"answer_format={how!r}; expected one of {', '.join(ANSWER_FORMATS)}")
