"""The run directory: resolved config, metrics, samples, TensorBoard events, checkpoints, plots, summary.

    runs/<name>/config.json     the resolved config (after overrides)
                metrics.jsonl    one JSON object per logged step: {"stage", "step", "time", <metric>: value}
                samples.jsonl    {"stage", "step", "prompt", "completion", "reward", "correct"}
                events/<stage>/  TensorBoard event files
                checkpoints/<stage>/<step>/   orbax checkpoints
                plots/*.png      written by `jaxrl-llm plot` and at the end of a run
                summary.json     final metrics (and before/after accuracy of RL stages)
                .jaxrl_llm_run   the marker that says this directory is a run written here
                .lock            held (flock) by the process running it: who, since when

One process at a time: a run holds an exclusive lock on `.lock` for its lifetime (released on any exit,
also a kill, since the operating system drops the lock of a dead process); a second run on the same
directory is refused with a message naming the holder (pid, host, start time, command). Where the file
system has no locks (some FUSE mounts), the pid written in the file decides: a dead process's lock is stale
and taken over. `--fresh` empties the directory but keeps the lock file it holds.

A run directory with a different config.json is resumed only with the same config, unless nothing ran in it
yet (no metrics, no checkpoint: a start that failed on a bad model path, say), which takes the new config.

Only a directory that holds the marker is ever deleted (`--fresh`); an existing directory without it is
written into only when it is empty or holds this very run's config.json (a run from before the marker).
Anything else is refused with a message, and nothing in it is touched.

Only process 0 writes. On resume the log files are cut back to the step of
the checkpoint the run continues from, so a resumed run's logs equal those
of a run that never stopped.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import shutil
import socket
import sys
import time
from typing import Any, Mapping

import jax
import ml_collections as mc

from jaxrl_llm.errors import ResumeError, RunDirBusyError
from jaxrl_llm.sharding import multihost
from jaxrl_llm.train.config import ConfigError

MARKER = ".jaxrl_llm_run"
LOCK = ".lock"


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "size", 2) == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


class RunLock:
    """An exclusive lock on `<run dir>/.lock` held for the life of a run (see the module docstring)."""

    def __init__(self, path: pathlib.Path):
        self.file = path / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock or raises RunDirBusyError naming the holder."""
        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirBusyError(self._busy(self._holder())) from None
        except (ImportError, OSError) as e:  # no flock on this file system (or platform): the pid decides
            if isinstance(e, OSError) and e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            holder = self._holder()
            if holder and holder.get("pid") != os.getpid() and _alive(holder):
                os.close(fd)
                raise RunDirBusyError(self._busy(holder)) from None
        self._fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join([pathlib.Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else ""}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # a lock file that names nobody: nobody holds it
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def _holder(self) -> dict:
        try:
            return json.loads(self.file.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _busy(self, holder: dict) -> str:
        who = (f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}, running since "
               f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['started']))}"
               if holder.get("started") else "another process")
        cmd = f" ({holder['command']})" if holder.get("command") else ""
        return (f"{self.file.parent} is in use by {who}{cmd}: two runs in one directory would mix their logs and "
                "checkpoints. Wait for it to end or stop it (Ctrl-C saves a checkpoint), or pick another name "
                "(--set name=...)")


