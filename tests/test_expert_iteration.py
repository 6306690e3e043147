"""Expert iteration: config errors, what a round keeps, its metrics, determinism, resume == never stopped."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import defaultdict

import ml_collections as mc
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxrl_llm.tasks import Example, register_task, registered_tasks
from jaxrl_llm.tasks.arithmetic import ArithmeticTask
from jaxrl_llm.train.config import ConfigError, base_config, expert_iteration_stage, sft_stage, validate
from jaxrl_llm.train.stages.expert_iteration import batch_order, keep_verified
from jaxrl_llm.train.trainer import train

ARITH = dict(min_digits=1, max_digits=1, operators=("+",), spaced=True, pad_operands=True, reverse_answer=True)


def _digit_sum(text: str) -> int:
    return sum(int(ch) for ch in text if ch.isdigit())


@dataclasses.dataclass(frozen=True)
class _ModThree(ArithmeticTask):
    """Arithmetic whose verifier accepts a completion whose digit sum equals the answer's mod 3: about a third of
    a briefly trained model's answers pass, so a round keeps some and rejects some."""

    def is_correct(self, completion: str, example: Example) -> bool:
        return bool(completion) and _digit_sum(completion) % 3 == _digit_sum(example.answer) % 3


if "arithmetic_mod3_ei" not in registered_tasks():
    register_task("arithmetic_mod3_ei")(_ModThree)

PROMPTS, N, KEEP = 4, 4, 2


def _config(run_root, name="ei", rounds=3) -> mc.ConfigDict:
    c = base_config()
    c.name, c.run_root, c.model.preset = name, str(run_root), "dummy"
    c.task.name, c.task.kwargs = "arithmetic_mod3_ei", mc.ConfigDict(ARITH)
    c.eval.every = 0
    c.log.every, c.log.progress, c.log.tensorboard = 1, False, False
    c.log.samples_every, c.log.num_samples = 1, PROMPTS * N
    c.checkpoint.every, c.checkpoint.keep, c.checkpoint.async_save = 1, 5, False
    c.stages = ("sft", "ei")
    c.sft = sft_stage(steps=30, batch_size=32, learning_rate=3e-3, max_prompt_len=12, max_response_len=4)
    c.ei = expert_iteration_stage(rounds=rounds, prompts_per_round=PROMPTS, n=N, keep_per_prompt=KEEP, sft_steps=2,
                                  batch_size=8, learning_rate=1e-3, max_new_tokens=4, reset_optimizer=True)
    c.ei.max_prompt_len = 12
    return c


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("key, value, match", [
    ("search.method", "beam", r"^config\.ei\.search\.prm_stage='' must name a prm stage that runs before 'ei'"),
    ("search.method", "sampel", r"^config\.ei\.search\.method='sampel' is not a search method .*did you mean 'sample'"),
    ("search.n", 0, r"^config\.ei\.search\.n=0 is out of range: expected an integer >= 1"),
    ("keep_per_prompt", 5, r"^config\.ei\.keep_per_prompt=5 is out of range: expected an integer in \[1, 4\]"),
    ("sft_steps", 0, r"^config\.ei\.sft_steps=0 is out of range"),
    ("rounds", 0, r"^config\.ei\.rounds=0 is out of range"),
    ("norm_length", 4.0, r"^config\.ei\.norm_length"),
    ("loss_agg", "mean", r"^config\.ei\.loss_agg"),
    ("sampling.temperature", 0.0, r"^config\.ei\.sampling\.temperature=0\.0 \(greedy\) with config\.ei\.search\.n=4"),
])
def test_config_errors_are_one_line_naming_the_key(tmp_path, key, value, match):
    c = _config(tmp_path)
    section, _, leaf = f"ei.{key}".rpartition(".")
    node = c
    for part in section.split("."):
        node = node[part]
    node[leaf] = value
    with pytest.raises(ConfigError, match=match) as e:
        validate(c)
    assert "\n" not in str(e.value)


def test_a_section_missing_a_key_is_an_error(tmp_path):
    c = _config(tmp_path)
    del c.ei["keep_per_prompt"]
    with pytest.raises((ConfigError, AttributeError, KeyError), match="keep_per_prompt"):
        validate(c)


# ----------------------------------------------------------------------------- what a round keeps


