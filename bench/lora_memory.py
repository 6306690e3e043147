"""A Qwen2.5-1.5B-shaped GRPO iteration with LoRA on one CPU device: the memory estimate of the LoRA run and
of the full float32 one, then the LoRA run for real (the trainer's own code), and its peak RSS.

    .venv/bin/python bench/lora_memory.py                 # estimate both, run the LoRA iteration (minutes)
    .venv/bin/python bench/lora_memory.py --estimate-only # the two estimates only (seconds)
    .venv/bin/python bench/lora_memory.py --no-split      # decode without the per-layer weight copy

The model is the `qwen2.5-1.5b` preset with random weights (1,543,714,304 parameters), float32 compute and
float32 adapters, the frozen base stored in bfloat16 (`model.lora.base_dtype`), remat full. The stage is a
GRPO stage with a k3 KL term (the reference: the frozen base with the adapters off), `--prompts` prompts x
`--samples` samples of the arithmetic task, `--new-tokens` new tokens, one AdamW step per iteration,
evaluation off. The full fine-tuning estimate is the same config with model.lora.rank=0. Heavy: run it once,
with nothing else on the machine. Prints the two estimate tables and one JSON line: the estimated peaks and
the measured peak RSS of this process (`resource.getrusage`, what `/usr/bin/time -v` reports as "Maximum
resident set size").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from jaxrl_llm.models import get_preset  # noqa: E402
from jaxrl_llm.train.config import base_config, grpo_stage  # noqa: E402
from jaxrl_llm.train.memory import estimate_memory  # noqa: E402


def config(args, run_root: str, rank: int):
    c = base_config()
    c.name = f"lora-memory-r{rank}"
    c.run_root = run_root
    c.model.preset = "qwen2.5-1.5b"
    c.model.remat = "full"
    c.model.dtype = args.dtype
    c.model.lora.rank, c.model.lora.alpha = rank, 2.0 * max(rank, 1)
    c.model.lora.base_dtype = args.base_dtype if rank else ""
    c.task.name = "arithmetic"
    c.eval.every = 0
    c.log.every, c.log.progress, c.log.tensorboard, c.log.samples_every = 1, False, False, 0
    c.checkpoint.every = 0
    c.mesh.check_memory = False  # no device limit on a CPU; the estimate is printed below
    c.stages = ("rl",)
    c.rl = grpo_stage("grpo", iterations=args.iterations, prompts_per_iter=args.prompts, group_size=args.samples,
                      learning_rate=1e-5, max_new_tokens=args.new_tokens, beta=0.04)
    c.rl.max_prompt_len = args.prompt_len
    c.rl.sampling.split_layer_weights = not args.no_split  # False: no per-layer copy of the weights to decode
    c.rl.algo.logprob_chunk = 8
    return c


def estimate(cfg):
    m = cfg.model
    model_cfg = get_preset(m.preset, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    return estimate_memory(cfg, model_cfg, {"data": 1, "fsdp": 1, "tensor": 1})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=1)
    ap.add_argument("--dtype", default="float32", help="compute dtype (model.dtype)")
    ap.add_argument("--base-dtype", default="bfloat16", help="model.lora.base_dtype of the LoRA run")
    ap.add_argument("--no-split", action="store_true",
                    help="rl.sampling.split_layer_weights=False: the decode loop slices the stacked weights "
                         "instead of a per-layer copy (less memory, slower decoding)")
    ap.add_argument("--estimate-only", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as root:
        lora_cfg, full_cfg = config(args, root, args.rank), config(args, root, 0)
        est_lora, est_full = estimate(lora_cfg), estimate(full_cfg)
        print("full fine-tuning, float32 parameters:\n" + est_full.table() + "\n", flush=True)
        print(f"LoRA rank {args.rank}, bfloat16 base:\n" + est_lora.table() + "\n", flush=True)
        out = {"model": "qwen2.5-1.5b (random weights)", "rank": args.rank, "prompts": args.prompts,
               "split_layer_weights": not args.no_split, "dtype": args.dtype, "base_dtype": args.base_dtype,
               "samples": args.samples, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "estimate_full_gib": round(est_full.peak_bytes / 2**30, 2),
               "estimate_lora_gib": round(est_lora.peak_bytes / 2**30, 2)}
        if not args.estimate_only:
            from jaxrl_llm.train.trainer import train
            t0 = time.time()
            summary = train(lora_cfg, fresh=True)
            out["seconds"] = round(time.time() - t0, 1)
            rows = [json.loads(x) for x in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
            last = [r for r in rows if "loss" in r][-1]
            out.update(loss=last["loss"], grad_norm=last["grad_norm"], kl_ref=last.get("kl_ref"),
                       skipped=last["skipped"])
            # ru_maxrss: KiB on Linux
            out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        out["device"] = str(jax.devices()[0].device_kind)
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
