"""Reward terms, combine(), and the HostRewardRunner's error / timeout handling (thread and process isolation).

The reward functions used with isolation="process" are defined at module level so they pickle; the
spawned workers import this module by name (pytest puts tests/ on sys.path, which spawn passes on).
"""

import logging
import os
import re
import time

import numpy as np
import pytest

from jaxrl_llm.rewards import (HostRewardRunner, RewardError, combine, format_reward, no_eos_penalty,
                               overlong_penalty, repetition_penalty)
from jaxrl_llm.tasks.base import Example, RewardInputs, RewardOutput


def make_inputs(completions, lengths=None, finished=None, answers=None, max_new_tokens=32):
    b = len(completions)
    answers = answers or ["42"] * b
    return RewardInputs(list(completions), [Example(f"q{i}", a) for i, a in enumerate(answers)],
                        np.asarray(lengths if lengths is not None else [5] * b, np.int32),
                        np.asarray(finished if finished is not None else [True] * b, bool), max_new_tokens)


class ToyTask:
    """A stand-in Task: the answer is the last integer in the completion; right answer scores 2, wrong -1."""

    name = "toy"

    def examples(self, split, num, seed):
        return [Example(f"q{i}", str(i)) for i in range(num)]

    def extract_answer(self, completion):
        nums = re.findall(r"-?\d+", completion)
        return nums[-1] if nums else None

    def is_correct(self, completion, example):
        return self.extract_answer(completion) == example.answer

    def reward(self, inputs):
        correct = np.array([self.is_correct(c, e) for c, e in zip(inputs.completions, inputs.examples)])
        scores = np.where(correct, 2.0, -1.0).astype(np.float32)
        return RewardOutput(scores, {"answer": scores}, correct)


# Module-level terms (picklable, for isolation="process").
def has_42(inp):
    return [1.0 if "42" in c else 0.0 for c in inp.completions]


def raising(inp):
    if any("boom" in c for c in inp.completions):
        raise ZeroDivisionError("the verifier divided by zero")
    return [0.5] * len(inp)


def sleepy(inp):
    # far longer than any test waits: a runner that returned at all did not wait for it, even on a loaded
    # machine where the caller's own thread can stall for seconds (a 3 s sleep failed `< 2.0` there: 3.4 s)
    if any("slow" in c for c in inp.completions):
        time.sleep(30.0)
    return [0.25] * len(inp)


def crashing(inp):
    if any("crash" in c for c in inp.completions):
        os._exit(3)
    return [0.0] * len(inp)


def wrong_length(inp):
    return [1.0] * (len(inp) + 1)


def nan_at_1(inp):
    return [float("nan") if i == 1 else 0.0 for i in range(len(inp))]


def test_overlong_penalty_boundaries():
    # Lmax 20, Lcache 5: no penalty up to 15, linear to -1 at 20, -1 beyond.
    inp = make_inputs(["x"] * 7, lengths=[0, 15, 16, 18, 20, 21, 100])
    r = overlong_penalty(20, 5)(inp)
    np.testing.assert_allclose(r, [0.0, 0.0, -0.2, -0.6, -1.0, -1.0, -1.0])
    # max_len=None reads max_new_tokens; penalty_factor scales.
    inp = make_inputs(["x"] * 3, lengths=[12, 14, 16], max_new_tokens=16)
    np.testing.assert_allclose(overlong_penalty(None, 4, penalty_factor=0.5)(inp), [0.0, -0.25, -0.5])
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(10, 11)


