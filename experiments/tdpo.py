"""TDPO2 (token-level DPO) on 1-2 digit addition: an SFT warm start, then TDPO2 on generated pairs.

    jaxrl-llm train experiments/tdpo.py          # default preset
    jaxrl-llm train experiments/tdpo.py:smoke    # a few steps (the test suite runs this)

Model: the tiny default (Qwen2 shape, 4M parameters, random init) and the shipped tokenizer. Task:
1-2 digit addition, one token per digit, answer reversed ("4 7 + 0 8 =" -> "5 5 0", i.e. 55);
greedy accuracy on 256 held-out problems, preference accuracy (beta * log-ratio, as experiments/dpo.py)
on 256 held-out pairs. SFT warm start: 200 steps of 128 gold answers, lr 1e-3. Pairs as experiments/dpo.py:
chosen = the gold answer, rejected = the result off by 1-3 or with two digits swapped.
TDPO2 (Zeng et al. 2024): beta 0.1, alpha 0.5 (the official code's defaults), reference = the SFT model,
per-token KL(ref || policy) over the whole vocabulary; 200 steps of 64 pairs, lr 1e-4 (as experiments/dpo.py),
no NLL term.
Expect: measured once (seed 0) on the 2-core AMD EPYC VM with other jobs sharing the cores, with
`jaxrl-llm train experiments/tdpo.py --set run_root=/tmp/tdpo_runs --set log.progress=False`: SFT 66.0%;
TDPO2 raises held-out preference accuracy 0% -> 98.4% and greedy task accuracy 66.0% -> 80.5% (87.1 / 85.9 /
74.6% at steps 50 / 100 / 150), where plain DPO (experiments/dpo.py:plain) falls to 21.5% and DPO + NLL
(its default) reaches 98.4%; SeqKL of chosen 1.9, of rejected 11.2 at the end. 1863 s (about 5 s per
TDPO step on the loaded cores).
"""

from jaxrl_llm.train.config import addition_warm_start, digit_addition_config, dpo_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = digit_addition_config(eval_every=50)
    c.stages = ("sft", "pref")
    c.sft = addition_warm_start()
    c.pref = dpo_stage("tdpo2", steps=200, batch_size=64, learning_rate=1e-4, max_prompt_len=12,
                       max_response_len=6, beta=0.1, tdpo_alpha=0.5)
    if preset == "smoke":  # a few steps of each stage, on the 2-layer dummy model
        c.model.preset = "dummy"
        c.sft.steps, c.pref.steps, c.pref.batch_size, c.pref.data.num_pairs = 2, 2, 8, 64
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 1, 0
        c.pref.data.eval_pairs = 16
    return c