def test_keep_verified_keeps_distinct_correct_ended_completions_up_to_the_cap():
    task = _ModThree(**ARITH)
    ex = [Example(prompt=f"p{i}", answer=a) for i, a in enumerate(("3", "1"))]
    #          prompt 0 (answer 3: digit sum 0 mod 3)          prompt 1 (answer 1)
    texts = ["6", "9", "6", "12", "3",                          "4", "5", "", "7", "1"]
    finished = [True, True, True, True, False,                  True, True, True, False, True]
    rows_ex = [ex[0]] * 5 + [ex[1]] * 5
    kept, correct, solved = keep_verified(texts, rows_ex, finished, 5, keep_per_prompt=3, task=task)
    np.testing.assert_array_equal(correct, [1, 1, 1, 1, 1, 1, 0, 0, 1, 1])
    # prompt 0: "6", "9" kept, the second "6" a duplicate, "12" kept (cap 3 reached), "3" never ended
    # prompt 1: "4" and "1" kept; "7" is correct but did not end
    assert kept == [0, 1, 3, 5, 9]
    np.testing.assert_array_equal(solved, [True, True])
    kept, _, _ = keep_verified(texts, rows_ex, finished, 5, keep_per_prompt=1, task=task)
    assert kept == [0, 5]


def test_batch_order_cycles_permutations_of_the_kept_pairs():
    order = batch_order(3, 8, (0, 1, 2))
    assert sorted(order[:3]) == sorted(order[3:6]) == [0, 1, 2] and len(order) == 8
    np.testing.assert_array_equal(order, batch_order(3, 8, (0, 1, 2)))
    assert not np.array_equal(batch_order(5, 10, (0, 1, 2)), batch_order(5, 10, (0, 1, 3)))


# ----------------------------------------------------------------------------- whole runs


def _records(run_dir, file, stage="ei") -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / file).read_text().splitlines()]
    return [r for r in rows if r["stage"] == stage]


def _state(run_dir, step) -> dict:
    state = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / "ei" / str(step) / "state")
    import jax
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ei")
    train(_config(root / "a"))
    return root


