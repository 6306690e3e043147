"""Runs an experiment: builds the components, then each stage in order, resuming where the run stopped.

    summary = train(load_experiment("experiments/demo.py"))

Stages hand their final parameters to the next one (an SFT warm start then
GRPO, for example); all of them write into one run directory. A finished
stage is skipped on restart (its final checkpoint is marked done); an
interrupted one resumes from its latest complete checkpoint.
"""

from __future__ import annotations

import json
import time
from typing import Any

import ml_collections as mc

from jaxrl_llm.train.build import build
from jaxrl_llm.train.checkpoint import Checkpointer
from jaxrl_llm.train.run_dir import RunDir


def stage_class(kind: str):
    """The Stage subclass of a registered stage kind (`train.stages.STAGE_KINDS`)."""
    from jaxrl_llm.train.stages import stage_kind
    return stage_kind(kind).stage


def train(cfg: mc.ConfigDict, *, fresh: bool = False) -> dict[str, Any]:
    """Runs (or resumes) every stage of `cfg`; returns the run summary (also written to summary.json)."""
    t0 = time.time()
    run = RunDir(cfg.run_root, cfg.name, cfg, fresh=fresh)
    comp, params = build(cfg)
    if comp.memory is not None and run.writer:  # the estimate checked before the parameters were created
        table = comp.memory.table()
        (run.path / "memory.txt").write_text(table + "\n")
        if cfg.log.progress:
            print(table, flush=True)
    summary: dict[str, Any] = {"name": cfg.name, "run_dir": str(run.path)}
    stages = tuple(cfg.stages)
    finished_before = []
    try:
        for index, name in enumerate(stages):
            stage = stage_class(cfg[name].kind)(comp, run, name, index, stages[:index])
            ck = Checkpointer(run.checkpoint_dir(name), max_to_keep=cfg.checkpoint.keep,
                              async_save=cfg.checkpoint.async_save)
            try:
                params = stage.run_stage(params, ck)
            finally:
                ck.close()
                stage.close()
            finished_before.append(stage.finished_before)
            for k, v in stage.summary.items():
                summary[f"{name}/{k}"] = v
    finally:
        run.close()
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
