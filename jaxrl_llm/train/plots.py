"""Plots of a run's metrics.jsonl, and overlays of several runs (sweep variants, mean ± std over seeds).

    plot_run("runs/demo")                        # runs/demo/plots/<stage>.png, one panel per metric family
    plot_overlay({"clip=0.2": [run_s0, run_s1], "clip=0.28": [...]}, "runs/sweep/plots")

Matplotlib's object API (`Figure` + the Agg canvas) is used instead of pyplot: no display, no global
figure state, so plotting is safe from any thread and at the end of a training process. metrics.jsonl
may hold non-finite values as strings ("nan", "inf") and a last line cut by a kill; both are read
without error (the cut line is dropped, the strings become floats and are not drawn).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

# Panels of plot_run: (title, metric keys drawn in it). "kl" draws kl_ref, else approx_kl.
RUN_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward", ("reward/mean",)),
    ("accuracy", ("accuracy", "eval/accuracy")),
    ("KL", ("kl",)),
    ("response length", ("response_length", "eval/response_length")),
    ("loss", ("loss",)),
    ("entropy", ("entropy",)),
)
OVERLAY_METRICS = ("reward/mean", "accuracy", "eval/accuracy", "kl", "response_length", "loss")
KL_KEYS = ("kl_ref", "approx_kl")


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of <run_dir>/metrics.jsonl; undecodable lines (a write cut by a kill) are skipped and
    numeric strings ("nan", "inf", "-inf") become floats."""
    file = pathlib.Path(run_dir) / "metrics.jsonl"
    if not file.exists():
        return []
    out = []
    for line in file.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append({k: _as_float(v) if k not in ("stage",) else v for k, v in rec.items()})
    return out


def _as_float(v):
    if isinstance(v, str):
        try:
            return float(v)  # "nan", "inf", "-inf" as written by RunDir
        except ValueError:
            return v
    return v


def stages_of(records: Iterable[dict]) -> list[str]:
    """Stage names in order of first appearance."""
    seen: dict[str, None] = {}
    for r in records:
        if isinstance(r.get("stage"), str):
            seen.setdefault(r["stage"], None)
    return list(seen)


def series(records: Iterable[dict], stage: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` in `stage`, sorted by step; a later record of the same step wins.
    key "kl" resolves to kl_ref, else approx_kl. Non-finite values are kept (as NaN/inf)."""
    records = [r for r in records if r.get("stage") == stage]
    if key == "kl":
        key = next((k for k in KL_KEYS if any(k in r for r in records)), KL_KEYS[0])
    by_step: dict[int, float] = {}
    for r in records:
        v, step = r.get(key), r.get("step")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(step, (int, float)):
            by_step[int(step)] = float(v)
    steps = np.array(sorted(by_step), np.int64)
    return steps, np.array([by_step[s] for s in steps], np.float64)


def _label(key: str, records: Sequence[dict], stage: str) -> str:
    if key != "kl":
        return key
    return next((k for k in KL_KEYS if any(k in r for r in records if r.get("stage") == stage)), "kl")


def _figure(n_panels: int, title: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(3, n_panels)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return fig, axes


def _draw(ax, steps: np.ndarray, values: np.ndarray, label: str, **kw) -> None:
    finite = np.isfinite(values)
    # Eval points are sparse: markers keep a single point visible.
    ax.plot(steps[finite], values[finite], marker="o" if finite.sum() < 12 else None, ms=3, label=label, **kw)


def run_panels(records: Sequence[dict], stage: str) -> list[tuple[str, list[tuple[str, np.ndarray, np.ndarray]]]]:
    """[(panel title, [(label, steps, values), ...])] of RUN_PANELS for `stage`; a metric with no finite
    value is left out, and so is a panel left without metrics."""
    panels = []
    for title, keys in RUN_PANELS:
        lines = [(_label(k, records, stage), *series(records, stage, k)) for k in keys]
        lines = [ln for ln in lines if np.isfinite(ln[2]).any()]
        if lines:
            panels.append((title, lines))
    return panels


def plot_run(run_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Writes <run_dir>/plots/<stage>.png for every stage in metrics.jsonl; returns the files written.

    Panels: reward, accuracy (train and eval/accuracy), KL (kl_ref or approx_kl), response length,
    loss, entropy; a panel whose metrics a stage never logged is left out."""
    run_dir = pathlib.Path(run_dir)
    records = read_metrics(run_dir)
    out_dir = run_dir / "plots"
    written = []
    for stage in stages_of(records):
        panels = run_panels(records, stage)
        if not panels:
            continue
        fig, axes = _figure(len(panels), f"{run_dir.name}: {stage}")
        for ax, (title, lines) in zip(axes, panels):
            ax.set_title(title if len(lines) > 1 or lines[0][0] == title else f"{title}: {lines[0][0]}")
            for label, steps, values in lines:
                _draw(ax, steps, values, label)
            if len(lines) > 1:
                ax.legend(fontsize=8)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{_safe(stage)}.png"
        fig.savefig(path, dpi=90)
        written.append(path)
    return written


def mean_std_by_step(runs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aligns seeds by step: (steps, mean, std) over the runs that logged each step (finite values only).
    std is the sample std (ddof=1) where two or more seeds have the step, else 0."""
    by_step: dict[int, list[float]] = {}
    for steps, values in runs:
        for s, v in zip(steps.tolist(), values.tolist()):
            if math.isfinite(v):
                by_step.setdefault(int(s), []).append(v)
    steps = np.array(sorted(by_step), np.int64)
    mean = np.array([np.mean(by_step[s]) for s in steps], np.float64)
    std = np.array([np.std(by_step[s], ddof=1) if len(by_step[s]) > 1 else 0.0 for s in steps], np.float64)
    return steps, mean, std


def plot_overlay(groups: Mapping[str, Sequence[str | os.PathLike]], out_dir: str | os.PathLike,
                 metrics: Sequence[str] = OVERLAY_METRICS) -> list[pathlib.Path]:
    """Writes <out_dir>/overlay_<stage>.png: one panel per metric, per group (variant) the mean over its
    runs (seeds) as a line and a ±std band. Returns the files written.

    groups: {label: [run_dir, ...]}; runs without metrics.jsonl are ignored.
    metrics: metric keys; "kl" means kl_ref (or approx_kl where kl_ref was not logged)."""
    data = {label: [read_metrics(d) for d in dirs] for label, dirs in groups.items()}
    stages = stages_of(r for runs in data.values() for recs in runs for r in recs)
    out_dir = pathlib.Path(out_dir)
    written = []
    for stage in stages:
        panels = []
        for key in metrics:
            lines = []
            for label, runs in data.items():
                per_seed = [series(recs, stage, key) for recs in runs]
                steps, mean, std = mean_std_by_step(per_seed)
                if len(steps):
                    lines.append((label, steps, mean, std))
            if lines:
                title = next((_label(key, recs, stage) for runs in data.values() for recs in runs
                              if _label(key, recs, stage) != "kl"), key)
                panels.append((title, lines))
        if not panels:
            continue
        fig, axes = _figure(len(panels), f"{stage}: mean ± std over seeds")
        for ax, (title, lines) in zip(axes, panels):
            ax.set_title(title)
            for i, (label, steps, mean, std) in enumerate(lines):
                color = f"C{i % 10}"
                _draw(ax, steps, mean, label, color=color)
                ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
            ax.legend(fontsize=7)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"overlay_{_safe(stage)}.png"
        fig.savefig(path, dpi=90)
        written.append(path)
    return written


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)
