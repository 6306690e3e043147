"""Math task: final-answer extraction, equivalence (math-verify + sympy), worker threads, file loading, splits."""

import concurrent.futures
import json
import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("math_verify")

from jaxrl_llm.data.records import DataError
from jaxrl_llm.tasks.base import RewardInputs, Task, get_task
from jaxrl_llm.tasks.math_answers import (
    AnswerPolicy,
    MathTask,
    answers_equal,
    canonical_answer,
    extract_final_answer,
    normalize_answer,
)

# ------------------------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize("text, answer, source", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72", "gsm8k"),
    ("so we get\n#### 1,000\n", "1,000", "gsm8k"),
    ("Hence $x = \\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}", "boxed"),
    ("The set is \\boxed{\\{1, 2\\}}", "\\{1, 2\\}", "boxed"),           # escaped braces are not structure
    ("First \\boxed{3}, no wait: \\boxed{4}.", "4", "boxed"),           # the last box wins
    ("\\boxed{\\frac{1}{\\boxed{2}}}", "\\frac{1}{\\boxed{2}}", "boxed"),  # outermost of nested boxes
    ("#### 5 but then \\boxed{6}", "6", "boxed"),                       # the later marker wins
    ("\\boxed{6} and finally\n#### 5", "5", "gsm8k"),
    ("so it is \\fbox{7}", "7", "boxed"),
    ("The answer is 3.5.", "3.5", "answer_is"),
    ("**Final answer:** $\\frac12$", "$\\frac12$", "answer_is"),
])
def test_extracts_final_answer(text, answer, source):
    ex = extract_final_answer(text)
    assert (ex.answer, ex.source, ex.failure) == (answer, source, None)


@pytest.mark.parametrize("text, why", [
    ("I think it is 42", "no final answer found"),
    ("so \\boxed{\\frac{1}{2", "unclosed"),                             # truncated completion
    ("\\boxed{}", "empty"),
    ("####   \n", "nothing after ####"),
])
def test_extraction_failure_is_reported(text, why):
    ex = extract_final_answer(text)
    assert ex.answer is None and why in ex.failure


def test_answer_is_fallback_can_be_turned_off():
    assert extract_final_answer("The answer is 12.").answer == "12"
    ex = extract_final_answer("The answer is 12.", answer_is_fallback=False)
    assert ex.answer is None and "'the answer is'" not in ex.failure


# ----------------------------------------------------------------------------------------------- equivalence

EQUAL = [
    ("1/2", "0.5"), ("\\frac{1}{2}", "0.5"), ("\\dfrac12", "1/2"), ("\\dfrac12", "\\frac{1}{2}"),
    ("1,000", "1000"), ("$1,000.00", "1000"), ("\\$1,000.00", "1000"), ("1\\,000", "1000"),
    ("-3", "\u22123"), ("2\\sqrt{2}", "\\sqrt{8}"), ("x+1", "1+x"),
    ("5 dollars", "5"), ("18 eggs", "18"), ("\\text{18 eggs}", "18"), ("5\\text{ dollars}", "5"), ("12 km/h", "12"),
    ("[1,2)", "[1, 2)"), ("\\{1,2\\}", "\\{2,1\\}"), ("(-\\infty, 3]", "(-\\infty,3]"),
    ("\\frac{\\sqrt3}{2}", "\\dfrac{\\sqrt{3}}{2}"), ("2^{2^{3}}", "256"), ("3.", "3"),
]
NOT_EQUAL = [
    ("1/2", "0.6"), ("1000", "100"), ("x+1", "x-1"), ("[1,2)", "(1,2)"), ("2\\sqrt{2}", "\\sqrt{6}"),
    ("1,000", "1"), ("-3", "3"), ("5 dollars", "6"), ("5", ""),
]


@pytest.mark.parametrize("a, b", EQUAL)
def test_equal_answers(a, b):
    assert answers_equal(a, b) and answers_equal(b, a)


@pytest.mark.parametrize("a, b", NOT_EQUAL)
def test_unequal_answers(a, b):
    assert not answers_equal(a, b) and not answers_equal(b, a)


@pytest.mark.parametrize("percent, equal_half, equal_fifty", [
    ("lenient", True, True), ("value", True, False), ("strip", False, True)])
def test_percent_policy(percent, equal_half, equal_fifty):
    policy = AnswerPolicy(percent=percent)
    for pct in ("50\\%", "50%", "50 percent"):
        assert answers_equal(pct, "0.5", policy) == equal_half, pct
        assert answers_equal("0.5", pct, policy) == equal_half, pct
        assert answers_equal(pct, "50", policy) == equal_fifty, pct


