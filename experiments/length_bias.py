"""GRPO's length bias (Dr. GRPO, arXiv 2503.20783, section 3.1): wrong answers drift longer under the 1/|o| mean.

    jaxrl-llm train experiments/length_bias.py:grpo      # GRPO: per-sequence token mean, std-scaled advantages
    jaxrl-llm train experiments/length_bias.py:dr_grpo   # Dr. GRPO: token sums / max_new_tokens, no std
    jaxrl-llm train experiments/length_bias.py           # = :grpo
    jaxrl-llm train experiments/length_bias.py:smoke     # a few steps (the test suite runs this)
    python bench/phenomena_plots.py length RUN_GRPO RUN_DR_GRPO   # docs/img/length_bias.png

Model: the tiny default (Qwen2 shape, 4M parameters, random init) and the shipped tokenizer. Task:
1-2 digit addition, one token per digit, answer reversed ("4 7 + 0 8 =" -> "5 5 0", i.e. 55), in-jit
exact-match reward 0/1. max_new_tokens = 16: a wrong completion may ramble on past the answer.
SFT warm start: 200 steps of 128 gold answers, lr 1e-3. RL: 32 prompts x 8 samples, temperature 1,
no KL, lr 5e-4, 40 iterations, metrics logged every iteration; the two presets differ only in the
variant (loss aggregation and std division). response_length/correct and response_length/wrong are
logged per iteration (train/stages/rl.py `lengths_by_outcome`). Results: docs/phenomena.md.
Expect: Measured on the 2-core CPU with other jobs sharing the cores (one seed; the Dr. GRPO arm resumed from the
GRPO arm's SFT checkpoint): NO length drift here: SFT fixes every completion at 6 tokens (answer + EOS): 1/|o| is
the same for all; wrong-answer length 5.98 -> 6.00 (GRPO) and 5.98 -> 6.02 (Dr. GRPO), first/last 10 iterations;
held-out greedy accuracy 66.0% -> 20.7% (GRPO) and -> 7.8% (Dr. GRPO); GRPO arm 1212 s with its SFT.
"""

from jaxrl_llm.train.config import addition_warm_start, digit_addition_config, grpo_stage

PRESETS = ("smoke", "grpo", "dr_grpo")


def get_config(preset=None):
    variant = "dr_grpo" if preset == "dr_grpo" else "grpo"
    c = digit_addition_config(eval_every=100)
    c.eval.max_new_tokens, c.log.every = 12, 1
    c.stages = ("sft", "rl")
    c.sft = addition_warm_start()
    kl = {} if variant == "dr_grpo" else {"beta": 0.0}
    c.task.kwargs.answer_prefix = True  # judged on its first tokens: a completion may go on after its answer
    c.rl = grpo_stage(variant, iterations=60, prompts_per_iter=32, group_size=8, learning_rate=3e-4,
                      max_new_tokens=12, **kl)
    c.rl.max_prompt_len, c.rl.sampling.temperature = 12, 1.5  # hot sampling: EOS placement varies
    if preset == "smoke":  # a few steps of each stage, on the 2-layer dummy model
        c.model.preset = "dummy"
        c.sft.steps, c.rl.iterations, c.rl.prompts_per_iter = 2, 2, 4
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 1, 0
    return c
