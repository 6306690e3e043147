"""The `jaxrl-llm` console script: demo, sample, presets, and its input errors."""

import pathlib
import re
import subprocess
import sys

import pytest

from jaxrl_llm import cli
from jaxrl_llm.cli import _parse_mesh, main
from jaxrl_llm.errors import ConfigError, ModelError


def test_demo_samples_from_tiny_model(capsys):
    assert main(["demo", "--max-new-tokens", "4", "--n", "1"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\[(\d)\.0\] '([^']*)' -> ", out, flags=re.M)
    assert [r[1] for r in rows][:2] == ["72+4=", "7+7737="] and len(rows) == 8
    assert re.search(r"model tiny \(4,067,584 params, float32\)", out)
    assert re.search(r"\d+ decode steps x 8 rows = [\d,]+ tokens/s", out)


def test_sample_is_deterministic_for_a_seed(capsys):
    argv = ["sample", "--model", "dummy", "--prompt", "1+2=", "--n", "3", "--max-new-tokens", "5",
            "--temperature", "0.8", "--top-k", "20", "--seed", "3"]
    main(argv)
    first = capsys.readouterr().out.split("\n\nmodel")[0]
    main(argv)
    assert capsys.readouterr().out.split("\n\nmodel")[0] == first
    assert first.count("'1+2=' ->") == 3


def test_presets_lists_param_counts(capsys):
    main(["presets"])
    out = capsys.readouterr().out
    assert re.search(r"qwen2.5-0.5b\s+qwen2\s+494,032,768", out)
    assert re.search(r"llama-3.1-8b\s+llama\s+8,030,261,248", out)


def test_input_errors(capsys):
    assert _parse_mesh("fsdp=4,tensor=2") == {"fsdp": 4, "tensor": 2}
    with pytest.raises(ConfigError, match="is not NAME=SIZE"):
        _parse_mesh("fsdp4")
    with pytest.raises(ConfigError, match="size of 'data' must be an integer"):
        _parse_mesh("data=x")
    assert main(["sample", "--model", "qwen-0.5b", "--prompt", "x"]) == ModelError.exit_code
    assert re.fullmatch(r"error: --model 'qwen-0.5b': not a directory and unknown model preset .*Did you mean "
                        r"'qwen2.5-0.5b'\?.*\n", capsys.readouterr().err)


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "jaxrl_llm.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "sample" in out.stdout


def test_summary_pairs_each_metric_before_with_its_own_after(capsys):
    """A preference stage reports task and preference accuracy; each line pairs a metric's before and after."""
    from jaxrl_llm.cli import print_summary
    print_summary({"name": "x", "run_dir": "runs/x", "wall_time_s": 3.0,
                   "pref/pref_accuracy_before": 0.922, "pref/pref_accuracy_after": 1.0,
                   "pref/accuracy_before": 0.66, "pref/accuracy_after": 0.117})
    out = capsys.readouterr().out
    assert "pref: held-out preference accuracy 0.922 -> 1.000 (+7.8 points)" in out
    assert "pref: held-out accuracy 0.660 -> 0.117 (-54.3 points)" in out
    assert "0.922 -> 0.117" not in out


def test_config_flag_spelling_is_an_override():
    """docs/experiments.md: `--config.key=value` (or `--config.key value`) is `--set key=value`."""
    demo = str(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "demo.py")
    argv = cli.config_flags_to_sets(["train", demo, "--config.seed=3", "--config.rl.iterations",
                                     "4", "--set", "log.every=2", "--fresh"])
    args = cli.build_parser().parse_args(argv)
    assert args.set == ["seed=3", "rl.iterations=4", "log.every=2"] and args.fresh
    from jaxrl_llm.train.config import load_experiment
    cfg = load_experiment(args.experiment, args.set)
    assert (cfg.seed, cfg.rl.iterations, cfg.log.every) == (3, 4, 2)


def test_eval_of_a_missing_run_says_what_to_give(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "no_such_run")]) == ConfigError.exit_code
    assert re.match(r"error: .*no_such_run does not exist; give a run directory \(runs/<name>\)",
                    capsys.readouterr().err)


def test_mean_logprob_averages_the_completion_tokens():
    """The sampler's mask is int32: it must mask, not index (positions 0 and 1 were averaged before)."""
    import numpy as np
    logprobs = np.array([[-1.0, -2.0, -3.0, -4.0], [-0.5, -9.0, -9.0, -9.0]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.int32)
    assert cli.mean_logprobs(logprobs, mask) == [-2.0, -0.5]
