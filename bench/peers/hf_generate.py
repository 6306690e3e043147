"""transformers `generate` alone on the reference workload: 64 rows x 64 new tokens, sampling, torch CPU.

    bench/.venvs/generate/bin/python bench/peers/hf_generate.py --workload bench/.cache/workload --iters 10

(bench/peers.py creates the venv: torch==2.13.0 (CPU), transformers==5.23.0.)
The 8 workload prompts, each repeated 8 times (64 rows, left-padded to the
longest), `do_sample=True`, temperature 1, top-p 1, top-k off, EOS 1, pad 0,
float32, 2 torch threads, OpenMP's default wait policy (see common.torch_env).
Times each `generate` call (prefill included) and prints one JSON line with
the median after --warmup calls. `matmuls_only_step_ms`: one decode step's
float32 matmuls alone with the model's own weights (q, k, v, o projections,
the MLP, the head; no attention, cache, norms or sampling), max_new_tokens
steps in a loop, median of --matmul-repeats calls: the chain that
bench/ours_grpo.py times for ours, so a decode gap can be placed in the matmul
kernels or around them.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from common import load_workload, parse_args, torch_env  # bench/peers/common.py, next to this file

torch_env()


def matmul_chain(model, rows: int, steps: int):
    """One decode step's matmuls alone (see the module docstring), `steps` steps: (fn, its input). No
    biases, as ours (bench/ours_grpo.py's matmul_chain)."""
    import torch
    from torch.nn.functional import linear, silu

    layers = [(m.self_attn.q_proj.weight, m.self_attn.k_proj.weight, m.self_attn.v_proj.weight,
               m.self_attn.o_proj.weight, m.mlp.gate_proj.weight, m.mlp.up_proj.weight, m.mlp.down_proj.weight)
              for m in model.model.layers]
    head = model.get_output_embeddings().weight

    @torch.inference_mode()
    def chain(h):
        for _ in range(steps):
            for wq, wk, wv, wo, wg, wu, wd in layers:
                q, k, v = linear(h, wq), linear(h, wk), linear(h, wv)
                h = h + linear(q, wo) + 0 * (k.sum() + v.sum())
                h = h + linear(silu(linear(h, wg)) * linear(h, wu), wd)
            h = h + 1e-3 * linear(h, head)[:, :1]  # keep the head
        return h

    return chain, torch.ones(rows, head.shape[1])


def matmuls_only_step_ms(model, rows: int, steps: int, repeats: int) -> float:
    """ms per decode step of `matmul_chain` (median of `repeats` calls after one)."""
    chain, x = matmul_chain(model, rows, steps)
    chain(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        chain(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times) / steps


def _extra(ap):
    ap.add_argument("--matmul-repeats", type=int, default=3,
                    help="timed calls of the decode step's matmuls alone (0: skip)")


def main(argv=None):
    args = parse_args(__doc__, argv, extra=_extra)

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    wl = load_workload(args.workload)
    tok = transformers.AutoTokenizer.from_pretrained(wl["tokenizer_dir"])
    tok.padding_side = "left"
    model = transformers.AutoModelForCausalLM.from_pretrained(wl["model_dir"], dtype=torch.float32).eval()
    rows = [p for p in wl["prompts"] for _ in range(wl["num_generations"])]
    enc = tok(rows, return_tensors="pt", padding=True)
    gen = transformers.GenerationConfig(
        do_sample=True, max_new_tokens=wl["max_new_tokens"], temperature=wl["temperature"], top_p=wl["top_p"],
        top_k=None, eos_token_id=wl["eos_id"], pad_token_id=wl["pad_id"])
    times, new_tokens = [], []
    with torch.inference_mode():
        for i in range(args.warmup + args.iters):
            torch.manual_seed(i)
            t0 = time.perf_counter()
            out = model.generate(**enc, generation_config=gen)
            dt = time.perf_counter() - t0
            new_tokens.append(out.shape[1] - enc["input_ids"].shape[1])
            if i >= args.warmup:
                times.append(dt)
    matmuls_ms = matmuls_only_step_ms(model, len(rows), wl["max_new_tokens"], args.matmul_repeats) \
        if args.matmul_repeats else None
    print(json.dumps({
        "framework": "transformers.generate", "ok": True, "iters": len(times), "warmup": args.warmup,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
        "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg": os.getloadavg(), "rows": len(rows), "prompt_len": int(enc["input_ids"].shape[1]),
        "decode_s": statistics.median(times), "median": {"generation": statistics.median(times)},
        "matmuls_only_step_ms": matmuls_ms, "all_s": times, "new_tokens_per_call": sorted(set(new_tokens)),
        "attn_implementation": model.config._attn_implementation,
    }))


if __name__ == "__main__":
    main()
