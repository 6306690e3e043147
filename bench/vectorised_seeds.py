"""Vectorised seeds (`jaxrl-llm sweep --vectorise`, train/vectorised.py) against runs one by one and 2 at a time.

    .venv/bin/python bench/vectorised_seeds.py                     # S = 4 and 8, 20 GRPO iterations each
    .venv/bin/python bench/vectorised_seeds.py --seeds 2 --iterations 3 --spec experiments/demo.py:smoke  # check
    .venv/bin/python bench/vectorised_seeds.py --accuracy          # plus the demo's accuracy over 8 seeds

Speed: the GRPO stage of experiments/demo.py (the tiny model preset, 32 prompts x 8 samples, 6 new tokens,
one AdamW step per iteration) alone (`--set stages=('rl',)`: from the random initial model, as
bench/overlap.py), `--iterations` iterations, no evaluation, for S seeds, three ways, in this one run:

    vectorised   sweep(..., vectorise=True): one process, one program per iteration for the S seeds
    sequential   sweep(..., jobs=1): S `jaxrl-llm train` processes one after another (compilation cache shared)
    jobs 2       sweep(..., jobs=2): S processes, 2 at a time (the process sweep on 2 cores)

Each way runs in a directory of its own under --root, emptied first, so each compiles its programs once
(its sweep's compilation cache starts empty). Each gets its wall time (the whole sweep call: process
starts, compilation, the stage) and its steady-state seconds per iteration of all S seeds: the median of
the trainer's `time/step_s` (log.every=1) over the iterations after --warmup; for the process sweeps the
sum over the S runs of each run's median (divided by 2 for jobs 2: two runs at a time, a rough figure when
the two runs' steps interleave). Ratios are against the vectorised run. The 1-minute load average at the
start and end of each way is printed: a start above ~1.5 on a 2-core machine means other work competed;
run it again.

Accuracy (--accuracy): the whole demo (SFT warm start, then 60 GRPO iterations) for seeds 0-7, vectorised
(`jaxrl-llm sweep experiments/demo.py --seeds 8 --vectorise`): mean ± std (ddof=1) over the seeds of the
held-out accuracy after SFT and after RL.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jaxrl_llm.train.plots import read_metrics  # noqa: E402
from jaxrl_llm.train.sweep import sweep  # noqa: E402

WAYS = ("vectorised", "sequential", "jobs 2")


def _load() -> float:
    return os.getloadavg()[0]


def _median_step(run_dir: pathlib.Path, warmup: int) -> float:
    steps = [r["time/step_s"] for r in read_metrics(run_dir) if r.get("stage") == "rl" and "time/step_s" in r
             and r["step"] > warmup]
    return statistics.median(steps) if steps else float("nan")


def time_ways(spec: str, s: int, iterations: int, warmup: int, root: pathlib.Path, only: tuple[str, ...],
              extra: list[str]) -> dict:
    base = [f"rl.iterations={iterations}", "stages=('rl',)", "eval.every=0", "checkpoint.every=0", "log.every=1",
            "log.samples_every=0", "log.tensorboard=False", *extra]
    out = {}
    for way in only:
        kw = {"vectorise": True} if way == "vectorised" else {"jobs": 1 if way == "sequential" else 2}
        where = root / f"S{s}-{way.replace(' ', '')}"  # its own directory and compilation cache, emptied first
        shutil.rmtree(where, ignore_errors=True)
        load0, t0 = _load(), time.time()
        result = sweep(spec, {}, s, base, run_root=where, name="sweep", quiet=True, **kw)
        wall = time.time() - t0
        if result.failed:
            raise SystemExit(f"{way}: {len(result.failed)} run(s) failed; see {result.path}/logs")
        medians = [_median_step(r.run_dir, warmup) for r in result.runs]
        per_iter = medians[0] if way == "vectorised" else sum(medians) / (1 if way == "sequential" else 2)
        out[way] = {"wall_s": round(wall, 1), "iteration_s": round(per_iter, 4), "load_start": round(load0, 2),
                    "load_end": round(_load(), 2)}
        print(f"S={s} {way}: wall {wall:.1f} s, {per_iter:.3f} s per iteration of all {s} seeds "
              f"(load {load0:.2f} -> {_load():.2f})", flush=True)
    if "vectorised" in out:
        v = out["vectorised"]
        for way, r in out.items():
            r["wall_ratio"] = round(r["wall_s"] / v["wall_s"], 2)
            r["iteration_ratio"] = round(r["iteration_s"] / v["iteration_s"], 2)
    return out


def accuracy(root: pathlib.Path, seeds: int, extra: list[str]) -> dict:
    t0 = time.time()
    result = sweep("experiments/demo.py", {}, seeds, ["log.tensorboard=False", *extra], run_root=root,
                   name=f"demo-vectorised-{seeds}", fresh=True, vectorise=True, quiet=True)
    row = result.rows[0]["metrics"]
    out = {k: row[k] for k in ("sft/accuracy_after", "rl/accuracy_before", "rl/accuracy_after") if k in row}
    out["wall_s"] = round(time.time() - t0, 1)
    for k, v in out.items():
        if isinstance(v, dict):
            print(f"{k}: {100 * v['mean']:.1f}% ± {100 * v['std']:.1f} over {v['n']} seeds; per seed "
                  + ", ".join(f"{100 * x:.1f}" for x in v["values"]), flush=True)
    print(f"wall {out['wall_s']} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="experiments/demo.py")
    ap.add_argument("--seeds", default="4,8", help="comma-separated S values")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="first iterations left out of the medians (compilation)")
    ap.add_argument("--only", default=",".join(WAYS), help=f"comma-separated ways among {', '.join(WAYS)}")
    ap.add_argument("--accuracy", action="store_true", help="also the whole demo over --accuracy-seeds, vectorised")
    ap.add_argument("--accuracy-seeds", type=int, default=8)
    ap.add_argument("--no-speed", action="store_true", help="skip the timing (e.g. with --accuracy)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    ap.add_argument("--root", default="/tmp/jaxrl_vectorised_bench")
    ap.add_argument("--json", default="", help="write the results here too")
    args = ap.parse_args()
    only = tuple(w.strip() for w in args.only.split(",") if w.strip())
    bad = [w for w in only if w not in WAYS]
    if bad:
        raise SystemExit(f"--only {args.only!r}: unknown way(s) {bad}; choose among {', '.join(WAYS)}")
    if args.warmup >= args.iterations:
        raise SystemExit(f"--warmup {args.warmup} must be below --iterations {args.iterations}")
    root = pathlib.Path(args.root)
    results: dict = {"spec": args.spec, "iterations": args.iterations, "warmup": args.warmup, "speed": {}}
    if not args.no_speed:
        for s in (int(x) for x in args.seeds.split(",") if x.strip()):
            results["speed"][s] = time_ways(args.spec, s, args.iterations, args.warmup, root, only, args.set)
        print("\n| S | way | wall s | wall / vectorised | s per iteration (all S) | per iteration / vectorised |")
        print("|---|---|---|---|---|---|")
        for s, ways in results["speed"].items():
            for way, r in ways.items():
                print(f"| {s} | {way} | {r['wall_s']} | {r.get('wall_ratio', '—')} | {r['iteration_s']} | "
                      f"{r.get('iteration_ratio', '—')} |")
    if args.accuracy:
        results["accuracy"] = accuracy(root, args.accuracy_seeds, args.set)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
