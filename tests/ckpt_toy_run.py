"""A tiny deterministic SFT run that checkpoints and resumes; tests/test_checkpoint.py kills it and compares.

    python tests/ckpt_toy_run.py --dir /tmp/run --steps 20 --out /tmp/final.npz [--sleep-per-step 0.2]

Every random number comes from (seed, step): parameters from fold_in(key, 0), the step's token dropout
mask from fold_in(fold_in(key, 1), step); data order from the PromptIterator (seed, epoch). On start it
restores the latest complete checkpoint (step counter, params, optimiser state, iterator state) and
continues. Markers on stdout for the test: "start K" (first step to run), "step K done" (K steps
done), "saving K" (save() returned: the write is in flight), "finished".
--stall-write K makes orbax's writing thread wait (60 s) after the files of checkpoint K are written and
before it is renamed into place, so a kill after "saving K" leaves a fully written temporary dir.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

from jaxrl_llm.algos.sft import make_sft_step
from jaxrl_llm.algos.train_state import OptimizerConfig, TrainState, jit_update
from jaxrl_llm.data.iterator import PromptIterator
from jaxrl_llm.models import ModelConfig, create_model
from jaxrl_llm.sharding import ShardingEnv, make_mesh
from jaxrl_llm.tasks.base import Example
from jaxrl_llm.train.checkpoint import Checkpointer, abstract_like

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
P, N, B, NUM_EXAMPLES = 4, 6, 4, 22  # 22 rows / batch 4: 5 batches an epoch, 2 rows dropped (order changes)


def make_examples(seed: int) -> list[Example]:
    """Token sequences as text ("3 17 42 9"), so the iterator's Example holds them."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(1, CFG.vocab_size, (NUM_EXAMPLES, P + N))
    return [Example(prompt=" ".join(map(str, t[:P])), answer=" ".join(map(str, t[P:]))) for t in toks]


def make_batch(examples: list[Example], rng: jax.Array) -> dict[str, np.ndarray]:
    prompt = np.array([[int(v) for v in e.prompt.split()] for e in examples], np.int32)
    completion = np.array([[int(v) for v in e.answer.split()] for e in examples], np.int32)
    keep = np.array(jax.random.bernoulli(rng, 0.75, completion.shape))  # the step's randomness
    keep[:, 0] = True
    return {"prompt_tokens": prompt, "prompt_mask": np.ones_like(prompt, bool),
            "completion_tokens": completion, "completion_mask": keep}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=3)
    ap.add_argument("--sleep-per-step", type=float, default=0.0)
    ap.add_argument("--stall-write", type=int, default=None)
    args = ap.parse_args(argv)

    key = jax.random.key(args.seed)
    env = ShardingEnv(make_mesh({"data": 1, "fsdp": -1}))  # params sharded over all devices
    module, params, _ = create_model(CFG, jax.random.fold_in(key, 0), env)
    opt = OptimizerConfig(name="adamw", learning_rate=3e-2, weight_decay=0.01, schedule="cosine",
                          warmup_steps=2, total_steps=args.steps)
    state = TrainState.create(params, opt)
    it = PromptIterator(make_examples(args.seed), batch_size=B, seed=args.seed, process_index=0, process_count=1)
    stalled = os.path.join(args.dir, f"{args.stall_write}.orbax-checkpoint-tmp")  # K is in flight iff it exists
    stall = (lambda: os.path.isdir(stalled) and time.sleep(60)) if args.stall_write else None
    ckpt = Checkpointer(args.dir, max_to_keep=2, save_every=args.save_every, before_commit=stall)

    def tree(s: TrainState) -> dict:
        return {"step": s.step, "params": s.params, "opt_state": s.opt_state}

    restored = ckpt.restore_latest(abstract_like(tree(state)))
    start = 0
    if restored is not None:
        start, saved, meta = restored
        state = state.replace(**saved)
        it.restore(meta["data"])
        assert meta["steps_done"] == start == int(state.step), (meta, start, state.step)
    print(f"start {start}", flush=True)

    example_batch = make_batch(make_examples(args.seed)[:B], key)  # shapes only
    update = jit_update(make_sft_step(module, CFG), state, example_batch, env)
    data_key = jax.random.fold_in(key, 1)
    for i in range(start, args.steps):
        mask_rng, step_rng = jax.random.split(jax.random.fold_in(data_key, i))
        state, metrics = update(state, make_batch(next(it), mask_rng), step_rng)
        done = i + 1
        if ckpt.save(done, tree(state), {"data": it.state(), "steps_done": done}):
            print(f"saving {done}", flush=True)
        print(f"step {done} done loss {float(metrics['loss']):.6f}", flush=True)
        if args.sleep_per_step:
            time.sleep(args.sleep_per_step)
    ckpt.close()

    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    np.savez(args.out + ".tmp.npz", step=np.asarray(state.step), **flat)
    os.replace(args.out + ".tmp.npz", args.out)
    print("finished", flush=True)


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    main(sys.argv[1:])
