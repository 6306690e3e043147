"""Checkpoints: a run SIGKILLed at several points and resumed ends bitwise equal to an uninterrupted run;
partial writes are never restored; keep-last-K; donation safety; sharded restore; clear mismatch errors.

The toy run (tests/ckpt_toy_run.py) runs in subprocesses on 2 CPU devices with a persistent compilation
cache shared by all of them (and the test process's compile-fast flags), so only the first one compiles.
"""

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.algos.train_state import OptimizerConfig, TrainState, apply_gradients
from jaxrl_llm.sharding import ShardingEnv, make_mesh
from jaxrl_llm.train.checkpoint import TRASH, Checkpointer, CheckpointError, abstract_like

TOY = Path(__file__).with_name("ckpt_toy_run.py")
TMP_SUFFIX = ".orbax-checkpoint-tmp"
STEPS = 20  # the toy checkpoints every 3 steps and keeps the last 2


@pytest.fixture(scope="module")
def toy_env(tmp_path_factory):
    env = dict(os.environ)
    fast = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(XLA_FLAGS=" ".join(["--xla_force_host_platform_device_count=2", *fast]), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def run_toy(env, ckpt_dir: Path, out: Path, kill_on: str | None = None, *args: str) -> list[str]:
    """Runs the toy; with kill_on, SIGKILLs it as soon as a stdout line starts with that marker."""
    log = out.with_suffix(".stderr")
    cmd = [sys.executable, str(TOY), "--dir", str(ckpt_dir), "--out", str(out), "--steps", str(STEPS), *args]
    lines = []
    with open(log, "a") as err, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env) as proc:
        watchdog = threading.Timer(120, proc.kill)
        watchdog.start()
        try:
            for line in proc.stdout:
                lines.append(line.strip())
                if kill_on is not None and line.startswith(kill_on):
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            rc = proc.wait()
        finally:
            watchdog.cancel()
    tail = "\n".join(lines[-5:])
    if kill_on is None:
        assert rc == 0 and lines[-1] == "finished", f"toy run failed (rc {rc}); see {log}:\n{tail}"
    else:
        assert rc == -signal.SIGKILL, f"toy run ended (rc {rc}) before printing {kill_on!r}; see {log}:\n{tail}"
    return lines


def complete_steps(d: Path) -> list[int]:
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def started_at(lines: list[str]) -> int:
    return int(next(m.group(1) for m in map(re.compile(r"start (\d+)").fullmatch, lines) if m))


def test_killed_and_resumed_run_is_bitwise_equal_to_uninterrupted(toy_env, tmp_path):
    out_a, out_b, d = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "ckpt_b"
    run_toy(toy_env, tmp_path / "ckpt_a", out_a)
    assert complete_steps(tmp_path / "ckpt_a") == [15, 18]  # keep-last-2

    # Each resume must start from the latest complete checkpoint left on disk by the kill before it.
    kills = [("step 2 done",),                      # before any checkpoint
             ("saving 6",),                         # save() returned: step 6's files are being written
             ("step 10 done", "--sleep-per-step", "0.05"),  # between checkpoints
             ("saving 15", "--stall-write", "15")]   # files of 15 written, not yet renamed into place
    for kill_on, *args in kills:
        expected = (complete_steps(d) or [0])[-1]
        lines = run_toy(toy_env, d, out_b, kill_on, *args)
        assert started_at(lines) == expected, (kill_on, lines[:2], expected)
    assert (d / f"15{TMP_SUFFIX}").is_dir() and not (d / "15").exists(), sorted(p.name for p in d.iterdir())
    assert complete_steps(d)[-1] == 12

    lines = run_toy(toy_env, d, out_b)
    assert started_at(lines) == 12  # the temporary 15 was not taken for a checkpoint
    assert sorted(p.name for p in d.iterdir()) == ["15", "18", TRASH]  # temp dir gone, step 15 rewritten
    assert not any((d / TRASH).iterdir())

    a, b = np.load(out_a), np.load(out_b)
    assert sorted(a.files) == sorted(b.files) and int(b["step"]) == STEPS
    for k in a.files:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), f"{k} differs after resuming"


# ------------------------------------------------------------------- in-process (8 fake CPU devices)


