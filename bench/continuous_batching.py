"""Continuous batching against the static batch on a long-tailed length distribution.

    .venv/bin/python bench/continuous_batching.py                      # 512 completions, 64 slots, N = 256
    .venv/bin/python bench/continuous_batching.py --requests 512 --slots 64 --new-tokens 256 --repeats 3
    .venv/bin/python bench/continuous_batching.py --quick              # 128 completions through 16 slots

The workload: completions whose lengths follow a reproducible long-tailed schedule (`long_tail_lengths`:
the median ends at 1/8 of max_new_tokens, 5% reach the limit, the rest spread log-uniformly between), set
as per-request stop lengths (`stop_lengths`, no EOS sampled), so both engines do exactly the same useful
work: the same tokens for the same key. The static batch decodes `--slots` rows at a time (the requests
in consecutive chunks of that many, each chunk until its longest row ends: today's sampler called per
chunk), continuous batching puts all of them through `--slots` slots in one call. Reported: slot
utilisation (useful tokens / decoded slot-steps: hardware-independent), decode steps, and wall time
(median of --repeats after a warm-up call), with the CPU model. Writes bench/results/continuous-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def long_tail_lengths(n: int, max_new_tokens: int, seed: int = 0, median_fraction: float = 1 / 8,
                      tail_fraction: float = 0.05) -> np.ndarray:
    """int32 [n] completion lengths in [1, max_new_tokens], shuffled: half of them at most median_fraction *
    max_new_tokens (log-uniform from 1 up to it), `tail_fraction` exactly max_new_tokens, the rest
    log-uniform between the median and the limit."""
    rng = np.random.default_rng(seed)
    tail = int(round(n * tail_fraction))
    median = max(1.0, median_fraction * max_new_tokens)
    low = np.exp(rng.uniform(0.0, np.log(median), n // 2))
    high = np.exp(rng.uniform(np.log(median), np.log(max_new_tokens - 1), n - n // 2 - tail))
    lengths = np.concatenate([low, high, np.full(tail, max_new_tokens)])
    return rng.permutation(np.clip(np.round(lengths), 1, max_new_tokens).astype(np.int32))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=512, help="completions in all (prompts x samples)")
    ap.add_argument("--samples", type=int, default=4, help="completions per prompt")
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--preset", default="tiny", help="model preset (jaxrl_llm.models.get_preset)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="128 completions through 16 slots, N = 64, 1 repeat")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args(argv)
    if a.quick:
        a.requests, a.slots, a.new_tokens, a.repeats = 128, 16, 64, 1
    if a.requests % a.samples or a.requests % a.slots:
        ap.error(f"--requests {a.requests} must be a multiple of --samples {a.samples} and --slots {a.slots}")

    import jax
    import jax.numpy as jnp

    from jaxrl_llm.models import create_model, get_preset
    from jaxrl_llm.rollout import SamplingConfig, make_sampler
    from jaxrl_llm.kernels.platform import cpu_info, summary
    from jaxrl_llm.rollout.sampler import slot_utilisation
    from jaxrl_llm.sharding import ShardingEnv, make_mesh

    cfg = get_preset(a.preset).replace(max_position_embeddings=max(512, a.prompt_len + a.new_tokens))
    env = ShardingEnv(make_mesh({"data": 1}, devices=jax.devices()[:1]))
    module, params, _ = create_model(cfg, jax.random.key(0), env)
    prompts = a.requests // a.samples
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, cfg.vocab_size, (prompts, a.prompt_len)).astype(np.int32)
    real = rng.integers(a.prompt_len // 2, a.prompt_len + 1, prompts)
    mask = (np.arange(a.prompt_len)[None, :] >= (a.prompt_len - real)[:, None]).astype(np.int32)
    tokens = tokens * mask
    lengths = long_tail_lengths(a.requests, a.new_tokens)
    base = SamplingConfig(max_new_tokens=a.new_tokens, n_samples=a.samples, eos_token_ids=())
    key = jax.random.key(7)
    chunk = a.slots // a.samples  # prompts per static chunk: --slots rows

    static = make_sampler(module, cfg, base)
    cont = make_sampler(module, cfg, base.replace(slots=a.slots))

    def run_static():
        # today's sampler, --slots rows at a time (each chunk runs until its longest row ends)
        outs = []
        for i in range(0, prompts, chunk):
            rows = slice(i * a.samples, (i + chunk) * a.samples)
            outs.append(static(params, tokens[i:i + chunk], mask[i:i + chunk], key, lengths[rows]))
        jax.block_until_ready(outs)
        return outs

    def run_static_all():
        # today's sampler given every request at once (memory for all of them; each row runs until the
        # longest ends)
        return jax.block_until_ready(static(params, tokens, mask, key, lengths))

    def run_cont():
        return jax.block_until_ready(cont(params, tokens, mask, key, lengths))

    def timed(fn):
        fn()  # compile + warm-up
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return out, statistics.median(times), times

    s_outs, s_time, s_times = timed(run_static)
    a_out, a_time, a_times = timed(run_static_all)
    c_out, c_time, c_times = timed(run_cont)
    s_steps = sum(int(o.num_steps) for o in s_outs)
    useful = int(lengths.sum())
    assert useful == sum(int(jnp.sum(o.lengths)) for o in s_outs) == int(jnp.sum(c_out.lengths))
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": summary(cpu_info()), "jax": jax.__version__, "devices": str(jax.devices()[0].device_kind),
        "model": a.preset, "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "requests": a.requests, "samples_per_prompt": a.samples, "slots": a.slots,
        "max_new_tokens": a.new_tokens, "prompt_len": a.prompt_len,
        "lengths": {"median": float(np.median(lengths)), "mean": float(lengths.mean()),
                    "at_limit": float(np.mean(lengths == a.new_tokens)), "useful_tokens": useful},
        "static": {"decode_steps": s_steps, "utilisation": useful / sum(int(o.slot_steps) for o in s_outs),
                   "seconds": s_time,
                   "all_seconds": s_times},
        "continuous": {"decode_steps": int(c_out.num_steps),
                       "utilisation": slot_utilisation(c_out), "slot_steps": int(c_out.slot_steps),
                       "seconds": c_time, "all_seconds": c_times},
        "static_all": {"decode_steps": int(a_out.num_steps), "rows": a.requests,
                       "utilisation": slot_utilisation(a_out), "seconds": a_time, "all_seconds": a_times},
        # every row draws from its own key (its index in the call): the one-call static batch and continuous
        # batching give the same tokens; the chunked calls number their rows from 0 in each chunk
        "same_tokens": bool(np.array_equal(np.asarray(a_out.tokens), np.asarray(c_out.tokens))),
        "max_abs_logprob_diff": float(np.max(np.abs(np.asarray(a_out.logprobs) - np.asarray(c_out.logprobs)))),
    }
    result["speedup"] = s_time / c_time
    print(f"cpu: {result['cpu']}; {a.requests} completions ({a.samples} per prompt) through {a.slots} slots, "
          f"max_new_tokens {a.new_tokens}; lengths median {result['lengths']['median']:.0f}, "
          f"{100 * result['lengths']['at_limit']:.1f}% at the limit")
    print("| engine | rows decoding at once | decode steps | slot utilisation | s (median) |\n|---|---|---|---|---|")
    labels = {"static": f"static batch, {a.slots} rows per call", "static_all": "static batch, every row in one call",
              "continuous": f"continuous batching, {a.slots} slots"}
    for name, label in labels.items():
        r, width = result[name], (a.requests if name == "static_all" else a.slots)
        print(f"| {label} | {width} | {r['decode_steps']} | {100 * r['utilisation']:.1f}% | {r['seconds']:.3f} |")
    result["speedup_all"] = a_time / c_time
    print(f"wall time over continuous: static per {a.slots} rows {result['speedup']:.2f}x, static all rows "
          f"{result['speedup_all']:.2f}x; same tokens as the one-call static batch: {result['same_tokens']} "
          f"(log-probs within {result['max_abs_logprob_diff']:.1e})")
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"continuous-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