def test_format_reward_modes():
    comps = ["<think>a\nb</think><answer>1</answer>", "  <think>a</think><answer>1</answer>", "no tags"]
    inp = make_inputs(comps)
    pat = r"<think>.*?</think><answer>.*?</answer>"
    np.testing.assert_array_equal(format_reward(pat)(inp), [1.0, 0.0, 0.0])  # fullmatch, DOTALL spans \n
    np.testing.assert_array_equal(format_reward(pat, mode="search")(inp), [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(format_reward(pat, 1.0, -1.0, flags=0)(inp), [-1.0, -1.0, -1.0])  # no DOTALL
    with pytest.raises(ValueError, match="invalid regular expression"):
        format_reward("(")


def test_repetition_penalty_hand_values():
    comps = ["a b c a b c", "The cat sat", "", "a A a a", "x y"]
    r = repetition_penalty(ngram_size=3, max_penalty=-1.0)(make_inputs(comps))
    # 4 trigrams, 3 unique -> -(1 - 3/4); 1 trigram -> 0; empty -> 0; "a a a a" 2 trigrams, 1 unique -> -0.5;
    # fewer words than n -> 0
    np.testing.assert_allclose(r, [-0.25, 0.0, 0.0, -0.5, 0.0])
    r2 = repetition_penalty(ngram_size=2, max_penalty=-2.0, unit="chars")(make_inputs(["abab"]))
    np.testing.assert_allclose(r2, [-2.0 * (1 - 2 / 3)])
    with pytest.raises(ValueError):
        repetition_penalty(max_penalty=0.5)


def test_no_eos_penalty():
    inp = make_inputs(["a", "b"], finished=[True, False])
    np.testing.assert_array_equal(no_eos_penalty(-0.7)(inp), [0.0, -0.7])


def test_user_reward_in_three_lines():
    def my_reward(inp):
        return [1.0 if "42" in c else 0.0 for c in inp.completions]
    out = combine(("answer", my_reward, 1.0), ("format", format_reward(r"<think>.*</think>", mode="search"), 0.5))(
        make_inputs(["<think>hm</think> 42", "41", "<think></think>"]))
    np.testing.assert_allclose(out.scores, [1.5, 0.0, 0.5])
    np.testing.assert_array_equal(out.components["format"], [1.0, 0.0, 1.0])
    assert out.correct is None


def test_combine_weights_components_and_correct():
    inp = make_inputs(["so 0", "so 5", "so 2 then 42"], lengths=[4, 30, 31], answers=["0", "1", "2"])
    reward = combine(ToyTask(), ("has42", has_42, -0.5), ("overlong", overlong_penalty(32, 4), 2.0))
    out = reward(inp)
    toy = np.array([2.0, -1.0, -1.0])                 # last integer: 0 ok, 5 wrong, 42 wrong
    ol = np.array([0.0, -0.5, -0.75])                 # start 28: (28 - 30) / 4, (28 - 31) / 4
    np.testing.assert_allclose(out.scores, toy - 0.5 * np.array([0, 0, 1.0]) + 2.0 * ol, rtol=1e-6)
    np.testing.assert_allclose(out.components["toy"], toy)
    np.testing.assert_allclose(out.components["overlong"], ol)        # unweighted
    np.testing.assert_allclose(out.components["toy/answer"], toy)     # the task's own component, for logging
    np.testing.assert_array_equal(out.correct, [True, False, False])
    assert out.metrics()["accuracy"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="unique"):
        combine(("a", has_42, 1.0), ("a", has_42, 1.0))
    with pytest.raises(TypeError, match="weight"):
        combine(("a", has_42, "1"))


@pytest.mark.parametrize("fn,match", [(wrong_length, r"'bad' returned 4 values for a batch of 3"),
                                      (nan_at_1, r"'bad' returned non-finite values at rows \[1\]")])
def test_invalid_return_is_a_clear_error(fn, match):
    inp = make_inputs(["a", "b", "c"])
    with pytest.raises(RewardError, match=match):
        combine(("bad", fn, 1.0))(inp)
    with HostRewardRunner(combine(("bad", fn, 1.0)), timeout_s=5.0, on_error="abort") as runner:
        with pytest.raises(RewardError, match=match):
            runner(inp)
    with HostRewardRunner(combine(("ok", has_42, 1.0), ("bad", fn, 1.0)), on_error="score", error_score=-3.0) as r:
        out = r(inp)
    assert out.errors == {"ok": 0, "bad": 1}
    np.testing.assert_array_equal(out.components["bad"], [-3.0] * 3)
    with pytest.raises(RewardError, match="forget to `return`"):
        combine(("none", lambda inp: None, 1.0))(inp)


def test_raising_term_score_and_abort(caplog):
    inp = make_inputs(["fine 42", "boom", "ok", "ok 42"])
    reward = combine(("answer", has_42, 1.0), ("verify", raising, 2.0))
    with HostRewardRunner(reward, on_error="score", error_score=-1.0, batch_size=2) as runner:
        with caplog.at_level(logging.WARNING):
            out = runner(inp)
    # Chunk [0, 2) raised: its rows get error_score for "verify"; chunk [2, 4) scored normally.
    np.testing.assert_allclose(out.components["verify"], [-1.0, -1.0, 0.5, 0.5])
    np.testing.assert_allclose(out.scores, [1 - 2, 0 - 2, 0 + 1, 1 + 1])
    assert out.errors == {"answer": 0, "verify": 1} and out.timeouts == {"answer": 0, "verify": 0}
    assert out.metrics()["reward/errors/verify"] == 1.0
    assert "ZeroDivisionError" in caplog.text and "in raising" in caplog.text  # logged with the user's traceback
    with HostRewardRunner(reward, on_error="abort") as runner:
        with pytest.raises(RewardError) as e:
            runner(inp)
    msg = str(e.value)
    assert "'verify'" in msg and "ZeroDivisionError: the verifier divided by zero" in msg
    assert "in raising" in msg and "on_error='score'" in msg
    with pytest.raises(RewardError, match="'verify' raised ZeroDivisionError"):  # called directly: raises
        reward(inp)


def test_thread_timeout_counted_and_late_result_dropped():
    reward = combine(("answer", has_42, 1.0), ("slow", sleepy, 1.0))
    with HostRewardRunner(reward, timeout_s=0.3, batch_size=2, error_score=-5.0) as runner:
        t0 = time.monotonic()
        out = runner(make_inputs(["slow", "42", "a", "b"]))
        assert time.monotonic() - t0 < 15.0              # did not wait for the 30 s sleep
        np.testing.assert_allclose(out.components["slow"], [-5.0, -5.0, 0.25, 0.25])
        assert out.timeouts == {"answer": 0, "slow": 1} and out.errors == {"answer": 0, "slow": 0}
        out2 = runner(make_inputs(["a", "42"]))          # the abandoned call must not leak into later calls
        np.testing.assert_allclose(out2.scores, [0.25, 1.25])
        assert out2.timeouts["slow"] == 0
    with HostRewardRunner(reward, timeout_s=0.3, on_error="abort") as runner:
        with pytest.raises(RewardError, match=r"'slow' did not return within timeout_s=0.3 s.*abandoned thread"):
            runner(make_inputs(["slow"]))


def test_task_term_through_runner_failure_makes_incorrect():
    inp = make_inputs(["0", "boom 1", "9"], answers=["0", "1", "2"])
    with HostRewardRunner(ToyTask(), batch_size=2) as runner:
        out = runner(inp)
    np.testing.assert_array_equal(out.correct, [True, True, False])
    np.testing.assert_allclose(out.scores, [2.0, 2.0, -1.0])
    assert out.components["toy/answer"].shape == (3,)


def test_process_isolation_timeout_error_crash(caplog):
    reward = combine(("answer", has_42, 1.0), ("slow", sleepy, 1.0), ("verify", raising, 1.0),
                     ("crash", crashing, 1.0))
    inputs = make_inputs(["42 slow boom crash", "ok"])
    with HostRewardRunner(reward, timeout_s=0.3, isolation="process", num_workers=2, error_score=-1.0,
                          start_timeout_s=60.0) as runner:
        with caplog.at_level(logging.WARNING):
            out = runner(inputs)
        # the worker's traceback text comes back to the parent
        assert re.search(r"(?s)'verify' raised ZeroDivisionError.*in raising", caplog.text)
        assert "'slow' did not return within timeout_s=0.3 s" in caplog.text
        assert "'crash'" in caplog.text and "died (exit code 3)" in caplog.text
        assert out.timeouts == {"answer": 0, "slow": 1, "verify": 0, "crash": 0}
        assert out.errors == {"answer": 0, "slow": 0, "verify": 1, "crash": 1}
        np.testing.assert_allclose(out.scores, [1.0 - 3.0, 0.0 - 3.0])
        t0 = time.monotonic()
        out2 = runner(make_inputs(["42", "a"]))          # killed workers were replaced; the pool still works
        np.testing.assert_allclose(out2.scores, [1.0 + 0.25 + 0.5, 0.25 + 0.5])
        assert sum(out2.errors.values()) == 0 and sum(out2.timeouts.values()) == 0
        assert time.monotonic() - t0 < 30


def test_process_isolation_needs_picklable_terms():
    with pytest.raises(TypeError, match=r"(?s)term 'lam'.*cannot be pickled.*top level of a module"):
        HostRewardRunner(combine(("lam", lambda inp: [0.0] * len(inp), 1.0)), isolation="process")
    with pytest.raises(ValueError, match="fork"):
        HostRewardRunner(has_42, isolation="process", start_method="fork")
