"""Runs an experiment: builds the components, then each stage in order, resuming where the run stopped.

    summary = train(load_experiment("experiments/demo.py"))

Stages hand their final parameters to the next one (an SFT warm start then
GRPO, for example); all of them write into one run directory. A finished
stage is skipped on restart (its final checkpoint is marked done); an
interrupted one resumes from its latest complete checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from typing import Any

import ml_collections as mc

from jaxrl_llm import host_memory
from jaxrl_llm.errors import FULL_DISK_ERRNOS, FULL_DISK_TEXT, Interrupted, StorageError
from jaxrl_llm.train.build import build
from jaxrl_llm.train.checkpoint import Checkpointer
from jaxrl_llm.train.config import check
from jaxrl_llm.train.run_dir import RunDir
from jaxrl_llm.train.signals import StopRequests


def stage_class(kind: str):
    """The Stage subclass of a registered stage kind (`train.stages.STAGE_KINDS`)."""
    from jaxrl_llm.train.stages import stage_kind
    return stage_kind(kind).stage


def load_stage_policy(comp, cfg: mc.ConfigDict, run_dir, name: str, params) -> tuple[Any, int, bool]:
    """The policy params in the latest checkpoint of stage `name` of the run in `run_dir`: (params, step, done).

    `params` (the initial model's, from `build(cfg)`) give the structure the checkpoint is restored into; under
    LoRA the checkpoint holds the adapters and they are put on the base the stage rebuilds."""
    import pathlib

    from jaxrl_llm.errors import ResumeError
    from jaxrl_llm.train.checkpoint import abstract_like

    stages = tuple(cfg.stages)
    ck_dir = pathlib.Path(run_dir) / "checkpoints" / name
    if not ck_dir.is_dir():
        raise ResumeError(f"{run_dir} has no checkpoints of stage {name!r} ({ck_dir})")
    index = stages.index(name)
    stage = stage_class(cfg[name].kind)(comp, None, name, index, stages[:index])
    stage.init(params)
    with Checkpointer(ck_dir, max_to_keep=None, async_save=False) as ck:
        step = ck.latest_step()
        if step is None:
            raise ResumeError(f"no complete checkpoint in {ck_dir}")
        tree, meta = ck.restore(step, abstract_like(stage.tree()))
    if stage.lora is None:
        out = tree["params"]
    else:  # LoRA: the checkpoint holds the adapters; the stage puts them on the base it rebuilt
        stage.restore(tree, meta)
        out = stage.model_params()
    stage.close()
    return out, int(step), bool(meta.get("done"))


def run_one_stage(cfg: mc.ConfigDict, comp, run: RunDir, stages: tuple[str, ...], index: int, params,
                  stop: StopRequests | None = None) -> tuple[Any, Any]:
    """(the stage object, the params it hands on): stage `stages[index]` run (or restored) with its own
    checkpointer, both closed afterwards."""
    name = stages[index]
    stage = stage_class(cfg[name].kind)(comp, run, name, index, stages[:index])
    if stop is not None:
        stage.stop = stop
    ck = Checkpointer(run.checkpoint_dir(name), max_to_keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    try:
        params = stage.run_stage(params, ck)
    finally:
        ck.close()
        stage.close()
    return stage, params


def train(cfg: mc.ConfigDict, *, fresh: bool = False) -> dict[str, Any]:
    """Runs (or resumes) every stage of `cfg`; returns the run summary (also written to summary.json).

    Ctrl-C or SIGTERM stops after the current step with a checkpoint (`errors.Interrupted`); a full disk
    ends with `errors.StorageError` naming the path and the free space, the last complete checkpoint intact."""
    t0 = time.time()
    host_memory.check()  # a bad JAXRL_LLM_HOST_MALLOC stops here, before the run directory is touched
    check(cfg)  # a config from load_experiment was checked there already
    run = RunDir(cfg.run_root, cfg.name, cfg, fresh=fresh)
    try:
        with StopRequests(every=cfg.log.every) as stop:
            return _train(cfg, run, stop, t0)
    except KeyboardInterrupt:  # a second Ctrl-C: out at once
        e = Interrupted(f"stopped at once by a second Ctrl-C; {run.path} resumes from its last complete "
                        f"checkpoint{_latest(run, cfg)} when the same command runs again (without --fresh)")
        e.at_once = True  # a save cut short (a third Ctrl-C) may leave the writer's threads waiting: see Interrupted
        raise e from None
    except (OSError, ValueError, RuntimeError) as e:
        full = _full_disk(e)
        if full is None:
            raise
        raise StorageError(_disk_message(run, cfg, full)) from e
    finally:
        run.close()


def _train(cfg: mc.ConfigDict, run: RunDir, stop: StopRequests, t0: float) -> dict[str, Any]:
    comp, params = build(cfg)
    if comp.memory is not None and run.writer:  # the estimate checked before the parameters were created
        table = comp.memory.table()
        (run.path / "memory.txt").write_text(table + "\n")
        if cfg.log.progress:
            print(table, flush=True)
    summary: dict[str, Any] = {"name": cfg.name, "run_dir": str(run.path)}
    stages = tuple(cfg.stages)
    finished_before = []
    for index, name in enumerate(stages):
        if index and stop.now(0):  # a signal during the last step of the stage before, which is complete
            raise stop.error(f"after stage {stages[index - 1]!r} finished; run the same command again (without "
                             f"--fresh) to go on with {name!r}")
        stage, params = run_one_stage(cfg, comp, run, stages, index, params, stop)
        finished_before.append(stage.finished_before)
        for k, v in stage.summary.items():
            summary[f"{name}/{k}"] = v
    saved = run.path / "summary.json"
    if all(finished_before) and saved.is_file():
        return json.loads(saved.read_text())  # a finished run, run again: its summary stays the one it wrote
    summary["wall_time_s"] = round(time.time() - t0, 1)
    run.write_summary(summary)
    if run.writer:
        try:
            from jaxrl_llm.train.plots import plot_run
            summary["plots"] = [str(p) for p in plot_run(run.path)]
        except ImportError:
            pass
    return summary


def _full_disk(e: BaseException) -> BaseException | None:
    """The error in `e`'s chain that says the disk is full (orbax and tensorstore wrap the OSError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno in FULL_DISK_ERRNOS) or any(t in str(e) for t in FULL_DISK_TEXT):
            return e
        e = e.__cause__ or e.__context__
    return None


def _latest(run: RunDir, cfg: mc.ConfigDict) -> str:
    """" (<stage dir>/<step>)" of the newest complete checkpoint on disk, or ""."""
    for name in reversed(tuple(cfg.stages)):
        steps = run.checkpoint_steps(name)
        if steps:
            return f" ({run.checkpoint_dir(name) / str(steps[-1])})"
    return ""


def _disk_message(run: RunDir, cfg: mc.ConfigDict, e: BaseException) -> str:
    where = getattr(e, "filename", None)
    if not where:  # tensorstore names the file in its message: say which checkpoint that was
        paths = re.findall(r'"(/[^"]+)"', str(e))
        step = re.search(r"^(.*?/\d+)\.orbax-checkpoint-tmp", paths[0]) if paths else None
        where = f"checkpoint {step.group(1)}" if step else (paths[0] if paths else run.path)
    try:
        free = f"{shutil.disk_usage(run.path).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    latest = _latest(run, cfg)
    kept = (f"the last complete checkpoint{latest} is intact" if latest else "no checkpoint had been completed")
    return (f"the disk is full writing {where} ({free} on the run directory's file system); {kept}. Free some "
            "space (or set another run_root) and run the same command again to resume")
