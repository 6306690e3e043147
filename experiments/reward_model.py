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
Expect: Measured on the 2-core CPU with another run sharing the cores: held-out pair accuracy 0.0% -> 93.8%;
499 s.
"""

import ml_collections as mc

from jaxrl_llm.train.config import base_config, reward_model_stage, sft_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = base_config()
    # one token per digit, operands zero-padded, answer reversed: the format small models learn addition in
    c.task.kwargs = mc.ConfigDict(dict(min_digits=1, max_digits=2, operators=("+",), spaced=True,
                                       pad_operands=True, reverse_answer=True))
    c.eval.num_examples, c.eval.max_new_tokens, c.eval.every = 256, 6, 50
    c.stages = ("sft", "rm")
    c.sft = sft_stage(steps=200, batch_size=128, learning_rate=1e-3, max_prompt_len=12, max_response_len=6)
    c.sft.optimizer.warmup_steps = 30
    c.rm = reward_model_stage(steps=300, batch_size=64, learning_rate=3e-4, max_prompt_len=12, max_response_len=6)
    if preset == "smoke":  # a few steps of each stage
        c.sft.steps, c.rm.steps, c.rm.batch_size, c.rm.data.num_pairs = 2, 2, 8, 64
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 1, 0
        c.rm.data.eval_pairs = 16
    return c