def test_unit_stripping_is_optional_and_leaves_math_words():
    assert normalize_answer("18 eggs") == "18"
    assert normalize_answer("18 eggs", strip_units=False) == "18 eggs"
    assert not answers_equal("18 eggs", "18", AnswerPolicy(strip_units=False))
    assert normalize_answer("2 pi") == "2 pi"


def test_canonical_form_groups_equivalent_answers():
    assert canonical_answer("\\dfrac12") == canonical_answer("0.5") == canonical_answer("1/2") == "1/2"
    assert canonical_answer("$1,000.00") == canonical_answer("1000") == "1000"
    assert canonical_answer("1+x") == canonical_answer("x+1")
    assert canonical_answer("\\sqrt{8}") == canonical_answer("2\\sqrt{2}")
    assert canonical_answer("0.6") != canonical_answer("1/2")


def _in_worker_thread(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001  (handed to the main thread)
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_works_in_a_worker_thread():
    # math-verify's SIGALRM timeout raises ValueError off the main thread; the symbolic pairs need it.
    policy = AnswerPolicy(main_thread_timeout_s=5)
    assert _in_worker_thread(lambda: answers_equal("2\\sqrt{2}", "\\sqrt{8}", policy))
    assert not _in_worker_thread(lambda: answers_equal("x+1", "x-1", policy))
    assert _in_worker_thread(lambda: canonical_answer("\\tfrac{3}{6}", policy)) == "1/2"


def test_thread_pool_matches_sequential():
    pairs = EQUAL + NOT_EQUAL
    expected = [answers_equal(a, b) for a, b in pairs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda ab: answers_equal(*ab), pairs * 3))
    assert got == expected * 3


def test_power_towers_do_not_hang():
    # Without the size guard sympy computes 9^(9^(9^9)) holding the GIL, so no thread time limit helps: run it
    # in a subprocess with a deadline.
    code = ("import threading; from jaxrl_llm.tasks.math_answers import answers_equal as eq\n"
            "r = []; t = threading.Thread(target=lambda: r.append((eq('9^{9^{9^{9}}}', '5'), "
            "eq('10^{10^{10}}', '10^{10^{10}}'), eq('(x+1)^{1000000}', 'x'))))\n"
            "t.start(); t.join(); print(r[0])")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "(False, True, False)", out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------- the task

def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


GSM8K = [{"question": f"Q{i}: What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
         for i in range(1, 11)]
MATH = [{"problem": "What is $\\sin 60^\\circ$?", "solution": "It is $\\boxed{\\frac{\\sqrt{3}}{2}}$."},
        {"problem": "Solve $2x = 1$.", "solution": "So $x=\\boxed{\\dfrac{1}{2}}$."}]


def _inputs(completions, examples):
    b = len(completions)
    return RewardInputs(completions, examples, np.full(b, 10, np.int32), np.ones(b, bool), 64)


def test_gsm8k_file(tmp_path):
    task = get_task("math", path=_write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K), test_fraction=0.2)
    assert isinstance(task, Task)
    exs = task.examples("train", 100, seed=0) + task.examples("test", 100, seed=0)
    by_q = {e.prompt[-1]["content"].split("\n")[0]: e for e in exs}
    ex = by_q["Q3: What is 3 + 3?"]
    assert ex.answer == "6" and ex.meta["gold_source"] == "gsm8k" and ex.meta["where"].endswith("gsm8k.jsonl:3")
    assert ex.prompt == [{"role": "user", "content": "Q3: What is 3 + 3?\n\nPlease reason step by step, "
                                                     "and put your final answer within \\boxed{}."}]
    completions = ["3 + 3 = 6\n#### 6", "so \\boxed{6.0}", "\\boxed{7}", "it is six", "\\boxed{6"]
    out = task.reward(_inputs(completions, [ex] * 5))
    np.testing.assert_array_equal(out.scores, [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(out.correct, [True, True, False, False, False])
    np.testing.assert_array_equal(out.components["format"], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(out.components["no_answer"], [0, 0, 0, 1, 1])
    assert out.scores.dtype == np.float32
    assert task.is_correct("#### 6", ex) and not task.is_correct("#### 60", ex)
    assert task.extract_answer("so \\boxed{6.0}") == "6" and task.extract_answer("six") is None
    clone = pickle.loads(pickle.dumps(task))  # the reward runner's process workers receive the task pickled
    np.testing.assert_array_equal(clone.reward(_inputs(completions, [ex] * 5)).scores, out.scores)


def test_reward_values_and_format_term(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", GSM8K)
    task = MathTask(train_path=path, chat=False, correct_reward=2.0, wrong_reward=-1.0, unparseable_reward=-0.5,
                    format_weight=0.25, template="Q: {question} {not a placeholder}\nA:")
    ex = next(e for e in task.examples("train", None, 0) if e.answer == "2")
    assert ex.prompt == "Q: Q1: What is 1 + 1? {not a placeholder}\nA:"
    out = task.reward(_inputs(["\\boxed{2}", "\\boxed{3}", "The answer is 2.", "no idea"], [ex] * 4))
    np.testing.assert_allclose(out.scores, [2.25, -0.75, 2.0, -0.5])
    np.testing.assert_allclose(out.components["answer"], [2.0, -1.0, 2.0, -0.5])
    assert out.metrics()["accuracy"] == 0.5


def test_math_file_and_system_prompt(tmp_path):
    task = MathTask(train_path=_write_jsonl(tmp_path / "math.jsonl", MATH), system_prompt="You are a mathematician.")
    sin, half = sorted(task.examples("train", None, 0), key=lambda e: e.meta["where"])
    assert sin.answer == "\\frac{\\sqrt{3}}{2}" and half.answer == "\\dfrac{1}{2}"
    assert sin.prompt[0] == {"role": "system", "content": "You are a mathematician."}
    assert task.is_correct("Thus \\boxed{\\dfrac{\\sqrt 3}{2}}", sin)
    assert not task.is_correct("Thus \\boxed{\\frac{\\sqrt{2}}{2}}", sin)
    assert task.is_correct("x = 0.5, so \\boxed{0.5}", half)
    with pytest.raises(ValueError, match="no 'test' split"):
        task.examples("test", 1, 0)


def test_math500_style_answer_field_and_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "p", "solution": "long\nsolution", "answer": "\\frac{1}{2}"}]),
                   path)
    (ex,) = MathTask(train_path=str(path), answer_field="answer").examples("train", 1, 0)
    assert ex.answer == "\\frac{1}{2}" and ex.meta["gold_source"] == "raw"


