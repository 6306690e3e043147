"""Knights and Knaves puzzles with the Logic-RL reward.

Generator after Xie et al., "On Memorization of Large Language Models in
Logical Reasoning" (arXiv 2410.23123, the K&K data set); reward after Logic-RL
(arXiv 2502.14768, `verl/utils/reward_score/kk.py`).

A statement is a nested tuple in the K&K format: ('telling-truth', i) "i is a
knight", ('lying', i) "i is a knave", ('not', s), ('and', s1, s2, ...),
('or', s1, s2, ...), ('->', s1, s2), ('<=>', s1, s2). Person i is a knight
iff their statement is true; a puzzle is kept iff exactly one assignment is
consistent. Statements are evaluated on all 2^n assignments at once as
bitmasks (bit a of a mask: the statement holds when the knights are the set
bits of a), so brute force costs a few big-int operations per tree node.

Splits are disjoint by construction: a puzzle (its statements, names aside)
belongs to "test" iff a stable hash of it falls in the held-out fraction.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxrl_llm.tasks.base import Example, RewardInputs, RewardOutput, register_task, split_on_separator

Statement = tuple  # ('telling-truth', i) | ('lying', i) | (op, *children)
LEAVES = ("telling-truth", "lying")

# The K&K generator's COMMON_NAMES (lib_kk.py).
NAMES = ("Emma", "Liam", "Olivia", "Noah", "Ava", "Ethan", "Sophia", "Mason", "Isabella", "William", "Mia",
         "James", "Charlotte", "Benjamin", "Amelia", "Lucas", "Harper", "Henry", "Evelyn", "Alexander",
         "Abigail", "Michael", "Emily", "Daniel", "Elizabeth", "Jacob", "Sofia", "Logan", "Avery", "Jackson",
         "Ella", "Sebastian", "Scarlett", "Jack", "Grace", "Aiden", "Chloe", "Owen", "Victoria", "Samuel",
         "Riley", "Matthew", "Aria", "Joseph", "Lily", "Luke", "Aurora", "David", "Zoey", "Oliver", "Penelope")

# The K&K saying templates. Quoted content starts with a capital letter.
TEMPLATES = ('{name} said that {content}.', '{name} told you that {content}.', '{name} said, "{content}."',
             '{name} stated, "{content}".', 'According to {name}, "{content}".', '''In {name}'s words: "{content}".''',
             '{name} remarked, "{content}".', '"{content}," {name} declared.', '{name} was heard saying, "{content}".',
             '{name} expressed that {content}.', '"{content}" - {name}.', 'As {name} put it, "{content}".',
             '{name} asserted: "{content}".', '"{content}," {name} mentioned.', '{name} commented, "{content}".',
             'In a statement by {name}: "{content}".', '{name} noted, "{content}".', '"{content}," {name} claimed.')

QUIZ_PREFIX = ("A very special island is inhabited only by knights and knaves. "
               "Knights always tell the truth, and knaves always lie. ")
QUIZ_POSTFIX = "So who is a knight and who is a knave?"

# Logic-RL's prompts (qwen-instruct system prompt; base template for plain text), grammar tidied.
_TAGS_SPEC = ("The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
              "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>. ")
SYSTEM_PROMPT = ("You are a helpful assistant. The assistant first thinks about the reasoning process in the mind "
                 "and then provides the user with the answer. " + _TAGS_SPEC +
                 "Now the user asks you to solve a logical reasoning problem. After thinking, when you finally "
                 "reach a conclusion, clearly state the identity of each character within <answer> </answer> "
                 "tags, i.e., <answer> (1) Zoey is a knight\n(2) Oliver is a knave </answer>.")
TEXT_PROMPT = ("The User asks a question, and the Assistant solves it. The Assistant first thinks about the "
               "reasoning process in the mind and then provides the User with the final answer. " + _TAGS_SPEC +
               "Now the User asks a logical reasoning problem. After careful thinking, when the Assistant reaches "
               "a final conclusion, the identity of each character should be clearly stated within "
               "<answer> </answer> tags, i.e., <answer> (1) Zoey is a knight\n(2) Oliver is a knave </answer>."
               "\n\nUser: {quiz}\nAssistant:")

# The reasoning of generated preference pairs: the same for chosen and rejected, so a pair differs only in
# its answer block.
KK_REASONING = "<think> Each statement is checked against the assignment. </think>\n"


# ---------------------------------------------------------------------------------------------- generation

def _sample_statement(rng: random.Random, n: int, speaker: int, depth: int, width: int) -> Statement:
    """lib_kk.KKProblemSampler._sample_statement: a leaf with prob 1/6 (always at depth 1), else one of
    not / and / or / -> / <=> (1/6 each) over distinct children of depth - 1."""
    dice = rng.randrange(6)
    if depth == 1 or dice == 0:
        while True:  # a speaker saying "I am a knave" is a paradox; the K&K generator never samples it
            kind, person = rng.choice(LEAVES), rng.randrange(n)
            if not (kind == "lying" and person == speaker):
                return (kind, person)
    if dice == 1:
        return ("not", _sample_statement(rng, n, speaker, depth - 1, width))
    op = ("and", "or", "->", "<=>")[dice - 2]
    count = rng.randint(2, width) if op in ("and", "or") else 2
    children: list[Statement] = []
    for _ in range(64 * count):  # distinct children; few exist for tiny n and large width, so bounded
        child = _sample_statement(rng, n, speaker, depth - 1, width)
        if child not in children:
            children.append(child)
            if len(children) == count:
                break
    return (op, *children)


@functools.cache
def _knight_masks(n: int) -> tuple[tuple[int, ...], int]:
    """Per person p, the mask of assignments where p is a knight; and the all-assignments mask."""
    full = (1 << (1 << n)) - 1
    masks = []
    for p in range(n):
        block = ((1 << (1 << p)) - 1) << (1 << p)  # 2^p zeros then 2^p ones, repeated with period 2^(p+1)
        period = 1 << (p + 1)
        m = 0
        for start in range(0, 1 << n, period):
            m |= block << start
        masks.append(m)
    return tuple(masks), full


def truth_mask(stmt: Statement, n: int) -> int:
    """Bitmask over the 2^n assignments where `stmt` is true."""
    knights, full = _knight_masks(n)
    op = stmt[0]
    if op == "telling-truth":
        return knights[stmt[1]]
    if op == "lying":
        return full ^ knights[stmt[1]]
    sub = [truth_mask(c, n) for c in stmt[1:]]
    if op == "not":
        return full ^ sub[0]
    if op == "and":
        return functools.reduce(lambda a, b: a & b, sub, full)
    if op == "or":
        return functools.reduce(lambda a, b: a | b, sub, 0)
    if op == "->":
        return (full ^ sub[0]) | sub[1]
    if op == "<=>":
        return full ^ sub[0] ^ sub[1]
    raise ValueError(f"unknown statement type {op!r} in {stmt!r}")


def consistent_mask(statements: Sequence[Statement]) -> int:
    """Assignments under which every knight's statement is true and every knave's false."""
    n = len(statements)
    knights, full = _knight_masks(n)
    m = full
    for i, s in enumerate(statements):
        m &= full ^ knights[i] ^ truth_mask(s, n)
        if not m:
            break
    return m


def solve(statements: Sequence[Statement]) -> list[tuple[bool, ...]]:
    """All consistent assignments (True = knight), brute force over 2^n."""
    n, m = len(statements), consistent_mask(statements)
    return [tuple(bool(a >> p & 1) for p in range(n)) for a in range(1 << n) if m >> a & 1]


def sample_puzzle(rng: random.Random, n: int, depth: int = 2, width: int = 2) -> tuple[tuple, tuple[bool, ...]]:
    """Draws statements for n people until exactly one assignment is consistent: (statements, solution)."""
    while True:
        stmts = tuple(_sample_statement(rng, n, i, depth, width) for i in range(n))
        m = consistent_mask(stmts)
        if m and not m & (m - 1):
            a = m.bit_length() - 1
            return stmts, tuple(bool(a >> p & 1) for p in range(n))


# ---------------------------------------------------------------------------------------------- text

def _is_atomic(stmt: Statement) -> bool:
    return stmt[0] in LEAVES or (stmt[0] == "not" and stmt[1][0] in LEAVES)


def render_statement(stmt: Statement, names: Sequence[str]) -> str:
    """English as the K&K formatter writes it; compound operands are parenthesised, which never happens at
    depth <= 2, so the paper's depth-2 text is unchanged and deeper statements stay unambiguous."""
    op = stmt[0]
    if op in LEAVES:
        return f"{names[stmt[1]]} is a {'knight' if op == 'telling-truth' else 'knave'}"
    unit = [render_statement(c, names) if _is_atomic(c) else f"({render_statement(c, names)})" for c in stmt[1:]]
    if op == "not":
        if stmt[1][0] in LEAVES:
            leaf = stmt[1]
            return f"{names[leaf[1]]} is not a {'knight' if leaf[0] == 'telling-truth' else 'knave'}"
        return f"it is not the case that {unit[0]}"
    if op in ("and", "or"):
        return f" {op} ".join(unit)
    if op == "->":
        return f"if {unit[0]} then {unit[1]}"
    if op == "<=>":
        return f"{unit[0]} if and only if {unit[1]}"
    raise ValueError(f"unknown statement type {op!r} in {stmt!r}")


