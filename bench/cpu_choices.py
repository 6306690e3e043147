"""Which of our CPU-specific choices help or hurt on this CPU: each against the default, interleaved rounds.

    .venv/bin/python bench/cpu_choices.py                                  # every variant, 3 rounds x 5 iters
    .venv/bin/python bench/cpu_choices.py --variants backward-xla,unroll --rounds 3 --iters 5
    .venv/bin/python bench/cpu_choices.py --list                           # the variants and what they change

Each run is a fresh process of `bench/ours_grpo.py` (the tiny-qwen2 GRPO workload of bench/workload.py:
64 completions x 64 new tokens, a reference forward, one AdamW step over the 64 rows) with one choice
changed; every round runs the default and each variant once, in an order rotated per round, so slow
phases of a shared machine fall on all of them. Each run reports the medians of its --iters timed
iterations (after --warmup) of the iteration's parts (generation, reference, update) and of the sampler
alone (decode, 64 rows x 64 new tokens); the table gives the median over rounds of those medians and, per
variant, default / variant per round (above 1: the variant is faster), the median and the range.

The choices (`--list`):
  (a) the dense layers' backward (`model.dense_backward`): `kernels.dense.matmul`'s hand-written one (the
      default, a weight gradient written as a row-major matmul) or XLA's autodiff of the same forward
      (`backward-xla`);
  (b) the decoder layers as a scan (`scan_unroll=1`, what `load_hf` gives) or unrolled (`unroll`);
  (c) XLA:CPU flags (`XLA_FLAGS`, appended to any the caller set): Eigen single-threaded, oneDNN matmuls,
      512-bit vectors in generated code, fast-math, XNNPACK off;
  (d) bf16 matmul operands (`model.matmul_dtype="bfloat16"`), with either backward.

The markdown table goes to stdout with the CPU's model and features (kernels.platform), and everything to
bench/results/cpu-choices-<date>.json (or --json). Run it under the machine's timing lock when other
jobs share the cores; the load average before and after each run is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
PARTS = ("generation", "reference", "update", "total")
CPU_PARTS = ("cpu_total", "cpu_ref_update", "cpu_decode")  # CPU seconds of the process, all threads

# name: (what it changes, bench/ours_grpo.py arguments, XLA flags, dense backward)
VARIANTS = {
    "default": ("float32, layer scan, hand-written dense backward, XLA defaults", [], [], "custom"),
    "backward-xla": ("(a) dense layers' backward by XLA autodiff", [], [], "xla"),
    "unroll": ("(b) layers unrolled (scan_unroll=num_layers)", ["--scan-unroll", "64"], [], "custom"),
    "unroll-backward-xla": ("(a)+(b) unrolled, XLA autodiff backward", ["--scan-unroll", "64"], [], "xla"),
    "bf16": ("(d) bf16 matmul operands", ["--matmul-dtype", "bfloat16"], [], "custom"),
    "bf16-backward-xla": ("(a)+(d) bf16 matmul operands, XLA autodiff backward", ["--matmul-dtype", "bfloat16"],
                          [], "xla"),
    "bf16-unroll": ("(b)+(d) bf16 matmul operands, layers unrolled", ["--matmul-dtype", "bfloat16", "--scan-unroll",
                                                                     "64"], [], "custom"),
    "eigen-1thread": ("(c) --xla_cpu_multi_thread_eigen=false", [], ["--xla_cpu_multi_thread_eigen=false"],
                      "custom"),
    "onednn": ("(c) --xla_cpu_use_onednn=true", [], ["--xla_cpu_use_onednn=true"], "custom"),
    "vec512": ("(c) --xla_cpu_prefer_vector_width=512", [], ["--xla_cpu_prefer_vector_width=512"], "custom"),
    "fast-math": ("(c) --xla_cpu_enable_fast_math=true", [], ["--xla_cpu_enable_fast_math=true"], "custom"),
    "no-xnnpack": ("(c) --xla_cpu_use_xnnpack=false", [], ["--xla_cpu_use_xnnpack=false"], "custom"),
}
GROUPS = {
    "code": ["backward-xla", "unroll", "unroll-backward-xla", "bf16", "bf16-backward-xla", "bf16-unroll"],
    "flags": ["eigen-1thread", "onednn", "vec512", "fast-math", "no-xnnpack"],
}


def _child(argv: list[str]) -> None:
    """One run of bench/ours_grpo.py in this process, with the dense layers' backward chosen."""
    backward, rest = argv[0], argv[1:]
    sys.path.insert(0, str(HERE))
    import ours_grpo

    if backward != "custom":  # model.dense_backward, set where ours_grpo loads the model
        load_hf = ours_grpo.load_hf
        ours_grpo.load_hf = lambda path, env, **kw: load_hf(path, env, dense_backward=backward, **kw)
    from jaxrl_llm.train.stages.grpo import GRPOLearner

    # CPU seconds (all threads of this process) per call: less moved than wall seconds by other jobs on the
    # cores; the learner's call is the iteration's reference forward + update.
    cpu = {"iteration": [], "learner": [], "decode": []}

    def timed(fn, key):
        def wrapped(*a, **kw):
            t0 = time.process_time()
            out = fn(*a, **kw)
            cpu[key].append(time.process_time() - t0)
            return out
        return wrapped

    ours_grpo.Ours.iteration = timed(ours_grpo.Ours.iteration, "iteration")
    ours_grpo.Ours.decode_only = timed(ours_grpo.Ours.decode_only, "decode")
    GRPOLearner.__call__ = timed(GRPOLearner.__call__, "learner")
    ours_grpo.main(rest)
    pathlib.Path(os.environ["CPU_CHOICES_CPU_JSON"]).write_text(json.dumps(cpu))


