"""Plots of a run, sweeps (separate processes, table, overlays, failures) and `jaxrl-llm eval`.

The sweep runs the demo's smoke preset for real: 2 variants x 2 seeds, 2 at a time, each run in its
own process on one CPU device (the 8 fake devices of conftest would only slow the runs down).
"""

import json
import os
import pathlib

import numpy as np
import pytest

from jaxrl_llm.cli import main
from jaxrl_llm.train.config import ConfigError
from jaxrl_llm.train.plots import mean_std_by_step, plot_run, read_metrics, run_panels
from jaxrl_llm.train.sweep import GridError, parse_grid, parse_seeds, sweep, variants

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO_SMOKE = f"{REPO / 'experiments' / 'demo.py'}:smoke"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def child_env(tmp_path_factory) -> dict[str, str]:
    """One CPU device per run, one compilation cache for every sweep of this module, and this process's
    compile-fast flags (conftest; a few steps per run: compiling is most of their time)."""
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    return {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache"))}


# ----------------------------------------------------------------------------- plots


def test_plot_run_reads_nan_strings_and_a_cut_last_line(tmp_path):
    lines = [{"stage": "sft", "step": s, "time": s, "loss": 3.0 - s / 10, "entropy": 5.0, "accuracy": s / 10}
             for s in (2, 4, 6)]
    lines += [{"stage": "sft", "step": 6, "time": 6.1, "eval/accuracy": 0.25}]
    lines += [{"stage": "rl", "step": s, "time": 10 + s, "reward/mean": s / 8, "accuracy": s / 8,
               "kl_ref": 0.01 * s, "approx_kl": 1.0, "response_length": 4.0, "loss": 0.1} for s in (2, 4)]
    lines += [{"stage": "rl", "step": 6, "time": 16, "reward/mean": "nan", "accuracy": 0.5, "loss": "inf"}]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"stage": "rl", "step": 8, "reward/me'
    (tmp_path / "metrics.jsonl").write_text(text)

    records = read_metrics(tmp_path)
    assert len(records) == len(lines)  # the cut line is dropped
    assert np.isnan(records[-1]["reward/mean"]) and records[-1]["loss"] == float("inf")

    titles = {stage: [t for t, _ in run_panels(records, stage)] for stage in ("sft", "rl")}
    assert titles["sft"] == ["accuracy", "loss", "entropy"]  # no reward / KL / length logged in SFT
    assert titles["rl"] == ["reward", "accuracy", "KL", "response length", "loss"]
    kl = dict(run_panels(records, "rl"))["KL"]
    assert [label for label, *_ in kl] == ["kl_ref"]  # kl_ref preferred over approx_kl
    acc = dict(run_panels(records, "sft"))["accuracy"]
    assert [label for label, *_ in acc] == ["accuracy", "eval/accuracy"]

    files = plot_run(tmp_path)
    assert [f.name for f in files] == ["sft.png", "rl.png"]
    assert all(f.read_bytes().startswith(PNG) and f.stat().st_size > 10_000 for f in files)


def test_mean_std_over_seeds_aligns_by_step():
    a = (np.array([2, 4]), np.array([1.0, 3.0]))
    b = (np.array([2, 4, 6]), np.array([3.0, float("nan"), 7.0]))
    steps, mean, std = mean_std_by_step([a, b])
    np.testing.assert_array_equal(steps, [2, 4, 6])
    np.testing.assert_allclose(mean, [2.0, 3.0, 7.0])
    np.testing.assert_allclose(std, [np.sqrt(2.0), 0.0, 0.0])  # sample std; one finite seed -> 0


# ----------------------------------------------------------------------------- grid parsing


def test_grid_and_seed_parsing(capsys):
    grid = parse_grid(["rl.algo.loss.clip_eps_high=0.2,0.28", "model.dtype=bfloat16,'float32'",
                       "eval.ks=(1,4),(1,)"])
    assert grid == {"rl.algo.loss.clip_eps_high": [0.2, 0.28], "model.dtype": ["bfloat16", "float32"],
                    "eval.ks": [(1, 4), (1,)]}
    vs = variants(grid)
    assert len(vs) == 8 and vs[0] == ("clip_eps_high=0.2,dtype=bfloat16,ks=1-4", (
        "rl.algo.loss.clip_eps_high=0.2", "model.dtype='bfloat16'", "eval.ks=(1, 4)"))
    assert variants({}) == [("base", ())]
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("0,5") == [0, 5] and parse_seeds("7,") == [7]
    assert parse_seeds(2) == [0, 1]

    for bad, msg in [("lr", "is not KEY=V1,V2"), ("=1", "is not KEY=V1,V2"), ("lr=", "is not KEY=V1,V2"),
                     ("lr=1,,2", "empty value"), ("x=(1,2", "unbalanced"), ("lr=1,1", "repeated"),
                     ("seed=0,1", "use --seeds")]:
        with pytest.raises(GridError, match=msg):
            parse_grid([bad])
    with pytest.raises(GridError, match="given twice"):
        parse_grid(["lr=1", "lr=2"])
    for bad, msg in [("0", ">= 1"), ("x", "give a count"), ("1,1", "distinct"), ("-1,2", "distinct")]:
        with pytest.raises(GridError, match=msg):
            parse_seeds(bad)
    assert main(["sweep", DEMO_SMOKE, "--grid", "oops"]) == GridError.exit_code
    assert "--grid 'oops' is not KEY=V1,V2" in capsys.readouterr().err
    # a misspelt key fails before any run starts, naming the variant and the nearest key
    with pytest.raises(ConfigError, match=r"variant 'clip_eps_hig=0.2'.*did you mean"):
        sweep(DEMO_SMOKE, {"rl.algo.loss.clip_eps_hig": [0.2]}, seeds=1, quiet=True)


# ----------------------------------------------------------------------------- sweeps


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory, child_env):
    root = tmp_path_factory.mktemp("sweeps")
    return sweep(DEMO_SMOKE, parse_grid(["rl.algo.loss.clip_eps_high=0.2,0.28"]), seeds=2,
                 base_overrides=["log.tensorboard=False"], jobs=2, run_root=root, name="clip",
                 env=child_env, quiet=True)


