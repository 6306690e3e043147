"""A tiny model learns to multiply with a calculator: SFT on tool demonstrations, then GRPO over episodes.

    jaxrl-llm train experiments/tool_calculator.py          # SFT warm start, then GRPO with the tool
    jaxrl-llm train experiments/tool_calculator.py:smoke    # a few steps (tests)

Model: the tiny default (random init) and the shipped tokenizer. Task: 2-3 digit multiplication
("123*45=" -> "5535"), which a 4M-parameter model cannot do in its head. Environment: "tools" with
the calculator; an episode is a call turn ("<calculator>123*45</calculator>"), the calculator's
output as an observation (context only: attended, never trained), then the answer turn. The SFT
stage trains on demonstrations (the task's calls run through the environment); GRPO trains on
whole episodes with the final answer's exact-match reward. Held-out evaluation reports the plain
single-turn accuracy (`accuracy`: without the tool) and the greedy episodes' (`eval/env/accuracy`).

Measured figures (machine, seeds): docs/agents.md "Measured".
"""

import ml_collections as mc

from jaxrl_llm.train.config import base_config, grpo_stage, sft_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = base_config()
    c.task.name = "arithmetic"
    c.task.kwargs = mc.ConfigDict(dict(min_digits=2, max_digits=3, operators=("*",)))
    c.eval.num_examples, c.eval.max_new_tokens = 128, 8
    env = mc.ConfigDict(dict(name="tools", obs_tokens=8, max_turn_tokens=32, system_prompt=False,
                             kwargs=mc.ConfigDict(dict(tools=("calculator",), max_turns=2,
                                                       answer_on_last_turn=False))))
    c.stages = ("sft", "rl")
    c.sft = sft_stage(steps=200, batch_size=64, learning_rate=1e-3, max_prompt_len=8, max_response_len=48)
    c.sft.optimizer.warmup_steps = 20
    c.sft.env.update(env)
    c.rl = grpo_stage("grpo", iterations=60, prompts_per_iter=32, group_size=8, learning_rate=1e-4,
                      max_new_tokens=48, beta=0.0)
    c.rl.max_prompt_len = 8
    c.rl.env.update(env)
    c.eval.every, c.log.every, c.checkpoint.every = 20, 10, 50
    if preset == "smoke":  # a few steps of each stage, on the 2-layer dummy model
        c.model.preset = "dummy"
        c.sft.steps, c.rl.iterations, c.rl.prompts_per_iter = 4, 2, 4
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 8, 1, 2
    return c