def format_quiz(statements: Sequence[Statement], names: Sequence[str], templates: Sequence[str]) -> str:
    """The K&K quiz text; templates[i] is person i's saying template."""
    n = len(names)
    who = " and ".join(names) if n == 2 else ", ".join(names[:-1]) + ", and " + names[-1]
    text = QUIZ_PREFIX + f"You meet {n} inhabitants: {who}."
    for name, stmt, tmpl in zip(names, statements, templates):
        content = render_statement(stmt, names)
        if '"' in tmpl:
            content = content[0].upper() + content[1:]
        text += " " + tmpl.format(name=name, content=content)
    return text + " " + QUIZ_POSTFIX


def format_answer(names: Sequence[str], solution: Sequence[bool]) -> str:
    """The K&K `solution_text_format`: "(1) Zoey is a knight\\n(2) Oliver is a knave"."""
    return "\n".join(f"({i + 1}) {nm} is a {'knight' if k else 'knave'}"
                     for i, (nm, k) in enumerate(zip(names, solution)))


# ---------------------------------------------------------------------------------------------- verification

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANY_ROLE_RE = re.compile(r"\b([A-Za-z]+)\s+is\s+a\s+(knight|knave)\b", re.IGNORECASE)


def valid_format(text: str) -> bool:
    """Logic-RL validate_response_structure: each tag exactly once, in the order think, /think, answer, /answer."""
    if any(text.count(t) != 1 for t in _TAGS):
        return False
    pos = [text.find(t) for t in _TAGS]
    return pos == sorted(pos)


