"""pass@k against brute-force enumeration, maj@k by hand, evaluate_samples on a stand-in task."""

import itertools
import json
import math
import re

import numpy as np
import pytest

from jaxrl_llm.eval import evaluate_samples, maj_at_k, majority_vote, pass_at_k, pass_at_k_table
from jaxrl_llm.tasks.base import Example, RewardOutput


def brute_pass_at_k(n, c, k):
    """Fraction of the k-subsets of n samples (c of them correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases_and_large_n():
    assert pass_at_k(10, 0, 3) == 0.0          # c = 0
    assert pass_at_k(10, 10, 3) == 1.0        # c = n
    assert pass_at_k(10, 1, 10) == 1.0        # k = n with a correct sample
    assert pass_at_k(10, 8, 3) == 1.0         # n - c < k
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)   # pass@1 = c / n
    exact = 1 - math.comb(197, 100) / math.comb(200, 100)  # binomials ~1e58: the product form stays exact
    assert pass_at_k(200, 3, 100) == pytest.approx(exact, rel=1e-12)
    for bad in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_pass_at_k_table():
    table = pass_at_k_table([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 1]], ks=(1, 2))
    assert table[1] == pytest.approx(np.mean([0.25, 0.0, 0.75]))
    assert table[2] == pytest.approx(np.mean([brute_pass_at_k(4, 1, 2), 0.0, 1.0]))
    with pytest.raises(ValueError, match="prompt 0 has 4"):
        pass_at_k_table([[1, 0, 0, 0]], ks=(5,))


def test_majority_vote_and_maj_at_k():
    assert majority_vote(["1", "2", "2"]) == 1
    assert majority_vote(["1", "2"]) == 0                       # tie: the answer seen first wins
    assert majority_vote(["2", "1", "1", "2"]) == 0             # 2-2 tie: "2" appeared first
    assert majority_vote([None, None, "3"]) == 2                # None never votes
    assert majority_vote([None, None]) is None
    golds = ["2", "1", "3", "7"]
    answers = [["1", "2", "2"], ["1", "2", "2"], [None, None, "3"], [None, None, None]]
    assert maj_at_k(answers, golds) == pytest.approx(2 / 4)     # right, wrong, right, all-None wrong
    assert maj_at_k(answers, golds, k=1) == pytest.approx(1 / 4)  # only the first sample votes
    close = lambda a, b: abs(float(a) - float(b)) < 1e-6
    assert maj_at_k([["0.5", "0.50000001", "1"]], ["0.5"], is_equal=close) == 1.0
    with pytest.raises(ValueError, match="maj@4"):
        maj_at_k(answers, golds, k=4)


class ToyTask:
    """The answer is the last integer of the completion; reward 1 when right, else 0."""

    name = "toy"

    def examples(self, split, num, seed):
        return []

    def extract_answer(self, completion):
        nums = re.findall(r"-?\d+", completion)
        return nums[-1] if nums else None

    def is_correct(self, completion, example):
        return self.extract_answer(completion) == example.answer

    def reward(self, inputs):
        correct = np.array([self.is_correct(c, e) for c, e in zip(inputs.completions, inputs.examples)])
        return RewardOutput(correct.astype(np.float32), {}, correct)


def _fixture():
    examples = [Example("a", "1", {"n_people": 2}), Example("b", "5", {"n_people": 3}),
                Example("c", "7", {"n_people": 2})]
    completions = [["1", "x", "so 1", "2"],        # 2/4 right; majority "1" -> right
                   ["4", "4", "5", "nothing"],     # 1/4 right; majority "4" -> wrong
                   ["no", "nope", "7", "8"]]       # 1/4 right; first vote is "7" (tie 7/8 -> first) -> right
    return examples, completions


def test_evaluate_samples_metrics_json_and_table(tmp_path):
    examples, completions = _fixture()
    res = evaluate_samples(ToyTask(), examples, completions, ks=(1, 2, 4))
    m = res.metrics
    assert m["prompts"] == 3 and m["samples"] == 12
    assert m["pass@1"] == pytest.approx(np.mean([0.5, 0.25, 0.25]))
    assert m["pass@2"] == pytest.approx(np.mean([brute_pass_at_k(4, 2, 2), brute_pass_at_k(4, 1, 2),
                                                 brute_pass_at_k(4, 1, 2)]))
    assert m["pass@4"] == 1.0
    assert m["maj@1"] == pytest.approx(1 / 3)       # first samples: "1" right, "4" wrong, "no" (None) wrong
    assert m["maj@4"] == pytest.approx(2 / 3)
    assert m["reward/mean"] == pytest.approx(m["pass@1"])
    r1 = res.records[1]
    assert r1["answers"] == ["4", "4", "5", None] and r1["maj@4_answer"] == "4" and r1["maj@4"] is False
    assert r1["correct"] == [False, False, True, False] and r1["rewards"] == [0.0, 0.0, 1.0, 0.0]

    path = tmp_path / "eval" / "out.json"
    res.to_json(path)
    loaded = json.loads(path.read_text())
    assert loaded["metrics"] == pytest.approx(m) and len(loaded["records"]) == 3
    assert loaded["records"][0]["completions"] == completions[0]

    lines = res.table().splitlines()
    assert lines[0] == "|  | prompts | samples | pass@1 | pass@2 | pass@4 | maj@1 | maj@2 | maj@4 | reward/mean |"
    assert lines[-1].startswith("| all | 3 | 12 | 0.333 |") and len(lines) == 3


def test_evaluate_samples_stratified():
    examples, completions = _fixture()
    res = evaluate_samples(ToyTask(), examples, completions, ks=(2,), stratify_by="n_people")
    assert list(res.strata) == [2, 3]
    assert res.strata[2]["prompts"] == 2 and res.strata[2]["pass@1"] == pytest.approx(np.mean([0.5, 0.25]))
    assert res.strata[3]["maj@2"] == 0.0 and res.strata[2]["maj@2"] == 0.5  # c: first two unparseable
    rows = res.table().splitlines()
    assert rows[0].startswith("| n_people | prompts |")
    assert [r.split("|")[1].strip() for r in rows[2:]] == ["2", "3", "all"]
    assert json.loads(json.dumps(res.to_dict()))["strata"]["3"]["prompts"] == 1
    with pytest.raises(KeyError, match="example 0 has no such meta key"):
        evaluate_samples(ToyTask(), examples, completions, stratify_by="depth")
    with pytest.raises(ValueError, match="at least 8 completions"):
        evaluate_samples(ToyTask(), examples, completions, ks=(8,))


def test_evaluate_samples_custom_reward_and_lengths():
    from jaxrl_llm.rewards import combine, overlong_penalty
    examples, completions = _fixture()
    lengths = [[10, 10, 10, 10], [10, 10, 10, 16], [10, 10, 10, 10]]
    reward = combine(ToyTask(), ("overlong", overlong_penalty(16, 4), 1.0))
    res = evaluate_samples(ToyTask(), examples, completions, lengths=lengths, max_new_tokens=16, reward=reward)
    assert res.records[1]["rewards"] == [0.0, 0.0, 1.0, -1.0]
