"""Rollout overlapped with training (`overlap` section, docs/async.md): iteration time and learning.

    .venv/bin/python bench/overlap.py                    # speed: on-policy vs staleness 1 (shared / split devices)
    .venv/bin/python bench/overlap.py --learning         # plus held-out accuracy of the demo, on-policy vs stale
    .venv/bin/python bench/overlap.py --episodes         # plus multi-turn tool episodes, on-policy vs stale

Speed: the GRPO stage of experiments/demo.py (the tiny model preset, 32 prompts x 8 samples, 6 new tokens,
one AdamW step per iteration) alone, from the random initial model, `--iterations` iterations in a
`jaxrl-llm train --cpu-devices 2` process per setting:

    on-policy             rollout -> rewards -> update, on mesh data=2
    stale-1 shared        overlap.staleness=1: iteration i+1's rollout runs (background thread) while update i
                          runs, both on the 2 devices
    stale-1 split         overlap.staleness=1, overlap.rollout_devices=1: the rollout on device 1, training on
                          device 0, the parameters transferred every iteration
    host on-policy        on-policy with the task's host reward (reward.in_jit=False: completions decoded and
                          scored in Python, `rewards.RolloutScorer`'s host path) instead of the in-jit one
    host stale-1          the same with overlap.staleness=1: the host scoring of rollout i+1 overlaps update i

Each setting's iteration time is the median of the trainer's `time/step_s` (log.every=1: one metrics fetch
per iteration, as every setting) over the iterations after --warmup; the weight transfer and the time the
main thread waits for its rollout are the medians of `time/weight_transfer_s` / `time/rollout_wait_s`. The
1-minute load average when each run starts and ends is printed with it: a run keeps both cores of a 2-core
machine busy by itself (load ~2 at its end), so a start above ~1.5 or an end well above 2 means other work
competed; run it again.

Episodes (--episodes): the GRPO stage of experiments/tool_calculator.py (32 prompts x 8 two-turn episodes
with the calculator; the host decodes every turn, runs the tool and tokenises the observations between
the jitted turns) after 60 SFT steps on demonstrations (enough for one tool call per episode), on-policy
and with overlap.staleness=1 on the same 2 devices (environments are not split off to rollout devices).

Learning (--learning): the whole demo (SFT warm start, then 60 GRPO iterations) on-policy and with
overlap.staleness=1 (truncated importance sampling on, cap 2), one seed each: held-out greedy accuracy
(`eval/accuracy`) of the GRPO stage every 20 iterations and its wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "experiments" / "demo.py")
TOOLS = str(ROOT / "experiments" / "tool_calculator.py")
EPISODE_SETTINGS = {"episodes on-policy": [], "episodes stale-1": ["rl.overlap.staleness=1"]}
SETTINGS = {
    "on-policy": [],
    "stale-1 shared": ["rl.overlap.staleness=1"],
    "stale-1 split": ["rl.overlap.staleness=1", "rl.overlap.rollout_devices=1"],
    "host on-policy": ["rl.reward.in_jit=False"],
    "host stale-1": ["rl.reward.in_jit=False", "rl.overlap.staleness=1"],
}
LOADS: dict[str, tuple[float, float]] = {}  # run -> 1-minute load average before and after it (2 cores: < 1.5)
QUIET = ["log.progress=False", "log.tensorboard=False", "log.samples_every=0"]


def train(root: pathlib.Path, name: str, sets: list[str], experiment: str = DEMO) -> tuple[list[dict], float]:
    """Runs `experiment` (the demo) with `sets` in a fresh process; (the rl stage's metrics records, wall
    seconds)."""
    args = [x for s in [*QUIET, f"run_root={root}", f"name={name}", *sets] for x in ("--set", s)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    load = os.getloadavg()[0]
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "jaxrl_llm.cli", "train", experiment, "--cpu-devices", "2", "--fresh", *args],
                   check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    rows = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
    LOADS[name] = (load, os.getloadavg()[0])
    return [r for r in rows if r["stage"] == "rl"], wall


def median_of(rows: list[dict], key: str, warmup: int) -> float | None:
    xs = [r[key] for r in rows if key in r and r["step"] > warmup]
    return statistics.median(xs) if xs else None


def speed(root: pathlib.Path, iterations: int, warmup: int, episodes: bool = False, only: list[str] = ()) -> dict:
    out = {}
    runs = {label: (DEMO, ["stages=('rl',)", *sets]) for label, sets in SETTINGS.items()}
    if episodes:
        runs.update({label: (TOOLS, ["sft.steps=60", *sets]) for label, sets in EPISODE_SETTINGS.items()})
    if only:
        unknown = sorted(set(only) - set(runs))
        if unknown:
            raise SystemExit(f"--only: unknown settings {unknown}; choose from {sorted(runs)}")
        runs = {k: v for k, v in runs.items() if k in only}
    for label, (experiment, sets) in runs.items():
        rows, _ = train(root, "speed-" + label.replace(" ", "-"),
                        [f"rl.iterations={iterations}", "log.every=1", "eval.every=0", "checkpoint.every=0", *sets],
                        experiment)
        out[label] = {k: median_of(rows, k, warmup)
                      for k in ("time/step_s", "time/weight_transfer_s", "time/rollout_wait_s")}
        out[label]["load"] = LOADS["speed-" + label.replace(" ", "-")]
    return out


def learning(root: pathlib.Path) -> dict:
    out = {}
    for label, sets in (("on-policy", []), ("stale-1 shared", ["rl.overlap.staleness=1"])):
        rows, wall = train(root, "learn-" + label.replace(" ", "-"), sets)
        out[label] = {"accuracy": {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r},
                      "load": LOADS["learn-" + label.replace(" ", "-")],
                      "wall_s": wall,
                      "rl_step_s": statistics.median(r["time/step_s"] for r in rows if "time/step_s" in r)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=4, help="first iterations left out (compilation, pipeline fill)")
    ap.add_argument("--learning", action="store_true", help="also the demo's held-out accuracy, on-policy vs stale")
    ap.add_argument("--episodes", action="store_true", help="also multi-turn tool episodes, on-policy vs stale")
    ap.add_argument("--only", default="", help="comma-separated setting labels to run (e.g. 'episodes on-policy,"
                    "episodes stale-1'); default: all")
    ap.add_argument("--root", default="/tmp/jaxrl_overlap_bench")
    ap.add_argument("--json", default="", help="write the results here too")
    a = ap.parse_args()
    root = pathlib.Path(a.root)
    res = {"speed": speed(root, a.iterations, a.warmup, a.episodes, [x for x in a.only.split(",") if x])}
    base = res["speed"].get("on-policy", {}).get("time/step_s")
    print(f"\nGRPO iteration, demo shape (tiny preset, 32 prompts x 8 samples, 6 new tokens), --cpu-devices 2, "
          f"median of iterations {a.warmup + 1}..{a.iterations}")
    print(f"{'setting':<16} {'s/iteration':>12} {'speed-up':>9} {'transfer s':>11} {'rollout wait s':>15} "
          f"{'load before/after':>18}")
    for label, r in res["speed"].items():
        if label.startswith("episodes"):  # against the on-policy loop of the same experiment
            base = res["speed"]["episodes on-policy"]["time/step_s"]
        f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"{label:<16} {r['time/step_s']:>12.4f} {base / r['time/step_s']:>8.2f}x "
              f"{f(r['time/weight_transfer_s']):>11} {f(r['time/rollout_wait_s']):>15} "
              f"{r['load'][0]:>9.2f}/{r['load'][1]:.2f}")
    if a.learning:
        res["learning"] = learning(root)
        steps = sorted({s for r in res["learning"].values() for s in r["accuracy"]})
        print("\nDemo (SFT warm start + 60 GRPO iterations), held-out greedy accuracy of the GRPO stage, one seed")
        print(f"{'setting':<16} " + " ".join(f"{'it ' + str(s):>7}" for s in steps) + f" {'wall s':>8} {'rl s/it':>8}"
              f" {'load before/after':>18}")
        for label, r in res["learning"].items():
            print(f"{label:<16} " + " ".join(f"{r['accuracy'].get(s, float('nan')):>7.3f}" for s in steps)
                  + f" {r['wall_s']:>8.1f} {r['rl_step_s']:>8.3f} {r['load'][0]:>9.2f}/{r['load'][1]:.2f}")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
