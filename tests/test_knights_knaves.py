"""Knights and Knaves: puzzles checked by an independent solver that reads the rendered quiz text; the Logic-RL
reward table; determinism and split disjointness; generator limits."""

import itertools
import json
import re
import time

import numpy as np
import pytest

from jaxrl_llm.tasks import RewardInputs, get_task
from jaxrl_llm.tasks.knights_knaves import NAMES, KKRewardConfig, KnightsKnavesTask

# ------------------------------------------------------------------ an independent reader of the quiz text

_QUIZ_RE = re.compile(r"A very special island is inhabited only by knights and knaves\. Knights always tell the "
                      r"truth, and knaves always lie\. You meet (\d+) inhabitants: (.*?)\. (.*) So who is a knight "
                      r"and who is a knave\?", re.DOTALL)


def _split_top(s, sep):
    """Split s at occurrences of sep outside parentheses."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        if s[i] == "(":
            depth += 1
        elif s[i] == ")":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    return parts + [s[start:]]


def _wrapped(s):
    """s is "( ... )" with the first bracket closed by the last."""
    depth = 0
    for i, ch in enumerate(s):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            return i == len(s) - 1 and s[0] == "("
    return False


def _unit(s, names):
    if _wrapped(s):
        return _expr(s[1:-1], names)
    m = re.fullmatch(r"(\w+) is (not )?a (knight|knave)", s)
    assert m and m.group(1) in names, f"cannot read {s!r}"
    leaf = ("leaf", names.index(m.group(1)), m.group(3) == "knight")
    return ("not", leaf) if m.group(2) else leaf


def _expr(s, names):
    """Strict reader: every operand must be a leaf, a negated leaf or parenthesised, so ambiguous text fails."""
    parts = _split_top(s, " if and only if ")
    if len(parts) > 1:
        assert len(parts) == 2, s
        return ("iff", _unit(parts[0], names), _unit(parts[1], names))
    for op in (" and ", " or "):
        parts = _split_top(s, op)
        if len(parts) > 1:
            return (op.strip(), *[_unit(p, names) for p in parts])
    if s.startswith("if "):
        parts = _split_top(s[3:], " then ")
        assert len(parts) == 2, s
        return ("imp", _unit(parts[0], names), _unit(parts[1], names))
    if s.startswith("it is not the case that "):
        return ("not", _unit(s[len("it is not the case that "):], names))
    return _unit(s, names)


def read_quiz(text):
    """(names, statement trees) from the quiz text alone."""
    m = _QUIZ_RE.fullmatch(text)
    assert m, text
    n, names = int(m.group(1)), re.split(r",? and |, ", m.group(2))
    assert len(names) == n
    said = {}
    for sent in re.split(r'(?<=\.)\s+|(?<=\.")\s+', m.group(3)):
        q = re.search(r'"([^"]*)"', sent)
        if q:
            content = q.group(1).rstrip(".,")
            outside = sent.replace(q.group(0), " ")
            speakers = [nm for nm in names if re.search(rf"\b{nm}\b", outside)]
            assert len(speakers) == 1, sent
            speaker = speakers[0]
            if content[:3] in ("If ", "It "):
                content = content[0].lower() + content[1:]
        else:
            u = re.fullmatch(r"(\w+) (?:said|told you|expressed) that (.*)\.", sent)
            assert u, sent
            speaker, content = u.groups()
        assert speaker not in said, f"{speaker} speaks twice"
        said[speaker] = _expr(content, names)
    assert sorted(said) == sorted(names)
    return names, [said[nm] for nm in names]


def _eval(t, a):
    op = t[0]
    if op == "leaf":
        return a[t[1]] == t[2]
    if op == "not":
        return not _eval(t[1], a)
    if op == "and":
        return all(_eval(c, a) for c in t[1:])
    if op == "or":
        return any(_eval(c, a) for c in t[1:])
    if op == "imp":
        return (not _eval(t[1], a)) or _eval(t[2], a)
    return _eval(t[1], a) == _eval(t[2], a)


def brute_force(trees):
    return [a for a in itertools.product([True, False], repeat=len(trees))
            if all(_eval(t, a) == a[i] for i, t in enumerate(trees))]


def read_answer(answer, names):
    lines = answer.split("\n")
    assert len(lines) == len(names)
    out = []
    for i, (line, nm) in enumerate(zip(lines, names)):
        m = re.fullmatch(rf"\({i + 1}\) {nm} is a (knight|knave)", line)
        assert m, line
        out.append(m.group(1) == "knight")
    return tuple(out)


def quiz_of(example):
    if isinstance(example.prompt, str):
        return example.prompt.split("User: ", 1)[1].rsplit("\nAssistant:", 1)[0]
    return example.prompt[-1]["content"]


def tree_depth(t):
    return 1 if t[0] == "leaf" else 1 + max(tree_depth(c) for c in t[1:])


def walk(t):
    yield t
    if t[0] != "leaf":
        for c in t[1:]:
            yield from walk(c)


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("depth,width,chat", [(2, 2, True), (3, 3, False)])
def test_unique_solution_from_text_equals_gold(depth, width, chat):
    for n in range(2, 9):
        task = KnightsKnavesTask(n_people=n, depth=depth, width=width, chat=chat)
        for ex in task.examples("train", 12, seed=3) + task.examples("test", 4, seed=3):
            names, trees = read_quiz(quiz_of(ex))
            assert names == ex.meta["names"]
            sols = brute_force(trees)
            assert len(sols) == 1, (quiz_of(ex), sols)
            assert sols[0] == read_answer(ex.answer, names)


def test_reward_table():
    task = KnightsKnavesTask(n_people=3)
    ex = task.examples("train", 1, seed=0)[0]
    gold = ex.answer
    first = gold.split("\n")[0]
    flipped = gold.replace(first, first.replace("knight", "knave") if "knight" in first
                           else first.replace("knave", "knight"))
    wrap = lambda a: f"<think> reasoning </think>\n<answer> {a} </answer>"
    cases = {  # completion: (format, answer, correct)
        wrap(gold): (1.0, 2.0, True),
        wrap(gold.upper().replace("(1)", "1.")): (1.0, 2.0, True),       # case-insensitive, numbering optional
        wrap(flipped): (1.0, -1.5, False),
        wrap("\n".join(gold.split("\n")[:-1])): (1.0, -2.0, False),      # a person missing
        wrap(gold + "\nEveryone else is a knave"): (1.0, -2.0, False),   # extra role word
        wrap("I am not sure."): (1.0, -2.0, False),
        "<think> x </think><answer></answer>": (1.0, -2.0, False),        # empty answer block
        f"<answer>{gold}</answer>": (-1.0, -2.0, True),                   # no think
        f"<think>a</think><think>b</think><answer>{gold}</answer>": (-1.0, -2.0, True),
        f"<think>a</think><answer>{flipped}</answer><answer>{gold}</answer>": (-1.0, -2.0, True),  # last block
        f"<answer>{gold}</answer><think>a</think>": (-1.0, -2.0, True),   # out of order
        f"</think>a<think><answer>{gold}</answer>": (-1.0, -2.0, True),
        f"<think>a</think><answer>{gold}": (-1.0, -2.0, False),           # cut before </answer>
    }
    comps = list(cases)
    out = task.reward(RewardInputs(comps, [ex] * len(comps), np.full(len(comps), 10), np.ones(len(comps), bool), 64))
    want = np.array(list(cases.values()), dtype=object)
    np.testing.assert_array_equal(out.components["format"], want[:, 0].astype(np.float32))
    np.testing.assert_array_equal(out.components["answer"], want[:, 1].astype(np.float32))
    np.testing.assert_array_equal(out.scores, (want[:, 0] + want[:, 1]).astype(np.float32))
    np.testing.assert_array_equal(out.correct, want[:, 2].astype(bool))
    assert out.scores.dtype == np.float32 and out.scores[0] == 3.0
    for c, (_, _, ok) in cases.items():
        assert task.is_correct(c, ex) == ok


def test_reward_config_and_prefill():
    base = {"n_people": 4}
    ex = KnightsKnavesTask(**base).examples("train", 1, seed=1)[0]
    late = f"<answer>{ex.answer}</answer><think>a</think>"
    cfg = KKRewardConfig(format_ok=0.5, format_bad=-0.25, answer_correct=1.0, answer_requires_format=False)
    task = KnightsKnavesTask(**base, reward_config=cfg)
    comps = [late, f"<think></think><answer>{ex.answer}</answer>"]
    inp = RewardInputs(comps, [ex, ex], np.ones(2), np.ones(2, bool), 8)
    out = task.reward(inp)
    np.testing.assert_array_equal(out.components["format"], [-0.25, 0.5])
    np.testing.assert_array_equal(out.components["answer"], [1.0, 1.0])
    as_dict = KnightsKnavesTask(**base, reward_config={"answer_wrong": -1.0})
    assert as_dict.reward_config == KKRewardConfig(answer_wrong=-1.0)
    # the text prompt ends with "<think>": the completion must not repeat it
    pre = KnightsKnavesTask(**base, chat=False, prefill_think=True)
    ex2 = pre.examples("train", 1, seed=1)[0]
    assert ex2.prompt.endswith("Assistant: <think>")
    both = [f" reasoning </think><answer>{ex2.answer}</answer>", f"<think> r </think><answer>{ex2.answer}</answer>"]
    out = pre.reward(RewardInputs(both, [ex2, ex2], np.ones(2), np.ones(2, bool), 8))
    np.testing.assert_array_equal(out.scores, [3.0, -3.0])
    with pytest.raises(ValueError, match="prefill_think needs chat=False"):
        KnightsKnavesTask(prefill_think=True)


def test_extract_answer_and_json_roundtrip():
    from jaxrl_llm.tasks.base import Example
    task = KnightsKnavesTask(n_people=5)
    ex = task.examples("test", 1, seed=0)[0]
    assert task.extract_answer(f"<think>x</think><answer>{ex.answer}</answer>") == ex.answer
    lower = ex.answer.lower().replace("\n", "; ")
    assert task.extract_answer(f"<answer>{lower}</answer>") == ex.answer
    assert task.extract_answer(ex.answer) is None                        # no answer block
    assert task.extract_answer("<answer>all knights</answer>") is None
    assert task.extract_answer(f"<answer>{ex.answer} (6) knave</answer>") is None
    back = Example.from_json(json.loads(json.dumps(ex.to_json())))
    assert back == ex
    assert task.is_correct(f"<think></think><answer>{ex.answer}</answer>", back)


def test_prompts():
    ex = KnightsKnavesTask(n_people=3).examples("train", 1, 0)[0]
    system, user = ex.prompt
    assert system["role"] == "system" and user["role"] == "user"
    assert "<think>" in system["content"] and "<answer>" in system["content"]
    assert "(1) Zoey is a knight" in system["content"]
    assert user["content"] == ex.meta["quiz"]
    text = KnightsKnavesTask(n_people=3, chat=False).examples("train", 1, 0)[0]
    assert isinstance(text.prompt, str) and text.prompt.endswith("\nAssistant:") and ex.meta["quiz"] in text.prompt


def test_determinism_dedupe_and_disjoint_splits():
    task = get_task("knights_knaves", n_people=range(2, 9))
    assert task.n_people == (2, 3, 4, 5, 6, 7, 8)
    train = task.examples("train", 140, seed=0)
    assert train == task.examples("train", 140, seed=0)
    assert train[:30] == task.examples("train", 30, seed=0)
    assert train != task.examples("train", 140, seed=1)
    assert [e.meta["n_people"] for e in train[:14]] == [2, 3, 4, 5, 6, 7, 8] * 2
    key = lambda e: repr(e.meta["statements"])
    test = task.examples("test", 140, seed=0)
    assert not {key(e) for e in train} & {key(e) for e in test}
    assert not {e.meta["quiz"] for e in train} & {e.meta["quiz"] for e in test}
    # two people leave few puzzles: the splits must still never meet, whatever the seeds
    two = KnightsKnavesTask(n_people=2)
    tr = [key(e) for s in (0, 1) for e in two.examples("train", 300, seed=s)]
    te = [key(e) for s in (0, 1) for e in two.examples("test", 40, seed=s)]
    assert len(set(tr[:300])) == 300 and len(set(te[:40])) == 40
    assert not set(tr) & set(te)
    with pytest.raises(ValueError, match="distinct 2-people train puzzles"):
        two.examples("train", 1000, seed=0)
    with pytest.raises(ValueError, match="expected 'train' or 'test'"):
        task.examples("validation", 1, 0)


@pytest.mark.parametrize("depth,width", [(2, 2), (3, 3)])
def test_limits_names_and_statement_types(depth, width):
    task = KnightsKnavesTask(n_people=(3, 5, 8), depth=depth, width=width)
    kinds, max_depth, max_width = set(), 0, 0
    for ex in task.examples("train", 60, seed=2):
        names, trees = read_quiz(ex.meta["quiz"])
        assert len(set(names)) == len(names) and set(names) <= set(NAMES)
        for t in trees:
            max_depth = max(max_depth, tree_depth(t))
            for node in walk(t):
                kinds.add(node[0])
                if node[0] != "leaf":
                    max_width = max(max_width, len(node) - 1)
        if depth == 2:
            assert "(" not in ex.meta["quiz"]  # the paper's depth-2 text needs no brackets
    assert (max_depth, max_width) == (depth, width)
    assert kinds == {"leaf", "not", "and", "or", "imp", "iff"}


def test_generation_speed_and_config_errors():
    start = time.perf_counter()
    exs = KnightsKnavesTask(n_people=8).examples("train", 100, seed=7)
    assert time.perf_counter() - start < 2.0 and len(exs) == 100
    with pytest.raises(ValueError, match="n_people"):
        KnightsKnavesTask(n_people=1)
    with pytest.raises(ValueError, match="depth"):
        KnightsKnavesTask(depth=0)
