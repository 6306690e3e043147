"""Decode, prefill and train-step throughput of one model config (random weights).

    .venv/bin/python bench/throughput.py                       # tiny default, CPU
    .venv/bin/python bench/throughput.py --model qwen2.5-0.5b --dtype bfloat16 \
        --batch 64 --prompt-len 128 --new-tokens 256            # a real shape (GPU)
    .venv/bin/python bench/throughput.py --new-tokens 256 --cache-segments 1,4,8 --repeats 12
                                                                # decode with each KV-cache segmenting, interleaved

Prints a markdown table and writes JSON (--json). Times are medians over
--repeats runs after one warm-up (compile) run; every run ends with
`block_until_ready`. Decode runs all --new-tokens steps (no EOS), so tokens/s
is batch x new_tokens / time. The train step is a jitted next-token NLL
value_and_grad + AdamW update with donated state; tokens/s counts all
batch x length tokens. Ratios against peers come from bench/ scripts that run
them side by side.
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scaling import median_time  # bench/, the script's own directory

from jaxrl_llm.models import CausalLM, KVCache, create_model, get_preset, positions_from_mask
from jaxrl_llm.rollout import SamplingConfig, make_sampler
from jaxrl_llm.sharding import ShardingEnv, make_mesh


def _median_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up / compile
    return median_time(fn, repeats)


def bench_decode(module, cfg, params, env, shardings, args):
    rng = np.random.default_rng(0)
    b, p = args.batch, args.prompt_len
    prompts = jnp.asarray(rng.integers(2, cfg.vocab_size, size=(b, p)), jnp.int32)
    mask = jnp.ones((b, p), jnp.bool_)
    segments = [int(k) for k in str(args.cache_segments).split(",")]
    samplers = {}
    for k in segments:
        sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, eos_token_ids=(),
                                  pad_token_id=0, cache_segments=k)
        samplers[k] = make_sampler(module, cfg, sampling, env=env, param_shardings=shardings)
    key = jax.random.key(0)
    for k, sampler in samplers.items():  # warm-up (compile) and a check that every step ran
        out = jax.block_until_ready(sampler(params, prompts, mask, key))
        assert int(out.num_steps) == args.new_tokens, "decode stopped early; the figure would be wrong"
    times = {k: [] for k in samplers}
    for _ in range(args.repeats):  # interleaved: machine drift hits every variant alike
        for k, sampler in samplers.items():
            times[k].append(median_time(lambda s=sampler: s(params, prompts, mask, key).tokens, 1))
    by_k = {k: float(np.median(v)) for k, v in times.items()}
    t = by_k[segments[0]]

    @jax.jit
    def prefill(params, tokens, mask):
        with env.activate():
            cache = KVCache.zeros(cfg, b, p + args.new_tokens)
            hidden, cache = module.apply({"params": params}, tokens, positions_from_mask(mask), mask, cache,
                                         return_hidden=True)
            return module.apply({"params": params}, hidden[:, -1:], method="logits"), cache

    t_prefill = _median_time(lambda: prefill(params, prompts, mask), args.repeats)
    return {"decode_s": t, "decode_tokens_per_s": b * args.new_tokens / t,
            "decode_s_by_cache_segments": by_k,
            "prefill_s": t_prefill, "prefill_tokens_per_s": b * p / t_prefill}


def bench_train(module, cfg, params, env, shardings, args):
    rng = np.random.default_rng(1)
    b, t = args.train_batch, args.train_len
    tokens = jnp.asarray(rng.integers(2, cfg.vocab_size, size=(b, t)), jnp.int32)
    mask = jnp.ones((b, t), jnp.bool_)
    opt = optax.adamw(1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    params = jax.tree.map(jnp.copy, params)
    state = (params, opt.init(params))

    def loss_fn(p, toks, m):
        with env.activate():
            logits, _ = module.apply({"params": p}, toks, None, m)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, toks[:, 1:, None], -1)[..., 0]
        return jnp.mean(nll)

    def step(state, toks, m):
        p, o = state
        loss, g = jax.value_and_grad(loss_fn)(p, toks, m)
        upd, o = opt.update(g, o, p)
        return (optax.apply_updates(p, upd), o), loss

    step = jax.jit(step, donate_argnums=0)
    holder = [state]

    def run():
        holder[0], loss = step(holder[0], tokens, mask)
        return loss

    dt = _median_time(run, args.repeats)
    return {"train_step_s": dt, "train_tokens_per_s": b * t / dt}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="preset name (jaxrl_llm.models.PRESETS)")
    ap.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    ap.add_argument("--batch", type=int, default=64, help="decode batch (sequences)")
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--train-len", type=int, default=72)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache-segments", default="4",
                    help="SamplingConfig.cache_segments; a comma list (e.g. 1,4) times each, interleaved; "
                         "the table's decode figure is the first")
    ap.add_argument("--mesh", default="data=-1", help="mesh axes, e.g. 'data=-1' or 'fsdp=4,tensor=2'")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    cfg = get_preset(args.model, dtype=args.dtype)
    axes = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
    env = ShardingEnv(make_mesh(axes))
    module, params, shardings = create_model(cfg, jax.random.key(0), env, module=CausalLM(cfg))
    res = {"model": args.model, "dtype": args.dtype, "params": cfg.num_params(),
           "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
           "host": platform.processor() or platform.machine(), "jax": jax.__version__,
           **{k: v for k, v in vars(args).items() if k not in ("json", "model", "dtype")}}
    res.update(bench_decode(module, cfg, params, env, shardings, args))
    res.update(bench_train(module, cfg, params, env, shardings, args))

    print(f"| model | dtype | device | decode tok/s (B={args.batch}, {args.new_tokens} new) "
          f"| prefill tok/s | train tok/s (B={args.train_batch}, T={args.train_len}) |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.model} | {args.dtype} | {res['device']} x{res['num_devices']} "
          f"| {res['decode_tokens_per_s']:,.0f} | {res['prefill_tokens_per_s']:,.0f} "
          f"| {res['train_tokens_per_s']:,.0f} |")
    if len(res["decode_s_by_cache_segments"]) > 1:
        print("\n| cache_segments | decode s | speed vs the first |\n|---|---|---|")
        base = res["decode_s"]
        for k, v in res["decode_s_by_cache_segments"].items():
            print(f"| {k} | {v:.3f} | {base / v:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
