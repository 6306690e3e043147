"""A Bradley-Terry reward model on 1-2 digit addition pairs, its backbone from an SFT warm start.

    jaxrl-llm train experiments/reward_model.py          # default preset
    jaxrl-llm train experiments/reward_model.py:smoke    # a few steps (the test suite runs this)

Model: the tiny default (Qwen2 shape, 4M parameters, random init) and the shipped tokenizer. Task:
1-2 digit addition, one token per digit, answer reversed ("4 7 + 0 8 =" -> "5 5 0", i.e. 55);
held-out metric: the fraction of 256 held-out pairs the reward model ranks right. SFT warm
start: 200 steps of 128 gold answers, lr 1e-3. Pairs from the task's train split: chosen = the
gold answer, rejected = the result off by 1-3 or with two digits swapped (train/pref_data.py).
Reward model: ScalarHeadModel(per_token=False), the SFT backbone plus a zero head read at the last
token; Bradley-Terry loss, 300 steps of 64 pairs, lr 3e-4. Its params stay in checkpoints/rm/:
a PPO stage after it uses them with reward_model_stage="rm" (docs/experiments.md).
Expect: Measured on the 2-core CPU with another run sharing the cores (one seed): held-out pair accuracy 0.0% -> 94.5%;
281 s.
"""

from jaxrl_llm.train.config import addition_warm_start, digit_addition_config, reward_model_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = digit_addition_config(eval_every=50)
    c.stages = ("sft", "rm")
    c.sft = addition_warm_start()
    c.rm = reward_model_stage(steps=300, batch_size=64, learning_rate=3e-4, max_prompt_len=12, max_response_len=6)
    if preset == "smoke":  # a few steps of each stage, on the 2-layer dummy model
        c.model.preset = "dummy"
        c.sft.steps, c.rm.steps, c.rm.batch_size, c.rm.data.num_pairs = 2, 2, 8, 64
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 1, 0
        c.rm.data.eval_pairs = 16
    return c
