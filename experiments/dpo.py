"""DPO on 1-2 digit addition: an SFT warm start, then DPO with an NLL term on chosen (RPO) on generated pairs.

    jaxrl-llm train experiments/dpo.py          # default preset: sigmoid DPO + 1.0 x NLL(chosen)
    jaxrl-llm train experiments/dpo.py:plain    # plain DPO (nll_coef 0): task accuracy collapses
    jaxrl-llm train experiments/dpo.py:smoke    # a few steps (the test suite runs this)

Model: the tiny default (Qwen2 shape, 4M parameters, random init) and the shipped tokenizer. Task:
1-2 digit addition, one token per digit, answer reversed ("4 7 + 0 8 =" -> "5 5 0", i.e. 55);
greedy accuracy on 256 held-out problems, preference accuracy on 256 held-out pairs. SFT warm
start: 200 steps of 128 gold answers, lr 1e-3. Pairs from the task's train split: chosen = the
gold answer, rejected = the result off by 1-3 or with two digits swapped (train/pref_data.py).
DPO: sigmoid loss, beta 0.1, reference = the SFT model, 200 steps of 64 pairs, lr 1e-4, plus
nll_coef 1.0 x the token-mean NLL of the chosen answers (RPO, Pang et al. 2024; TRL rpo_alpha).
Without the NLL term (preset plain) chosen and rejected share all but one or two digit tokens, and
DPO widens their margin by pushing both down: the freed mass goes to tokens that are neither digits,
space nor EOS, and greedy answers become malformed (docs/algorithms.md, "Why DPO collapsed task
accuracy, and the remedy"; bench/dpo_collapse.py).
Expect: Measured on the 2-core CPU with other jobs sharing the cores (one seed): SFT 66.0%; DPO + NLL then
raises held-out preference accuracy 0% -> 99.6% and greedy task accuracy 66.0% -> 98.4% (the DPO stage run
from the SFT checkpoint, bench/dpo_collapse.py train rpo; 16 min). Preset plain: 97.7% and 66.0% -> 21.5%
(27 min for both stages).
"""

from jaxrl_llm.train.config import addition_warm_start, digit_addition_config, dpo_stage

PRESETS = ("smoke", "plain")


def get_config(preset=None):
    c = digit_addition_config(eval_every=50)
    c.stages = ("sft", "pref")
    c.sft = addition_warm_start()
    c.pref = dpo_stage("sigmoid", steps=200, batch_size=64, learning_rate=1e-4, max_prompt_len=12,
                       max_response_len=6, beta=0.1, nll_coef=1.0)
    if preset == "plain":  # DPO alone: preference accuracy rises, greedy task accuracy collapses
        c.pref.algo.nll_coef = 0.0
    if preset == "smoke":  # a few steps of each stage, on the 2-layer dummy model
        c.model.preset = "dummy"
        c.sft.steps, c.pref.steps, c.pref.batch_size, c.pref.data.num_pairs = 2, 2, 8, 64
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 1, 0
        c.pref.data.eval_pairs = 16
    return c
