"""Plausible wrong answers, the rejected side of the preference pairs that tasks generate.

    wrong_number("46", random.Random(1))   # "64" (two digits swapped); with other seeds "43".."49", not "46"

Shared by the tasks with integer answers (arithmetic, math); a near miss teaches more than a random
number, because the pair then differs only where the answer is wrong.
"""

from __future__ import annotations

import random


def wrong_number(answer: str, rng: random.Random) -> str:
    """A plausible wrong integer answer: off by 1..3, or two different digits swapped. Never equals `answer`.

    With probability 1/2 when the number has two different digits, two of them swap ("46" -> "64");
    otherwise, or when the swap gives the same number, it is off by 1..3 either way. Raises ValueError
    when `answer` is not an integer.
    """
    value = int(answer)
    digits = str(abs(value))
    pairs = [(i, j) for i in range(len(digits)) for j in range(i + 1, len(digits)) if digits[i] != digits[j]]
    if pairs and rng.random() < 0.5:
        i, j = rng.choice(pairs)
        d = list(digits)
        d[i], d[j] = d[j], d[i]
        swapped = int("".join(d))
        if swapped != abs(value):  # a leading zero can make "10" -> "01" = 1: still a different number
            return str(-swapped if value < 0 else swapped)
    return str(value + rng.choice((-3, -2, -1, 1, 2, 3)))
