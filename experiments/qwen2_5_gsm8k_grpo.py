"""GRPO on GSM8K with Qwen2.5-1.5B-Instruct: answers checked with math-verify, data files given by path.

    jaxrl-llm train experiments/qwen2_5_gsm8k_grpo.py --set model.path=/path/to/Qwen2.5-1.5B-Instruct \
        --set task.kwargs.train_path=/data/gsm8k/train.jsonl --set task.kwargs.test_path=/data/gsm8k/test.jsonl
    jaxrl-llm train experiments/qwen2_5_gsm8k_grpo.py:smoke --set task.kwargs.train_path=... (tests)

Weights and tokenizer come from a local Hugging Face directory (--set model.path=...); the GSM8K files are
the data set's own JSONL/parquet ({"question", "answer": "... #### 72"}). Nothing is downloaded; an empty
model.path or task.kwargs.*_path stops the run with a message naming the key.
Task: tasks/math_answers.py ("math"): chat prompt asking for the final answer in \\boxed{}; reward 1 when the
last \\boxed{} (or "#### N") equals the gold answer (math-verify), else 0. Eval: greedy accuracy on the
first 512 test problems every 50 iterations.
Algorithm: GRPO (DeepSeekMath), 64 prompts x 8 samples per iteration, k3 KL beta 0.04, lr 1e-6,
up to 512 new tokens at temperature 1.0, 2 minibatches per iteration.
Expect: Qwen2.5-1.5B-Instruct starts near its reported ~70% GSM8K accuracy (Qwen2.5 report; greedy, our
prompt: not measured here) and GRPO typically adds a few points. Time on an 8xH100 box: NOT MEASURED HERE
(developed on a CPU-only machine); a rough estimate is 20-40 s per iteration, 2-4 h for 300 iterations.
"""

import ml_collections as mc

from jaxrl_llm.train.config import base_config, grpo_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = base_config()
    c.model.preset, c.model.path = "", ""          # weights from --set model.path=... only
    c.model.dtype, c.model.remat = "bfloat16", "full"
    c.task.name = "math"
    c.task.kwargs = mc.ConfigDict(dict(train_path="", test_path=""))
    c.eval.num_examples, c.eval.max_new_tokens, c.eval.every = 512, 512, 50
    c.stages = ("rl",)
    c.rl = grpo_stage("grpo", iterations=300, prompts_per_iter=64, group_size=8, learning_rate=1e-6,
                      max_new_tokens=512, beta=0.04, num_minibatches=2, num_micro_batches=4)
    c.rl.max_prompt_len = 384
    c.rl.reward.in_jit = False
    c.checkpoint.every, c.log.every = 50, 1
    if preset == "smoke":  # the dummy model, the tiny tokenizer (prompts are cut to their last 32 tokens)
        c.model.preset, c.model.dtype, c.model.remat = "dummy", "float32", "none"
        c.rl.iterations, c.rl.prompts_per_iter, c.rl.algo.group_size = 2, 2, 4
        c.rl.algo.num_minibatches, c.rl.algo.num_micro_batches = 1, 1
        c.rl.max_prompt_len, c.rl.sampling.max_new_tokens = 32, 8
        c.eval.every, c.eval.num_examples, c.eval.max_new_tokens, c.checkpoint.every = 2, 4, 8, 0
    return c