TRUNK_VARIANTS = {  # name: (dense backward, unrolled layers, matmul dtype)
    "default": ("custom", False, None), "backward-xla": ("xla", False, None), "unroll": ("custom", True, None),
    "unroll-backward-xla": ("xla", True, None), "bf16": ("custom", False, "bfloat16"),
    "bf16-backward-xla": ("xla", False, "bfloat16"), "bf16-unroll": ("custom", True, "bfloat16"),
    "bf16-unroll-backward-xla": ("xla", True, "bfloat16"),
}


def trunk_pass(args) -> dict:
    """The trunk's forward + backward (64 x 70 tokens, loss mean(h^2), no head) of every TRUNK_VARIANTS entry,
    compiled once each in this one process, then timed call by call in rotated order: choices (a), (b) and
    (d) isolated from generation and the optimizer, and from load that drifts slower than one call."""
    import jax
    import jax.numpy as jnp
    sys.path.insert(0, str(HERE))
    import workload as workload_lib
    from jaxrl_llm.models import CausalLM, load_hf
    from jaxrl_llm.sharding import ShardingEnv, make_mesh

    wl = workload_lib.load(args.workload)
    env = ShardingEnv(make_mesh({"data": 1}, devices=jax.devices()[:1]))
    cfg, params = load_hf(wl["model_dir"], env)
    rows, length = 64, max(wl["prompt_tokens"]) + wl["max_new_tokens"]
    tokens = jax.random.randint(jax.random.key(0), (rows, length), 2, cfg.vocab_size)
    mask = jnp.ones((rows, length), bool)
    fns = {}
    for name, (backward, unroll, mm_dtype) in TRUNK_VARIANTS.items():
        module = CausalLM(cfg.replace(scan_unroll=cfg.num_layers if unroll else 1, matmul_dtype=mm_dtype,
                                      dense_backward=backward))

        def loss(prm, module=module):
            with env.activate():
                h, _ = module.apply({"params": prm}, tokens, None, mask, return_hidden=True)
            return jnp.mean(h.astype(jnp.float32) ** 2)

        fns[name] = jax.jit(jax.grad(loss))
        jax.block_until_ready(fns[name](params))  # compiled here, before any timing
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.trunk_repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name](params))
            times[name].append(time.perf_counter() - t0)
    base = times["default"]
    out = {}
    for name in names:
        ratios = [b / t for b, t in zip(base, times[name])]
        out[name] = {"what": TRUNK_VARIANTS[name], "fwd_bwd_s": statistics.median(times[name]),
                     "speedup": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)]}
    return out