def test_sweep_runs_every_variant_and_seed_and_aggregates(smoke_sweep, tmp_path):
    res = smoke_sweep
    assert not res.failed, "\n\n".join(f"{r.variant} s{r.seed}:\n{r.error}" for r in res.failed)
    assert sorted((r.variant, r.seed) for r in res.runs) == [
        ("clip_eps_high=0.2", 0), ("clip_eps_high=0.2", 1), ("clip_eps_high=0.28", 0), ("clip_eps_high=0.28", 1)]
    for r in res.runs:
        cfg = json.loads((r.run_dir / "config.json").read_text())
        assert cfg["seed"] == r.seed and cfg["name"] == f"clip/{r.variant}-s{r.seed}"
        assert cfg["rl"]["algo"]["loss"]["clip_eps_high"] == float(r.variant.split("=")[1])

    table = (res.path / "table.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| clip_eps_high=")]
    assert len(rows) == 2 and all(" ± " in row for row in rows)
    assert "rl/accuracy_after" in table and "rl/reward/mean" in table

    results = json.loads((res.path / "results.json").read_text())
    assert [v["variant"] for v in results["variants"]] == ["clip_eps_high=0.2", "clip_eps_high=0.28"]
    for v in results["variants"]:
        assert v["seeds_ok"] == [0, 1] and v["seeds_failed"] == []
        s = v["metrics"]["rl/response_length"]
        assert s["n"] == 2 and s["mean"] == pytest.approx(np.mean(s["values"]))
        assert s["std"] == pytest.approx(np.std(s["values"], ddof=1))
    assert len(results["runs"]) == 4 and all(r["ok"] for r in results["runs"])

    assert sorted(p.name for p in res.plots) == ["overlay_rl.png", "overlay_sft.png"]
    assert all(p.read_bytes().startswith(PNG) for p in res.plots)
    assert all((r.run_dir / "plots" / "rl.png").exists() for r in res.runs)  # the trainer's plot_run

    # `jaxrl-llm plot`: several runs also get an overlay; a sweep directory gets its overlay redrawn
    assert main(["plot", *(str(r.run_dir) for r in res.runs[:2]), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "overlay_rl.png").read_bytes().startswith(PNG)
    before = (res.path / "plots" / "overlay_rl.png").stat().st_mtime_ns
    assert main(["plot", str(res.path)]) == 0
    assert (res.path / "plots" / "overlay_rl.png").stat().st_mtime_ns > before


def test_failing_variant_is_reported_and_the_others_finish(tmp_path, child_env):
    # SFT only: the same program as the smoke sweep's SFT stage, found in the compilation cache.
    # A model directory that is not there passes the config checks (it may appear before the run starts)
    # and fails in the run itself.
    res = sweep(DEMO_SMOKE, {"model.path": [str(tmp_path / "no_model"), ""]}, seeds=[0], jobs=2,
                run_root=tmp_path, base_overrides=["stages=('sft',)", "eval.every=0", "log.tensorboard=False"],
                env=child_env, quiet=True)
    bad, good = res.runs
    assert (bad.ok, good.ok) == (False, True) and bad.variant != good.variant
    assert bad.returncode == 4 and "no_model does not exist (config.model.path)" in bad.error
    assert (good.run_dir / "summary.json").exists() and good.metrics["sft/loss"] > 0
    table = (res.path / "table.md").read_text()
    assert f"| {bad.variant} | 0/1 (failed: [0]) |" in table and f"{bad.variant} seed 0: exit 4" in table
    assert json.loads((res.path / "results.json").read_text())["runs"][0]["ok"] is False


# ----------------------------------------------------------------------------- eval


def test_eval_of_a_finished_run_writes_pass_at_k(smoke_sweep, capsys):
    run_dir = smoke_sweep.runs[0].run_dir
    assert main(["eval", str(run_dir), "--k", "1,2", "--n-samples", "2"]) == 0
    assert "| all | 16 | 32 |" in capsys.readouterr().out
    out = json.loads((run_dir / "eval.json").read_text())
    assert (out["stage"], out["step"], out["final"], out["split"]) == ("rl", 4, True, "test")
    m = out["metrics"]
    assert 0.0 <= m["pass@1"] <= m["pass@2"] <= 1.0 and m["prompts"] == 16 and m["samples"] == 32
    assert len(out["records"]) == 16 and all(r["n"] == 2 for r in out["records"])
