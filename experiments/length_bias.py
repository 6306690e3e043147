"""GRPO's length bias (Dr. GRPO, arXiv 2503.20783, section 3.1): wrong answers drift longer under the 1/|o| mean.

    jaxrl-llm train experiments/length_bias.py:grpo      # GRPO: per-sequence token mean, std-scaled advantages
    jaxrl-llm train experiments/length_bias.py:dr_grpo   # Dr. GRPO: token sums / max_new_tokens, no std
    jaxrl-llm train experiments/length_bias.py           # = :grpo
    jaxrl-llm train experiments/length_bias.py:smoke     # a few steps (the test suite runs this)
    python bench/phenomena_plots.py length RUN_GRPO RUN_DR_GRPO   # docs/img/length_bias.png

Model: the tiny default (Qwen2 shape, 4M parameters, random init) and the shipped tokenizer. Task:
1-2 digit addition, one token per digit, answer reversed ("4 7 + 0 8 =" -> "5 5 0", i.e. 55), in-jit
reward 0/1 on the answer prefix (task option answer_prefix: "5 5 0 3 1" counts as right, so a completion,
right or wrong, may go on after its answer). SFT warm start: 200 steps of 128 gold answers, lr 1e-3.
RL: 32 prompts x 8 samples, temperature 1.5 (at 1.0 the SFT model ends every completion right after
the answer), max_new_tokens = 12, no KL, lr 3e-4, 60 iterations, metrics every iteration; the two presets
differ only in the variant (loss aggregation and std division). Results: docs/phenomena.md.
Expect: Measured on the 2-core CPU with other jobs sharing the cores (one seed; every arm resumed from the same SFT
checkpoint): mean response_length/wrong per block of 10 iterations GRPO 7.1 10.1 11.0 11.7 11.6 11.4 (correct ones
lengthen with them); GRPO with only loss_agg=seq-mean-token-sum-norm 6.2 6.3 6.3 6.1 6.0 6.0; Dr. GRPO (also no
std) 5.8 6.3 8.5 10.9 11.0 10.2: it drifts too, about 15 iterations later. Held-out greedy accuracy 66.0% ->
71.9% (GRPO), 81.2% (token-sum), 66.0% (Dr. GRPO); 171-215 s wall per arm's RL stage.
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
