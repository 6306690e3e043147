"""The run directory never deletes or writes into a folder it cannot prove is one of its runs."""

import contextlib
import errno
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from jaxrl_llm import cli
from jaxrl_llm.train.config import ConfigError, load_experiment
from jaxrl_llm.errors import RunDirBusyError
from jaxrl_llm.train.run_dir import MARKER, RunDir

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "experiments" / "demo.py")


def _cfg(root, name="exp", *sets):
    return load_experiment(DEMO + ":smoke", [f"run_root={root}", f"name={name}", "log.tensorboard=False", *sets])


def _user_folder(root: pathlib.Path) -> dict:
    folder = root / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "train.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    (folder / "sub" / "notes.txt").write_text("mine\n")
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _contents(folder: pathlib.Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("fresh", [True, False])
def test_a_folder_that_is_not_a_run_is_never_deleted_or_written(tmp_path, fresh):
    before = _user_folder(tmp_path)
    with pytest.raises(ConfigError, match=rf"data exists.*not a run directory written by jaxrl-llm \(no "
                                          rf"\{MARKER} marker\).*nothing in it was touched.*--set name="):
        RunDir(tmp_path, "data", _cfg(tmp_path, "data"), fresh=fresh)
    assert _contents(tmp_path / "data") == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["sub", "train.jsonl"]


def test_the_cli_says_so_in_one_line(tmp_path, capsys):
    before = _user_folder(tmp_path)
    code = cli.main(["train", DEMO + ":smoke", "--set", f"run_root={tmp_path}", "--set", "name=data", "--fresh"])
    err = capsys.readouterr().err
    assert code == ConfigError.exit_code
    assert err.startswith("error: ") and err.count("\n") == 1 and "will not delete it" in err
    assert _contents(tmp_path / "data") == before


def _open(*args, **kw) -> RunDir:
    """A run directory opened and closed again (its lock released), as a finished run leaves it."""
    run = RunDir(*args, **kw)
    run.close()
    return run


def test_runs_carry_the_marker_and_fresh_deletes_only_them(tmp_path):
    run = _open(tmp_path, "exp", _cfg(tmp_path))
    assert (run.path / MARKER).is_file() and (run.path / "config.json").is_file()
    marker = (run.path / MARKER).read_bytes()
    (run.path / "metrics.jsonl").write_text('{"stage": "sft", "step": 1}\n')
    _open(tmp_path, "exp", _cfg(tmp_path))  # resumed: kept, the marker as it was written
    assert (run.path / "metrics.jsonl").exists() and (run.path / MARKER).read_bytes() == marker
    _open(tmp_path, "exp", _cfg(tmp_path), fresh=True)  # a run of ours: deleted and started over
    assert not (run.path / "metrics.jsonl").exists() and (run.path / MARKER).is_file()


def test_an_empty_folder_is_adopted(tmp_path):
    (tmp_path / "exp").mkdir()
    run = _open(tmp_path, "exp", _cfg(tmp_path), fresh=True)
    assert (run.path / MARKER).is_file() and (run.path / "config.json").is_file()


def test_a_run_from_before_the_marker_resumes_but_is_not_deleted(tmp_path):
    run = _open(tmp_path, "exp", _cfg(tmp_path))
    (run.path / MARKER).unlink()
    (run.path / "metrics.jsonl").write_text('{"stage": "sft", "step": 1}\n')
    _open(tmp_path, "exp", _cfg(tmp_path))  # its own config.json: this very run, resumed; the marker is added
    assert (run.path / MARKER).is_file() and (run.path / "metrics.jsonl").exists()
    (run.path / MARKER).unlink()
    with pytest.raises(ConfigError, match="will not delete it"):
        RunDir(tmp_path, "exp", _cfg(tmp_path), fresh=True)
    assert (run.path / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match="not a run directory"):  # another config in a folder not proven ours
        RunDir(tmp_path, "exp", _cfg(tmp_path, "exp", "seed=7"))
    assert json.loads((run.path / "config.json").read_text())["seed"] != 7


def test_a_file_where_the_run_goes_is_refused(tmp_path):
    (tmp_path / "exp").write_text("not a folder\n")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        RunDir(tmp_path, "exp", _cfg(tmp_path))
    assert (tmp_path / "exp").read_text() == "not a folder\n"


# ----------------------------------------------------------------------------- one run at a time

HOLD = """
import sys, time
from jaxrl_llm.train.run_dir import RunLock
import pathlib
RunLock(pathlib.Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def _held(path: pathlib.Path):
    """Another process holding the lock of run directory `path`; killed on leaving the block."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_run_on_a_locked_directory_is_refused_naming_the_holder(tmp_path):
    run = RunDir(tmp_path, "exp", _cfg(tmp_path))
    with pytest.raises(RunDirBusyError, match=rf"exp is in use by process {os.getpid()} on host "
                                               rf"{socket.gethostname()}, running since .*--set name="):
        RunDir(tmp_path, "exp", _cfg(tmp_path), fresh=True)
    assert (run.path / "config.json").is_file()  # the refused --fresh deleted nothing
    run.close()
    _open(tmp_path, "exp", _cfg(tmp_path))  # released on close


def test_the_lock_of_a_killed_process_is_stale(tmp_path):
    with _held(tmp_path / "exp") as proc, pytest.raises(RunDirBusyError, match=rf"in use by process {proc.pid} on "
                                                                                 "host"):
        RunDir(tmp_path, "exp", _cfg(tmp_path))
    run = _open(tmp_path, "exp", _cfg(tmp_path))  # a dead process holds no lock
    assert (run.path / MARKER).is_file()


def test_without_file_locks_the_pid_decides(tmp_path, monkeypatch):
    """File systems without flock (some FUSE mounts): a live holder's pid refuses, a dead one's is taken over."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with _held(tmp_path / "exp") as proc, pytest.raises(RunDirBusyError, match=rf"in use by process {proc.pid}"):
        RunDir(tmp_path, "exp", _cfg(tmp_path))
    _open(tmp_path, "exp", _cfg(tmp_path))


def test_the_cli_refuses_a_second_run_with_one_line(tmp_path, capsys):
    with _held(tmp_path / "demo-smoke") as proc:
        code = cli.main(["train", DEMO + ":smoke", "--set", f"run_root={tmp_path}"])
    err = capsys.readouterr().err
    assert code == RunDirBusyError.exit_code and err.count("\n") == 1 and err.startswith("error: ")
    assert f"in use by process {proc.pid}" in err


def test_a_start_that_failed_before_training_does_not_pin_its_config(tmp_path):
    """A run refused while building (say, a wrong model path) left only its config.json: the corrected
    config runs without --fresh; once a run has metrics or checkpoints, another config is refused."""
    from jaxrl_llm.errors import ResumeError
    _open(tmp_path, "exp", _cfg(tmp_path, "exp", "seed=7"))
    run = _open(tmp_path, "exp", _cfg(tmp_path))
    assert json.loads((run.path / "config.json").read_text())["seed"] == 0
    (run.path / "metrics.jsonl").write_text('{"stage": "sft", "step": 1}\n')
    with pytest.raises(ResumeError, match="holds a run with a different config .*differs at: seed"):
        RunDir(tmp_path, "exp", _cfg(tmp_path, "exp", "seed=7"))
    (run.path / "metrics.jsonl").unlink()
    (run.path / "checkpoints" / "sft" / "2").mkdir(parents=True)
    with pytest.raises(ResumeError, match="differs at: seed"):
        RunDir(tmp_path, "exp", _cfg(tmp_path, "exp", "seed=7"))
