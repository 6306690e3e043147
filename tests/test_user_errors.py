"""Every mistake a user can make on the command line ends the same way: a non-zero exit code of its kind, one
`error:` line naming the thing and where, no traceback, nothing outside the run directory touched, and an
existing run's last checkpoint still restorable. Also: a full disk (fault-injected, and a real tmpfs where the
machine lets the test mount one)."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from jaxrl_llm import cli
from jaxrl_llm.errors import (ConfigError, DataError, MeshError, ModelError, ResumeError, RewardFailureError,
                              RunDirBusyError, StorageError, TaskError, UserError)
from jaxrl_llm.tokenizer import tiny_tokenizer_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "experiments" / "demo.py")
DPO = str(ROOT / "experiments" / "dpo.py")
QUIET = ["log.progress=False", "log.tensorboard=False", "log.samples_every=0"]
GOOD = QUIET + ["sft.steps=2", "rl.iterations=2", "checkpoint.every=1", "eval.every=0"]


def _snapshot(folder: pathlib.Path, skip: pathlib.Path | None = None) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and (skip is None or skip not in p.parents)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs a user has (a model directory, data files, experiment files) and a run with checkpoints."""
    root = tmp_path_factory.mktemp("user_errors")
    inputs, runs = root / "inputs", root / "runs"
    inputs.mkdir()
    import jax

    from jaxrl_llm.models import create_model, get_preset
    from jaxrl_llm.models.hf import save_hf
    from jaxrl_llm.sharding import ShardingEnv, make_mesh
    cfg = get_preset("dummy")
    _, params, _ = create_model(cfg, jax.random.key(0), ShardingEnv(make_mesh({"data": -1})))
    save_hf(params, cfg, inputs / "model", tokenizer_dir=tiny_tokenizer_dir())
    code = cli.main(["train", DEMO + ":smoke", *_sets(runs, "good", GOOD)])
    assert code == 0
    return root


def _sets(runs, name, sets):
    return [x for s in [f"run_root={runs}", f"name={name}", *sets] for x in ("--set", s)]


def _copy_model(world, name) -> pathlib.Path:
    d = world / "inputs" / name
    if not d.exists():
        shutil.copytree(world / "inputs" / "model", d)
    return d


def _write(world, name, text) -> pathlib.Path:
    p = world / "inputs" / name
    p.write_text(textwrap.dedent(text))
    return p


# Each case: (id, code, pattern in the error line, argv maker (world, runs) -> argv).
def _model_case(mutate):
    def argv(world, runs, case_id):
        d = _copy_model(world, case_id)
        mutate(d)
        return ["train", DEMO + ":smoke", *_sets(runs, case_id, QUIET + [f"model.path={d}", "tokenizer.path=tiny"])]
    return argv


def _demo(*sets):
    return lambda world, runs, case_id: ["train", DEMO + ":smoke", *_sets(runs, case_id, QUIET + list(sets))]


def _exp_file(text):
    def argv(world, runs, case_id):
        return ["train", str(_write(world, f"{case_id}.py", text)), *_sets(runs, case_id, QUIET)]
    return argv


def _truncate(d: pathlib.Path):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])


def _config_json(d: pathlib.Path, **changes):
    c = json.loads((d / "config.json").read_text())
    c.update(changes)
    (d / "config.json").write_text(json.dumps(c))


def _bad_pairs(world, runs, case_id):
    f = _write(world, f"{case_id}.jsonl", '{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "2+2=",\n')
    return ["train", DPO + ":smoke", *_sets(runs, case_id, QUIET + ["pref.data.source=jsonl", f"pref.data.path={f}",
                                                                 "pref.data.num_pairs=20000"])]


