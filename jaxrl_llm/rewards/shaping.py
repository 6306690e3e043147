"""Reward shaping terms: format, DAPO overlong penalty, n-gram repetition penalty, no-EOS penalty.

Each factory returns a RewardFn (`RewardInputs -> float64 [B]`) to use as a
`combine` term, e.g. `("overlong", overlong_penalty(4096, 512), 1.0)`. They
are small frozen dataclasses rather than closures so that they pickle, which
`HostRewardRunner(isolation="process")` needs; they keep lower-case names
because users call them like functions.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from jaxrl_llm.tasks.base import RewardInputs

_MODES = ("fullmatch", "search", "match")


@dataclasses.dataclass(frozen=True)
class format_reward:
    """match_score where the completion text matches `pattern`, else miss_score.

    mode: "fullmatch" (default: the whole completion must match; put `\\s*` at the ends to allow
    surrounding whitespace), "search" (the pattern anywhere) or "match" (at the start).
    flags: re flags; re.DOTALL by default so `.*` spans lines.

        format_reward(r"<think>.*?</think>\\s*<answer>.*?</answer>\\s*")     # R1-style format term
    """

    pattern: str
    match_score: float = 1.0
    miss_score: float = 0.0
    flags: int = re.DOTALL
    mode: str = "fullmatch"

    def __post_init__(self):
        if self.mode not in _MODES:
            raise ValueError(f"format_reward mode={self.mode!r}; expected one of {_MODES}")
        try:
            object.__setattr__(self, "_re", re.compile(self.pattern, self.flags))
        except re.error as e:
            raise ValueError(f"format_reward: invalid regular expression {self.pattern!r}: {e}") from None

    def __call__(self, inputs: RewardInputs) -> np.ndarray:
        find = getattr(self._re, self.mode)
        hit = np.array([find(c) is not None for c in inputs.completions], dtype=bool)
        return np.where(hit, self.match_score, self.miss_score).astype(np.float64)


@dataclasses.dataclass(frozen=True)
class overlong_penalty:
    """DAPO soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13) on token lengths |y|:

        R(y) = 0                                   if |y| <= Lmax - Lcache
             = ((Lmax - Lcache) - |y|) / Lcache    if Lmax - Lcache < |y| <= Lmax
             = -1                                  if |y| > Lmax

    times penalty_factor (verl's overlong_buffer.penalty_factor, 1 in the paper). |y| is
    RewardInputs.lengths (EOS included when emitted, as in verl's response mask). max_len=None uses
    inputs.max_new_tokens. The paper trains with Lmax = 20480, Lcache = 4096 and adds this to the
    correctness reward.
    """

    max_len: int | None
    cache_len: int
    penalty_factor: float = 1.0

    def __post_init__(self):
        if self.cache_len <= 0 or (self.max_len is not None and self.cache_len > self.max_len):
            raise ValueError(f"overlong_penalty needs 0 < cache_len <= max_len; got max_len={self.max_len}, "
                             f"cache_len={self.cache_len}")

    def __call__(self, inputs: RewardInputs) -> np.ndarray:
        l_max = inputs.max_new_tokens if self.max_len is None else self.max_len
        length = np.asarray(inputs.lengths, np.float64)
        start = l_max - self.cache_len
        r = np.where(length <= start, 0.0, (start - length) / self.cache_len)
        r = np.where(length > l_max, -1.0, r)
        return self.penalty_factor * r


@dataclasses.dataclass(frozen=True)
class repetition_penalty:
    """N-gram repetition penalty (Yeo et al. 2025, "Demystifying Long Chain-of-Thought Reasoning in LLMs",
    arXiv 2502.03373, App. C.2; the formula of open-r1's `get_repetition_penalty_reward`):

        words = completion.lower().split()            (unit="words"; unit="chars": the characters)
        ngrams = the len(words) - n + 1 windows of n consecutive units
        R = max_penalty * (1 - |set(ngrams)| / |ngrams|)        (0 when there are fewer than n units)

    so R is 0 without repetition and approaches max_penalty (<= 0) as the text loops. Computed on the
    decoded text (RewardInputs carries no token ids); unit="chars" suits scripts without spaces.
    """

    ngram_size: int = 3
    max_penalty: float = -1.0
    unit: str = "words"

    def __post_init__(self):
        if self.max_penalty > 0:
            raise ValueError(f"repetition_penalty max_penalty={self.max_penalty} must be <= 0 (it is a penalty)")
        if self.ngram_size < 1:
            raise ValueError(f"repetition_penalty ngram_size={self.ngram_size} must be >= 1")
        if self.unit not in ("words", "chars"):
            raise ValueError(f"repetition_penalty unit={self.unit!r}; expected 'words' or 'chars'")

    def _one(self, text: str) -> float:
        units = text.lower().split() if self.unit == "words" else list(text.lower())
        total = len(units) - self.ngram_size + 1
        if total <= 0:
            return 0.0
        unique = len(set(zip(*(units[i:] for i in range(self.ngram_size)))))
        return self.max_penalty * (1.0 - unique / total)

    def __call__(self, inputs: RewardInputs) -> np.ndarray:
        return np.array([self._one(c) for c in inputs.completions], dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class no_eos_penalty:
    """`score` for completions cut at max_new_tokens without EOS (finished=False), 0 for finished ones.

    The "fixed low score for completions without EOS" of Huang et al., "The N+ implementation details
    of RLHF with PPO" (2024). Used as a term it adds to the other terms; to replace the total reward
    of such completions instead, give the other terms a task whose reward already does that.
    """

    score: float = -1.0

    def __call__(self, inputs: RewardInputs) -> np.ndarray:
        return np.where(np.asarray(inputs.finished, bool), 0.0, float(self.score))
