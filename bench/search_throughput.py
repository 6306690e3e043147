"""Search throughput: generated tokens/s of beam search, DVTS and MCTS against plain sampling of the same tokens.

    .venv/bin/python bench/search_throughput.py                  # tiny default model, CPU
    .venv/bin/python bench/search_throughput.py --problems 32 --width 4 --expansions 4 --step-tokens 16 \
        --steps 8 --model qwen2.5-0.5b --dtype bfloat16           # a bigger shape (GPU)

Every method generates the same tokens per problem: W * E rows of steps * step_tokens tokens (no EOS, and a
step separator no token has, so every step runs its full step_tokens). The plain sampler draws W * E whole
solutions of steps * step_tokens tokens per problem. The scorer is a PRM-sized forward (a scalar head on the
same backbone shape, random weights) over prompt + prefix, as a real PRM-guided search pays it; the "-cached"
variants feed the PRM only each round's step from its own KV cache (`search.scorers.CachedPRMScorer`);
`--scorer none` times the search bookkeeping alone (a scorer that reads nothing). Prints a markdown table (tokens/s and the
ratio to plain sampling) and the CPU/GPU it ran on; times are medians over --repeats interleaved runs after a
warm-up (compile) run.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from rl_iteration import cpu_model  # bench/, the script's own directory

from jaxrl_llm.models import create_model, get_preset
from jaxrl_llm.models.transformer import ScalarHeadModel
from jaxrl_llm.rollout import make_sampler
from jaxrl_llm.search.beam import beam_search, dvts
from jaxrl_llm.search.decoding import StepConfig, StepDecoder
from jaxrl_llm.search.scorers import CachedPRMScorer, prm_scorer
from jaxrl_llm.sharding import ShardingEnv, make_mesh


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--expansions", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--step-tokens", type=int, default=8)
    ap.add_argument("--scorer", choices=("prm", "none"), default="prm")
    ap.add_argument("--methods", default="sample,beam,beam-cached,dvts,dvts-cached,mcts")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    cfg = get_preset(args.model)
    if args.dtype:
        cfg = cfg.replace(dtype=args.dtype)
    env = ShardingEnv(make_mesh({"data": -1}))
    module, params, shardings = create_model(cfg, jax.random.key(0), env)
    rng = np.random.default_rng(0)
    b, p = args.problems, args.prompt_len
    prompts = rng.integers(2, cfg.vocab_size, size=(b, p)).astype(np.int32)
    pmask = np.ones((b, p), np.int32)
    w, e = args.width, args.expansions
    sc = StepConfig(step_tokens=args.step_tokens, max_steps=args.steps, temperature=1.0, eos_token_ids=())
    no_step_end = np.zeros(cfg.vocab_size, bool)  # every step runs its full step_tokens
    dec = StepDecoder(module, cfg, sc, no_step_end, env=env, param_shardings=shardings)

    cached = None
    if args.scorer == "prm":
        prm = ScalarHeadModel(cfg, per_token=True)
        _, prm_params, _ = create_model(cfg, jax.random.key(1), env, module=prm)
        scorer = prm_scorer(prm, prm_params, no_step_end, p, how="last")
        cached = CachedPRMScorer(prm, prm_params, sc, env=env)
    else:
        scorer = lambda t, m: jnp.zeros((t.shape[0],), jnp.float32)  # noqa: E731
    sampler = make_sampler(module, cfg, sc.sampling(n_samples=w * e, cache_segments=1), env=env,
                           param_shardings=shardings)
    key = jax.random.key(0)
    tokens_per_run = b * w * e * args.steps * args.step_tokens

    def run_sample():
        ro = sampler(params, prompts, pmask, key)
        scores = scorer(*ro.sequences())  # best-of-N scores its N whole solutions once
        return int(jax.device_get(jnp.sum(ro.lengths))), scores

    runs = {"sample": lambda: run_sample()[0],
            "beam": lambda: beam_search(dec, params, prompts, pmask, key, scorer, beam_width=w,
                                        expansions=e).generated_tokens,
            "dvts": lambda: dvts(dec, params, prompts, pmask, key, scorer, subtrees=w,
                                 expansions=e).generated_tokens}
    if cached is not None:  # the PRM fed one step per round from its own KV cache
        runs["beam-cached"] = lambda: beam_search(dec, params, prompts, pmask, key, cached, beam_width=w,
                                                  expansions=e).generated_tokens
        runs["dvts-cached"] = lambda: dvts(dec, params, prompts, pmask, key, cached, subtrees=w,
                                           expansions=e).generated_tokens
    try:
        from jaxrl_llm.search.mcts import mcts
        # MCTS's budget in the same tokens: each simulation expands E children of one step per problem.
        sims = w * args.steps
        runs["mcts"] = lambda: int(np.sum(mcts(dec, params, prompts, pmask, key, scorer, simulations=sims,
                                               expansions=e).generated_tokens))
    except ImportError:
        pass
    methods = [m for m in args.methods.split(",") if m in runs]
    for m in methods:  # warm-up (compile) and the token count check
        got = runs[m]()
        if m != "mcts" and got != tokens_per_run:
            raise SystemExit(f"{m} generated {got} tokens, expected {tokens_per_run}: the figure would be wrong")
    times: dict[str, list[float]] = {m: [] for m in methods}
    counts = {m: runs[m]() for m in methods}
    for _ in range(args.repeats):  # interleaved: machine drift hits every method alike
        for m in methods:
            t0 = time.perf_counter()
            runs[m]()
            times[m].append(time.perf_counter() - t0)
    med = {m: float(np.median(v)) for m, v in times.items()}
    base = counts["sample"] / med["sample"] if "sample" in med else None
    print(f"device: {jax.devices()[0].device_kind} ({cpu_model()}), {len(jax.devices())} device(s); model {args.model}, "
          f"{b} problems, W={w} E={e}, {args.steps} steps x {args.step_tokens} tokens, scorer {args.scorer}")
    print("| method | tokens | median s | tokens/s | vs sampling |")
    print("|---|---:|---:|---:|---:|")
    out = {}
    for m in methods:
        tps = counts[m] / med[m]
        out[m] = {"tokens": counts[m], "seconds": med[m], "tokens_per_s": tps}
        ratio = f"{tps / base:.2f}x" if base else "-"
        print(f"| {m} | {counts[m]} | {med[m]:.3f} | {tps:,.0f} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cpu": cpu_model(), "results": out}, f, indent=1)


if __name__ == "__main__":
    main()
