"""GRPO on Knights and Knaves with Qwen2.5-0.5B/1.5B-Instruct and the Logic-RL reward, as in Logic-RL.

    jaxrl-llm train experiments/qwen2_5_kk_grpo.py --set model.path=/path/to/Qwen2.5-1.5B-Instruct
    jaxrl-llm train experiments/qwen2_5_kk_grpo.py --set model.path=/path/to/Qwen2.5-0.5B-Instruct
    jaxrl-llm train experiments/qwen2_5_kk_grpo.py:smoke   # dummy model + tiny tokenizer, a few steps (tests)

Weights and tokenizer (its chat template) come from a local Hugging Face directory given with --set
model.path=...; nothing is downloaded, and an empty model.path stops the run with a message naming it.
Task: K&K puzzles (Xie et al. 2024) with 3-7 people, depth 2, width 2, Logic-RL's system prompt as chat
messages; reward format +1/-1 plus answer +2 / -1.5 / -2 (tasks/knights_knaves.py). Eval: greedy accuracy
on 256 held-out puzzles (3-7 people) every 50 iterations.
Algorithm: Logic-RL's main_grpo.sh (arXiv 2502.14768, verl): GRPO, 8 prompts x 16 samples per iteration,
k3 KL in the loss with beta 0.001, one update per iteration, up to 2048 new tokens at temperature 1.0.
Departure: lr 1e-6 (Logic-RL: 3e-7 for 7B), not tuned for 0.5B/1.5B.
Published: Logic-RL's Qwen2.5-7B-Instruct-1M reached accuracy .99/.99/.94/.92/.91/.80/.67 on puzzles with
2..8 people; 0.5B/1.5B models reach less (no published figure reproduced here).
Time on an 8xH100 box: NOT MEASURED HERE (developed on a CPU-only machine). Rough estimate for 1.5B,
bfloat16 compute, 8-way data parallel: 1-2 min per iteration while responses are long (rollout-bound),
so 10-20 h for the 600 iterations; 0.5B about a third of that. Measure before planning around it.
"""

import ml_collections as mc

from jaxrl_llm.train.config import base_config, grpo_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = base_config()
    c.model.preset, c.model.path = "", ""          # weights from --set model.path=... only
    c.model.dtype, c.model.remat = "bfloat16", "full"
    c.task.name = "knights_knaves"
    c.task.kwargs = mc.ConfigDict(dict(n_people=(3, 4, 5, 6, 7), chat=True))
    c.eval.num_examples, c.eval.max_new_tokens, c.eval.every = 256, 2048, 50
    c.stages = ("rl",)
    c.rl = grpo_stage("grpo", iterations=600, prompts_per_iter=8, group_size=16, learning_rate=1e-6,
                      max_new_tokens=2048, beta=0.001, num_micro_batches=8)
    c.rl.max_prompt_len = 512
    c.rl.reward.in_jit = False
    c.checkpoint.every, c.log.every = 50, 1
    if preset == "smoke":  # the dummy model, the tiny tokenizer (prompts are cut to their last 32 tokens)
        c.model.preset, c.model.dtype, c.model.remat = "dummy", "float32", "none"
        c.task.kwargs.n_people = (3,)
        c.rl.iterations, c.rl.prompts_per_iter, c.rl.algo.group_size = 2, 2, 4
        c.rl.algo.num_micro_batches, c.rl.max_prompt_len, c.rl.sampling.max_new_tokens = 1, 32, 8
        c.eval.every, c.eval.num_examples, c.eval.max_new_tokens, c.checkpoint.every = 2, 4, 8, 0
    return c