def test_missing_field_error_names_field_location_and_fields(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [GSM8K[0], {"question": "q", "solutoin": "#### 1"}])
    with pytest.raises(DataError) as e:
        MathTask(train_path=path)
    msg = str(e.value)
    assert "bad.jsonl:2" in msg and "'answer'" in msg and "'solution'" in msg and "'question', 'solutoin'" in msg
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'prompt'.*'question', 'answer'"):
        MathTask(train_path=path, question_field="prompt")


def test_numeric_answer_field_and_wrong_types(tmp_path):
    (ex,) = MathTask(train_path=_write_jsonl(tmp_path / "n.jsonl", [{"question": "q", "answer": 42}])).examples(
        "train", 1, 0)
    assert ex.answer == "42" and ex.meta["gold_source"] == "raw"
    with pytest.raises(DataError, match=r"l.jsonl:1: field 'question' is an array"):
        MathTask(train_path=_write_jsonl(tmp_path / "l.jsonl", [{"question": ["q"], "answer": "#### 1"}]))


def test_gold_without_final_answer_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "some\nwork, no final line"}])
    with pytest.raises(DataError, match=r"g.jsonl:1: cannot read the gold answer"):
        MathTask(train_path=path)


def test_held_out_split_is_deterministic(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", GSM8K)

    def split(seed):
        t = MathTask(path=path, test_fraction=0.3, split_seed=seed)
        return ({e.answer for e in t.examples("train", None, 0)}, {e.answer for e in t.examples("test", None, 0)})

    train, test = split(0)
    assert len(train) == 7 and len(test) == 3 and not train & test
    assert train | test == {str(2 * i) for i in range(1, 11)}
    assert split(0) == (train, test)
    assert any(split(s)[1] != test for s in (1, 2, 3))
    t = MathTask(path=path, test_fraction=0.3, split_seed=0)
    assert [e.answer for e in t.examples("train", 4, seed=5)] == [e.answer for e in t.examples("train", 4, seed=5)]
    assert len(t.examples("train", 4, seed=5)) == 4


def test_train_and_test_files(tmp_path):
    task = MathTask(train_path=_write_jsonl(tmp_path / "tr.jsonl", GSM8K[:6]),
                    test_path=_write_jsonl(tmp_path / "te.jsonl", GSM8K[6:]))
    assert len(task.examples("train", None, 0)) == 6
    assert sorted(int(e.answer) for e in task.examples("test", None, 0)) == [14, 16, 18, 20]


def test_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of"):
        MathTask()
    with pytest.raises(ValueError, match="percent"):
        AnswerPolicy(percent="half")
    with pytest.raises(TypeError, match="unexpected arguments \\['precent'\\]"):
        MathTask(train_path="unused.jsonl", precent="strip")
