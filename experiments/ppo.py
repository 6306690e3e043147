"""PPO on 1-2 digit addition: an SFT warm start, then PPO with a value model and a KL-shaped reward.

    jaxrl-llm train experiments/ppo.py          # default preset
    jaxrl-llm train experiments/ppo.py:smoke    # a few steps (the test suite runs this)

Model: the tiny default (Qwen2 shape, 4M parameters, random init) and the shipped tokenizer. Task:
1-2 digit addition, one token per digit, answer reversed ("4 7 + 0 8 =" -> "5 5 0", i.e. 55);
in-jit exact-match reward 0/1; greedy accuracy on 256 held-out problems every 25 iterations.
SFT warm start: 200 steps of 128 gold answers, lr 1e-3.
PPO: 64 prompts x 4 samples per iteration; a separate value model (the SFT backbone, zero head,
lr 3e-4); k1 KL to the SFT model in the reward, fixed coefficient 0.02; GAE gamma 1, lambda 0.95;
2 epochs x 2 minibatches; 100 iterations, policy lr 1e-4.
Expect: Not measured yet at this preset; its smoke preset runs in the test suite.
"""

from jaxrl_llm.train.config import addition_warm_start, digit_addition_config, ppo_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = digit_addition_config(eval_every=25)
    c.stages = ("sft", "rl")
    c.sft = addition_warm_start()
    c.rl = ppo_stage(iterations=100, prompts_per_iter=64, samples_per_prompt=4, learning_rate=1e-4,
                     value_learning_rate=3e-4, max_new_tokens=6, kl_coef=0.02, epochs=2, num_minibatches=2)
    c.rl.max_prompt_len = 12
    if preset == "smoke":  # a few steps of each stage, on the 2-layer dummy model
        c.model.preset = "dummy"
        c.sft.steps, c.rl.iterations, c.rl.prompts_per_iter = 2, 2, 4
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 1, 0
    return c
