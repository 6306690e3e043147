"""The `jaxrl-llm` command line.

    jaxrl-llm demo                      # build the tiny default model and sample from it
    jaxrl-llm sample --model DIR_OR_PRESET --prompt "12+34=" [--chat] [--n 4] ...
    jaxrl-llm presets                   # model presets and their parameter counts
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time


def _parse_mesh(text: str) -> dict[str, int]:
    axes = {}
    for part in filter(None, text.split(",")):
        name, sep, size = part.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"--mesh: {part!r} is not NAME=SIZE (example: --mesh data=-1 or fsdp=4,tensor=2)")
        try:
            axes[name.strip()] = int(size)
        except ValueError:
            raise SystemExit(f"--mesh: size of {name!r} must be an integer, got {size!r}") from None
    return axes


def _load_model(model: str, dtype: str, env, seed: int):
    """(cfg, module, params) from an HF directory or a preset name (random weights)."""
    import jax

    from jaxrl_llm.models import CausalLM, create_model, get_preset

    if pathlib.Path(model).is_dir():
        from jaxrl_llm.models.hf import load_hf
        cfg, params = load_hf(model, env, dtype=dtype)
        return cfg, CausalLM(cfg), params
    try:
        cfg = get_preset(model, dtype=dtype)
    except KeyError as e:
        raise SystemExit(f"--model {model!r}: not a directory and {e.args[0]}") from None
    module, params, _ = create_model(cfg, jax.random.key(seed), env)
    return cfg, module, params


def cmd_sample(args) -> int:
    import jax
    import numpy as np

    from jaxrl_llm.rollout import SamplingConfig, make_sampler
    from jaxrl_llm.sharding import ShardingEnv, make_mesh
    from jaxrl_llm.tokenizer import decode_completions, encode_prompts, load_tokenizer, tokenizer_info

    env = ShardingEnv(make_mesh(_parse_mesh(args.mesh)))
    cfg, module, params = _load_model(args.model, args.dtype, env, args.seed)
    tok_path = args.tokenizer or (args.model if pathlib.Path(args.model).is_dir() else "tiny")
    tokenizer = load_tokenizer(tok_path, vocab_size=cfg.vocab_size)
    info = tokenizer_info(tokenizer)
    prompts = args.prompt
    if args.chat:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    enc = encode_prompts(tokenizer, prompts, args.max_prompt_len, chat=args.chat)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, n_samples=args.n,
                              eos_token_ids=tuple(info.eos_ids), pad_token_id=info.pad_id)
    sampler = make_sampler(module, cfg, sampling, env=env)
    key = jax.random.key(args.seed)

    t0 = time.perf_counter()
    out = jax.block_until_ready(sampler(params, enc.tokens, enc.mask, key))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(sampler(params, enc.tokens, enc.mask, key))
    timed = time.perf_counter() - t0

    texts = decode_completions(tokenizer, np.asarray(out.tokens), np.asarray(out.mask))
    lengths = np.asarray(out.lengths)
    for i, text in enumerate(texts):
        p = args.prompt[i // args.n]
        print(f"[{i // args.n}.{i % args.n}] {p!r} -> {text!r}  ({int(lengths[i])} tokens, "
              f"mean logprob {float(np.asarray(out.logprobs)[i][np.asarray(out.mask)[i]].mean()):.3f})")
    n_tokens = int(lengths.sum())
    steps = int(out.num_steps)
    rows = len(texts)
    print(f"\nmodel {args.model} ({cfg.num_params():,} params, {cfg.dtype}) on "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}; mesh {dict(env.mesh.shape)}")
    print(f"first call (compile + run) {first:.2f} s; second call {timed * 1e3:.1f} ms: {steps} decode steps "
          f"x {rows} rows = {rows * steps / timed:,.0f} tokens/s ({n_tokens} tokens before EOS)")
    return 0


def cmd_demo(args) -> int:
    """The smallest real thing: the tiny default model (random weights) sampling arithmetic prompts."""
    ns = argparse.Namespace(
        model="tiny", tokenizer="tiny", dtype="float32", mesh=args.mesh, seed=args.seed,
        prompt=["72+4=", "7+7737=", "3439+7=", "6+9952=", "7+738=", "75+5=", "0+8=", "6+54="],
        chat=False, n=args.n, max_prompt_len=8, max_new_tokens=args.max_new_tokens,
        temperature=1.0, top_k=0, top_p=1.0)
    print("Sampling from the tiny default model (Qwen2 shape, random weights: the text is noise;"
          " RL training comes in the experiments).\n")
    return cmd_sample(ns)


def cmd_presets(args) -> int:
    from jaxrl_llm.models import PRESETS
    print(f"{'preset':<16}{'family':<8}{'params':>16}  layers  hidden  heads/kv  vocab")
    for name, cfg in PRESETS.items():
        print(f"{name:<16}{cfg.family:<8}{cfg.num_params():>16,}  {cfg.num_layers:>6}  {cfg.hidden_size:>6}  "
              f"{cfg.num_heads:>4}/{cfg.num_kv_heads:<3}  {cfg.vocab_size}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jaxrl-llm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="build the tiny default model and sample from it")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--n", type=int, default=2, help="samples per prompt")
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.add_argument("--mesh", default="data=-1", help="mesh axes, e.g. data=-1 or fsdp=4,tensor=2")
    demo.set_defaults(func=cmd_demo)

    s = sub.add_parser("sample", help="generate from an HF checkpoint directory or a preset (random weights)")
    s.add_argument("--model", required=True, help="local HF directory (config.json + safetensors) or preset name")
    s.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory, or 'tiny')")
    s.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    s.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    s.add_argument("--n", type=int, default=1, help="samples per prompt")
    s.add_argument("--max-prompt-len", type=int, default=256)
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    s.add_argument("--mesh", default="data=-1")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_sample)

    p = sub.add_parser("presets", help="list model presets")
    p.set_defaults(func=cmd_presets)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
