"""Tunix GRPOLearner on the reference workload "tiny-qwen2 GRPO", timed per iteration.

    bench/.venvs/tunix/bin/python bench/peers/tunix_grpo.py --workload bench/.cache/workload --iters 10 --warmup 2

(bench/peers.py creates the venv: jax[cpu]==0.10.2, google-tunix==0.1.7.) The
HF safetensors model is loaded twice (actor and reference) with Tunix's Qwen2
loader on a 1x1 ("fsdp", "tp") mesh; the vanilla rollout engine shares the
actor's weights. One iteration = one global step: 8 prompts x 8 completions
(64 new tokens, T=1, top-p 1, prompts padded to max_prompt_length=16, KV
cache 16+64), Python reward, reference forward (beta 0.04), one AdamW step
(lr 1e-5, no weight decay, no clipping, one iteration mu=1) over the 64
completions. The rollout seed changes every iteration (with a fixed seed,
or none, every rollout draws the same key).

Timing wraps Tunix's own calls: `RLCluster.generate` (generation),
`get_ref_per_token_logps` (reference, blocked on its result), the learner's
`_compute_rewards` (reward) and `update_actor` (update, blocked on the actor
parameters); the iteration is the time between consecutive update ends.
Prints one JSON line of medians.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time

from common import load_workload, parse_args  # bench/peers/common.py, next to this file


def main(argv=None):
    args = parse_args(__doc__, argv, threads=False)

    import flax
    import jax
    import numpy as np
    import optax
    import transformers
    from flax import nnx
    from tunix.models.qwen2 import model as qwen2_model
    from tunix.models.qwen2 import params as qwen2_params
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    wl = load_workload(args.workload)
    mc = wl["model_config"]
    cfg = qwen2_model.ModelConfig(
        num_layers=mc["num_hidden_layers"], vocab_size=mc["vocab_size"], embed_dim=mc["hidden_size"],
        hidden_dim=mc["intermediate_size"], num_heads=mc["num_attention_heads"],
        head_dim=mc["hidden_size"] // mc["num_attention_heads"], num_kv_heads=mc["num_key_value_heads"],
        rope_theta=10_000, norm_eps=1e-6, use_tied_embedding=mc["tie_word_embeddings"])
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    actor = qwen2_params.create_model_from_safe_tensors(wl["model_dir"], cfg, mesh)
    reference = qwen2_params.create_model_from_safe_tensors(wl["model_dir"], cfg, mesh)
    tok = transformers.AutoTokenizer.from_pretrained(wl["tokenizer_dir"])
    assert tok.pad_token_id == wl["pad_id"] and tok.eos_token_id == wl["eos_id"]

    n_steps = args.warmup + args.iters
    rollout_cfg = base_rollout.RolloutConfig(
        max_tokens_to_generate=wl["max_new_tokens"], max_prompt_length=wl["max_prompt_length"],
        kv_cache_size=wl["max_prompt_length"] + wl["max_new_tokens"], temperature=wl["temperature"],
        top_p=wl["top_p"], top_k=None, eos_tokens=[wl["eos_id"]], seed=0)
    train_cfg = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optax.adamw(wl["learning_rate"], b1=wl["adam_b1"], b2=wl["adam_b2"], eps=wl["adam_eps"],
                                    weight_decay=wl["weight_decay"]),
        eval_every_n_steps=10**9, max_steps=n_steps)
    cluster_cfg = rl_cluster_lib.ClusterConfig(
        role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                      rl_cluster_lib.Role.ROLLOUT: mesh},
        rollout_engine="vanilla", offload_to_cpu=False, training_config=train_cfg, rollout_config=rollout_cfg)
    cluster = rl_cluster_lib.RLCluster(actor=actor, reference=reference, tokenizer=tok, cluster_config=cluster_cfg)
    algo = grpo_learner.GRPOConfig(num_generations=wl["num_generations"], num_iterations=wl["epochs"],
                                   beta=wl["beta"], epsilon=wl["epsilon"], loss_agg_mode="sequence-mean-token-mean")

    def length_reward(prompts, completions, **kwargs):
        return [-abs(len(c) - 20) / 20 for c in completions]

    learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=[length_reward])

    cur: dict = {}
    steps: list[dict] = []
    it = [0]

    def timed(name, fn, block=None):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            if block is not None:
                jax.block_until_ready(block(out))
            cur[name] = cur.get(name, 0.0) + time.perf_counter() - t0
            return out
        return wrapper

    generate = cluster.generate

    def generate_with_seed(*a, **kw):
        rollout_cfg.seed = it[0]  # a new sampling key every iteration
        it[0] += 1
        return generate(*a, **kw)

    cluster.generate = timed("generation", generate_with_seed)
    cluster.get_ref_per_token_logps = timed("reference", cluster.get_ref_per_token_logps, block=lambda x: x)
    learner._compute_rewards = timed("reward", learner._compute_rewards)
    update_actor = timed("update", cluster.update_actor,
                         block=lambda _: nnx.state(cluster.actor_trainer.model, nnx.Param))
    last_end = [None]

    def update_and_record(*a, **kw):
        begin = time.perf_counter()
        out = update_actor(*a, **kw)
        now = time.perf_counter()
        rec = {k: cur.get(k, 0.0) for k in ("generation", "reward", "reference", "update")}
        rec["total"] = now - (last_end[0] if last_end[0] is not None else begin - sum(rec.values()))
        steps.append(rec)
        last_end[0] = now
        cur.clear()
        return out
    cluster.update_actor = update_and_record

    prompts = np.array(wl["prompts"])
    t0 = time.perf_counter()
    learner.train([{"prompts": prompts} for _ in range(n_steps)])
    wall = time.perf_counter() - t0
    timed_steps = steps[args.warmup:]
    keys = ("generation", "reward", "reference", "update", "total")
    med = {k: statistics.median(s[k] for s in timed_steps) for k in keys}
    med["other"] = med["total"] - med["generation"] - med["reference"] - med["update"]
    from importlib.metadata import version

    import tunix  # noqa: F401  (version from the installed distribution)
    print(json.dumps({
        "framework": "tunix", "ok": True, "iters": len(timed_steps), "warmup": args.warmup,
        "versions": {"google-tunix": version("google-tunix"), "jax": jax.__version__, "flax": flax.__version__,
                     "transformers": transformers.__version__, "python": sys.version.split()[0]},
        "device": jax.devices()[0].device_kind, "loadavg": os.getloadavg(), "median": med,
        "first_iteration_s": steps[0]["total"], "train_wall_s": wall,
        "all_total_s": [s["total"] for s in timed_steps], "iterations_run": len(steps),
        "settings": {"max_prompt_length": wl["max_prompt_length"], "kv_cache_size": rollout_cfg.kv_cache_size,
                     "rollout_engine": "vanilla", "seed": "iteration index"},
    }))


if __name__ == "__main__":
    main()
