"""RL sharpens pass@1 more than pass@k at large k (Yue et al. 2025, arXiv 2504.13837): SFT, then GRPO.

    jaxrl-llm train experiments/pass_at_k.py          # default preset
    jaxrl-llm train experiments/pass_at_k.py:smoke    # a few steps (the test suite runs this)
    jaxrl-llm eval experiments/pass_at_k.py --stage sft --k 1,2,4,8,16,32,64 --batch-size 64  # eval-sft.json
    jaxrl-llm eval experiments/pass_at_k.py --k 1,2,4,8,16,32,64 --batch-size 64  # the final model: eval.json
    python bench/phenomena_plots.py passk runs/pass_at_k                               # docs/img/pass_at_k.png

Model: the tiny default (Qwen2 shape, 4M parameters, random init) and the shipped tokenizer. Task:
1-2 digit addition, one token per digit, answer reversed ("4 7 + 0 8 =" -> "5 5 0", i.e. 55), in-jit
exact-match reward 0/1, max_new_tokens 6. SFT warm start (decent, not perfect): 200 steps of 128 gold
answers, lr 1e-3. GRPO (the setting of experiments/grpo.py, 60 iterations): 32 prompts x 8 samples,
temperature 1, k3 KL to the SFT model (beta 0.04), lr 3e-4. pass@k: 64 samples per problem at
temperature 1 on the same 256 held-out problems for the SFT checkpoint (--stage sft) and the final one,
the unbiased estimator (eval/metrics.py). Results: docs/phenomena.md.
Expect: Measured on the 2-core CPU with other jobs sharing the cores (one seed; the run resumed from the SFT
checkpoint of length_bias.py:grpo, the same SFT): greedy 66.0% -> 85.5%; pass@1 45.8% -> 67.8% (+22.0 points),
pass@8 87.3% -> 94.5%, pass@64 98.0% -> 98.4% (+0.4): the gain shrinks with k, no crossing at k <= 64.
"""

from jaxrl_llm.train.config import addition_warm_start, digit_addition_config, grpo_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = digit_addition_config(eval_every=100)
    c.log.every = 5
    c.stages = ("sft", "rl")
    c.sft = addition_warm_start()
    c.rl = grpo_stage("grpo", iterations=60, prompts_per_iter=32, group_size=8, learning_rate=3e-4,
                      max_new_tokens=6, beta=0.04)
    c.rl.max_prompt_len = 12
    if preset == "smoke":  # a few steps of each stage, on the 2-layer dummy model
        c.model.preset = "dummy"
        c.sft.steps, c.rl.iterations, c.rl.prompts_per_iter = 2, 2, 4
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 1, 0
    return c
