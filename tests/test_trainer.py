"""The training loop end to end: SIGKILL at several points then resume == never stopped; non-finite stop."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxrl_llm.train.config import load_experiment
from jaxrl_llm.train.stage import NonFiniteError
from jaxrl_llm.train.trainer import train
from subprocs import stop_with_tracebacks

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "experiments" / "demo.py")
# Two stages (SFT warm start, then GRPO), checkpoints every 2 steps, no evaluation (fast).
ARGS = ["sft.steps=6", "rl.iterations=6", "checkpoint.every=2", "eval.every=0", "log.every=1",
        "log.progress=False", "log.tensorboard=False", "log.samples_every=0"]


def _cmd(run_root):
    sets = [x for a in ARGS + [f"run_root={run_root}"] for x in ("--set", a)]
    return [sys.executable, "-m", "jaxrl_llm.cli", "train", DEMO + ":smoke", *sets]


def _env():
    env = dict(os.environ)
    # One CPU device, as a user's run, compiled with this process's compile-fast flags (conftest); every run
    # compared here is compiled with the same flags. Every program goes to the cache: later runs skip compiling.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(ROOT / ".pytest_cache" / "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONFAULTHANDLER"] = "1"  # a run stopped with SIGABRT prints where each of its threads was
    return env


def _communicate(proc, timeout=None, what="the run") -> str:
    """The run's stderr once it ends; a run still going after `timeout` s fails the test with every thread's
    Python stack (`subprocs.stop_with_tracebacks`) instead of leaving only a TimeoutExpired."""
    try:
        return proc.communicate(timeout=timeout)[1].decode()
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} had not ended {timeout} s later; where its threads were:\n"
                    + stop_with_tracebacks([proc], tail=8000))


def _final_arrays(run_root) -> dict:
    ck = pathlib.Path(run_root) / "demo-smoke" / "checkpoints" / "rl"
    last = max(int(p.name) for p in ck.iterdir() if p.name.isdigit())
    state = ocp.StandardCheckpointer().restore(ck / str(last) / "state")
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves}


def _metrics(run_root) -> list[dict]:
    lines = (pathlib.Path(run_root) / "demo-smoke" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def _run_until(run_root, predicate, timeout=240):
    """Starts the run and SIGKILLs it as soon as predicate(run_dir) holds; returns whether it was killed."""
    proc = subprocess.Popen(_cmd(run_root), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=ROOT)
    run_dir = pathlib.Path(run_root) / "demo-smoke"
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if predicate(run_dir):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    out = _communicate(proc, timeout, "the run (no signal sent)")
    assert proc.returncode == 0, out[-3000:]
    return False


def _metric_steps(run_dir, stage):
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return 0
    try:
        return sum(1 for ln in f.read_text().splitlines() if f'"stage": "{stage}"' in ln)
    except OSError:
        return 0


def _writing(run_dir, stage):
    d = run_dir / "checkpoints" / stage
    return d.exists() and any("tmp" in p.name for p in d.iterdir())


@pytest.fixture(scope="module")
def ref_root(tmp_path_factory):
    """The run never stopped (the same command as every stopped run here), shared by the tests that compare."""
    root = tmp_path_factory.mktemp("ref")
    assert not _run_until(root, lambda d: False)
    return root


def test_sigkill_anywhere_then_resume_equals_uninterrupted(tmp_path, ref_root):
    root = tmp_path / "killed"
    reference = _final_arrays(ref_root)
    kill_points = [
        lambda d: _metric_steps(d, "sft") >= 3,   # mid SFT, between checkpoints
        lambda d: _writing(d, "sft"),              # during an SFT checkpoint write
        lambda d: _metric_steps(d, "rl") >= 1,    # first RL step done, before its first checkpoint
        lambda d: _writing(d, "rl"),               # during an RL checkpoint write
    ]
    kills = sum(_run_until(root, p) for p in kill_points)
    assert kills >= 3, "the run finished before most kill points were reached"
    _run_until(root, lambda d: False)  # resume to the end
    resumed = _final_arrays(root)
    assert resumed.keys() == reference.keys()
    for k in reference:
        np.testing.assert_array_equal(resumed[k], reference[k], err_msg=k)
    # the logs of the resumed run equal the uninterrupted run's (times aside)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("time")} for r in rs]  # noqa: E731
    assert strip(_metrics(root)) == strip(_metrics(ref_root))


def test_finished_run_is_skipped_on_restart(tmp_path):
    cfg = load_experiment(DEMO + ":smoke", ARGS + [f"run_root={tmp_path}", "sft.steps=2", "rl.iterations=2"])
    first = train(cfg)
    written = (pathlib.Path(first["run_dir"]) / "summary.json").read_bytes()
    t0 = time.time()
    again = train(load_experiment(DEMO + ":smoke", ARGS + [f"run_root={tmp_path}", "sft.steps=2",
                                                            "rl.iterations=2"]))
    assert time.time() - t0 < first["wall_time_s"]
    assert len(_metrics(tmp_path)) == 4  # 2 SFT + 2 RL log records, not duplicated
    # the no-op run leaves the finished run's summary as it was, and returns it
    assert (pathlib.Path(first["run_dir"]) / "summary.json").read_bytes() == written
    assert again == json.loads(written) and again["wall_time_s"] == first["wall_time_s"]
    with pytest.raises(ValueError, match="holds a run with a different config .*differs at: rl.iterations"):
        train(load_experiment(DEMO + ":smoke", ARGS + [f"run_root={tmp_path}", "sft.steps=2", "rl.iterations=3"]))
    del again


def test_non_finite_steps_stop_the_run_with_its_checkpoint_intact(tmp_path):
    # A learning rate of 1e38 sends the parameters to ~1e38 once warm-up starts; every later loss overflows.
    cfg = load_experiment(DEMO + ":smoke", ARGS + [f"run_root={tmp_path}", "sft.steps=20",
                                                   "sft.optimizer.learning_rate=1e38",
                                                   "sft.optimizer.max_grad_norm=None", "max_consecutive_skips=3"])
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps had a non-finite loss or gradient"):
        train(cfg)
    records = [r for r in _metrics(tmp_path) if r["stage"] == "sft"]
    skipped = [r["skipped"] for r in records]
    assert skipped[0] == 0.0 and skipped[-2:] == [1.0, 1.0] and records[-1]["skipped_in_a_row"] == 2
    ck = tmp_path / "demo-smoke" / "checkpoints" / "sft"
    steps = sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit())
    assert steps and steps[-1] <= len(records)
    state = ocp.StandardCheckpointer().restore(ck / str(steps[0]) / "state")
    assert np.isfinite(np.asarray(state["params"]["model"]["norm"]["scale"])).all()


def _run_and_signal(run_root, predicate, signals=(signal.SIGINT,), timeout=240):
    """Starts the run, sends `signals` (50 ms apart) once predicate(run_dir) holds; (returncode, stderr)."""
    proc = subprocess.Popen(_cmd(run_root), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=ROOT)
    run_dir = pathlib.Path(run_root) / "demo-smoke"
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout and not predicate(run_dir):
        time.sleep(0.01)
    for s in signals:
        if proc.poll() is None:
            proc.send_signal(s)
            time.sleep(0.05)
    err = _communicate(proc, timeout, f"the run sent {[signal.Signals(s).name for s in signals]}")
    return proc.returncode, err


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


def test_ctrl_c_and_sigterm_checkpoint_where_they_stop_and_resume_equals_uninterrupted(tmp_path, ref_root):
    root = tmp_path / "stopped"
    reference = _final_arrays(ref_root)

    # Ctrl-C mid SFT (between checkpoints): a checkpoint where it stopped, exit code 130, one line saying so.
    rc, err = _run_and_signal(root, lambda d: _metric_steps(d, "sft") >= 3)
    line = _one_error_line(err)
    assert rc == 130, err[-3000:]
    m = re.fullmatch(r"error: stopped by Ctrl-C \(SIGINT\) (?:at stage '(\w+)' step (\d+) of \d+; checkpoint "
                     r"(\S+) saved|after stage '\w+' finished;.*)\. Run the same command again .*resume.*|"
                     r"error: stopped by Ctrl-C \(SIGINT\) after stage .*", line)
    assert m, line
    if m.group(1):
        assert pathlib.Path(m.group(3)).is_dir() and m.group(3).endswith(f"checkpoints/{m.group(1)}/{m.group(2)}")
        assert m.group(1) == "rl" or int(m.group(2)) >= 3  # the step in flight when the signal came

    # SIGTERM (a preemption) in the RL stage: the same, with 143.
    rl_done = _metric_steps(root / "demo-smoke", "rl")
    rc, err = _run_and_signal(root, lambda d: _metric_steps(d, "rl") > rl_done, signals=(signal.SIGTERM,))
    assert rc in (143, 0), err[-3000:]  # 0: the run ended before the signal came
    if rc:
        assert re.match(r"error: stopped by SIGTERM", _one_error_line(err))

    # Two Ctrl-C at once: out without waiting for a checkpoint, still one line and no traceback.
    if not (root / "demo-smoke" / "summary.json").exists():
        rl_done = _metric_steps(root / "demo-smoke", "rl")
        rc, err = _run_and_signal(root, lambda d: _metric_steps(d, "rl") > rl_done,
                                  signals=(signal.SIGINT, signal.SIGINT))
        assert rc in (130, 0), err[-3000:]
        if rc:
            assert re.match(r"error: stopped (at once by a second Ctrl-C|by Ctrl-C)", _one_error_line(err))

    _run_until(root, lambda d: False)  # resume to the end
    resumed = _final_arrays(root)
    for k in reference:
        np.testing.assert_array_equal(resumed[k], reference[k], err_msg=k)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("time")} for r in rs]  # noqa: E731
    assert strip(_metrics(root)) == strip(_metrics(ref_root))


def test_a_second_ctrl_c_ends_the_process_though_a_writer_thread_still_waits():
    """A Ctrl-C that cuts a checkpoint save short (a third one: a second waits for the save to be handed over,
    tests/test_checkpoint.py) leaves orbax's writer threads waiting for signals the save never sent, and
    Python's exit joins them for ever (seen: `threading._shutdown` waiting on three `_SignalingThread`s).
    `jaxrl-llm` reports the stop and ends at once all the same."""
    script = textwrap.dedent("""
        import sys, threading
        from jaxrl_llm import cli
        from jaxrl_llm.errors import Interrupted

        def train(args):
            threading.Thread(target=threading.Event().wait, name="waits-for-ever").start()  # not a daemon
            e = Interrupted("stopped at once by a second Ctrl-C; the run resumes from its last checkpoint")
            e.at_once = True
            raise e

        cli.cmd_train = train
        sys.exit(cli.main(["train", "experiments/demo.py"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert _one_error_line(proc.stderr).startswith("error: stopped at once by a second Ctrl-C")


def test_a_second_ctrl_c_inside_a_gc_callback_leaves_no_traceback(monkeypatch):
    """Python drops an exception raised in a __del__ / garbage-collector callback and reports it through
    sys.unraisablehook (a traceback on stderr); a second Ctrl-C landing there must not be reported (the stop
    is already requested), other errors still are, and the hook is restored afterwards."""
    from jaxrl_llm.train.signals import StopRequests

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: reported.append(info.exc_type))

    class Raises:
        def __init__(self, exc):
            self.exc = exc

        def __del__(self):
            raise self.exc

    outer = sys.unraisablehook
    with StopRequests() as stop:
        Raises(KeyboardInterrupt())  # no stop requested yet: reported
        stop.signum = signal.SIGINT
        Raises(KeyboardInterrupt())  # the second Ctrl-C: dropped quietly
        Raises(ValueError("kept"))
    assert reported == [KeyboardInterrupt, ValueError]
    assert sys.unraisablehook is outer
