"""What docs/phenomena.md measures with: the lengths of correct and wrong completions per RL iteration
(`response_length/correct`, `response_length/wrong`) and `jaxrl-llm eval --stage` (pass@k of a stage's
checkpoint, e.g. the SFT model before RL)."""

import json
import math
import re

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.cli import main
from jaxrl_llm.errors import ConfigError
from jaxrl_llm.train.stages.rl import lengths_by_outcome


def _by_outcome_f64(lengths, correct):
    lengths, correct = np.asarray(lengths, np.float64), np.asarray(correct, bool)
    mean = lambda x: float(x.mean()) if x.size else math.nan  # noqa: E731
    return mean(lengths[correct]), mean(lengths[~correct])


@pytest.mark.parametrize("lengths,correct", [
    ([4, 16, 4, 9, 16, 4, 5, 1], [1, 0, 1, 0, 0, 1, 1, 0]),   # correct 17/4 = 4.25, wrong 42/4 = 10.5
    ([3, 7, 11], [1, 1, 1]),                                   # no wrong completion: NaN
    ([3, 7, 11], [0, 0, 0]),                                   # no correct completion: NaN
])
def test_lengths_by_outcome_match_a_float64_reimplementation(lengths, correct):
    out = lengths_by_outcome(jnp.asarray(lengths, jnp.int32), jnp.asarray(correct, bool))
    right, wrong = _by_outcome_f64(lengths, correct)
    np.testing.assert_allclose(float(out["response_length/correct"]), right, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(float(out["response_length/wrong"]), wrong, rtol=1e-6, equal_nan=True)


def test_lengths_by_outcome_by_hand():
    out = lengths_by_outcome(jnp.array([4, 16, 4, 9, 16, 4, 5, 1]), jnp.array([1, 0, 1, 0, 0, 1, 1, 0], bool))
    assert float(out["response_length/correct"]) == 4.25 and float(out["response_length/wrong"]) == 10.5


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """experiments/length_bias.py:smoke (dummy model): 3 SFT steps, then 2 GRPO iterations."""
    from jaxrl_llm.train.config import load_experiment
    from jaxrl_llm.train.trainer import train
    root = tmp_path_factory.mktemp("phen")
    cfg = load_experiment("experiments/length_bias.py:smoke",
                          [f"run_root={root}", "sft.steps=3", "eval.every=0", "log.tensorboard=False",
                           "log.progress=False", "log.samples_every=0"])
    train(cfg)
    return root / cfg.name


def test_rl_iterations_log_the_lengths_of_correct_and_wrong_completions(smoke_run):
    rows = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if r["stage"] == "rl" and "response_length" in r]
    assert len(rl) == 2
    for r in rl:
        acc, right, wrong = r["accuracy"], float(r["response_length/correct"]), float(r["response_length/wrong"])
        # the batch's mean length is the accuracy-weighted mix of the two means (a side without rows is NaN)
        assert math.isnan(right) == (acc == 0.0) and math.isnan(wrong) == (acc == 1.0)
        mix = (acc * right if acc > 0 else 0.0) + ((1 - acc) * wrong if acc < 1 else 0.0)
        assert mix == pytest.approx(r["response_length"], rel=1e-5)


def test_eval_stage_scores_that_stages_checkpoint(smoke_run, capsys):
    args = ["eval", str(smoke_run), "--k", "1,2", "--n-samples", "2", "--num-examples", "8", "--max-new-tokens", "4"]
    assert main(args + ["--stage", "sft"]) == 0
    assert "stage 'sft' step 3" in capsys.readouterr().out
    out = json.loads((smoke_run / "eval-sft.json").read_text())
    assert (out["stage"], out["step"], out["final"]) == ("sft", 3, True) and out["metrics"]["prompts"] == 8
    assert not (smoke_run / "eval.json").exists()
    assert main(args) == 0  # default: the last stage, to eval.json
    out = json.loads((smoke_run / "eval.json").read_text())
    assert (out["stage"], out["step"]) == ("rl", 2)


def test_eval_of_a_stage_the_run_does_not_have_is_one_error_line(smoke_run, capsys):
    assert main(["eval", str(smoke_run), "--stage", "sfy"]) == ConfigError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.fullmatch(r"error: --stage 'sfy': the run .* has no stage of that name; did you mean 'sft'\?; "
                        r"give one of its stages sft, rl \(or leave --stage out for the last one\)", err)


# ----------------------------------------------------------------- answer_prefix: judged on the first tokens

@pytest.mark.parametrize("prefix", [False, True])
def test_answer_prefix_judges_the_first_characters_on_host_and_in_jit(prefix):
    import jax

    from jaxrl_llm.tasks import Example, RewardInputs
    from jaxrl_llm.tasks.arithmetic import ArithmeticTask
    from jaxrl_llm.tokenizer import load_tokenizer, tokenizer_info
    tok = load_tokenizer("tiny")
    eos = tokenizer_info(tok).eos_ids[0]
    task = ArithmeticTask(max_digits=2, spaced=True, pad_operands=True, reverse_answer=True, answer_prefix=prefix)
    ex = Example(prompt="4 7 + 0 8 =", answer="5 5 0", meta={"a": 47, "b": 8, "op": "+"})
    # (completion, ends with EOS, correct exactly, correct as a prefix)
    cases = [("5 5 0", True, True, True), ("5 5 0 3 1", True, False, True), ("5 5 0 9 9 9 9", False, False, True),
             ("5 5", True, False, False), ("5 4 0 3", True, False, False), ("0 5 5 0", True, False, False)]
    n = 16
    tokens, mask = np.zeros((len(cases), n), np.int32), np.zeros((len(cases), n), np.int32)
    for i, (text, ends, _, _) in enumerate(cases):
        ids = tok.encode(text, add_special_tokens=False) + ([eos] if ends else [])
        tokens[i, :len(ids)], mask[i, :len(ids)] = ids, 1
    want = np.array([c[3] if prefix else c[2] for c in cases], np.float32)
    host = task.reward(RewardInputs([c[0] for c in cases], [ex] * len(cases), mask.sum(1),
                                    np.ones(len(cases), bool), n)).scores
    np.testing.assert_array_equal(host, want)
    target_bytes, target_len = task.encode_targets([ex] * len(cases))
    in_jit = jax.jit(task.jax_reward(tok, 512))(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(target_bytes),
                                                 jnp.asarray(target_len))
    np.testing.assert_array_equal(np.asarray(in_jit), want)


def test_answer_prefix_needs_the_exact_answer_format():
    from jaxrl_llm.tasks.arithmetic import ArithmeticTask
    with pytest.raises(ValueError, match=r"answer_prefix=True needs answer_format='exact' \(got 'last_number'\)"):
        ArithmeticTask(answer_format="last_number", answer_prefix=True)
