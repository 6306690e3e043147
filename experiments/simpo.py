"""SimPO on 1-2 digit addition: no reference, length-normalised log-probs and a margin.

    jaxrl-llm train experiments/simpo.py          # default preset
    jaxrl-llm train experiments/simpo.py:smoke    # a few steps (the test suite runs this)

Model: the tiny default (Qwen2 shape, 4M parameters, random init) and the shipped tokenizer. Task:
1-2 digit addition, one token per digit, answer reversed ("4 7 + 0 8 =" -> "5 5 0", i.e. 55);
greedy accuracy on 256 held-out problems, preference accuracy on 256 held-out pairs. SFT warm
start: 200 steps of 128 gold answers, lr 1e-3. Pairs from the task's train split: chosen = the
gold answer, rejected = the result off by 1-3 or with two digits swapped (train/pref_data.py).
SimPO (Meng et al. 2024): -log sig(beta (avg logp_c - avg logp_r) - gamma), beta 2.0, gamma
1.0 (gamma/beta 0.5), no reference forward, 200 steps of 64 pairs, lr 3e-4.
Expect: Measured on the 2-core CPU with another run sharing the cores (one seed): SFT 66.0%; SimPO preference
accuracy 92.2% -> 100%, while greedy task accuracy falls 66.0% -> 11.7% (as DPO's does); 226 s.
"""

from jaxrl_llm.train.config import addition_warm_start, digit_addition_config, dpo_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = digit_addition_config(eval_every=50)
    c.stages = ("sft", "pref")
    c.sft = addition_warm_start()
    c.pref = dpo_stage("simpo", steps=200, batch_size=64, learning_rate=3e-4, max_prompt_len=12,
                       max_response_len=6, beta=2.0, simpo_gamma=1.0)
    if preset == "smoke":  # a few steps of each stage, on the 2-layer dummy model
        c.model.preset = "dummy"
        c.sft.steps, c.pref.steps, c.pref.batch_size, c.pref.data.num_pairs = 2, 2, 8, 64
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 1, 0
        c.pref.data.eval_pairs = 16
    return c