def _bad_math_file(world, runs, case_id):
    f = _write(world, f"{case_id}.jsonl", '{"question": "1+1?", "answer": "2"}\n[1, 2]\n')
    exp = _write(world, f"{case_id}.py", f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("demo_exp", {DEMO!r})
        demo = importlib.util.module_from_spec(spec); spec.loader.exec_module(demo)

        def get_config(preset=None):
            import ml_collections as mc
            c = demo.get_config("smoke")
            c.task.name = "math"
            c.task.kwargs = mc.ConfigDict(dict(path={str(f)!r}, test_fraction=0.5))
            return c
        """)
    return ["train", str(exp), *_sets(runs, case_id, QUIET)]


def _failing_reward(world, runs, case_id):
    """A task of the user's whose reward function raises on every call."""
    exp = _write(world, f"{case_id}.py", f"""
        import importlib.util
        from jaxrl_llm.tasks import get_task, register_task, registered_tasks
        spec = importlib.util.spec_from_file_location("demo_exp", {DEMO!r})
        demo = importlib.util.module_from_spec(spec); spec.loader.exec_module(demo)

        class FailingReward:
            name = "failing_reward"

            def __init__(self, **kw):
                self.inner = get_task("arithmetic", **kw)

            def examples(self, split, num, seed):
                return self.inner.examples(split, num, seed)

            def extract_answer(self, completion):
                return self.inner.extract_answer(completion)

            def is_correct(self, completion, example):
                return self.inner.is_correct(completion, example)

            def reward(self, inputs):
                raise ZeroDivisionError("my reward divided by zero")

        if "failing_reward" not in registered_tasks():
            register_task("failing_reward")(FailingReward)

        def get_config(preset=None):
            c = demo.get_config("smoke")
            c.task.name = "failing_reward"
            c.rl.reward.in_jit = False
            return c
        """)
    return ["train", str(exp), *_sets(runs, case_id, QUIET + ["eval.every=0"])]


def _resume_other_config(world, runs, case_id):
    return ["train", DEMO + ":smoke", *_sets(runs, "good", GOOD[:-1] + ["eval.every=1"])]


def _damaged_checkpoint(world, runs, case_id):
    """A copy of the finished run whose last RL checkpoint lost its array data."""
    d = runs / case_id
    shutil.copytree(runs / "good", d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "name": case_id}))
    for f in (d / "checkpoints" / "rl" / "2" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # the OCDBT data files
            f.write_bytes(b"")
    return ["train", DEMO + ":smoke", *_sets(runs, case_id, GOOD)]


def _tokenizer_dir(world, runs, case_id):
    d = world / "inputs" / case_id
    shutil.copytree(tiny_tokenizer_dir(), d, dirs_exist_ok=True)
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    return ["train", DEMO + ":smoke", *_sets(runs, case_id, QUIET + [f"tokenizer.path={d}"])]


CASES = [
    # configs and experiment files
    ("no_experiment_file", ConfigError, r"experiment file .*nope\.py' does not exist",
     lambda w, r, c: ["train", str(w / "nope.py")]),
    ("experiment_syntax_error", ConfigError, r"syntax_error\.py: importing the experiment failed: SyntaxError",
     _exp_file("def get_config(:\n")),
    ("experiment_without_get_config", ConfigError, r"does not define get_config\(\)", _exp_file("x = 1\n")),
    ("get_config_raises", ConfigError, r"get_config_raises\.py: get_config\(\) raised KeyError: 'lr'",
     _exp_file("def get_config():\n    return {}['lr']\n")),
    ("unknown_preset", ConfigError, r"unknown preset 'smok'.*did you mean 'smoke'",
     lambda w, r, c: ["train", DEMO + ":smok"]),
    ("unknown_key", ConfigError, r"unknown key 'rl.iteration'.*did you mean 'rl.iterations'", _demo("rl.iteration=3")),
    ("wrong_type", ConfigError, r"'rl.iterations' expects int, got str", _demo("rl.iterations=many")),
    ("unknown_variant", ConfigError, r"rl\.variant.*'grpoo'", _demo("rl.variant=grpoo")),
    ("negative_iterations", ConfigError, r"rl\.iterations=-5", _demo("rl.iterations=-5")),
    ("log_every_zero", ConfigError, r"log\.every=0", _demo("log.every=0")),
    ("prompts_per_iter_zero", ConfigError, r"rl\.prompts_per_iter=0", _demo("rl.prompts_per_iter=0")),
    ("bad_dtype", ConfigError, r"model\.dtype='float8'", _demo("model.dtype=float8")),
    ("malformed_override", ConfigError, r"override 'seed' is not KEY=VALUE",
     lambda w, r, c: ["train", DEMO + ":smoke", "--set", "seed"]),
    ("cli_mesh_flag", ConfigError, r"--mesh: 'data' is not NAME=SIZE",
     lambda w, r, c: ["sample", "--model", "dummy", "--prompt", "1+1=", "--mesh", "data"]),
    ("cli_sampling_flag", ConfigError, r"--top-p=1.5: must be in \(0, 1\]",
     lambda w, r, c: ["sample", "--model", "dummy", "--prompt", "1+1=", "--top-p", "1.5"]),
    # data files
    ("pairs_file_bad_json", DataError, r"bad_json\.jsonl:2", _bad_pairs),
    ("task_file_not_an_object", DataError, r"not_an_object\.jsonl:2", _bad_math_file),
    # model directories and tokenizers
    ("model_dir_missing", ModelError, r"model directory /no/such_model does not exist \(config\.model\.path\)",
     _demo("model.path=/no/such_model")),
    ("model_path_is_a_file", ModelError, r"model directory .*model_path_is_a_file\.py is a file, not a directory",
     lambda w, r, c: ["train", DEMO + ":smoke", *_sets(r, c, QUIET + [f"model.path={_write(w, c + '.py', 'x')}"])]),
    ("model_without_config", ModelError, r"no config\.json in .*model_without_config",
     _model_case(lambda d: (d / "config.json").unlink())),
    ("model_config_not_json", ModelError, r"config\.json is not valid JSON: line 1",
     _model_case(lambda d: (d / "config.json").write_text("{oops"))),
    ("unsupported_architecture", ModelError, r"config\.json: unsupported architecture MambaForCausalLM",
     _model_case(lambda d: _config_json(d, architectures=["MambaForCausalLM"]))),
    ("model_without_weights", ModelError, r"no weights found in .*model_without_weights",
     _model_case(lambda d: (d / "model.safetensors").unlink())),
    ("truncated_weights", ModelError, r"model\.safetensors: not a readable safetensors file.*truncated",
     _model_case(_truncate)),
    ("pickle_weights", ModelError, r"holds only pickle-based weights",
     _model_case(lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"))),
    ("tokenizer_missing", ModelError, r"tokenizer directory '/no/tok' does not exist", _demo("tokenizer.path=/no/tok")),
    ("tokenizer_corrupt", ModelError, r"tokenizer in .*tokenizer_corrupt' cannot be loaded", _tokenizer_dir),
    ("cli_model_missing", ModelError, r"--model 'qwen-0.5b': not a directory",
     lambda w, r, c: ["sample", "--model", "qwen-0.5b", "--prompt", "x"]),
    # tasks
    ("unknown_task", TaskError, r"unknown task 'arithmetc'.*Did you mean 'arithmetic'", _demo("task.name=arithmetc")),
    # meshes
    ("mesh_does_not_divide", MeshError, r"mesh\.axes=.*do(es)? not divide|multiply to 3 but there are",
     _demo("mesh.axes.data=3")),
    ("unknown_mesh_preset", MeshError, r"unknown mesh\.preset 'v5e-9'", _demo("mesh.preset=v5e-9", "mesh.axes.data=1")),
    # runs
    ("resume_other_config", ResumeError, r"good holds a run with a different config \(differs at: eval\.every\)",
     _resume_other_config),
    ("damaged_checkpoint", ResumeError, r"checkpoint .*damaged_checkpoint/checkpoints/rl/2 cannot be read .*Delete "
     r"that step directory", _damaged_checkpoint),
    # reward functions
    ("reward_always_fails", RewardFailureError, r"ZeroDivisionError: my reward divided by zero", _failing_reward),
    ("eval_without_run", ConfigError, r"no_run does not exist; give a run directory",
     lambda w, r, c: ["eval", str(r / "no_run")]),
]


@pytest.mark.parametrize("case_id,error,pattern,argv", CASES, ids=[c[0] for c in CASES])
def test_a_user_mistake_is_one_line_and_an_exit_code(world, case_id, error, pattern, argv, capsys, monkeypatch):
    runs, cwd = world / "runs", world / "cwd" / case_id
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    args = argv(world, runs, case_id)  # may write its input files
    inputs, good = _snapshot(world / "inputs"), _snapshot(runs / "good")
    run_dirs = {p.name for p in runs.iterdir()}
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == error.exit_code and code != 0, f"exit {code}, expected {error.exit_code}:\n{err}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and len(lines) <= 6, err
    assert re.search(pattern, errors[0]), f"{pattern!r} not in:\n{errors[0]}"
    # nothing outside the run directory touched; the finished run is as it was
    assert _snapshot(world / "inputs") == inputs and not any(cwd.iterdir())
    assert _snapshot(runs / "good") == good
    assert {p.name for p in runs.iterdir()} - run_dirs <= {case_id}


def test_the_run_all_mistakes_ran_beside_is_still_restorable(world):
    from jaxrl_llm.train.checkpoint import Checkpointer
    for stage in ("sft", "rl"):
        with Checkpointer(world / "runs" / "good" / "checkpoints" / stage, async_save=False) as ck:
            assert ck.latest_step() == 2 and ck.read_meta(2)["done"]


def test_debug_shows_the_traceback(world, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="unknown key"):
        cli.main(["train", DEMO + ":smoke", "--set", "rl.iteration=3", "--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(TaskError):
        cli.main(["train", DEMO + ":smoke", *_sets(world / "runs", "debug", QUIET + ["task.name=nope"])])


def test_every_kind_has_its_own_exit_code():
    from jaxrl_llm.errors import EXIT_CODES
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES) and 0 not in EXIT_CODES.values()
    assert 1 not in EXIT_CODES.values()  # 1: an internal error (a traceback)
    assert all(issubclass(c, UserError) for c in (ConfigError, DataError, ModelError, RunDirBusyError))


# ----------------------------------------------------------------------------- a full disk


def test_a_full_disk_while_logging_is_one_line_and_the_checkpoint_before_survives(tmp_path, capsys, monkeypatch):
    from jaxrl_llm.train import run_dir
    from jaxrl_llm.train.checkpoint import Checkpointer
    real, calls = run_dir.RunDir._append, []

    def append(self, file, records):
        calls.append(file)
        if len(calls) > 3:  # the fourth metrics row: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real(self, file, records)

    monkeypatch.setattr(run_dir.RunDir, "_append", append)
    code = cli.main(["train", DEMO + ":smoke", *_sets(tmp_path, "full", QUIET + ["checkpoint.every=2", "log.every=1",
                                                                                   "eval.every=0"])])
    err = capsys.readouterr().err
    assert code == StorageError.exit_code and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"error: the disk is full writing {tmp_path / 'full' / 'metrics.jsonl'} (")
    assert "MiB free" in err and "checkpoints/sft/2) is intact" in err
    with Checkpointer(tmp_path / "full" / "checkpoints" / "sft", async_save=False) as ck:
        assert ck.all_steps() == [2] and not ck.read_meta(2)["done"]


VERIFY = """
import sys
from jaxrl_llm.train.checkpoint import Checkpointer
with Checkpointer(sys.argv[1], async_save=False) as ck:
    print("complete steps", ck.all_steps(), "meta", sorted(ck.read_meta(ck.latest_step())))
"""


def test_a_real_full_disk_while_checkpointing(tmp_path):
    """A 2 MiB tmpfs holds the first SFT checkpoint (1.3 MiB), not the second: the write fails in orbax's
    background thread. Needs a private mount namespace (root, or unprivileged user namespaces)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare command")
    exe = shutil.which("jaxrl-llm") or f"{sys.executable} -m jaxrl_llm.cli"
    sets = " ".join(f"--set {s}" for s in [f"run_root={mnt}", *QUIET, "eval.every=0", "checkpoint.every=2"])
    script = (f"mount -t tmpfs -o size=2m tmpfs {mnt} || exit 99; {exe} train {DEMO}:smoke {sets}; echo rc=$?; "
              f"{sys.executable} -c '{VERIFY}' {mnt}/demo-smoke/checkpoints/sft")
    flags = ["-m"] if os.geteuid() == 0 else ["-r", "-m"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    out = subprocess.run([unshare, *flags, "sh", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    if out.returncode == 99 or "rc=" not in out.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()[-300:]}")
    assert "rc=11" in out.stdout, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("error: ") == 1, out.stderr
    assert "error: the disk is full writing checkpoint " in out.stderr and "checkpoints/sft/2) is intact" in out.stderr
    assert "complete steps [2] meta ['done', 'iterator', 'summary', 'topology']" in out.stdout, out.stdout