def extract_answer_block(text: str) -> str | None:
    """Logic-RL extract_solution: the last <answer>...</answer> block, stripped (None: no block)."""
    blocks = _ANSWER_RE.findall(text)
    return blocks[-1].strip() if blocks else None


def parse_roles(answer: str, names: Sequence[str]) -> tuple[bool, ...] | None:
    """Logic-RL parse_model_answer: None unless the words 'knight' + 'knave' occur (case-insensitive, as
    substrings) exactly len(names) times and each name has a "<Name> is a knight|knave" (case-insensitive;
    the first match counts)."""
    low = answer.lower()
    if low.count("knight") + low.count("knave") != len(names):
        return None
    roles = []
    for name in names:
        m = re.search(rf"\b{re.escape(name)}\b\s+is\s+a\s+\b(knight|knave)\b", answer, re.IGNORECASE)
        if m is None:
            return None
        roles.append(m.group(1).lower() == "knight")
    return tuple(roles)


@dataclasses.dataclass(frozen=True)
class KKRewardConfig:
    """Logic-RL's reward values. answer_requires_format=True is Logic-RL's rule: the answer is scored only when
    the format is valid and the answer block is non-empty, else it gets answer_unparseable."""

    format_ok: float = 1.0
    format_bad: float = -1.0
    answer_correct: float = 2.0
    answer_wrong: float = -1.5
    answer_unparseable: float = -2.0
    answer_requires_format: bool = True


