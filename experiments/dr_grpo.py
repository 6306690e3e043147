"""Dr. GRPO on 1-2 digit addition: GRPO without the std and length normalisations.

    jaxrl-llm train experiments/dr_grpo.py          # default preset
    jaxrl-llm train experiments/dr_grpo.py:smoke    # a few steps (the test suite runs this)

Model: the tiny default (Qwen2 shape, 4M parameters, random init) and the shipped tokenizer. Task:
1-2 digit addition, one token per digit, answer reversed ("4 7 + 0 8 =" -> "5 5 0", i.e. 55);
in-jit exact-match reward 0/1; greedy accuracy on 256 held-out problems every 25 iterations.
SFT warm start: 200 steps of 128 gold answers, lr 1e-3.
Dr. GRPO (arXiv 2503.20783): 32 prompts x 8 samples, advantages r - mean(r) (no std), token
sums divided by the constant max_new_tokens = 6, no KL, 100 iterations, lr 3e-4.
Expect: Measured on the 2-core CPU with another run sharing the cores (one seed): SFT 66.0%; Dr. GRPO 66.0% -> 72.7%
held-out accuracy; 231 s.
"""

from jaxrl_llm.train.config import addition_warm_start, digit_addition_config, grpo_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = digit_addition_config(eval_every=25)
    c.stages = ("sft", "rl")
    c.sft = addition_warm_start()
    c.rl = grpo_stage("dr_grpo", iterations=100, prompts_per_iter=32, group_size=8, learning_rate=3e-4,
                      max_new_tokens=6)
    c.rl.max_prompt_len = 12
    if preset == "smoke":  # a few steps of each stage, on the 2-layer dummy model
        c.model.preset = "dummy"
        c.sft.steps, c.rl.iterations, c.rl.prompts_per_iter = 2, 2, 4
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 1, 0
    return c
