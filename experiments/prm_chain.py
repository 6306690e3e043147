"""A process reward model on chain arithmetic: SFT warm start, then a PRM on the task's true step grades.

    jaxrl-llm train experiments/prm_chain.py          # default preset
    jaxrl-llm train experiments/prm_chain.py:smoke    # a few steps (the test suite runs this)

Model: the 2-layer "dummy" preset (random init) and the shipped tokenizer. Task: `chain_arithmetic` with small
numbers (start 0..9, 2-3 "+"/"-" steps of 0..4: "7+3=10;10-4=6"). Stage "sft" trains on the gold
step-by-step solutions; stage "prm" samples a solution for each of 2048 train problems from that policy at
temperature 0.6 (so some steps go wrong), labels every step with `task.grade_steps` (a step carrying an
earlier mistake is wrong too) and trains the PRM (the SFT backbone + a per-token head, docs/prm.md) on them.
Held out: the sampled solutions of 256 test problems, graded the same way. prm/accuracy_after is held-out
step accuracy, prm/auc_after the ROC AUC of the PRM's step probabilities against the true grades.
Expect (measured on 2 shared AMD EPYC cores, 2 min 34 s wall): SFT greedy accuracy 0.37; 2046 training
solutions, 5107 labelled steps of which 17% right; held-out step accuracy 0.842 (always "wrong": 0.824),
AUC 0.734 (0.729 after 400 steps). The same with batch 64, lr 3e-3 reached AUC 0.764 after 1200 steps.
"""

from jaxrl_llm.train.config import base_config, prm_stage, sft_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = base_config()
    c.model.preset = "dummy"  # 2 narrow layers: the whole run fits in minutes on a laptop CPU
    c.task.name = "chain_arithmetic"
    # small numbers (start 0..9, operands 0..4, values 0..30): a 2-layer model learns to write right steps fast
    c.task.kwargs.update(dict(max_start=9, max_operand=4, max_value=30, max_steps=3))
    c.eval.num_examples, c.eval.max_new_tokens, c.eval.every = 128, 24, 400
    c.stages = ("sft", "prm")
    c.sft = sft_stage(steps=400, batch_size=64, learning_rate=3e-3, max_prompt_len=12, max_response_len=24)
    c.sft.optimizer.update(dict(warmup_steps=20, schedule="cosine", total_steps=400))
    c.prm = prm_stage(steps=800, batch_size=32, learning_rate=1e-3, max_prompt_len=12, max_response_len=24)
    c.prm.data.source, c.prm.data.num_examples, c.prm.data.eval_rows = "task", 2048, 256
    c.prm.data.sampling.max_new_tokens, c.prm.data.sampling.temperature = 24, 0.6
    c.log.every, c.checkpoint.every = 25, 0
    if preset == "smoke":  # a few steps
        c.sft.steps, c.sft.optimizer.total_steps, c.sft.optimizer.warmup_steps = 4, 4, 0
        c.prm.steps, c.prm.batch_size, c.prm.data.num_examples, c.prm.data.eval_rows = 2, 4, 64, 16
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 1, 2
    return c
