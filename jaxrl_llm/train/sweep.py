"""Sweeps: every variant of a grid x every seed as its own training process, then a table and overlay plots.

    jaxrl-llm sweep experiments/demo.py:smoke --grid rl.algo.loss.clip_eps_high=0.2,0.28 --seeds 2 --jobs 2

    result = sweep("experiments/demo.py:smoke", {"rl.algo.loss.clip_eps_high": [0.2, 0.28]}, seeds=2, jobs=2)
    print(result.table)

Each run is `python -m jaxrl_llm.cli train SPEC --set k=v ... --set seed=S --set name=<sweep>/<variant>-s<S>`,
so runs are isolated (a crash, an OOM or a hung compile takes down one run, not the sweep) and a
rerun of the same sweep resumes or skips the runs that finished. Up to `jobs` run at a time; a
failed run is reported with the tail of its log and the others go on. Afterwards:

    <run_root>/<sweep>/table.md       final metrics per variant, mean ± std over seeds (markdown)
                       results.json   the same, plus every run's final metrics and status
                       logs/*.log     each run's stdout + stderr
                       plots/overlay_<stage>.png   mean ± std over seeds per variant, against step

Overrides are checked for every variant before anything starts, so a misspelt grid key fails at once.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import itertools
import json
import math
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jaxrl_llm.train.config import ConfigError, load_experiment
from jaxrl_llm.train.plots import plot_overlay, read_metrics

RESERVED = ("seed", "name", "run_root")  # the sweep sets these per run


class GridError(ConfigError):
    """A --grid / --seeds argument is malformed; the message shows the expected form."""


@dataclasses.dataclass
class RunResult:
    """One (variant, seed) run. returncode None: not finished; metrics: final metrics (see final_metrics)."""

    variant: str
    seed: int
    overrides: tuple[str, ...]
    run_dir: pathlib.Path
    log: pathlib.Path
    returncode: int | None = None
    wall_s: float = 0.0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.error


@dataclasses.dataclass
class SweepResult:
    name: str
    path: pathlib.Path
    runs: list[RunResult]
    columns: list[str]
    rows: list[dict]     # per variant: {"variant", "overrides", "seeds_ok", "seeds_failed", "metrics": {col: stats}}
    table: str           # markdown
    plots: list[pathlib.Path]

    @property
    def failed(self) -> list[RunResult]:
        return [r for r in self.runs if not r.ok]


# ----------------------------------------------------------------------------- parsing


def _split_values(raw: str, item: str) -> list[str]:
    """Splits on commas outside brackets and quotes: "(1,2),(3,4)" -> ["(1,2)", "(3,4)"]."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    if depth or quote:
        raise GridError(f"--grid {item!r}: unbalanced brackets or quotes")
    return parts


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string, as in --set


def parse_grid(items: Iterable[str]) -> dict[str, list]:
    """["a.b=0.2,0.28", "c=1,2"] -> {"a.b": [0.2, 0.28], "c": [1, 2]}; values are Python literals
    (bare words are strings). Several items make a cartesian product in `sweep`."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise GridError(f"--grid {item!r} is not KEY=V1,V2,... "
                            "(example: --grid rl.algo.loss.clip_eps_high=0.2,0.28)")
        if key in RESERVED:
            raise GridError(f"--grid {item!r}: {key!r} is set by the sweep itself"
                            + (" (use --seeds)" if key == "seed" else ""))
        if key in grid:
            raise GridError(f"--grid {key!r} given twice; list all its values in one --grid {key}=V1,V2")
        parts = [p.strip() for p in _split_values(raw, item)]
        if not all(parts):
            raise GridError(f"--grid {item!r}: empty value; values are comma-separated Python literals "
                            "(0.2,0.28 or 'adam','sgd' or (1,2),(3,4))")
        values = [_literal(p) for p in parts]
        if len({repr(v) for v in values}) < len(values):
            raise GridError(f"--grid {item!r}: a value is repeated")
        grid[key] = values
    return grid


def parse_seeds(text: str | int | Sequence[int]) -> list[int]:
    """3 or "3" -> [0, 1, 2] (N seeds); "0,1,2", "7," or [0, 5] -> those seeds."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        seeds = list(text)
    else:
        try:
            seeds = [int(s) for s in text.split(",") if s.strip()] if "," in text else list(range(int(text)))
        except ValueError:
            raise GridError(f"--seeds {text!r}: give a count (--seeds 3 = seeds 0,1,2) or a list "
                            "(--seeds 0,1,2; one seed: --seeds 7,)") from None
    if not seeds:
        raise GridError(f"--seeds {text!r}: the number of seeds must be >= 1")
    if any(not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) < len(seeds):
        raise GridError(f"--seeds {text!r}: seeds must be distinct integers >= 0")
    return seeds


