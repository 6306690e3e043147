"""DPO on a real pretrained instruct model: SmolLM2-135M-Instruct, right vs near-miss replies to one-digit
arithmetic.

    jaxrl-llm train experiments/smollm2_arithmetic_dpo.py
    jaxrl-llm train experiments/smollm2_arithmetic_dpo.py:smoke   # the machinery on the dummy model (tests)

Model and task as in experiments/smollm2_arithmetic_grpo.py (`train.config.chat_arithmetic_config`).
Pairs from the task's train split (`ArithmeticTask.preference_pair`): chosen "7 * 8 = 56", rejected the same
with a near-miss result ("7 * 8 = 57"); reference = the base model. DPO sigmoid loss, beta 0.1, 40 steps of
16 pairs, AdamW lr 5e-6; greedy held-out task accuracy and held-out preference accuracy every 10 steps.
Expect: Measured on the 2-core AMD EPYC (Zen 4) CPU, one seed: held-out preference accuracy 0% -> 93.8% while
greedy task accuracy goes 45.8% -> 41.7% and replies grow from 14 to 39 tokens; 25 min 15 s with the test
suite sharing the cores (about 13 s per step before it started). Details: docs/experiments.md.
"""

from jaxrl_llm.train.config import chat_arithmetic_config, dpo_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = chat_arithmetic_config(eval_every=10)
    c.stages = ("pref",)
    c.pref = dpo_stage("sigmoid", steps=40, batch_size=16, learning_rate=5e-6, max_prompt_len=48,
                       max_response_len=12, beta=0.1)
    c.pref.data.eval_pairs = 64
    c.checkpoint.every, c.log.every = 0, 5
    if preset == "smoke":
        c.model.preset, c.model.path = "dummy", ""
        c.pref.steps, c.pref.batch_size, c.pref.data.num_pairs, c.pref.data.eval_pairs = 2, 4, 16, 8
        c.eval.every, c.eval.num_examples, c.eval.max_new_tokens, c.log.every = 2, 4, 8, 1
    return c
