"""TRL GRPOTrainer on a benchmark workload ("tiny-qwen2 GRPO", "smollm2-135m GRPO"), timed per iteration.

    bench/.venvs/trl/bin/python bench/peers/trl_grpo.py --workload bench/.cache/workload --iters 10 --warmup 2
    bench/.venvs/trl/bin/python bench/peers/trl_grpo.py --workload bench/.cache/smollm2 --iters 2 --warmup 1

(bench/peers.py creates the venv: torch==2.13.0 (CPU), trl==1.16.0.) One
iteration = one trainer step: generate 8 prompts x 8 completions with
`model.generate` (64 new tokens, T=1, top-p 1), Python reward, reference
forward (beta 0.04), one AdamW step over the 64 completions (lr 1e-5, no weight
decay, no clipping, one epoch, no accumulation). float32, 2 torch threads,
gradient checkpointing off (our update does not rematerialise either),
OpenMP's default wait policy (see common.torch_env).

smollm2 (workload.json's eos_id null): 8 chat prompts x 4 completions of 64 tokens; `generation_kwargs`
min_new_tokens = max_new_tokens keeps the EOS from being sampled, so every completion is 64 tokens, as ours
(which samples with no EOS); the run checks that every completion has that length and that TRL's prompt
token ids are the workload's (`prompt_ids`), and reports the lengths it saw.

Timing: the step is the time between consecutive `on_step_end` callbacks;
its split comes from wrapping the trainer's own methods: `_generate`
(generation), `_calculate_rewards` (reward), `_get_per_token_logps_and_entropies`
called on the reference model (reference), and update = from the end of
`_generate_and_score_completions` to `on_step_end` (loss forward, backward,
optimizer step). Prints one JSON line of medians.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import tempfile
import time

from common import load_workload, parse_args, torch_env  # bench/peers/common.py, next to this file

torch_env()


def main(argv=None):
    def extra(ap):
        ap.add_argument("--bf16", action="store_true", help="TRL's bf16=True (bfloat16 autocast; weights float32)")
        ap.add_argument("--micro-batches", type=int, default=1,
                        help="per_device_train_batch_size = 64 / M with gradient_accumulation_steps = M: "
                             "still one generation of 64 and one AdamW step per iteration")
    args = parse_args(__doc__, argv, extra=extra)

    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    torch.set_num_threads(args.threads)
    wl = load_workload(args.workload)
    tok = AutoTokenizer.from_pretrained(wl["tokenizer_dir"])
    no_eos = wl["eos_id"] is None  # every completion runs max_new_tokens: the EOS is never sampled
    assert tok.pad_token_id == wl["pad_id"] and (no_eos or tok.eos_token_id == wl["eos_id"]), (
        tok.pad_token_id, tok.eos_token_id)
    tok.padding_side = "left"
    n_steps = args.warmup + args.iters
    # Each step takes the 8 prompts in order (no shuffling), each repeated num_generations times.
    ds = datasets.Dataset.from_dict({"prompt": wl["prompts"] * n_steps})

    def length_reward(prompts, completions, **kwargs):
        return [-abs(len(c) - 20) / 20 for c in completions]

    out_dir = tempfile.mkdtemp(prefix="trl_grpo_")
    cfg = trl.GRPOConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
        max_steps=n_steps,
        per_device_train_batch_size=len(wl["prompts"]) * wl["num_generations"] // args.micro_batches,
        gradient_accumulation_steps=args.micro_batches, num_generations=wl["num_generations"],
        num_iterations=wl["epochs"],
        max_completion_length=wl["max_new_tokens"], temperature=wl["temperature"], top_p=wl["top_p"],
        top_k=wl["top_k"], beta=wl["beta"], epsilon=wl["epsilon"], loss_type="grpo", scale_rewards="group",
        learning_rate=wl["learning_rate"], adam_beta1=wl["adam_b1"], adam_beta2=wl["adam_b2"],
        adam_epsilon=wl["adam_eps"], weight_decay=wl["weight_decay"], max_grad_norm=0.0,
        lr_scheduler_type="constant", warmup_steps=0, bf16=args.bf16, fp16=False, gradient_checkpointing=False,
        shuffle_dataset=False, use_vllm=False, log_completions=False, dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.float32},
        generation_kwargs={"min_new_tokens": wl["max_new_tokens"]} if no_eos else None,
    )
    trainer = trl.GRPOTrainer(model=wl["model_dir"], reward_funcs=length_reward, args=cfg, train_dataset=ds,
                              processing_class=tok)
    assert trainer.ref_model is not None, "beta > 0 needs a reference model"

    cur: dict = {}
    steps: list[dict] = []

    def timed(name, fn, pred=None):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if pred is None or pred(*a, **kw):
                    cur[name] = cur.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    seen = {"completion_lengths": set(), "prompt_ids_ok": None}
    generate = trainer._generate

    @functools.wraps(generate)
    def generate_checked(*a, **kw):  # the completions' lengths, and the prompt ids against the workload's
        out = generate(*a, **kw)
        prompt_ids, completion_ids = out[0], out[1]
        seen["completion_lengths"].update(len(c) for c in completion_ids)
        if "prompt_ids" in wl:
            g = wl["num_generations"]
            seen["prompt_ids_ok"] = [list(p) for p in prompt_ids[::g]] == wl["prompt_ids"]
        return out
    trainer._generate = timed("generation", generate_checked)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timed(
        "reference", trainer._get_per_token_logps_and_entropies, pred=lambda m, *a, **k: m is trainer.ref_model)
    inner = trainer._generate_and_score_completions

    @functools.wraps(inner)
    def gen_and_score(*a, **kw):
        out = inner(*a, **kw)
        cur["scored_at"] = time.perf_counter()
        return out
    trainer._generate_and_score_completions = gen_and_score

    class StepTimer(TrainerCallback):
        last_end = None

        def on_step_begin(self, a, state, control, **kw):
            cur["begin"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            rec = {k: cur.get(k, 0.0) for k in ("generation", "reward", "reference")}
            rec["update"] = now - cur["scored_at"]
            rec["step"] = now - cur["begin"]
            rec["total"] = now - (self.last_end if self.last_end is not None else cur["begin"])
            steps.append(rec)
            self.last_end = now
            cur.clear()

    trainer.add_callback(StepTimer())
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    if no_eos and seen["completion_lengths"] != {wl["max_new_tokens"]}:
        raise AssertionError(f"completion lengths {sorted(seen['completion_lengths'])}, expected every one "
                             f"{wl['max_new_tokens']}")
    if seen["prompt_ids_ok"] is False:
        raise AssertionError("TRL's prompt token ids differ from workload.json's prompt_ids")
    timed_steps = steps[args.warmup:]
    keys = ("generation", "reward", "reference", "update", "total", "step")
    med = {k: statistics.median(s[k] for s in timed_steps) for k in keys}
    med["other"] = med["total"] - med["generation"] - med["reference"] - med["update"]
    print(json.dumps({
        "framework": "trl", "ok": True, "iters": len(timed_steps), "warmup": args.warmup,
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
        "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg": os.getloadavg(), "median": med, "first_iteration_s": steps[0]["total"],
        "train_wall_s": wall, "all_total_s": [s["total"] for s in timed_steps],
        "completion_lengths": sorted(seen["completion_lengths"]), "prompt_ids_match": seen["prompt_ids_ok"],
        "settings": {"bf16": args.bf16, "gradient_accumulation_steps": args.micro_batches,
                     "gradient_checkpointing": False, "loss_type": "grpo", "attn_implementation":
                     trainer.model.config._attn_implementation, "optim": str(cfg.optim),
                     "generation_kwargs": cfg.generation_kwargs},
    }))


if __name__ == "__main__":
    main()