def _fmt_value(v: Any) -> str:
    """A value as it appears in a directory name: 'bf16' -> bf16, (1, 4) -> 1-4, a/b -> a_b."""
    text = (v if isinstance(v, str) else repr(v)).replace("/", "_").replace(",", "-")
    return "".join(c for c in text if c.isalnum() or c in "-_.=+").strip("-") or "_"


def variants(grid: Mapping[str, Sequence]) -> list[tuple[str, tuple[str, ...]]]:
    """[(variant name, overrides)] for the cartesian product of the grid; name "base" for an empty grid.
    Names use the last key component ("clip_eps_high=0.2") unless two keys share it."""
    keys = list(grid)
    if not keys:
        return [("base", ())]
    short = [k.rsplit(".", 1)[-1] for k in keys]
    names = short if len(set(short)) == len(short) else keys
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        label = ",".join(f"{n}={_fmt_value(v)}" for n, v in zip(names, combo))
        out.append((label, tuple(f"{k}={v!r}" for k, v in zip(keys, combo))))
    if len({n for n, _ in out}) < len(out):  # e.g. 0.2 and '0.2'
        out = [(f"v{i}-{n}", o) for i, (n, o) in enumerate(out)]
    return out


# ----------------------------------------------------------------------------- results


def final_metrics(run_dir: str | os.PathLike) -> dict[str, float]:
    """summary.json's numbers (e.g. "rl/accuracy_after", "wall_time_s") and, per stage, the last logged
    value of every metric in metrics.jsonl as "<stage>/<metric>" (e.g. "rl/reward/mean")."""
    run_dir = pathlib.Path(run_dir)
    out: dict[str, float] = {}
    for rec in read_metrics(run_dir):
        for k, v in rec.items():
            if k not in ("stage", "step", "time") and _is_number(v):
                out[f"{rec['stage']}/{k}"] = float(v)
    summary = run_dir / "summary.json"
    if summary.exists():
        for k, v in json.loads(summary.read_text()).items():
            if isinstance(v, str):
                try:
                    v = float(v)  # "nan"
                except ValueError:
                    continue
            if _is_number(v):
                out[k] = float(v)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def default_columns(stages: Sequence[str]) -> list[str]:
    last = stages[-1]
    return [f"{last}/{k}" for k in ("accuracy_before", "accuracy_after", "reward/mean", "accuracy", "kl_ref",
                                    "approx_kl", "entropy", "response_length")] + ["wall_time_s"]


