"""Time and memory of the pieces of RL post-training, and how they grow with completion length, group
size, batch and prompt length: rollout (prefill + decode), reference log-prob forward, GRPO update,
DPO update, and a whole GRPO iteration.

    .venv/bin/python bench/scaling.py                          # tiny model: base point + growth sweep, plot
    .venv/bin/python bench/scaling.py --model qwen2.5-0.5b --prompts 2 --group 4 --prompt-len 32 \
        --new-tokens 64 --sweep none                             # a real shape, random weights
    .venv/bin/python bench/scaling.py --model qwen2.5-0.5b --dtype bfloat16 --prompts 16 --group 4 \
        --prompt-len 128 --new-tokens 256 --sweep none           # GPU: decode bandwidth and update MFU

Random weights in a preset's shape (`jaxrl_llm.models.PRESETS`). A point is B prompts x G samples
(rows = B*G), P prompt tokens, N new tokens. For each point:

  rollout    the jitted KV-cache sampler: B*G rows, N new tokens, EOS off (every row runs N steps), T=1
  prefill    the prompt forward that fills the KV cache (B*G x P tokens)
  reference  the log-prob forward over B*G rows of P+N tokens (as GRPO's reference model)
  grpo       one GRPO update (AdamW, beta 0.04, k3 KL, one minibatch, state donated) over all rows
  dpo        one DPO update (sigmoid loss) over B*G/2 pairs whose chosen and rejected responses have N
             tokens each: the same B*G rows of P+N tokens as the GRPO update
  iteration  rollout + reference + grpo (device work only; the host reward is the caller's)

Times are medians of --repeats runs after a compile run, each ended by `block_until_ready`.
Memory is XLA's buffer assignment of each compiled program (`memory_analysis()`: arguments, outputs
and temporaries, donated buffers counted once); the iteration's peak adds what stays
alive across its programs (policy, optimizer state, reference weights) to the largest program's own
buffers. On GPUs the allocator's peak (`memory_stats()["peak_bytes_in_use"]`) is recorded too.
Throughput counts tokens processed; FLOPs are the matmul FLOPs of the model's shape (2 per
multiply-add; attention scores and values over the full sequence; training = 3x forward), from which
MFU is computed where the device's bf16 dense peak is known (--peak-tflops overrides). Decode's
achieved bandwidth is (weights + KV cache read per step) / step time, against the device's memory
bandwidth where it is known (--hbm-gbps overrides).

Prints markdown tables, writes JSON (--json) and, with a sweep, a plot (--plot).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.algos import dpo, grpo
from jaxrl_llm.algos.policy_loss import PolicyLossConfig
from jaxrl_llm.algos.train_state import OptimizerConfig, TrainState, jit_update, make_epoch_runner
from jaxrl_llm.models import CausalLM, KVCache, create_model, get_preset, positions_from_mask
from jaxrl_llm.rollout import SamplingConfig, make_sampler
from jaxrl_llm.sharding import ShardingEnv, make_mesh

# bf16 dense peak (TFLOP/s) and memory bandwidth (GB/s) by device kind, from the vendors' data sheets.
DEVICE_PEAKS = {
    "NVIDIA H100 80GB HBM3": (989.0, 3350.0),
    "NVIDIA H100 PCIe": (756.0, 2000.0),
    "NVIDIA H200": (989.0, 4800.0),
    "NVIDIA A100-SXM4-80GB": (312.0, 2039.0),
    "NVIDIA A100-SXM4-40GB": (312.0, 1555.0),
}

PIECES = ("rollout", "prefill", "reference", "grpo", "dpo")


@dataclasses.dataclass(frozen=True)
class Point:
    prompts: int
    group: int
    prompt_len: int
    new_tokens: int

    @property
    def rows(self) -> int:
        return self.prompts * self.group

    def label(self) -> str:
        return f"B={self.prompts} G={self.group} P={self.prompt_len} N={self.new_tokens}"


# ------------------------------------------------------------------------------------------- arithmetic


def matmul_flops_per_token(cfg, context: int, head: bool) -> float:
    """Forward matmul FLOPs of one token attending to `context` positions (2 per multiply-add)."""
    e, h, k, d, m = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    proj = e * h * d * 2 + e * k * d * 2 + 3 * e * m  # q, o; k, v; gate, up, down
    attn = 2 * h * d * context                         # scores and the weighted sum of values
    return 2.0 * (cfg.num_layers * (proj + attn) + (e * cfg.vocab_size if head else 0))


def forward_flops(cfg, rows: int, p: int, n: int) -> float:
    """A log-prob forward: the trunk over P+N tokens, the head over the N completion positions."""
    t = p + n
    return rows * (t * matmul_flops_per_token(cfg, t, head=False) + n * 2.0 * cfg.hidden_size * cfg.vocab_size)


def decode_flops(cfg, rows: int, p: int, n: int) -> float:
    return rows * sum(matmul_flops_per_token(cfg, p + i + 1, head=True) for i in range(n))


def param_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def decode_bytes_per_step(cfg, params, rows: int, context: int) -> float:
    """Bytes read by one decode step: every weight once, plus each row's KV cache up to `context`."""
    kv = 2 * cfg.num_layers * rows * context * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.jnp_dtype).itemsize
    return param_bytes(params) + kv


