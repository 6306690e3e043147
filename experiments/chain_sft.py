"""Supervised fine-tuning on chain arithmetic from a random init: the gold step-by-step solutions.

    jaxrl-llm train experiments/chain_sft.py          # default preset
    jaxrl-llm train experiments/chain_sft.py:smoke    # a few steps (the test suite runs this)

Model: the tiny default (Qwen2 shape, 4M parameters, random init) and the shipped tokenizer. Task:
`chain_arithmetic` with its defaults, 2-4 "+"/"-" operations of 0..9 on a start of 0..20 ("12+7-3+9=");
SFT trains on the full solution ("12+7=19;19-3=16;16+9=25", the examples' meta["sft_target"]), so the
policy writes one checkable step per operation: a starting point for process reward models and search.
200 steps of 128, AdamW lr 1e-3, 30 warm-up steps, the cosine schedule of a 300-step run stopped at 200:
a half-trained policy that still makes step errors. Greedy accuracy on 256 held-out problems.
Expect: Measured (AMD EPYC, 2 cores shared with other jobs, one seed): held-out final-answer accuracy 0.0% ->
50.0% (2 steps 58%, 3 steps 44%, 4 steps 47%); 43.4% of solutions have every step right, 26.7% of the steps
are new mistakes (wrong given the policy's own previous value), the first wrong step is step 0 in 74, step 1
in 38, step 2 in 30 problems; 11 min wall at load ~8 (1.2 s/step when the cores were less busy).
--set sft.steps=300 (measured in the same run): 94.1% accurate, 3.7% of steps wrong.
"""

from jaxrl_llm.train.config import base_config, sft_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = base_config()
    c.task.name = "chain_arithmetic"
    c.eval.num_examples, c.eval.max_new_tokens, c.eval.every = 256, 24, 100
    c.stages = ("sft",)
    c.sft = sft_stage(steps=200, batch_size=128, learning_rate=1e-3, max_prompt_len=12, max_response_len=24)
    c.sft.optimizer.update(dict(warmup_steps=30, schedule="cosine", total_steps=300))
    c.log.every, c.checkpoint.every = 20, 100
    if preset == "smoke":  # a few steps on the 2-layer dummy model
        c.model.preset = "dummy"
        c.sft.steps = 4
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 1, 2
    return c
