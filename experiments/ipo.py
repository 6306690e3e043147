"""IPO on 1-2 digit addition: DPO's pairs with IPO's squared loss, after an SFT warm start.

    jaxrl-llm train experiments/ipo.py          # default preset
    jaxrl-llm train experiments/ipo.py:smoke    # a few steps (the test suite runs this)

Model: the tiny default (Qwen2 shape, 4M parameters, random init) and the shipped tokenizer. Task:
1-2 digit addition, one token per digit, answer reversed ("4 7 + 0 8 =" -> "5 5 0", i.e. 55);
greedy accuracy on 256 held-out problems, preference accuracy on 256 held-out pairs. SFT warm
start: 200 steps of 128 gold answers, lr 1e-3. Pairs from the task's train split: chosen = the
gold answer, rejected = the result off by 1-3 or with two digits swapped (train/pref_data.py).
IPO (Azar et al. 2023): (log-ratio margin - 1/(2 tau))^2 on summed log-probs, tau = beta = 0.1,
reference = the SFT model, 200 steps of 64 pairs, lr 1e-4.
Expect: Not measured yet at this preset; its smoke preset runs in the test suite.
"""

from jaxrl_llm.train.config import addition_warm_start, digit_addition_config, dpo_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = digit_addition_config(eval_every=50)
    c.stages = ("sft", "pref")
    c.sft = addition_warm_start()
    c.pref = dpo_stage("ipo", steps=200, batch_size=64, learning_rate=1e-4, max_prompt_len=12,
                       max_response_len=6, beta=0.1)
    if preset == "smoke":  # a few steps of each stage, on the 2-layer dummy model
        c.model.preset = "dummy"
        c.sft.steps, c.pref.steps, c.pref.batch_size, c.pref.data.num_pairs = 2, 2, 8, 64
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 1, 0
        c.pref.data.eval_pairs = 16
    return c
