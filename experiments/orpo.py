"""ORPO on 1-2 digit addition: SFT and preference alignment in one stage, from a random init.

    jaxrl-llm train experiments/orpo.py          # default preset
    jaxrl-llm train experiments/orpo.py:smoke    # a few steps (the test suite runs this)

Model: the tiny default (Qwen2 shape, 4M parameters, random init) and the shipped tokenizer. Task:
1-2 digit addition, one token per digit, answer reversed ("4 7 + 0 8 =" -> "5 5 0", i.e. 55);
greedy accuracy on 256 held-out problems, preference accuracy on 256 held-out pairs. Pairs from
the task's train split: chosen = the gold answer, rejected = the result off by 1-3 or with two
digits swapped (train/pref_data.py). ORPO (Hong et al. 2024): NLL of the chosen answer + lambda *
-log sig(log odds ratio), lambda 0.1, no reference and no SFT stage; 300 steps of 128 pairs,
lr 1e-3, 30 warm-up steps, cosine decay.
Expect: Not measured yet at this preset; its smoke preset runs in the test suite.
"""

from jaxrl_llm.train.config import digit_addition_config, dpo_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = digit_addition_config(eval_every=50)
    c.stages = ("orpo",)
    c.orpo = dpo_stage("orpo", steps=300, batch_size=128, learning_rate=1e-3, max_prompt_len=12,
                       max_response_len=6, orpo_lambda=0.1)
    c.orpo.optimizer.update(dict(warmup_steps=30, schedule="cosine", total_steps=300))
    if preset == "smoke":  # a few steps, on the 2-layer dummy model
        c.model.preset = "dummy"
        c.orpo.steps, c.orpo.batch_size, c.orpo.data.num_pairs, c.orpo.data.eval_pairs = 2, 8, 64, 16
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 1, 0
    return c
