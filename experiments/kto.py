"""KTO on 1-2 digit addition: an SFT warm start, then KTO on unpaired examples (gold = desirable, near miss = not).

    jaxrl-llm train experiments/kto.py          # default preset
    jaxrl-llm train experiments/kto.py:smoke    # a few steps (the test suite runs this)

Model: the tiny default (Qwen2 shape, 4M parameters, random init) and the shipped tokenizer. Task:
1-2 digit addition, one token per digit, answer reversed ("4 7 + 0 8 =" -> "5 5 0", i.e. 55);
greedy accuracy on 256 held-out problems; preference accuracy (beta * log-ratio of the desirable completion
above the undesirable one's) on 256 held-out pairs. SFT warm start: 200 steps of 128 gold answers, lr 1e-3.
Data: the pairs of experiments/dpo.py, unpaired (each gives the gold answer as a desirable example and the
near miss, off by 1-3 or two digits swapped, as an undesirable one), shuffled.
KTO (Ethayarajh et al. 2024; TRL's defaults): beta 0.1, desirable and undesirable weight 1, z0 from the
batch's completions shifted by one row; reference = the SFT model; 200 steps of 128 examples (as many
sequences as experiments/dpo.py's 64 pairs), lr 1e-4.
Expect: measured once (seed 0) on the 2-core AMD EPYC VM with other jobs sharing the cores, with
`jaxrl-llm train experiments/kto.py --set run_root=/tmp/kto_runs --set log.progress=False`: SFT 66.0%;
KTO raises held-out preference accuracy 0% -> 94.5% while greedy task accuracy ends at 56.2% (76.6 / 64.8 /
74.6% at steps 50 / 100 / 150: it oscillates; plain DPO, experiments/dpo.py:plain, falls to 21.5%); z0 was
0 at every logged step (the mismatched-pair KL estimate stayed below 0). 1314 s.
"""

from jaxrl_llm.train.config import addition_warm_start, digit_addition_config, kto_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = digit_addition_config(eval_every=50)
    c.stages = ("sft", "kto")
    c.sft = addition_warm_start()
    c.kto = kto_stage(steps=200, batch_size=128, learning_rate=1e-4, max_prompt_len=12, max_response_len=6,
                      beta=0.1)
    if preset == "smoke":  # a few steps of each stage, on the 2-layer dummy model
        c.model.preset = "dummy"
        c.sft.steps, c.kto.steps, c.kto.batch_size, c.kto.data.num_pairs = 2, 2, 8, 32
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 1, 0
        c.kto.data.eval_pairs = 8
    return c