# ------------------------------------------------------------------------------------------- timing


def median_time(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls of `fn`, each ended by `block_until_ready` (warm it up first)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak(compiled) -> int:
    """Arguments + outputs (donated ones once) + XLA's temporary allocation (its buffer assignment, reuse
    included). `peak_memory_in_bytes` alone leaves the temporaries out on CPU."""
    m = compiled.memory_analysis()
    own = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return int(max(own, m.peak_memory_in_bytes))


def _device_peak() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


class Bench:
    """One model (random weights) with its reference copy and optimizer state; measures points."""

    def __init__(self, model: str, dtype: str, remat: str | None, repeats: int, seed: int = 0,
                 param_dtype: str = "float32"):
        overrides = {"dtype": dtype, "param_dtype": param_dtype}
        if remat:
            overrides["remat"] = remat
        self.cfg = get_preset(model, **overrides)
        self.env = ShardingEnv(make_mesh({"data": -1}))
        self.module, params, self.shardings = create_model(self.cfg, jax.random.key(seed), self.env,
                                                           module=CausalLM(self.cfg))
        # The policy samples and the updates train copies of it; the reference is the same arrays here
        # (in a run it is a second copy, counted in `resident`). Optimizer state exists only inside updates.
        self.params = self.ref = params
        self.opt = OptimizerConfig(name="adamw", learning_rate=1e-5, max_grad_norm=None)
        self.repeats = repeats
        self.rng = np.random.default_rng(seed)
        opt_shapes = jax.eval_shape(lambda p: TrainState.create(p, self.opt).opt_state, params)
        self.resident = 2 * param_bytes(params) + param_bytes(opt_shapes)  # policy + reference + AdamW

    def _tokens(self, rows: int, length: int) -> jax.Array:
        return jnp.asarray(self.rng.integers(2, self.cfg.vocab_size, size=(rows, length)), jnp.int32)

    def measure(self, pt: Point, pieces=PIECES) -> dict:
        cfg, env, r = self.cfg, self.env, self.repeats
        rows, p, n = pt.rows, pt.prompt_len, pt.new_tokens
        out: dict = {"point": dataclasses.asdict(pt), "rows": rows}
        prompts, pmask = self._tokens(pt.prompts, p), jnp.ones((pt.prompts, p), jnp.bool_)

        # Rollout: the trainer's sampler (prompts repeated G times inside).
        sampling = SamplingConfig(max_new_tokens=n, temperature=1.0, n_samples=pt.group, eos_token_ids=(),
                                  pad_token_id=0)
        sampler = make_sampler(self.module, cfg, sampling, env=env, param_shardings=self.shardings)
        key = jax.random.key(1)
        compiled = sampler.jitted_for((pt.prompts, p)).lower(self.params, prompts, pmask, key).compile()
        ro = jax.block_until_ready(compiled(self.params, prompts, pmask, key))
        assert int(ro.num_steps) == n, "decode stopped early; the figures would be wrong"
        t = median_time(lambda: compiled(self.params, prompts, pmask, key).tokens, r)
        kv_read = statistics.mean(decode_bytes_per_step(cfg, self.params, rows, p + i + 1) for i in range(n))
        out["rollout"] = {"s": t, "tokens_per_s": rows * n / t, "flops": decode_flops(cfg, rows, p, n),
                          "peak_bytes": _peak(compiled), "resident_args": param_bytes(self.params),
                          "bytes_per_step": kv_read, "achieved_gbps": kv_read * n / t / 1e9}

        if "prefill" in pieces:
            rep_prompts, rep_mask = jnp.repeat(prompts, pt.group, 0), jnp.repeat(pmask, pt.group, 0)

            def prefill(params, tokens, mask):
                with env.activate():
                    cache = KVCache.zeros(cfg, rows, p + n)
                    hidden, cache = self.module.apply({"params": params}, tokens, positions_from_mask(mask), mask,
                                                      cache, return_hidden=True)
                    return self.module.apply({"params": params}, hidden[:, -1:], method="logits"), cache

            c = jax.jit(prefill).lower(self.params, rep_prompts, rep_mask).compile()
            jax.block_until_ready(c(self.params, rep_prompts, rep_mask))
            t = median_time(lambda: c(self.params, rep_prompts, rep_mask), r)
            out["prefill"] = {"s": t, "tokens_per_s": rows * p / t,
                              "flops": rows * p * matmul_flops_per_token(cfg, p, head=False), "peak_bytes": _peak(c),
                              "resident_args": param_bytes(self.params)}

        batch = {"prompt_tokens": ro.prompt_tokens, "prompt_mask": ro.prompt_mask,
                 "completion_tokens": ro.tokens, "completion_mask": ro.mask, "sampler_logprobs": ro.raw_logprobs}
        algo = grpo.grpo(group_size=pt.group, beta=0.04).replace(
            loss=PolicyLossConfig(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.04, kl_estimator="k3"),
            temperature=1.0, epochs=1, num_minibatches=1, num_micro_batches=1)

        # Reference log-probs.
        def logp(params, b):
            with env.activate():
                return grpo.make_logprob_fn(self.module, cfg, 1.0, algo.logprob_chunk)(params, b)
        ref_in = dict(batch)
        c = jax.jit(logp).lower(self.ref, ref_in).compile()
        batch["ref_logprobs"] = jax.block_until_ready(c(self.ref, ref_in))
        t = median_time(lambda: c(self.ref, ref_in), r)
        out["reference"] = {"s": t, "tokens_per_s": rows * (p + n) / t, "flops": forward_flops(cfg, rows, p, n),
                            "peak_bytes": _peak(c), "resident_args": param_bytes(self.ref)}

        if "grpo" in pieces:
            batch["advantages"] = grpo.compute_advantages(
                algo, jnp.asarray(self.rng.normal(size=rows), jnp.float32), ro.mask)
            step = make_epoch_runner(grpo.make_grpo_step(self.module, cfg, algo), 1, 1)
            out["grpo"] = self._update(step, batch, rows * (p + n), 3 * forward_flops(cfg, rows, p, n))

        if "dpo" in pieces:
            pairs = max(rows // 2, 1)
            dbatch = {"prompt_tokens": self._tokens(pairs, p), "prompt_mask": jnp.ones((pairs, p), jnp.bool_),
                      "chosen_tokens": self._tokens(pairs, n), "chosen_mask": jnp.ones((pairs, n), jnp.bool_),
                      "rejected_tokens": self._tokens(pairs, n), "rejected_mask": jnp.ones((pairs, n), jnp.bool_)}
            with env.activate():
                dbatch.update(jax.jit(dpo.make_reference_logps_fn(self.module, cfg))(self.ref, dbatch))
            dstep = dpo.make_dpo_step(self.module, cfg, dpo.DPOConfig())
            out["dpo"] = self._update(dstep, dbatch, 2 * pairs * (p + n), 3 * forward_flops(cfg, 2 * pairs, p, n))

        if "grpo" in out:
            parts = ("rollout", "reference", "grpo")
            extra = max(out[k]["peak_bytes"] - out[k]["resident_args"] for k in parts)
            out["iteration"] = {"s": sum(out[k]["s"] for k in parts), "peak_bytes": self.resident + extra,
                                "flops": sum(out[k]["flops"] for k in parts)}
        out["device_peak_bytes"] = _device_peak()
        return out

    def _update(self, step, batch, tokens: int, flops: float) -> dict:
        state = TrainState.create(jax.tree.map(jnp.copy, self.params), self.opt)  # freed when this returns
        update = jit_update(step, state, batch, self.env)
        key = jax.random.key(2)
        compiled = update.jitted.lower(state, batch, key).compile()
        holder = [state]

        def run():
            holder[0], _ = compiled(holder[0], batch, key)
            return holder[0].params

        jax.block_until_ready(run())
        t = median_time(run, self.repeats)
        return {"s": t, "tokens_per_s": tokens / t, "flops": flops, "peak_bytes": _peak(compiled),
                "resident_args": param_bytes(state.params) + param_bytes(state.opt_state)}


# ------------------------------------------------------------------------------------------- reporting


def sweep_points(base: Point, which: str) -> list[tuple[str, Point]]:
    """The base point, then one axis varied at a time."""
    pts = [("base", base)]
    if which == "none":
        return pts
    for n in (32, 128, 256):
        pts.append(("completion length", dataclasses.replace(base, new_tokens=n)))
    for g in (4, 16):
        pts.append(("group size", dataclasses.replace(base, group=g)))
    for b in (4, 16):
        pts.append(("batch", dataclasses.replace(base, prompts=b)))
    for p in (32, 128):
        pts.append(("prompt length", dataclasses.replace(base, prompt_len=p)))
    return pts


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.3f}"


def _rate(res: dict, piece: str, peak_tflops: float | None) -> str:
    gf = res[piece]["flops"] / res[piece]["s"] / 1e9
    if peak_tflops:
        return f"{gf:,.0f} ({100 * gf / 1e3 / peak_tflops:.1f}% MFU)"
    return f"{gf:,.0f}"


def tables(results: list[dict], meta: dict) -> str:
    peak_tflops, hbm = meta.get("peak_tflops"), meta.get("hbm_gbps")
    head = (f"model {meta['model']} ({meta['params']:,} params), compute {meta['dtype']}, "
            f"params {meta.get('param_dtype', 'float32')}, remat {meta['remat']}, "
            f"{meta['device']} x{meta['num_devices']}, jax {meta['jax']}")
    lines = [head, "",
             "| point | rollout s (decode tok/s) | reference s | GRPO update s (tok/s) | DPO update s (tok/s) | iteration s |",
             "|---|---|---|---|---|---|"]
    def secs(res, k, rate=False):
        if k not in res:
            return "-"
        return f"{res[k]['s']:.3f}" + (f" ({res[k]['tokens_per_s']:,.0f})" if rate else "")

    for res in results:
        lines.append(f"| {res['axis']}: {Point(**res['point']).label()} | {secs(res, 'rollout', True)} "
                     f"| {secs(res, 'reference')} | {secs(res, 'grpo', True)} | {secs(res, 'dpo', True)} "
                     f"| {secs(res, 'iteration')} |")
    lines += ["", "Peak memory (GiB; XLA buffer assignment of each program; iteration = resident + largest program)",
              "", "| point | rollout | prefill | reference | GRPO update | DPO update | iteration |",
              "|---|---|---|---|---|---|---|"]
    for res in results:
        cells = [_gib(res[k]["peak_bytes"]) if k in res else "-"
                 for k in ("rollout", "prefill", "reference", "grpo", "dpo", "iteration")]
        lines.append(f"| {res['axis']}: {Point(**res['point']).label()} | " + " | ".join(cells) + " |")
    rate = "GFLOP/s (MFU)" if peak_tflops else "GFLOP/s"
    lines += ["", f"Achieved matmul {rate} and decode bandwidth", "",
              f"| point | prefill | reference | GRPO update | DPO update | decode GB/s{' (of HBM)' if hbm else ''} |",
              "|---|---|---|---|---|---|"]
    for res in results:
        gbps = res["rollout"]["achieved_gbps"]
        bw = f"{gbps:,.1f}" + (f" ({100 * gbps / hbm:.1f}%)" if hbm else "")
        cells = [_rate(res, k, peak_tflops) if k in res else "-" for k in ("prefill", "reference", "grpo", "dpo")]
        lines.append(f"| {res['axis']}: {Point(**res['point']).label()} | " + " | ".join(cells) + f" | {bw} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str, meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = Point(**results[0]["point"])
    axes_spec = (("completion length", "new_tokens", "completion length N"), ("group size", "group", "group size G"),
                 ("batch", "prompts", "prompts per batch B"), ("prompt length", "prompt_len", "prompt length P"))
    fig, axs = plt.subplots(2, len(axes_spec), figsize=(17, 7))
    for col, (axis, field, xlabel) in enumerate(axes_spec):
        pts = [r for r in results if r["axis"] in (axis, "base")]
        pts.sort(key=lambda r: r["point"][field])
        xs = [r["point"][field] for r in pts]
        for piece, style in (("rollout", "o-"), ("reference", "s-"), ("grpo", "^-"), ("dpo", "v-"),
                             ("iteration", "k--")):
            if all(piece in r for r in pts):
                axs[0, col].plot(xs, [r[piece]["s"] for r in pts], style, label=piece)
                axs[1, col].plot(xs, [r[piece]["peak_bytes"] / 2**20 for r in pts], style, label=piece)
        axs[0, col].set_title(f"{xlabel} (others as base)")
        axs[1, col].set_xlabel(xlabel)
        for row in (0, 1):
            axs[row, col].set_xscale("log", base=2)
            axs[row, col].set_xticks(xs, [str(x) for x in xs])
            axs[row, col].grid(alpha=0.3)
    axs[0, 0].set_ylabel("seconds")
    axs[1, 0].set_ylabel("peak MiB (XLA)")
    axs[0, 0].legend(fontsize=8)
    fig.suptitle(f"{meta['model']} {meta['dtype']} on {meta['device']} x{meta['num_devices']}; base {base.label()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--dtype", default="float32", help="compute dtype")
    ap.add_argument("--param-dtype", default="float32", help="storage dtype of params (and optimizer state)")
    ap.add_argument("--remat", default=None, help="remat policy override: none, full, dots")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sweep", choices=("axes", "none"), default="axes",
                    help="axes: also vary completion length, group size, batch and prompt length one at a time")
    ap.add_argument("--no-dpo", action="store_true")
    ap.add_argument("--pieces", default=None,
                    help=f"comma-separated subset of {','.join(PIECES)} (rollout and reference always run); "
                         "the iteration needs grpo")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of one device (MFU)")
    ap.add_argument("--hbm-gbps", type=float, default=None, help="memory bandwidth of one device (GB/s)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG path (with --sweep axes)")
    args = ap.parse_args(argv)

    kind = jax.devices()[0].device_kind
    peaks = DEVICE_PEAKS.get(kind, (None, None))
    bench = Bench(args.model, args.dtype, args.remat, args.repeats, param_dtype=args.param_dtype)
    meta = {"model": args.model, "params": bench.cfg.num_params(), "dtype": args.dtype,
            "param_dtype": args.param_dtype,
            "remat": bench.cfg.remat, "device": kind, "num_devices": jax.device_count(),
            "host": platform.processor() or platform.machine(), "jax": jax.__version__,
            "peak_tflops": args.peak_tflops or peaks[0], "hbm_gbps": args.hbm_gbps or peaks[1],
            "repeats": args.repeats, "command": " ".join(sys.argv)}
    pieces = tuple(x for x in args.pieces.split(",") if x) if args.pieces else PIECES
    if set(pieces) - set(PIECES) or not {"rollout", "reference"} <= set(pieces):
        ap.error(f"--pieces {args.pieces!r}: choose from {','.join(PIECES)}; rollout and reference are always run")
    pieces = tuple(x for x in pieces if not (args.no_dpo and x == "dpo"))
    base = Point(args.prompts, args.group, args.prompt_len, args.new_tokens)
    results = []
    for axis, pt in sweep_points(base, args.sweep):
        t0 = time.perf_counter()
        res = bench.measure(pt, pieces)
        res["axis"] = axis
        res["wall_s"] = time.perf_counter() - t0
        results.append(res)
        it = res.get("iteration", {})
        print(f"# {axis}: {pt.label()}: iteration {it.get('s', float('nan')):.3f} s, "
              f"peak {_gib(it.get('peak_bytes'))} GiB ({res['wall_s']:.0f} s with compiles)", flush=True)
    text = tables(results, meta)
    print(text)
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if args.plot and args.sweep != "none":
        plot(results, args.plot, meta)
    return results


if __name__ == "__main__":
    main()