def score_completion(completion: str, names: Sequence[str], solution: Sequence[bool], cfg: KKRewardConfig,
                     prefill_think: bool = False) -> tuple[float, float, bool]:
    """(format score, answer score, all roles right). `correct` ignores the format (as Logic-RL's evaluation)."""
    text = "<think>" + completion if prefill_think else completion
    fmt = valid_format(text)
    block = extract_answer_block(text)
    roles = parse_roles(block, names) if block else None
    correct = roles is not None and roles == tuple(bool(s) for s in solution)
    if not block or roles is None or (cfg.answer_requires_format and not fmt):
        answer = cfg.answer_unparseable
    else:
        answer = cfg.answer_correct if correct else cfg.answer_wrong
    return (cfg.format_ok if fmt else cfg.format_bad), answer, correct


def _as_lists(x):
    """Statements as nested lists, so that an Example survives a JSON round trip unchanged."""
    return [_as_lists(c) for c in x] if isinstance(x, tuple) else x


def _stable_fraction(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2**64


# ---------------------------------------------------------------------------------------------- the task

@register_task("knights_knaves")
@dataclasses.dataclass(frozen=True)
class KnightsKnavesTask:
    """Knights and Knaves with n_people (an int, or a list/range for a round-robin mix) of depth/width-bounded
    statements; Logic-RL prompts (chat messages, or plain text with chat=False; prefill_think=True ends the
    text prompt with "<think>" as Logic-RL does and the reward then counts that tag as the completion's)."""

    n_people: Any = (3, 4, 5, 6, 7)  # Logic-RL trains on a 3..7 mix and tests on 2..8
    depth: int = 2
    width: int = 2
    chat: bool = True
    prefill_think: bool = False
    random_templates: bool = True
    test_fraction: float = 0.1
    reward_config: Any = KKRewardConfig()
    step_separator: str = "\n"  # SteppedTask: the reasoning's steps are its lines; no per-step ground truth
    name: str = "knights_knaves"

    def __post_init__(self):
        ns = (self.n_people,) if isinstance(self.n_people, int) else tuple(int(n) for n in self.n_people)
        object.__setattr__(self, "n_people", ns)
        if not ns or any(not 2 <= n <= 12 for n in ns):
            raise ValueError(f"knights_knaves: n_people={self.n_people!r}; each must be in 2..12 (K&K uses 2..8)")
        if self.depth < 1 or self.width < 2:
            raise ValueError(f"knights_knaves: depth={self.depth}, width={self.width}; need depth >= 1, width >= 2")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"knights_knaves: test_fraction={self.test_fraction} must be in (0, 1)")
        if self.chat and self.prefill_think:
            raise ValueError("knights_knaves: prefill_think needs chat=False (chat messages cannot end inside the "
                             "assistant turn)")
        if isinstance(self.reward_config, Mapping):
            object.__setattr__(self, "reward_config", KKRewardConfig(**self.reward_config))
        if not isinstance(self.step_separator, str) or not self.step_separator:
            raise ValueError(f"knights_knaves: step_separator={self.step_separator!r}; expected non-empty text, "
                             "e.g. '\\n'")

    # ------------------------------------------------------------------ examples

    def _prompt(self, quiz: str):
        if self.chat:
            return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": quiz}]
        return TEXT_PROMPT.format(quiz=quiz) + (" <think>" if self.prefill_think else "")

    def _draw(self, split: str, num: int, seed: int, n: int) -> list[Example]:
        rng = random.Random(f"knights_knaves/{seed}/{split}/{n}")
        want_test, seen, out, misses = split == "test", set(), [], 0
        while len(out) < num:
            stmts, solution = sample_puzzle(rng, n, self.depth, self.width)
            key = repr(stmts)
            if key in seen or (_stable_fraction(key) < self.test_fraction) != want_test:
                misses += 1
                if misses > 20_000:
                    raise ValueError(f"knights_knaves: found only {len(out)} distinct {n}-people {split} puzzles "
                                     f"at depth={self.depth}, width={self.width}, test_fraction="
                                     f"{self.test_fraction}; ask for fewer, raise depth/width, or move test_fraction")
                continue
            misses = 0
            seen.add(key)
            names = rng.sample(NAMES, n)
            templates = [rng.choice(TEMPLATES) if self.random_templates else TEMPLATES[0] for _ in range(n)]
            quiz = format_quiz(stmts, names, templates)
            out.append(Example(prompt=self._prompt(quiz), answer=format_answer(names, solution),
                               meta={"n_people": n, "names": list(names), "solution": list(solution),
                                     "statements": _as_lists(stmts), "quiz": quiz}))
        return out

    def examples(self, split: str, num: int, seed: int) -> list[Example]:
        """`num` puzzles of `split` ("train" or "test"), people counts round-robin over n_people. Each count
        has its own stream, so a longer list extends a shorter one. Deduplicated on the statements."""
        if split not in ("train", "test"):
            raise ValueError(f"knights_knaves: split {split!r}; expected 'train' or 'test'")
        k = len(self.n_people)
        per_n = [self._draw(split, num // k + (j < num % k), seed, n) for j, n in enumerate(self.n_people)]
        return [per_n[i % k][i // k] for i in range(num)]

    # ------------------------------------------------------------------ preference pairs

    def _completion(self, answer: str) -> str:
        text = f"{KK_REASONING}<answer>\n{answer}\n</answer>"
        return text[len("<think>"):] if self.prefill_think else text  # the prompt already ends with <think>

    def preference_pair(self, example: Example, rng: random.Random) -> tuple[str, str]:
        """(gold assignment, the gold assignment with one person's role flipped), both inside Logic-RL's
        <think></think><answer></answer> format: chosen scores +3 and rejected -0.5 under the default reward."""
        solution = list(example.meta["solution"])
        k = rng.randrange(len(solution))
        flipped = solution[:k] + [not solution[k]] + solution[k + 1:]
        return self._completion(example.answer), self._completion(format_answer(example.meta["names"], flipped))

    # ------------------------------------------------------------------ verification

    def split_steps(self, completion: str) -> list[str]:
        """The completion's non-empty pieces between `step_separator`s, stripped (blank lines are not steps)."""
        return split_on_separator(completion, self.step_separator, drop_empty=True)

    def extract_answer(self, completion: str) -> str | None:
        """The last answer block as "(1) Name is a knight\\n(2) ..." in the order the names first appear;
        None without a block, without any "<Name> is a knight|knave", or when the knight/knave word count
        differs from the number of names found (Logic-RL's garbled-answer check)."""
        block = extract_answer_block(completion)
        if not block:
            return None
        roles: dict[str, bool] = {}
        for m in _ANY_ROLE_RE.finditer(block):
            roles.setdefault(m.group(1).capitalize(), m.group(2).lower() == "knight")
        low = block.lower()
        if not roles or low.count("knight") + low.count("knave") != len(roles):
            return None
        return format_answer(list(roles), list(roles.values()))

    def is_correct(self, completion: str, example: Example) -> bool:
        """Every person's role right in the answer block (format not required, as Logic-RL's evaluation)."""
        return score_completion(completion, example.meta["names"], example.meta["solution"], self.reward_config,
                                self.prefill_think)[2]

    def reward(self, inputs: RewardInputs) -> RewardOutput:
        rows = [score_completion(c, e.meta["names"], e.meta["solution"], self.reward_config, self.prefill_think)
                for c, e in zip(inputs.completions, inputs.examples)]
        fmt = np.array([r[0] for r in rows], np.float32).reshape(-1)
        ans = np.array([r[1] for r in rows], np.float32).reshape(-1)
        correct = np.array([r[2] for r in rows], bool).reshape(-1)
        return RewardOutput(scores=fmt + ans, components={"format": fmt, "answer": ans}, correct=correct)
