"""Supervised fine-tuning on 1-2 digit addition from a random init: masked NLL of the gold answers.

    jaxrl-llm train experiments/sft.py          # default preset
    jaxrl-llm train experiments/sft.py:smoke    # a few steps (the test suite runs this)

Model: the tiny default (Qwen2 shape, 4M parameters, random init) and the shipped tokenizer. Task:
1-2 digit addition, one token per digit, answer reversed ("4 7 + 0 8 =" -> "5 5 0", i.e. 55);
greedy accuracy on 256 held-out problems every 50 steps. 300 steps of 128 (prompt, answer + EOS)
pairs, AdamW lr 1e-3, 30 warm-up steps, cosine decay. (The RL and preference experiments start
from the first 200 steps of this at a constant lr.)
Expect: Measured on the 2-core CPU with another run sharing the cores (one seed): held-out accuracy 0.0% -> 93.0%
in 161 s.
"""

from jaxrl_llm.train.config import digit_addition_config, sft_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = digit_addition_config(eval_every=50)
    c.stages = ("sft",)
    c.sft = sft_stage(steps=300, batch_size=128, learning_rate=1e-3, max_prompt_len=12, max_response_len=6)
    c.sft.optimizer.update(dict(warmup_steps=30, schedule="cosine", total_steps=300))
    c.checkpoint.every = 100
    if preset == "smoke":  # a few steps, with a mid-run checkpoint, on the 2-layer dummy model
        c.model.preset = "dummy"
        c.sft.steps = 4
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 1, 2
    return c