def run_one(name: str, args) -> dict:
    what, extra, flags, backward = VARIANTS[name]
    env = dict(os.environ)
    if args.compile_cache:  # rounds after the first load each variant's executables instead of compiling them
        env.update(JAX_COMPILATION_CACHE_DIR=args.compile_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if flags:
        env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", "")] + flags).strip()
    with tempfile.TemporaryDirectory() as d:
        out = pathlib.Path(d) / "res.json"
        env["CPU_CHOICES_CPU_JSON"] = str(pathlib.Path(d) / "cpu.json")
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", backward,
               "--workload", args.workload, "--iters", str(args.iters), "--warmup", str(args.warmup),
               "--json", str(out), *extra]
        load0, t0 = os.getloadavg()[0], time.perf_counter()
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"no result within --timeout {args.timeout:g} s", "wall_s": args.timeout}
        wall = time.perf_counter() - t0
        if p.returncode != 0 or not out.is_file():
            tail = (p.stderr or p.stdout)[-800:]
            return {"ok": False, "error": f"exit {p.returncode}: {tail}", "wall_s": wall}
        res = json.loads(out.read_text())
        cpu = json.loads((pathlib.Path(d) / "cpu.json").read_text())
    med, n = res["median"], args.iters
    return {"ok": True, "wall_s": wall, "load_before": load0, "load_after": os.getloadavg()[0],
            **{k: med[k] for k in PARTS}, "decode": res["decode_s"],
            "cpu_total": _med(cpu["iteration"][-n:]), "cpu_ref_update": _med(cpu["learner"][-n:]),
            "cpu_decode": _med(cpu["decode"][-n:]), "cores_busy": _med(cpu["iteration"][-n:]) / med["total"],
            "options": res["options"],
            "compiles_in_timed_loop": res["compiles_in_timed_loop"], "loss": res["last"]["loss"]}


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per variant: median over rounds of each part, and default / variant per round (paired by round)."""
    base = runs["default"]
    out = {}
    for name, rs in runs.items():
        row = {"what": VARIANTS[name][0], "rounds_ok": sum(r["ok"] for r in rs)}
        row["cores_busy"] = [round(r["cores_busy"], 2) for r in rs if r["ok"] and "cores_busy" in r]
        for k in PARTS + ("decode",) + CPU_PARTS:
            row[k] = _med([r[k] for r in rs if r["ok"]])
            ratios = [b[k] / r[k] for b, r in zip(base, rs) if b["ok"] and r["ok"] and k in b and k in r]
            row[f"{k}_speedup"] = _med(ratios)
            row[f"{k}_speedup_range"] = [min(ratios), max(ratios)] if ratios else None
        out[name] = row
    return out


def table(summary: dict, cpu: str, meta: str) -> str:
    def f(x, d=3):
        return "-" if x is None else f"{x:.{d}f}"

    def sp(row, k):
        rng = row[f"{k}_speedup_range"]
        return "-" if rng is None else f"{row[f'{k}_speedup']:.2f} ({rng[0]:.2f}-{rng[1]:.2f})"

    lines = [f"CPU: {cpu}", "", meta, "",
             "| variant | what | iteration s | generation | reference | update | decode 64x64 s "
             "| iteration speed-up | update speed-up | decode speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary.items():
        lines.append(f"| {name} | {r['what']} | {f(r['total'])} | {f(r['generation'])} | {f(r['reference'])} "
                     f"| {f(r['update'])} | {f(r['decode'])} | {sp(r, 'total')} | {sp(r, 'update')} "
                     f"| {sp(r, 'decode')} |")
    lines += ["", "| variant | CPU s / iteration | CPU s reference + update | CPU s decode | iteration CPU-s ratio "
              "| reference + update CPU-s ratio | decode CPU-s ratio | cores busy per round |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in summary.items():
        lines.append(f"| {name} | {f(r['cpu_total'])} | {f(r['cpu_ref_update'])} | {f(r['cpu_decode'])} "
                     f"| {sp(r, 'cpu_total')} | {sp(r, 'cpu_ref_update')} | {sp(r, 'cpu_decode')} "
                     f"| {' '.join(str(c) for c in r.get('cores_busy', [])) or '-'} |")
    lines += ["", "speed-up: default / variant per round (above 1: the variant is faster), median (range). "
              "CPU s: the process's CPU seconds (all threads) per call, medians; less moved than wall seconds "
              "by other jobs sharing the cores, though it counts the thread pool's spinning too. Cores busy: "
              "CPU s / wall s of an iteration, per round (1.0 on a 2-core machine: one core's worth, either "
              "because the program ran on one thread or because other jobs held the other core)."]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child(argv[1:])
    if argv[:1] == ["--trunk"]:
        a = argparse.Namespace(workload=argv[1], trunk_repeats=int(argv[2]))
        print(json.dumps(trunk_pass(a)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="all",
                    help="comma-separated names, a group (" + ", ".join(GROUPS) + ") or 'all'; the default always runs")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run before it counts as failed")
    ap.add_argument("--workload", default=str(HERE / ".cache" / "workload"))
    ap.add_argument("--json", default=None, help="default: bench/results/cpu-choices-<date>.json")
    ap.add_argument("--compile-cache", default=None,
                    help="JAX's persistent compilation cache for the runs (default: a new temporary directory; "
                         "its key covers XLA_FLAGS and the program, so variants never share executables); "
                         "'none': compile in every run")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    ap.add_argument("--trunk-repeats", type=int, default=0,
                    help="also time the trunk's forward + backward of each (a)/(b)/(d) combination in one process, "
                         "this many calls each, rotated (0: skip)")
    args = ap.parse_args(argv)
    if args.list:
        for name, (what, extra, flags, backward) in VARIANTS.items():
            print(f"{name:20s} {what}   [{' '.join(extra + flags)} backward={backward}]")
        return
    names = []
    for item in (GROUPS["code"] + GROUPS["flags"] if args.variants == "all" else args.variants.split(",")):
        for name in GROUPS.get(item, [item]):
            if name not in VARIANTS:
                ap.error(f"--variants: unknown variant {name!r}; --list shows them")
            if name != "default" and name not in names:
                names.append(name)
    names = ["default"] + names

    sys.path.insert(0, str(HERE))
    import workload as workload_lib
    workload_lib.build(args.workload)  # built once, before any timing
    from jaxrl_llm.kernels import platform

    info = platform.cpu_info()
    cpu = platform.summary(info)
    print(f"CPU: {cpu}; {os.cpu_count()} logical CPUs; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    cache_tmp = None
    if args.compile_cache is None:
        cache_tmp = tempfile.TemporaryDirectory(prefix="cpu-choices-cache-")
        args.compile_cache = cache_tmp.name
    elif args.compile_cache == "none":
        args.compile_cache = None
    runs: dict[str, list[dict]] = {n: [] for n in names}
    t_start = time.time()
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            r = run_one(name, args)
            runs[name].append(r)
            msg = (f"total {r['total']:.3f} s (gen {r['generation']:.3f} ref {r['reference']:.3f} upd "
                   f"{r['update']:.3f}) decode {r['decode']:.3f} s, load {r['load_before']:.1f}"
                   if r["ok"] else r["error"])
            print(f"round {rnd + 1}/{args.rounds} {name}: {msg}", flush=True)
    # results stay in run order within each variant's list: index i is round i for every variant
    summary = summarise(runs)
    trunk = None
    if args.trunk_repeats:
        try:
            p = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--trunk", args.workload,
                                str(args.trunk_repeats)], capture_output=True, text=True, timeout=args.timeout)
            trunk = (json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0
                     else {"error": p.stderr[-800:]})
        except subprocess.TimeoutExpired:
            trunk = {"error": f"no result within --timeout {args.timeout:g} s"}
    import jax
    meta = (f"bench/cpu_choices.py --rounds {args.rounds} --iters {args.iters} --warmup {args.warmup}; "
            f"jax {jax.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t_start))}, "
            f"{(time.time() - t_start) / 60:.1f} min")
    md = table(summary, cpu, meta)
    if trunk and "error" not in trunk:
        md += ("\n\nTrunk forward + backward alone (64 x 70 tokens, one process, " + str(args.trunk_repeats)
               + " calls each, rotated; speed-up: default / variant per call):\n\n| variant | backward, unrolled, "
               "matmul dtype | s | speed-up |\n|---|---|---|---|\n" + "\n".join(
                   f"| {n} | {', '.join(str(x) for x in r['what'])} | {r['fwd_bwd_s']:.3f} | {r['speedup']:.2f} "
                   f"({r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}) |" for n, r in trunk.items()))
    elif trunk:
        md += f"\n\ntrunk pass failed: {trunk['error']}"
    print(md)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                            text=True).stdout.strip()
    path = pathlib.Path(args.json) if args.json else (
        HERE / "results" / f"cpu-choices-{datetime.date.today().isoformat()}.json")
    for i in range(2, 100):  # never overwrite an earlier run of the same day
        if args.json or not path.exists():
            break
        path = path.with_name(f"cpu-choices-{datetime.date.today().isoformat()}-{i}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cpu": info, "cpu_summary": cpu, "logical_cpus": os.cpu_count(), "commit": commit,
                                "jax": jax.__version__, "xla_flags_env": os.environ.get("XLA_FLAGS", ""),
                                "args": vars(args), "variants": {n: VARIANTS[n] for n in names},
                                "summary": summary, "runs": runs, "trunk": trunk, "markdown": md}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
