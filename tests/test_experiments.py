"""Every experiment file runs its smoke preset end to end; experiment files and overrides fail clearly.

The smoke runs happen in two worker subprocesses (this file run as a script), one CPU device each as on a
user's laptop (this test process has 8 fake devices), the files split between the two cores. The workers
share one persistent compilation cache: programs that are the same in several files (the evaluator's
sampler, the SFT step, the rollout samplers) compile once. A file added to experiments/ is picked up.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from jaxrl_llm.train.config import ConfigError, load_experiment

ROOT = Path(__file__).resolve().parent.parent
EXP_DIR = ROOT / "experiments"
EXPERIMENTS = sorted(p.stem for p in EXP_DIR.glob("*.py"))
RERUN = ("ppo", "dpo", "reward_model", "rm_then_ppo", "tools_ppo")  # run twice: the second restores every stage

# A reward model, then PPO (shared backbone) whose value head starts from it and whose reward is its score.
RM_THEN_PPO = '''
import ml_collections as mc
from jaxrl_llm.train.config import base_config, ppo_stage, reward_model_stage

def get_config():
    c = base_config()
    c.model.preset = "dummy"
    c.task.kwargs = mc.ConfigDict(dict(min_digits=1, max_digits=2, operators=("+",), spaced=True,
                                       pad_operands=True, reverse_answer=True))
    c.eval.num_examples, c.eval.max_new_tokens, c.eval.every, c.log.every, c.checkpoint.every = 16, 6, 2, 1, 0
    c.stages = ("rm", "rl")
    c.rm = reward_model_stage(steps=2, batch_size=8, learning_rate=1e-3, max_prompt_len=12, max_response_len=6)
    c.rm.data.num_pairs, c.rm.data.eval_pairs = 64, 16
    c.rl = ppo_stage(iterations=2, prompts_per_iter=4, samples_per_prompt=2, learning_rate=1e-4,
                     max_new_tokens=6, kl_target=1.0, shared_backbone=True)
    c.rl.max_prompt_len, c.rl.reward_model_stage = 12, "rm"
    c.rl.value_init, c.rl.reward.source = "reward_model", "reward_model"
    return c
'''

# SFT on tool demonstrations, then PPO over episodes (per-turn credit) with the calculator.
TOOLS_PPO = '''
from jaxrl_llm.train.config import load_experiment, ppo_stage

def get_config():
    c = load_experiment("TOOLS:smoke")
    c.name = "tools_ppo"
    env = c.rl.env
    c.rl = ppo_stage(iterations=2, prompts_per_iter=4, samples_per_prompt=2, learning_rate=1e-4, max_new_tokens=48)
    c.rl.max_prompt_len = 8
    c.rl.env.update(env)
    c.rl.env.kwargs.call_reward = 0.1
    return c
'''


def _gsm8k_files(directory: Path) -> list[str]:
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have now?",
             "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"} for a in range(2, 9) for b in range(1, 5)]
    for name, part in (("train", rows), ("test", rows[:8])):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return [f"task.kwargs.train_path={directory / 'train.jsonl'}", f"task.kwargs.test_path={directory / 'test.jsonl'}"]


# ----------------------------------------------------------------------------- the smoke runs


def _worker(results: Path, run_root: Path, jobs: list[list]) -> None:
    """Runs each (spec, overrides, name) job; writes results/<name>.json with the summary or the traceback."""
    from jaxrl_llm.train.trainer import train
    for spec, overrides, name in jobs:
        t0 = time.time()
        try:
            cfg = load_experiment(spec, [f"run_root={run_root}", "log.progress=False", *overrides])
            summary = train(cfg)
            out = {"ok": True, "summary": summary, "stages": list(cfg.stages), "seconds": time.time() - t0}
            if name in RERUN:
                again = train(cfg)
                out["rerun_summary"] = again
        except BaseException:  # noqa: BLE001 - reported by the test that owns this experiment
            out = {"ok": False, "error": traceback.format_exc(), "seconds": time.time() - t0}
        (results / f"{name}.json").write_text(json.dumps(out, default=str))


def _selected_runs(session) -> set[str] | None:
    """The smoke runs the selected tests read (`pytest -k dpo` runs only those); None: all of them."""
    names = set()
    for item in session.items:
        if item.module.__name__ != __name__ or "smoke" not in getattr(item, "fixturenames", ()):
            continue
        if item.originalname != "test_smoke_preset_runs":
            return None
        names.add(item.callspec.params["name"])
    return names


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, request):
    base = tmp_path_factory.mktemp("experiments")
    results, run_root, data = base / "results", base / "runs", base / "data"
    for d in (results, run_root, data):
        d.mkdir()
    (base / "rm_then_ppo.py").write_text(RM_THEN_PPO)
    (base / "tools_ppo.py").write_text(TOOLS_PPO.replace("TOOLS", str(EXP_DIR / "tool_calculator.py")))
    extra = {"qwen2_5_gsm8k_grpo": _gsm8k_files(data)}
    jobs = [[f"{EXP_DIR / n}.py:smoke", extra.get(n, []), n] for n in EXPERIMENTS]
    jobs.append([str(base / "rm_then_ppo.py"), [], "rm_then_ppo"])
    jobs.append([str(base / "tools_ppo.py"), [], "tools_ppo"])
    selected = _selected_runs(request.session)
    jobs = jobs if selected is None else [j for j in jobs if j[2] in selected]
    # One CPU device, compiled with this process's compile-fast flags (conftest): a smoke run executes a few
    # steps, so compiling is most of its time.
    xla = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                   if not f.startswith("--xla_force_host_platform_device_count"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla, JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    procs = []
    for w in range(2):
        log = open(base / f"worker{w}.log", "w")
        args = [sys.executable, __file__, str(results), str(run_root), json.dumps(jobs[w::2])]
        procs.append((subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log))
    for p, log in procs:
        try:
            p.wait(timeout=900)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()
    logs = "\n".join((base / f"worker{w}.log").read_text()[-3000:] for w in range(2))
    return {"results": results, "runs": run_root, "logs": logs, "seconds": time.time() - t0}


def _result(smoke, name: str) -> dict:
    file = smoke["results"] / f"{name}.json"
    assert file.exists(), f"no result for {name}: its worker died; the workers' output ends with:\n{smoke['logs']}"
    result = json.loads(file.read_text())
    assert result["ok"], f"{name}:smoke failed:\n{result['error']}"
    return result


def _check_run(smoke, name: str, result: dict) -> None:
    run = Path(result["summary"]["run_dir"])
    assert run.parent == smoke["runs"]
    for f in ("config.json", "summary.json", "metrics.jsonl"):
        assert (run / f).is_file(), f"{name}: {run / f} is missing"
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for stage in result["stages"]:
        # a step's metrics: its update's loss (a lessons round updates only when it distills a kept lesson)
        trained = [r for r in records if r["stage"] == stage and ("loss" in r or "lessons/proposed" in r)]
        assert trained, f"{name}: stage {stage!r} logged no training metrics"
        assert all(r.get("skipped", 0.0) == 0.0 for r in trained), f"{name}: stage {stage!r} skipped non-finite steps"
        assert (run / "checkpoints" / stage / str(trained[-1]["step"])).is_dir(), f"{name}: no final checkpoint"
        assert f"{stage}/accuracy_after" in summary, f"{name}: no held-out evaluation of stage {stage!r}"


@pytest.mark.parametrize("name", EXPERIMENTS + ["rm_then_ppo", "tools_ppo"])
def test_smoke_preset_runs(smoke, name):
    result = _result(smoke, name)
    _check_run(smoke, name, result)
    if name in RERUN:  # every stage restored from its final checkpoint, its summary from the checkpoint meta
        strip = lambda s: {k: v for k, v in s.items() if k not in ("wall_time_s", "plots")}  # noqa: E731
        assert strip(result["rerun_summary"]) == strip(result["summary"])


def test_preference_and_ppo_stages_report_their_metrics(smoke):
    def last(name, stage, key):
        run = Path(_result(smoke, name)["summary"]["run_dir"])
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r[key] for r in rows if r["stage"] == stage and key in r][-1]
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "pref_loss"):
        last("dpo", "pref", key)
    assert 0.0 <= last("dpo", "pref", "eval/pref_accuracy") <= 1.0
    for key in ("log_odds_ratio", "nll_loss"):
        last("orpo", "orpo", key)
    for key in ("bt_loss", "accuracy", "rewards/margins"):
        last("reward_model", "rm", key)
    for key in ("vf_loss", "vf_explained_var", "kl", "kl_coef", "rlhf_reward", "clipfrac_low", "entropy"):
        last("ppo", "rl", key)
    assert last("rm_then_ppo", "rl", "reward/task_mean") >= 0.0  # scored by the reward model, task kept as a metric
    summary = _result(smoke, "rm_then_ppo")["summary"]
    assert summary["rm/pairs/train"] == 64 and "rl/accuracy_after" in summary
    for name in ("tools_ppo", "tool_calculator"):  # episodes: their metrics, and evaluation with the environment
        for key in ("episode/turns", "episode/tool_calls", "episode/observation_tokens", "time/env_s"):
            last(name, "rl", key)
        assert 0.0 <= last(name, "rl", "eval/env/accuracy") <= 1.0
        assert 0.0 <= last(name, "sft", "eval/env/accuracy") <= 1.0
    last("tools_ppo", "rl", "vf_loss")


def test_every_experiment_produced_a_result(smoke):
    seconds = {}
    for name in EXPERIMENTS + ["rm_then_ppo", "tools_ppo"]:
        seconds[name] = _result(smoke, name)["seconds"]
    print(f"\nsmoke runs: {smoke['seconds']:.0f} s wall on 2 workers; per file: "
          + ", ".join(f"{n} {s:.0f}s" for n, s in sorted(seconds.items(), key=lambda x: -x[1])))


# ----------------------------------------------------------------------------- the files themselves


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_file_is_short_documented_and_loads(name):
    path = EXP_DIR / f"{name}.py"
    text = path.read_text()
    assert len(text.splitlines()) <= 80, f"{path} has {len(text.splitlines())} lines; keep experiments short"
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert f"jaxrl-llm train experiments/{name}.py" in doc, f"{path}: the docstring must give the command"
    for preset in (None, "smoke"):
        cfg = load_experiment(str(path) + (f":{preset}" if preset else ""))
        assert cfg.stages and cfg.name == name + (f"-{preset}" if preset else "")


@pytest.mark.parametrize("name", ["qwen2_5_kk_grpo", "qwen2_5_gsm8k_grpo"])
def test_real_scale_experiments_need_their_paths(name):
    from jaxrl_llm.train.build import build, check_required_paths
    cfg = load_experiment(f"{EXP_DIR / name}.py")
    with pytest.raises(ConfigError, match=r"config\.model\.path is empty.*--set model\.path="):
        build(cfg)
    cfg = load_experiment(f"{EXP_DIR / name}.py", ["model.path=/models/qwen"])
    if name == "qwen2_5_gsm8k_grpo":
        both = r"config\.task\.kwargs\.test_path, config\.task\.kwargs\.train_path are empty"
        with pytest.raises(ConfigError, match=both):
            check_required_paths(cfg)
    else:
        check_required_paths(cfg)


def test_model_dtype_names_are_checked_before_building():
    from jaxrl_llm.train.build import check_required_paths
    for key in ("dtype", "param_dtype", "matmul_dtype"):  # when the experiment loads, with the nearest name
        with pytest.raises(ConfigError, match=rf"config\.model\.{key}='bf16' is not a dtype name.*bfloat16"):
            load_experiment(f"{EXP_DIR / 'grpo'}.py", [f"model.{key}=bf16"])
    check_required_paths(load_experiment(f"{EXP_DIR / 'grpo'}.py", ["model.matmul_dtype=bfloat16"]))
    with pytest.raises(ConfigError, match=r"config\.model\.scan_unroll=-1 is out of range: expected an integer >= 0"):
        load_experiment(f"{EXP_DIR / 'grpo'}.py", ["model.scan_unroll=-1"])


def test_model_numerics_keys_reach_the_model_config():
    from jaxrl_llm.models import get_preset
    from jaxrl_llm.train.build import model_numerics
    m = load_experiment(f"{EXP_DIR / 'grpo'}.py").model
    assert get_preset(m.preset, **model_numerics(m)) == get_preset(m.preset)  # defaults: the preset's own
    m = load_experiment(f"{EXP_DIR / 'grpo'}.py", ["model.matmul_dtype=bfloat16", "model.scan_unroll=2",
                                                   "model.remat=full"]).model
    cfg = get_preset(m.preset, **model_numerics(m))
    assert (cfg.matmul_dtype, cfg.scan_unroll, cfg.remat) == ("bfloat16", 2, "full")


# ----------------------------------------------------------------------------- loading errors


def test_unknown_override_key_names_the_nearest():
    nearest = r"unknown key 'rl\.algo\.loss\.kl_cof'; did you mean 'rl\.algo\.loss\.kl_coef'"
    with pytest.raises(ConfigError, match=nearest):
        load_experiment(f"{EXP_DIR / 'grpo'}.py", ["rl.algo.loss.kl_cof=0.0"])
    with pytest.raises(ConfigError, match=r"unknown key 'pref\.algo\.betta'; did you mean 'pref\.algo\.beta'"):
        load_experiment(f"{EXP_DIR / 'dpo'}.py:smoke", ["pref.algo.betta=0.2"])


def test_override_of_the_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError, match=r"'rl\.iterations' expects int, got str 'many'"):
        load_experiment(f"{EXP_DIR / 'ppo'}.py", ["rl.iterations=many"])
    with pytest.raises(ConfigError, match=r"'rl\.algo\.reward_kl_clamp' expects float, got str"):
        load_experiment(f"{EXP_DIR / 'ppo'}.py", ["rl.algo.reward_kl_clamp=big"])
    cfg = load_experiment(f"{EXP_DIR / 'ppo'}.py", ["rl.algo.reward_kl_clamp=10.0",
                                                    "--config.rl.algo.kl.kind=adaptive"])
    assert cfg.rl.algo.reward_kl_clamp == 10.0 and cfg.rl.algo.kl.kind == "adaptive"


def test_experiment_without_get_config(tmp_path):
    path = tmp_path / "nothing.py"
    path.write_text('"""An experiment that forgot get_config."""\nCONFIG = {}\n')
    with pytest.raises(ConfigError, match=r"nothing\.py does not define get_config\(\)"):
        load_experiment(str(path))


def test_unknown_preset_names_the_nearest():
    with pytest.raises(ConfigError, match=r"unknown preset 'smok'; did you mean 'smoke'"):
        load_experiment(f"{EXP_DIR / 'rloo'}.py:smok")


def test_bad_algorithm_values_name_their_key():
    from jaxrl_llm.algos.dpo import DPOConfig
    from jaxrl_llm.train.config import to_dataclass
    key = r"config\.pref\.algo\.loss_type='sigmod' is not supported\. Did you mean 'sigmoid'"
    with pytest.raises(ConfigError, match=key):  # when the experiment loads
        load_experiment(f"{EXP_DIR / 'dpo'}.py", ["pref.algo.loss_type=sigmod"])
    cfg = load_experiment(f"{EXP_DIR / 'dpo'}.py")
    with pytest.raises(ConfigError, match=key):  # and where stages build theirs
        to_dataclass(DPOConfig, {**cfg.pref.algo.to_dict(), "loss_type": "sigmod"}, "config.pref.algo")


# ----------------------------------------------------------------------------- generated preference pairs


def test_generated_pairs_are_deterministic_wrong_and_in_the_task_format():
    from jaxrl_llm.tasks import get_task
    from jaxrl_llm.train.pref_data import task_pairs
    for kw in ({}, {"spaced": True, "pad_operands": True, "reverse_answer": True}):
        task = get_task("arithmetic", **kw)
        pairs = task_pairs(task, "train", 500, seed=3)
        assert pairs == task_pairs(task, "train", 500, seed=3) and pairs != task_pairs(task, "train", 500, seed=4)
        examples = task.examples("train", 500, 3)
        for p, e in zip(pairs, examples):
            assert p.prompt == e.prompt and p.chosen == e.answer and task.is_correct(p.chosen, e)
            assert not task.is_correct(p.rejected, e)
            assert task.extract_answer(p.rejected) is not None  # a well-formed number, just the wrong one
            if kw:  # reversed, zero-padded answers keep their width
                assert len(p.rejected) == len(p.chosen)
        offsets = [abs(int(task.extract_answer(p.rejected)) - int(task.extract_answer(p.chosen))) for p in pairs]
        assert min(offsets) >= 1 and sum(o <= 3 for o in offsets) > len(pairs) // 3  # near misses and swaps


def test_knights_knaves_pairs_score_as_right_and_wrong():
    from jaxrl_llm.tasks import get_task
    from jaxrl_llm.tasks.base import RewardInputs
    from jaxrl_llm.train.pref_data import task_pairs
    task = get_task("knights_knaves", n_people=(3, 4))
    pairs, examples = task_pairs(task, "test", 6, seed=0), task.examples("test", 6, 0)
    texts = [m[0]["content"] for p in pairs for m in (p.chosen, p.rejected)]
    out = task.reward(RewardInputs(texts, [e for e in examples for _ in range(2)], [1] * 12, [True] * 12, 64))
    assert list(out.correct) == [True, False] * 6 and list(out.scores) == [3.0, -0.5] * 6


def test_preference_file_pairs_hold_out_a_split(tmp_path):
    import ml_collections as mc
    from jaxrl_llm.train.config import preference_data
    from jaxrl_llm.train.pref_data import stage_pairs
    rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(50)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = preference_data()
    data.update(dict(source="jsonl", path=str(tmp_path / "p.jsonl"), eval_pairs=20))
    train, held = stage_pairs(data, None, 0, "config.pref")
    assert len(held) == 5 and len(train) == 45 and not {p.prompt for p in train} & {p.prompt for p in held}
    with pytest.raises(ValueError, match=r"config\.pref\.data\.source='parquet'; expected 'task'"):
        stage_pairs(mc.ConfigDict(dict(data.to_dict(), source="parquet")), None, 0, "config.pref")


if __name__ == "__main__":  # a worker of the `smoke` fixture
    _worker(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]))
