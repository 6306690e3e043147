"""Where one RL iteration's time goes, for any experiment file's GRPO stage, as the trainer runs it.

    .venv/bin/python bench/rl_iteration.py experiments/smollm2_arithmetic_grpo.py --iters 3
    .venv/bin/python bench/rl_iteration.py experiments/smollm2_arithmetic_grpo.py --set rl.sampling.max_new_tokens=32

Builds the experiment (`train.build.build`, its `--set` overrides applied), makes its RL stage (the first
stage of kind "grpo") and runs iterations through the stage's own code: `collect` (the jitted KV-cache
sampler, then the reward, via `RLStage.experience`) and the stage's learner (reference / old log-prob forwards when the algorithm
needs them, then the update). Each phase ends with `block_until_ready`; the first `--warmup` iterations
(compilation) are reported apart; medians over the rest. Prints one JSON line: phases in seconds, rows,
tokens, and the CPU model.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time

import jax


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", help="experiment file[:preset]")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the JSON line to this file")
    args = ap.parse_args(argv)

    from jaxrl_llm.train.build import build
    from jaxrl_llm.train.config import load_experiment
    from jaxrl_llm.train.run_dir import RunDir
    from jaxrl_llm.train.trainer import stage_class

    cfg = load_experiment(args.experiment, args.overrides)
    names = [n for n in cfg.stages if cfg[n].kind == "grpo"]
    if not names:
        sys.exit(f"{args.experiment}: no stage of kind 'grpo' in stages {tuple(cfg.stages)}")
    name = names[0]
    cfg.eval.every = 0  # the held-out evaluation is not part of an iteration
    t0 = time.perf_counter()
    comp, params = build(cfg)
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        cfg.run_root = tmp
        run = RunDir(tmp, cfg.name or "bench", cfg, fresh=True)
        stage = stage_class(cfg[name].kind)(comp, run, name, list(cfg.stages).index(name), ())
        stage.init(params)
        rows = stage.prompts * stage.n
        per_iter = []
        for i in range(args.warmup + args.iters):
            marks = [("start", time.perf_counter())]

            def phase(label, value):
                jax.block_until_ready(value)
                marks.append((label, time.perf_counter()))

            exp = stage.experience(i, stage.state.model_params(), on_phase=phase)
            stage.state, metrics = stage.learner(stage.state, stage.reference_params(), exp, stage.update_key(i),
                                                 on_phase=phase)
            jax.block_until_ready(metrics)
            marks.append(("end", time.perf_counter()))
            t = {}
            for (_, start), (label, end) in zip(marks, marks[1:]):
                t[label] = t.get(label, 0.0) + end - start
            t["total"] = marks[-1][1] - marks[0][1]
            t["decode_steps"] = int(exp.rollout.num_steps)
            t["completion_tokens"] = float(jax.device_get(exp.rollout.lengths).sum())
            t["reward_mean"] = float(jax.device_get(exp.rewards).mean())
            per_iter.append(t)
            print(f"iteration {i}{' (warmup)' if i < args.warmup else ''}: "
                  + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in t.items()),
                  file=sys.stderr, flush=True)
        stage.close()
    timed = per_iter[args.warmup:] or per_iter
    keys = [k for k in timed[0] if isinstance(timed[0][k], float)]
    out = {"experiment": args.experiment, "overrides": args.overrides, "cpu": cpu_model(),
           "devices": jax.device_count(), "rows": rows, "max_prompt_len": int(cfg[name].max_prompt_len),
           "max_new_tokens": int(cfg[name].sampling.max_new_tokens), "build_s": round(load_s, 2),
           "warmup_total_s": round(sum(t["total"] for t in per_iter[:args.warmup]), 2),
           "median_s": {k: round(statistics.median(t[k] for t in timed), 3) for k in keys}}
    line = json.dumps(out)
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    return out


if __name__ == "__main__":
    main()