def _alive(holder: dict) -> bool:
    """Whether the lock file's process still runs (a process on another host counts as alive)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    return True


class RunDir:
    """Writes everything a run leaves behind; see the module docstring for the layout."""

    def __init__(self, root: str | pathlib.Path, name: str, config: mc.ConfigDict, *, fresh: bool = False):
        self.path = pathlib.Path(root) / name
        self.writer = jax.process_index() == 0
        self.start = time.time()
        self._tb: dict[str, Any] = {}
        self.tensorboard = bool(config.log.get("tensorboard", True))
        resolved = json.loads(config.to_json())
        cfg_file = self.path / "config.json"
        saved = _saved_config(cfg_file)
        _check_ours(self.path, fresh, saved == resolved)
        self.lock = RunLock(self.path)
        busy = ""
        if self.writer:  # one lock per run: process 0's, taken before anything in the directory changes
            try:
                self.lock.acquire()
            except RunDirBusyError as e:
                busy = str(e)
        if multihost.process_sum(1.0 if busy else 0.0):  # every process stops when process 0 cannot lock
            raise RunDirBusyError(busy or f"{self.path} is in use by another run (process 0 says who)")
        try:
            if saved is not None and not fresh and saved != resolved and self._has_progress():
                old, new = _flat(saved), _flat(resolved)
                diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
                raise ResumeError(
                    f"{self.path} holds a run with a different config (differs at: {', '.join(diff[:8])}); "
                    "resume it with the same config, pick another name (--set name=...), or pass --fresh to "
                    "start over in that directory")
            multihost.barrier("run_dir:checked")  # every process has read the saved config before it is rewritten
            if self.writer:
                if fresh and (self.path / MARKER).is_file():
                    _empty_run_dir(self.path)
                (self.path / "plots").mkdir(parents=True, exist_ok=True)
                marker = self.path / MARKER
                if not marker.is_file():  # written once, when this directory became a run
                    marker.write_text(json.dumps({"name": name, "created": time.time()}) + "\n")
                cfg_file.write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")
            multihost.barrier("run_dir:ready")  # ... and nobody writes into it before process 0 has set it up
        except BaseException:
            self.lock.release()
            raise

    # ------------------------------------------------------------------ paths

    @property
    def metrics_file(self) -> pathlib.Path:
        return self.path / "metrics.jsonl"

    @property
    def samples_file(self) -> pathlib.Path:
        return self.path / "samples.jsonl"

    def checkpoint_dir(self, stage: str) -> pathlib.Path:
        return self.path / "checkpoints" / stage

    def checkpoint_steps(self, stage: str) -> list[int]:
        """Steps of the stage's complete checkpoints on disk, oldest first (a write cut short is a temporary
        directory, never a bare step number), read without opening orbax."""
        d = self.checkpoint_dir(stage)
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []

    def _has_progress(self) -> bool:
        """Whether the directory holds anything a run produced (metrics or a checkpoint); one that a refused or
        failed start left (config.json alone) takes another config without --fresh."""
        if self.metrics_file.is_file() and self.metrics_file.stat().st_size:
            return True
        stages = self.path / "checkpoints"
        return stages.is_dir() and any(self.checkpoint_steps(d.name) for d in stages.iterdir() if d.is_dir())

    # ------------------------------------------------------------------ writing

    def _append(self, file: pathlib.Path, records: list[dict]) -> None:
        if not self.writer or not records:
            return
        with open(file, "a") as f:
            for r in records:
                f.write(json.dumps({k: _jsonable(v) for k, v in r.items()}) + "\n")

    def log_metrics(self, stage: str, step: int, metrics: Mapping[str, Any]) -> dict:
        record = {"stage": stage, "step": int(step), "time": round(time.time() - self.start, 3)}
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        self._append(self.metrics_file, [record])
        if self.writer and self.tensorboard:
            tb = self._tb_writer(stage)
            for k, v in record.items():
                if k not in ("stage", "step") and isinstance(v, (int, float)):
                    tb.add_scalar(k, v, int(step))
            tb.flush()
        return record

    def log_samples(self, stage: str, step: int, samples: list[dict]) -> None:
        self._append(self.samples_file, [{"stage": stage, "step": int(step), **s} for s in samples])

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        if self.writer:
            (self.path / "summary.json").write_text(
                json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2) + "\n")

    def _tb_writer(self, stage: str):
        if stage not in self._tb:
            from tensorboardX import SummaryWriter
            self._tb[stage] = SummaryWriter(str(self.path / "events" / stage))
        return self._tb[stage]

    # ------------------------------------------------------------------ resume

    def rewind(self, stage: str, step: int, stages_before: tuple[str, ...]) -> None:
        """Drops log records the restored checkpoint has not seen: this stage's steps > `step` and any
        later stage's records. TensorBoard events of this stage are purged from `step + 1` on."""
        if not self.writer:
            return
        keep_stages = set(stages_before)

        def keep(r: dict) -> bool:
            return r.get("stage") in keep_stages or (r.get("stage") == stage and r.get("step", 0) <= step)

        for file in (self.metrics_file, self.samples_file):
            if file.exists():
                lines = [ln for ln in file.read_text().splitlines() if ln.strip()]
                kept = []
                for ln in lines:
                    try:
                        if keep(json.loads(ln)):
                            kept.append(ln)
                    except json.JSONDecodeError:
                        pass  # a line cut by a kill mid-write
                file.write_text("".join(ln + "\n" for ln in kept))
        if self.tensorboard:
            from tensorboardX import SummaryWriter
            self._tb[stage] = SummaryWriter(str(self.path / "events" / stage), purge_step=step + 1)

    def read_metrics(self) -> list[dict]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(ln) for ln in self.metrics_file.read_text().splitlines() if ln.strip()]

    def close(self) -> None:
        for tb in self._tb.values():
            tb.close()
        self._tb.clear()
        self.lock.release()


def _flat(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _empty_run_dir(path: pathlib.Path) -> None:
    """`--fresh`: everything of the old run goes, except the lock this process holds."""
    for child in path.iterdir():
        if child.name == LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _saved_config(cfg_file: pathlib.Path) -> dict | None:
    if not cfg_file.is_file():
        return None
    try:
        return json.loads(cfg_file.read_text())
    except (OSError, ValueError):
        return None  # not a config this library wrote: _check_ours decides what that directory is


def _check_ours(path: pathlib.Path, fresh: bool, same_config: bool) -> None:
    """Refuses a directory this library cannot prove it wrote (see the module docstring)."""
    if not path.exists() or (path / MARKER).is_file():
        return
    if not path.is_dir():
        raise ConfigError(f"{path} exists and is not a directory; pick another name (--set name=...) or "
                          "run_root (--set run_root=...)")
    if not any(p.name != LOCK for p in path.iterdir()):
        return  # an empty directory (or one this library locked and then stopped in): nothing to lose
    if same_config and not fresh:
        return  # this very run, written before runs carried the marker: resume it (the marker is added)
    fix = ("Pick another name (--set name=...) or run_root (--set run_root=...), or move that folder away")
    if fresh:
        raise ConfigError(f"{path} exists and is not a run directory written by jaxrl-llm (no {MARKER} marker), "
                          f"so --fresh will not delete it; nothing in it was touched. {fix}")
    raise ConfigError(f"{path} exists, is not empty and is not a run directory written by jaxrl-llm (no {MARKER} "
                      f"marker); nothing in it was touched. {fix}")