def _tree(seed=0, shape=(8, 16)):
    rng = np.random.default_rng(seed)
    return {"params": {"w": jnp.asarray(rng.standard_normal(shape), jnp.float32), "b": jnp.zeros(shape[1:])},
            "step": jnp.asarray(seed, jnp.int32)}


def test_keep_last_k_and_save_every(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=3, save_every=2) as ckpt:
        saved = [s for s in range(1, 13) if ckpt.save(s, _tree(s), {"s": s})]
        assert saved == [2, 4, 6, 8, 10, 12]
        assert ckpt.save(13, _tree(13), {"s": 13}, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10", "12", "13", TRASH]
    assert not any((tmp_path / TRASH).iterdir())  # pruned steps are deleted, not just renamed
    ckpt = Checkpointer(tmp_path, max_to_keep=3)
    assert ckpt.all_steps() == [10, 12, 13]
    state, meta = ckpt.restore(12, abstract_like(_tree()))
    assert meta == {"s": 12} and np.array_equal(state["params"]["w"], _tree(12)["params"]["w"])
    with pytest.raises(CheckpointError, match=r"step 12 already exists .* latest step \(13\)"):
        ckpt.save(12, _tree(), {})


def test_step_in_flight_is_not_complete(tmp_path):
    gate, reached = threading.Event(), threading.Event()

    def before_commit():
        reached.set()  # the step's files are written, not yet committed
        gate.wait(30)

    ckpt = Checkpointer(tmp_path, before_commit=before_commit)
    ckpt.save(1, _tree(1), {})
    assert reached.wait(30)
    assert ckpt.latest_step() is None and ckpt.restore_latest(abstract_like(_tree())) is None
    assert (tmp_path / f"1{TMP_SUFFIX}").is_dir()
    gate.set()
    ckpt.wait()
    assert ckpt.latest_step() == 1
    ckpt.close()


def test_leftover_temporary_and_pruned_dirs_are_removed(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, _tree(3), {"s": 3})
    # What kills leave behind: a step half written, a pruned step half deleted.
    for junk in (tmp_path / f"6{TMP_SUFFIX}" / "state", tmp_path / TRASH / "1" / "state"):
        junk.mkdir(parents=True)
        (junk / "manifest.ocdbt").write_bytes(b"\x00garbage")
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 3
    assert ckpt.save(6, _tree(6), {"s": 6})
    ckpt.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "6", TRASH] and not any((tmp_path / TRASH).iterdir())
    step, state, meta = ckpt.restore_latest(abstract_like(_tree()))
    assert (step, meta) == (6, {"s": 6}) and np.array_equal(state["params"]["w"], _tree(6)["params"]["w"])
    ckpt.close()


def test_state_may_be_donated_as_soon_as_save_returns(tmp_path, devices):
    env = ShardingEnv(make_mesh({"data": 2, "fsdp": 4}))
    sh = env.sharding(("embed", "mlp"), (8, 16))
    tree = {"params": {"w": jax.device_put(_tree(1)["params"]["w"], sh)}}
    before = np.asarray(tree["params"]["w"]).copy()
    step = jax.jit(lambda t: jax.tree.map(lambda x: x * 3.0 + 1.0, t), donate_argnums=0)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, tree, {})
    after = step(tree)  # reuses the saved buffers while the file write runs
    assert tree["params"]["w"].is_deleted()
    after = step(after)
    ckpt.wait()
    state, _ = ckpt.restore(1, abstract_like(after))
    assert np.asarray(state["params"]["w"]).tobytes() == before.tobytes()
    ckpt.close()


PARAMS = {"embed": (("vocab", "embed"), (64, 32)), "up": (("embed", "mlp"), (32, 64)),
          "down": (("mlp", "embed"), (64, 32)), "norm": (("embed",), (32,))}


def _train_state_on(axes, seed, update=True):
    """Parameters placed by logical axes on a mesh, and AdamW moments (not zero after an update)."""
    env = ShardingEnv(make_mesh(axes))
    rng = np.random.default_rng(seed)
    params = {k: jax.device_put(rng.standard_normal(shape, np.float32), env.sharding(names, shape))
              for k, (names, shape) in PARAMS.items()}
    st = TrainState.create(params, OptimizerConfig(name="adamw", learning_rate=1e-3))
    if update:
        st, _ = jax.jit(lambda s: apply_gradients(s, s.params, {}))(st)
    return {"step": st.step, "params": st.params, "opt_state": st.opt_state}


