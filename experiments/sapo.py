"""SAPO on 1-2 digit addition: a smooth sigmoid gate of the importance ratio instead of the hard clip.

    jaxrl-llm train experiments/sapo.py          # default preset
    jaxrl-llm train experiments/sapo.py:smoke    # a few steps (the test suite runs this)

Model: the tiny default (Qwen2 shape, 4M parameters, random init) and the shipped tokenizer. Task:
1-2 digit addition, one token per digit, answer reversed ("4 7 + 0 8 =" -> "5 5 0", i.e. 55);
in-jit exact-match reward 0/1; greedy accuracy on 256 held-out problems every 25 iterations.
SFT warm start: 200 steps of 128 gold answers, lr 1e-3.
SAPO (arXiv 2511.20347; grpo.sapo): 32 prompts x 8 samples, group mean/std advantages, per token
-(4 / tau) sigmoid(tau (rho - 1)) A with tau 1.0 / 1.05 for A > 0 / A <= 0, per-sequence token mean,
no KL, 100 iterations, lr 3e-4; 2 minibatches per rollout batch, so the second update is off-policy
(rho != 1) and the gate acts.
Expect: Measured on the 2-core AMD EPYC VM with other jobs sharing the cores (one seed): SFT 66.0%; SAPO
66.0% -> 22.3% held-out accuracy (50.8% / 51.6% / 59.0% at iterations 25 / 50 / 75, then a collapse in the
last 10: sampled accuracy 60.2% -> 19.1%); the gate stayed near 1 (sapo_gate_mean >= 0.99), so at these
ratios SAPO is close to the unclipped policy gradient; 975 s wall, of which RL 443 s.
"""

from jaxrl_llm.train.config import addition_warm_start, digit_addition_config, grpo_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = digit_addition_config(eval_every=25)
    c.stages = ("sft", "rl")
    c.sft = addition_warm_start()
    c.rl = grpo_stage("sapo", iterations=100, prompts_per_iter=32, group_size=8, learning_rate=3e-4,
                      max_new_tokens=6, num_minibatches=2)
    c.rl.max_prompt_len = 12
    if preset == "smoke":  # a few steps of each stage, on the 2-layer dummy model
        c.model.preset = "dummy"
        c.sft.steps, c.rl.iterations, c.rl.prompts_per_iter = 2, 2, 4
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 1, 0
    return c
