"""Several processes on one machine: 2 processes x 2 CPU devices (gloo collectives) compute what 1 process x 4
devices computes, and their checkpoints resume, on 2 processes and on 1.

The runs go through the CLI (`--coordinator/--num-processes/--process-id`) on tests/multihost_exp.py: GRPO
iterations with host rewards (each process scores its own rollouts), then DPO steps, evaluation at the
start and end of each stage, on a data x fsdp mesh.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from subprocs import stop_with_tracebacks

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXP = str(ROOT / "tests" / "multihost_exp.py")
NAME = "multihost"
TIMEOUT = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    # This process's compile-fast flags (conftest): these runs take a few steps, so compiling is most of their
    # time; every run compared here is compiled with the same flags.
    fast = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={devices}", *fast])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONFAULTHANDLER"] = "1"  # a process stopped with SIGABRT prints where each thread was
    env["JAX_COMPILATION_CACHE_DIR"] = str(ROOT / ".pytest_cache" / "jax_cache_multihost")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # every program: later runs skip compiling
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


def _start(run_root, processes: int, sets=()) -> list[subprocess.Popen]:
    """Starts the experiment as `processes` processes with 4 // processes CPU devices each."""
    args = [x for s in (f"run_root={run_root}", *sets) for x in ("--set", s)]
    base = [sys.executable, "-m", "jaxrl_llm.cli", "train", EXP, *args]
    if processes == 1:
        cmds = [base]
    else:
        port = _free_port()
        cmds = [base + ["--coordinator", f"localhost:{port}", "--num-processes", str(processes),
                        "--process-id", str(i)] for i in range(processes)]
    return [subprocess.Popen(c, env=_env(4 // processes), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for c in cmds]


def _finish(procs, timeout=TIMEOUT) -> list[str]:
    outs = []
    deadline = time.time() + timeout
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"multi-process run did not finish in {timeout} s; where each process was:\n"
                        + stop_with_tracebacks(procs, grace=30))
        outs.append(out)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, f"process failed (exit {p.returncode}):\n{out[-4000:]}"
    return outs


def _run(run_root, processes: int, sets=()) -> list[str]:
    return _finish(_start(run_root, processes, sets))


def _final_state(run_root, stage: str) -> dict:
    ck = pathlib.Path(run_root) / NAME / "checkpoints" / stage
    last = max(int(p.name) for p in ck.iterdir() if p.name.isdigit())
    path = ck / str(last) / "state"
    with ocp.StandardCheckpointer() as ckptr:  # read onto this process's first device, whatever wrote it
        meta = ckptr.metadata(path)
        meta = getattr(meta, "item_metadata", meta)
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
        state = ckptr.restore(path, target)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves}


def _metrics(run_root) -> list[dict]:
    lines = (pathlib.Path(run_root) / NAME / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def _losses(metrics) -> dict:
    keys = ("loss", "pg_loss", "kl_ref", "reward/mean", "grad_norm", "eval/accuracy", "eval/pref_accuracy",
            "eval/pref_margin")
    return {(m["stage"], m["step"], k): m[k] for m in metrics for k in keys if k in m}


def _assert_close_states(a: dict, b: dict, rtol=1e-3, atol=2e-5):
    """Equal up to float reassociation (reductions over 2 processes vs 4 local devices), which Adam's
    normalisation amplifies for near-zero gradients."""
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """The same experiment on 1 process x 4 devices and on 2 processes x 2 devices."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    procs_two = _start(two, 2)  # the 2-process run and the 1-process run side by side
    outs_one = _finish(_start(one, 1))
    outs_two = _finish(procs_two)
    return one, two, outs_one, outs_two


def test_two_processes_compute_what_one_process_computes(reference_runs):
    one, two, _, outs_two = reference_runs
    m1, m2 = _metrics(one), _metrics(two)
    assert [(m["stage"], m["step"]) for m in m1] == [(m["stage"], m["step"]) for m in m2]
    l1, l2 = _losses(m1), _losses(m2)
    assert l1.keys() == l2.keys()
    assert any(k[0] == "rl" and k[2] == "pg_loss" and l1[k] != 0 for k in l1), "GRPO had no policy gradient"
    assert any(k[0] == "pref" and k[2] == "loss" for k in l1)
    for k in l1:
        assert l2[k] == pytest.approx(l1[k], rel=2e-4, abs=2e-6), k
    for stage in ("rl", "pref"):
        _assert_close_states(_final_state(one, stage), _final_state(two, stage))
    # only process 0 writes logs and plots; both processes ran the whole program
    assert "run multihost" in outs_two[0] and "run multihost" not in outs_two[1]
    assert sorted(p.name for p in (two / NAME / "plots").iterdir()) == ["pref.png", "rl.png"]
    samples = [json.loads(x) for x in (two / NAME / "samples.jsonl").read_text().splitlines()]
    assert samples and all(set(s) >= {"prompt", "completion", "reward"} for s in samples)


def _kill_when(procs, path: pathlib.Path, timeout=TIMEOUT) -> None:
    t0 = time.time()
    while not path.exists():
        if any(p.poll() is not None for p in procs) or time.time() - t0 > timeout:
            pytest.fail(f"the run ended (or hung) before {path} appeared after {time.time() - t0:.0f} s:\n"
                        + stop_with_tracebacks(procs, grace=30))
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate()


def test_checkpoint_of_two_processes_resumes_on_two_and_on_one(reference_runs, tmp_path):
    one, two, _, _ = reference_runs
    sets = ("eval.every=0",)  # evaluation does not change training; leaving it out keeps this test short
    killed = tmp_path / "killed"
    _kill_when(_start(killed, 2, sets), killed / NAME / "checkpoints" / "rl" / "2")
    copy = tmp_path / "copy"
    shutil.copytree(killed, copy)

    _run(killed, 2, sets)  # resumed on the topology it was written on: exactly the uninterrupted run
    for stage in ("rl", "pref"):
        a, b = _final_state(two, stage), _final_state(killed, stage)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{stage}: {k}")

    shutil.rmtree(killed)  # the saved config names the run root: put the copy back in its place
    shutil.move(copy, killed)
    out = _run(killed, 1, sets)[0]  # the 2-process checkpoint, resumed by 1 process x 4 devices
    assert "written on 2 process(es)" in out
    for stage in ("rl", "pref"):
        _assert_close_states(_final_state(one, stage), _final_state(killed, stage))


# ------------------------------------------------------------------ in-process: launch detection, flags, rows


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                         "JAX_LOCAL_DEVICE_IDS")):
            monkeypatch.delenv(k)
    return monkeypatch


def test_detect_cluster_and_slurm_devices(clean_env):
    from jaxrl_llm.sharding import multihost
    assert multihost.detect_cluster() in (None, "tpu")
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    for k, v in slurm.items():
        clean_env.setenv(k, v)
    assert multihost.detect_cluster() == "slurm"
    clean_env.setenv("SLURM_NTASKS_PER_NODE", "1")
    clean_env.setenv("SLURM_GPUS_ON_NODE", "8")
    assert multihost._slurm_node_gpus() == list(range(8))  # one task per node: all GPUs of the node
    clean_env.setenv("SLURM_NTASKS_PER_NODE", "8")
    assert multihost._slurm_node_gpus() is None  # one task per GPU: JAX's own choice
    clean_env.setenv("SLURM_NTASKS", "1")
    assert multihost.detect_cluster() in (None, "tpu")  # a single task is not a multi-process run
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "h:1")
    assert multihost.detect_cluster() == "env"


def test_initialize_modes_and_flag_errors(clean_env):
    from jaxrl_llm.sharding import multihost
    assert multihost.initialize("off", coordinator="localhost:1") is False
    if multihost.detect_cluster() is None:
        assert multihost.initialize("auto") is False  # nothing to join: a plain one-process run
    with pytest.raises(ValueError, match="needs --num-processes and --process-id"):
        multihost.initialize("auto", coordinator="localhost:1")
    with pytest.raises(ValueError, match=r"--process-id 2 must be in \[0, --num-processes=2\)"):
        multihost.initialize("on", coordinator="localhost:1", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="expected 'auto', 'on' or 'off'"):
        multihost.initialize("yes")
    clean_env.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' must be an integer"):
        multihost.initialize("on", coordinator="localhost:1")


def test_cpu_client_gets_more_threads_than_local_devices(clean_env):
    """2 devices per process on 2 cores: XLA's CPU thread pool (NPROC) gets 4 threads per device, so parts of
    two programs waiting in collectives cannot take every thread; a user's NPROC is kept; one process with
    one device is left alone."""
    from jaxrl_llm.sharding import multihost
    clean_env.setenv("NPROC", "")  # restored after the test, whatever the helper sets
    clean_env.delenv("PORTABLE_NPROC", raising=False)
    clean_env.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    clean_env.setattr(os, "cpu_count", lambda: 2)
    multihost.cpu_thread_headroom()
    assert os.environ["NPROC"] == "8"
    clean_env.setenv("NPROC", "3")
    multihost.cpu_thread_headroom()
    assert os.environ["NPROC"] == "3"
    clean_env.setenv("NPROC", "")
    clean_env.setattr(os, "cpu_count", lambda: 64)  # enough cores: nothing to add
    multihost.cpu_thread_headroom()
    assert os.environ["NPROC"] == ""
    clean_env.setattr(os, "cpu_count", lambda: 2)
    clean_env.setenv("XLA_FLAGS", "")  # one device in one process: no collectives, the pool is left alone
    multihost.cpu_thread_headroom(min_devices=2)
    assert os.environ["NPROC"] == ""
    clean_env.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # 8 devices in one process
    multihost.cpu_thread_headroom(min_devices=2)
    assert os.environ["NPROC"] == "32"


def test_cli_coordinator_without_count_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "jaxrl_llm.cli", "train", EXP, "--coordinator", "localhost:1"],
                         capture_output=True, text=True, cwd=ROOT, env=_env(1))
    assert out.returncode != 0 and "needs --num-processes and --process-id" in out.stderr


def test_rows_helpers_on_one_process():
    from jaxrl_llm.sharding import ShardingEnv, make_mesh, multihost
    env = ShardingEnv(make_mesh({"data": 2, "fsdp": 4, "tensor": 1}))
    assert multihost.batch_rows(env, 16) == slice(0, 16) and multihost.data_shard(env, 16) == (0, 1)
    x = np.arange(32).reshape(16, 2)
    g = multihost.to_global(env, x, 16)
    assert g.sharding.spec[0] == ("data", "fsdp") and len(g.sharding.device_set) == 8
    np.testing.assert_array_equal(multihost.local_rows(g), x)
    np.testing.assert_array_equal(multihost.to_host(g), x)
    key = multihost.replicated(env, jax.random.key(3))
    assert key.sharding.is_fully_replicated and len(key.sharding.device_set) == 8
    assert multihost.process_mean({"a": 1.5}) == {"a": 1.5} and multihost.process_sum(3) == 3


def test_checkpoint_from_another_topology_that_cannot_be_restored_says_so():
    from types import SimpleNamespace

    from jaxrl_llm.sharding import ShardingEnv, make_mesh
    from jaxrl_llm.train.checkpoint import CheckpointError
    from jaxrl_llm.train.stage import Stage

    saved = {"process_count": 4, "device_count": 16, "local_device_count": 4, "platform": "tpu",
             "mesh": {"data": 2, "fsdp": 8, "tensor": 1}}

    class FakeCheckpointer:
        directory = "/runs/x/checkpoints/rl"

        def read_meta(self, step):
            return {"topology": saved}

        def restore(self, step, abstract):
            raise ValueError("cannot place a [6] array on 8 shards")

    stage = Stage.__new__(Stage)
    stage.name = "rl"
    stage.comp = SimpleNamespace(env=ShardingEnv(make_mesh({"data": -1, "fsdp": 1, "tensor": 1})))
    stage.tree = lambda: {}
    with pytest.raises(CheckpointError) as e:
        stage._restore_checkpoint(FakeCheckpointer(), 10)
    text = str(e.value)
    assert "/runs/x/checkpoints/rl/10" in text and "written on 4 process(es) x 4 tpu device(s)" in text
    assert "on 1 process(es) x 8 cpu device(s) (mesh data=8 x fsdp=1 x tensor=1)" in text
    assert "cannot place a [6] array" in text and "--fresh" in text
    saved = stage._topology()  # the same topology: the original error, unchanged
    with pytest.raises(ValueError, match="cannot place") as e:
        stage._restore_checkpoint(FakeCheckpointer(), 10)
    assert not isinstance(e.value, CheckpointError)