def test_restore_into_other_sharding(tmp_path, devices):
    saved = _train_state_on({"data": 1, "fsdp": 8}, seed=0)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, saved, {"stage": "sft"})
    target = abstract_like(_train_state_on({"data": 2, "fsdp": 2, "tensor": 2}, seed=1, update=False))
    state, meta = Checkpointer(tmp_path).restore(5, target)
    assert meta == {"stage": "sft"}
    got, want = jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(saved)
    assert len(got) == len(want) == len(jax.tree.leaves(target)) == 15  # step, 4 params, AdamW: 2 counts, mu, nu
    for (path, x), y, t in zip(got, want, jax.tree.leaves(target)):
        assert x.sharding == t.sharding, jax.tree_util.keystr(path)
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), jax.tree_util.keystr(path)
    assert state["params"]["up"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert np.any(np.asarray(state["opt_state"][1][0].mu["up"]) != 0)


def test_mismatch_and_bad_input_messages(tmp_path):
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match=r"meta is not JSON-able .*ndarray"):
        ckpt.save(1, _tree(), {"kl": np.zeros(2)})
    assert ckpt.all_steps() == [] and not any(p.name.startswith("1") for p in tmp_path.iterdir())
    ckpt.save(1, _tree(), {})
    ckpt.wait()
    with pytest.raises(CheckpointError, match=r"no complete checkpoint for step 2 .* complete steps: \[1\]"):
        ckpt.restore(2, abstract_like(_tree()))

    other = abstract_like(_tree(shape=(8, 32)))             # another model width
    other["ref_params"] = other["params"]                   # and a state entry the run did not save
    with pytest.raises(CheckpointError) as e:
        ckpt.restore(1, other)
    msg = str(e.value)
    assert "not in the checkpoint (2):\n    ref_params/b\n    ref_params/w" in msg
    assert "params/b: saved float32[16], expected float32[32]" in msg
    assert "params/w: saved float32[8, 16], expected float32[8, 32]" in msg
    assert "another model/optimiser config" in msg

    fewer = abstract_like(_tree())
    del fewer["step"]
    with pytest.raises(CheckpointError, match=r"in the checkpoint but not expected \(1\):\n    step"):
        ckpt.restore(1, fewer)
    ckpt.close()


def test_a_second_ctrl_c_waits_for_the_save_to_be_handed_over_and_a_third_does_not(tmp_path, capsys):
    """A second Ctrl-C that comes while `save` hands the checkpoint to orbax is held until that call returns
    (cut short, orbax's writer threads would wait for ever for what it had not done yet), then raised: the
    checkpoint is complete. A third one raises at once; outside a save the second raises at once as before."""
    from jaxrl_llm.train.signals import StopRequests, finish_first

    def sigint():
        signal.raise_signal(signal.SIGINT)  # to this thread (the main one); its handler has run when this returns

    ckpt = Checkpointer(tmp_path)
    orbax_save = ckpt._manager.save
    calls = []

    def interrupted_save(*args, **kwargs):
        sigint()  # the second Ctrl-C, in the middle of the call
        calls.append("after the second Ctrl-C")
        return orbax_save(*args, **kwargs)

    ckpt._manager.save = interrupted_save
    with StopRequests() as stop:
        sigint()  # the first: a stop after this step
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            ckpt.save(1, _tree(1), {"s": 1})
        assert calls == ["after the second Ctrl-C"]
        ckpt.wait()
        assert ckpt.all_steps() == [1]  # complete and readable
        _, meta = ckpt.restore(1, abstract_like(_tree()))
        assert meta == {"s": 1}
        held = "Ctrl-C again: stopping at once when checkpoint 1 has been handed to its writer"
        assert held in capsys.readouterr().err

        done = []
        with pytest.raises(KeyboardInterrupt):
            with finish_first("the test's section"):
                sigint()  # held
                done.append(2)
                sigint()  # the third: at once
                done.append(3)
        assert done == [2]
        with pytest.raises(ValueError, match="its own error"):  # a body's own error wins over a held Ctrl-C
            with finish_first("the test's section"):
                sigint()
                raise ValueError("its own error")
        with finish_first("the test's section"):
            pass  # nothing held over from the section before
        with pytest.raises(KeyboardInterrupt):
            sigint()  # outside a section: at once
    ckpt.close()