def test_rounds_keep_only_verified_completions_and_count_them(runs):
    run_dir = runs / "a" / "ei"
    task = _ModThree(**ARITH)
    answers = {e.prompt: e.answer for e in task.examples("train", PROMPTS * 64, 0)}
    metrics = {r["step"]: r for r in _records(run_dir, "metrics.jsonl") if "search/kept" in r}
    samples = defaultdict(list)
    for r in _records(run_dir, "samples.jsonl"):
        samples[r["step"]].append(r)
    assert sorted(metrics) == sorted(samples) == [1, 2, 3]
    total_tokens, any_kept, any_rejected = 0, False, False
    for step, rows in samples.items():
        assert len(rows) == PROMPTS * N
        solved = 0
        for p in range(PROMPTS):
            group = rows[p * N:(p + 1) * N]
            assert len({r["prompt"] for r in group}) == 1
            ok = [bool(r["completion"]) and _digit_sum(r["completion"]) % 3 == _digit_sum(answers[r["prompt"]]) % 3
                  for r in group]
            assert [r["correct"] for r in group] == ok  # the verifier ran on the right example
            kept = [r["completion"] for r in group if r["kept"]]
            assert all(r["correct"] and r["finished"] for r in group if r["kept"])  # only verified, ended ones
            assert len(set(kept)) == len(kept)                                       # distinct
            eligible = {r["completion"] for r, good in zip(group, ok) if good and r["finished"]}
            assert len(kept) == min(KEEP, len(eligible))                             # none lost
            solved += any(ok)
            any_kept |= bool(kept)
            any_rejected |= not all(ok)
        m = metrics[step]
        assert m["search/solve_rate"] == pytest.approx(solved / PROMPTS)
        assert m["search/kept"] == sum(r["kept"] for r in rows)
        assert m["search/accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows]))
        total_tokens += m["search/sampled_tokens"]
        assert m["search/sampled_tokens_total"] == total_tokens
        assert m["sft/steps"] == (2.0 if m["search/kept"] else 0.0)
    assert any_kept and any_rejected  # the test can fail either way
    trained = [m for m in metrics.values() if "loss" in m]
    assert trained and all(np.isfinite(m["loss"]) and m["skipped"] == 0 for m in trained)
    # reset_optimizer: every round starts a fresh optimizer, so its step count is that round's SFT steps
    for step in (1, 2, 3):
        assert int(_state(run_dir, step)["['step']"]) == metrics[step]["sft/steps"]


def test_resume_equals_never_stopping(runs):
    """The finished run cut back to round 1's checkpoint runs rounds 2 and 3 again: the same metrics (search,
    kept data, SFT), samples and final state as uninterrupted (its sft stage is restored, not rerun)."""
    a = runs / "a" / "ei"
    before = {f: _strip(_records(a, f)) for f in ("metrics.jsonl", "samples.jsonl")}
    final = _state(a, 3)
    for step in (2, 3):
        shutil.rmtree(a / "checkpoints" / "ei" / str(step))
    train(_config(runs / "a"))
    again = _state(a, 3)
    assert set(again) == set(final)
    for k in final:
        np.testing.assert_array_equal(again[k], final[k], err_msg=k)
    for file, rows in before.items():
        assert _strip(_records(a, file)) == rows, file


def _prm_config(tmp_path, method: str = "beam") -> mc.ConfigDict:
    """SFT, a PRM on a small step-labelled file (steps: digits, separated by " "), then expert iteration with a
    step-level search ranked by it ("ei"; with both methods, "ei" beam and "ei_dvts" DVTS)."""
    from jaxrl_llm.train.config import prm_stage
    rows = [{"prompt": f"{a} + {b} =", "steps": [str((a + b) % 10), str((a + b) // 10)], "labels": [1, a % 2]}
            for a in range(4) for b in range(4)]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = _config(tmp_path, name="ei_step", rounds=2)
    c.stages = ("sft", "prm", "ei")  # a policy that ends its answers, so that some candidates are kept
    c.prm = prm_stage(steps=1, batch_size=4, learning_rate=1e-3, max_prompt_len=12, max_response_len=4)
    c.prm.data.update(dict(source="jsonl", path=str(tmp_path / "steps.jsonl"), separator=" "))
    c.ei.search.update(dict(method=method, prm_stage="prm", expansions=2, step_tokens=2))
    c.ei.keep_per_prompt = 1
    return c


def test_step_search_needs_an_earlier_prm_stage(tmp_path):
    c = _prm_config(tmp_path, "beam")
    c.ei.search.prm_stage = "sft"
    with pytest.raises(ConfigError, match=r"^config\.ei\.search\.prm_stage='sft' must name a prm stage that runs "
                                          r"before 'ei' .*earlier prm stages: \['prm'\]$"):
        validate(c)
    c = _config(tmp_path)
    c.ei.search.expansions = 2
    with pytest.raises(ConfigError, match=r"^config\.ei\.search\.expansions=2 is not read by method='sample'"):
        validate(c)
    c = _prm_config(tmp_path, "dvts")
    c.ei.search.expansions = 3
    with pytest.raises(ConfigError, match=r"^config\.ei\.search\.n=4 is not divisible by config\.ei\.search\."
                                          r"expansions=3"):
        validate(c)


def test_prm_guided_beam_search_and_dvts_rounds(tmp_path):
    """Beam search and DVTS ranked by the earlier prm stage's PRM: n / expansions = 2 candidates per prompt are
    verified and kept like samples, and trained on."""
    c = _prm_config(tmp_path, "beam")
    c.ei_dvts = mc.ConfigDict(c.ei.to_dict())
    c.ei_dvts.search.method = "dvts"
    c.stages = ("sft", "prm", "ei", "ei_dvts")
    train(c)
    run_dir = tmp_path / "ei_step"
    for stage in ("ei", "ei_dvts"):
        metrics = [r for r in _records(run_dir, "metrics.jsonl", stage) if "search/kept" in r]
        samples = _records(run_dir, "samples.jsonl", stage)
        assert [m["step"] for m in metrics] == [1, 2], stage
        assert len(samples) == 2 * PROMPTS * (N // 2), stage
        for m in metrics:
            rows = [r for r in samples if r["step"] == m["step"]]
            assert 0 < m["search/sampled_tokens"] <= PROMPTS * N * 4
            assert m["search/kept"] == sum(r["kept"] for r in rows)
            assert all(r["correct"] and r["finished"] for r in rows if r["kept"])
            assert m["search/accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows]))
        assert any("loss" in m for m in metrics), stage  # something was kept and trained on
