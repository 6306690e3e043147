"""The per-row draw alone: inverse CDF (`sampling.cdf_pick`, what the sampler runs) against one Gumbel number per
vocabulary entry and row (the draw before it), each including the log-softmax, 20 steps in one compiled loop.

    .venv/bin/python bench/draw.py                      # [32, 49152]: the SmolLM2 workload's rows and vocabulary
    .venv/bin/python bench/draw.py --rows 64 --vocab 151936
    .venv/bin/python bench/draw.py --sampler            # + the SmolLM2 workload's whole sampler with each draw

Prints ms per step (best of --repeats calls) for each draw; `--sampler` also builds the SmolLM2 workload's
sampler (bench/workload.py) twice, with each draw, and times --repeats alternating calls of each.
"""

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

from jaxrl_llm.rollout.sampling import first_argmax, process_logits, sample_tokens


def gumbel_per_row(keys, logp):
    noise = jax.vmap(lambda k: jax.random.gumbel(k, logp.shape[-1:], logp.dtype))(keys)
    return first_argmax(logp + noise)


def cdf_per_row(keys, logp):
    return sample_tokens(keys, logp, logp, False, per_row=True)


def sampler_ab(repeats: int) -> dict:
    """The SmolLM2 workload's sampler (32 rows x 64 new tokens) with the inverse-CDF draw and with the Gumbel
    draw, compiled both, then `repeats` alternating calls each: seconds per call."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import workload as workload_lib
    from ours_grpo import Ours

    import jaxrl_llm.rollout.sampler as sampler_mod
    from jaxrl_llm.rollout.sampler import make_sampler

    def gumbel_tokens(rng, logp_bv, raw_logp_bv, greedy, per_row=False):
        return first_argmax(raw_logp_bv) if greedy else gumbel_per_row(rng, logp_bv)

    o = Ours(workload_lib.load(workload_lib.build("smollm2")))
    draws = {"inverse CDF": sample_tokens, "gumbel": gumbel_tokens}
    samplers, times = {}, {k: [] for k in draws}
    for name, fn in draws.items():  # the sampler reads the module's sample_tokens when it is traced
        sampler_mod.sample_tokens = fn
        samplers[name] = jax.jit(make_sampler(o.module, o.cfg, o.sampling, env=o.env))
        jax.block_until_ready(samplers[name](o.state.params, o.prompt_tokens, o.prompt_mask, jax.random.key(0)))
    sampler_mod.sample_tokens = sample_tokens
    for r in range(repeats):
        for name in (list(draws) if r % 2 == 0 else list(draws)[::-1]):
            t0 = time.perf_counter()
            jax.block_until_ready(samplers[name](o.state.params, o.prompt_tokens, o.prompt_mask,
                                                 jax.random.key(r + 1)))
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sampler", action="store_true", help="also the SmolLM2 sampler with each draw")
    args = ap.parse_args(argv)
    b, v = args.rows, args.vocab
    logits = jax.random.normal(jax.random.key(0), (b, v)) * 3
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(1), i))(jnp.arange(b))
    for name, draw in (("gumbel per row", gumbel_per_row), ("inverse CDF per row", cdf_per_row)):
        def loop(lg, keys, draw=draw):
            def body(i, acc):  # each step's logits depend on the last draw, so no step is hoisted
                logp, _ = process_logits(lg + acc[:, None].astype(lg.dtype) * 1e-9, 1.0)
                return acc + draw(jax.vmap(lambda k: jax.random.fold_in(k, i))(keys), logp)
            return jax.lax.fori_loop(0, args.steps, body, jnp.zeros(b, jnp.int32))
        run = jax.jit(loop)
        jax.block_until_ready(run(logits, keys))
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(run(logits, keys))
            best = min(best, time.perf_counter() - t0)
        print(f"[{b}, {v}] {name}: {1e3 * best / args.steps:.2f} ms a step")
    if args.sampler:
        for name, ts in sampler_ab(args.repeats).items():
            print(f"SmolLM2 sampler, {name} draw: " + " / ".join(f"{t:.2f}" for t in sorted(ts)) + " s")


if __name__ == "__main__":
    main()
