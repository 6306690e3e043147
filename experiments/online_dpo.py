"""Online DPO (Guo et al. 2024) on 1-2 digit addition: an SFT warm start, then DPO on pairs sampled each iteration.

    jaxrl-llm train experiments/online_dpo.py          # default preset
    jaxrl-llm train experiments/online_dpo.py:smoke    # a few steps (the test suite runs this)

Model: the tiny default (Qwen2 shape, 4M parameters, random init) and the shipped tokenizer. Task:
1-2 digit addition, one token per digit, answer reversed ("4 7 + 0 8 =" -> "5 5 0", i.e. 55);
greedy accuracy on 256 held-out problems every 25 iterations. SFT warm start: 200 steps of 128 gold
answers, lr 1e-3. Online DPO: each iteration 32 prompts x 4 samples (temperature 1) from the current
policy, scored by the in-jit exact-match reward (0/1); per prompt chosen = a correct sample, rejected =
a wrong one (prompts whose samples all score the same are skipped); sigmoid loss, beta 0.1, reference =
the SFT model, 100 iterations, lr 1e-4 (as experiments/dpo.py).
Expect: Measured on the 2-core CPU with other jobs sharing the cores (one seed): SFT 66.0%; online DPO 66.0% ->
89.8% held-out greedy accuracy (89.5% already at iteration 25): no collapse, unlike offline DPO on near-miss
pairs (experiments/dpo.py). Preference accuracy on the freshly sampled pairs (before each update) stays near
chance (0.28-0.73, mean 0.54 over the 10 logged iterations), with 30% of their prompts tied; 1157 s (SFT 811 s).
"""

from jaxrl_llm.train.config import addition_warm_start, digit_addition_config, online_dpo_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = digit_addition_config(eval_every=25)
    c.stages = ("sft", "rl")
    c.sft = addition_warm_start()
    c.rl = online_dpo_stage("sigmoid", iterations=100, prompts_per_iter=32, samples_per_prompt=4,
                            learning_rate=1e-4, max_new_tokens=6, beta=0.1)
    c.rl.max_prompt_len = 12
    if preset == "smoke":  # a few steps of each stage, on the 2-layer dummy model
        c.model.preset = "dummy"
        c.sft.steps, c.rl.iterations, c.rl.prompts_per_iter = 2, 2, 4
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 1, 0
    return c