def stats(values: Sequence[float]) -> dict:
    """mean and sample std (ddof=1; 0 for one value) over seeds."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "values": list(values)}


def _cell(s: dict | None) -> str:
    if s is None:
        return "—"
    m, d = s["mean"], s["std"]
    big = max(abs(m), abs(d)) if math.isfinite(m) and math.isfinite(d) else 0
    f = ".0f" if big >= 100 else ".1f" if big >= 10 else ".3f"
    return f"{m:{f}} ± {d:{f}}"


def aggregate(runs: Sequence[RunResult], variant_list: Sequence[tuple[str, tuple[str, ...]]],
              columns: Sequence[str]) -> tuple[list[str], list[dict], str]:
    """(columns present, one row per variant, markdown table)."""
    ok = [r for r in runs if r.ok]
    cols = [c for c in columns if any(c in r.metrics for r in ok)]
    rows = []
    for name, overrides in variant_list:
        mine = [r for r in runs if r.variant == name]
        good = [r for r in mine if r.ok]
        metrics = {}
        for c in cols:
            vals = [r.metrics[c] for r in good if c in r.metrics]
            if vals:
                metrics[c] = stats(vals)
        rows.append({"variant": name, "overrides": list(overrides), "seeds_ok": [r.seed for r in good],
                     "seeds_failed": [r.seed for r in mine if not r.ok], "metrics": metrics})
    head = ["variant", "seeds", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        n_ok, n_all = len(row["seeds_ok"]), len(row["seeds_ok"]) + len(row["seeds_failed"])
        seeds = str(n_ok) if n_ok == n_all else f"{n_ok}/{n_all} (failed: {row['seeds_failed']})"
        lines.append("| " + " | ".join([row["variant"], seeds, *(_cell(row["metrics"].get(c)) for c in cols)]) + " |")
    return cols, rows, "\n".join(lines)


# ----------------------------------------------------------------------------- running


def _tail(path: pathlib.Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def sweep(spec: str, grid: Mapping[str, Sequence], seeds: int | str | Sequence[int] = 1,
          base_overrides: Sequence[str] = (), jobs: int | None = None, run_root: str | os.PathLike | None = None,
          *, name: str | None = None, fresh: bool = False, columns: Sequence[str] | None = None,
          env: Mapping[str, str] | None = None, compile_cache: bool = True, quiet: bool = False,
          vectorise: bool = False) -> SweepResult:
    """Runs every variant of `grid` (cartesian product) for every seed; returns the aggregated result.

    spec: "experiments/x.py[:preset]". grid: {dotted key: [values]}. seeds: a count or a list.
    base_overrides: "key=value" for every run. jobs: runs at a time (default: half the CPU cores).
    run_root: where runs go (default: the experiment's run_root); runs are <run_root>/<name>/<variant>-s<seed>.
    name: sweep name (default "<experiment name>-sweep"). fresh: restart runs that exist (else resume/skip).
    columns: metrics of the table (default: default_columns of the experiment's last stage).
    env: extra environment variables for the runs.
    compile_cache: share JAX's persistent compilation cache between the runs (<run_root>/.jax_cache, or
        JAX_COMPILATION_CACHE_DIR when set).
    vectorise: run every (variant, seed) in this process, the last (grpo) stage of all of them as one program
        per iteration (`train.vectorised`); the grid may only hold the last stage's learning rate; `jobs` and
        `env` do not apply (an error when given); compile_cache: this process uses the cache.
    """
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    seed_list = parse_seeds(seeds)
    for key in grid:
        if key in RESERVED:
            raise GridError(f"grid key {key!r} is set by the sweep itself")
    base = tuple(base_overrides)
    cfg = load_experiment(spec, base)
    variant_list = variants(grid)
    for vname, overrides in variant_list:  # every override is checked before anything runs
        try:
            load_experiment(spec, base + overrides)
        except ConfigError as e:
            raise ConfigError(f"sweep variant {vname!r}: {e}") from None
    name = name or f"{cfg.name}-sweep"
    root = pathlib.Path(run_root if run_root is not None else cfg.run_root).absolute()
    path = root / name
    (path / "logs").mkdir(parents=True, exist_ok=True)
    if vectorise:
        from jaxrl_llm.train.vectorised import check_sweep
        check_sweep(cfg, grid, jobs, env)
    jobs = max(1, (os.cpu_count() or 2) // 2) if jobs is None else int(jobs)
    if jobs < 1:
        raise GridError(f"jobs={jobs}: must be >= 1")

    queue = collections.deque()
    # Seed-major: every variant's first seed comes first (early comparisons), and later seeds find their
    # programs in the compilation cache, written by the same variant's first seed.
    for seed in seed_list:
        for vname, overrides in variant_list:
            run_name = f"{name}/{vname}-s{seed}"
            queue.append(RunResult(
                vname, seed, base + overrides + (f"seed={seed}", f"name={run_name!r}", f"run_root={str(root)!r}",
                                                 "log.progress=False"),
                root / run_name, path / "logs" / f"{vname}-s{seed}.log"))
    runs = list(queue)
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    if compile_cache and not child_env.get("JAX_COMPILATION_CACHE_DIR"):
        # Runs of a sweep compile the same programs (a seed is a runtime input): each compiles once.
        child_env["JAX_COMPILATION_CACHE_DIR"] = str(root / ".jax_cache")
        child_env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    say(f"sweep {name}: {len(variant_list)} variant(s) x {len(seed_list)} seed(s) = {len(runs)} runs, "
        f"{'in one vectorised process' if vectorise else f'{jobs} at a time'} -> {path}")
    if vectorise:  # every run in this process, the last stage vectorised; the loop below then has nothing to do
        from jaxrl_llm.train.vectorised import run_sweep
        run_sweep(spec, runs, fresh=fresh, say=say, cache_dir=child_env.get("JAX_COMPILATION_CACHE_DIR"))
        queue.clear()
    running: dict[subprocess.Popen, tuple[RunResult, float]] = {}
    done = 0
    try:
        while queue or running:
            while queue and len(running) < jobs:
                r = queue.popleft()
                cmd = [sys.executable, "-m", "jaxrl_llm.cli", "train", spec,
                       *(x for o in r.overrides for x in ("--set", o))] + (["--fresh"] if fresh else [])
                with open(r.log, "w") as log:  # the child writes into its own copy of the descriptor
                    log.write("$ " + " ".join(cmd) + "\n")
                    log.flush()
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env)
                running[proc] = (r, time.time())
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                r, t0 = running.pop(proc)
                r.returncode, r.wall_s = proc.returncode, round(time.time() - t0, 1)
                if r.returncode == 0 and not (r.run_dir / "summary.json").exists():
                    r.error = f"exit 0 but no summary.json in {r.run_dir}"
                elif r.returncode != 0:
                    r.error = _tail(r.log)
                r.metrics = final_metrics(r.run_dir) if r.ok else {}
                done += 1
                last = "\n".join(r.error.splitlines()[-6:])  # the whole tail is in results.json
                status = "ok" if r.ok else f"FAILED (exit {r.returncode}); log {r.log}:\n    " + \
                    last.replace("\n", "\n    ")
                say(f"[{done}/{len(runs)}] {r.variant} seed {r.seed}: {status} ({r.wall_s:.0f} s)")
    finally:
        for proc in running:  # interrupted: stop the runs this sweep started
            proc.terminate()
            proc.wait()

    cols, rows, table = aggregate(runs, variant_list, columns or default_columns(tuple(cfg.stages)))
    failed = [r for r in runs if not r.ok]
    text = [f"# Sweep {name}", "", f"experiment `{spec}`, base overrides {list(base) or 'none'}, seeds {seed_list}",
            "", "Final metrics, mean ± std (sample std, ddof=1) over seeds.", "", table, ""]
    if failed:
        text += ["Failed runs:", ""] + [f"- {r.variant} seed {r.seed}: exit {r.returncode}, log `{r.log}`"
                                        for r in failed] + [""]
    (path / "table.md").write_text("\n".join(text))
    groups = {row["variant"]: [r.run_dir for r in runs if r.variant == row["variant"] and r.ok] for row in rows}
    plots = plot_overlay({k: v for k, v in groups.items() if v}, path / "plots")
    (path / "results.json").write_text(json.dumps(_jsonable({
        "sweep": name, "spec": spec, "grid": {k: list(v) for k, v in grid.items()}, "seeds": seed_list,
        "base_overrides": list(base), "columns": cols, "variants": rows,
        "runs": [{"variant": r.variant, "seed": r.seed, "overrides": list(r.overrides), "run_dir": str(r.run_dir),
                  "log": str(r.log), "returncode": r.returncode, "ok": r.ok, "wall_s": r.wall_s,
                  "error": r.error, "metrics": r.metrics} for r in runs],
        "plots": [str(p) for p in plots]}), indent=1, default=repr) + "\n")
    say("\n" + table)
    if failed:
        say(f"\n{len(failed)} of {len(runs)} runs failed: "
            + ", ".join(f"{r.variant} seed {r.seed}" for r in failed))
    say(f"\ntable: {path / 'table.md'}\nresults: {path / 'results.json'}")
    for p in plots:
        say(f"plot: {p}")
    return SweepResult(name, path, runs, cols, rows, table, plots)


def _jsonable(v: Any) -> Any:
    """JSON has no NaN/inf: they are written as strings, as in metrics.jsonl."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v
