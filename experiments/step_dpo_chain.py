"""Step-level DPO on chain arithmetic: MCTS with the SFT policy finds steps that lead to right answers more
often than their siblings; DPO trains the policy to prefer them (rStar-Math's step pairs, Step-DPO's loss).

    jaxrl-llm train experiments/step_dpo_chain.py          # SFT warm start, then step DPO
    jaxrl-llm train experiments/step_dpo_chain.py:smoke    # a few steps on the dummy model (tests)

Stages: sft (experiments/chain_sft.py's warm start, shortened so the policy still makes step mistakes), then
step_dpo: MCTS over 128 train problems (16 simulations of 4 expansions; leaf values from greedy rollouts
scored by the task's verifier), sibling steps with a Q gap >= 0.3 as pairs, sigmoid DPO (beta 0.1) against
the SFT policy. Greedy held-out accuracy (final value) before and after.

Measured (2-core AMD EPYC Zen 4, one seed, 5 min 14 s): SFT 57.4%; MCTS found a right solution for 92.2% of the
128 problems (26404 tokens) and 688 pairs (199 held out); after 100 DPO steps held-out preference accuracy 52.3%
(84% on training batches) and greedy accuracy fell to 22.7%: the task-accuracy collapse of DPO stages
(docs/search_training.md).
"""

from jaxrl_llm.train.config import base_config, prm_stage, sft_stage, step_dpo_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = base_config()
    c.task.name = "chain_arithmetic"
    c.eval.num_examples, c.eval.max_new_tokens, c.eval.every = 256, 24, 50
    c.stages = ("sft", "step")
    c.sft = sft_stage(steps=200, batch_size=128, learning_rate=1e-3, max_prompt_len=12, max_response_len=24)
    c.sft.optimizer.update(dict(warmup_steps=30, schedule="cosine", total_steps=200))
    c.step = step_dpo_stage(steps=100, batch_size=32, learning_rate=2e-5, beta=0.1, max_prompt_len=40,
                            max_response_len=8)
    c.step.search.update(dict(num_problems=128, eval_problems=32, simulations=16, expansions=4, step_tokens=8,
                              max_steps=4, min_q_gap=0.3))
    c.log.every, c.checkpoint.every = 25, 50
    if preset == "smoke":  # a few steps of each on the 2-layer dummy model
        c.model.preset = "dummy"
        c.sft.steps, c.step.steps = 4, 2
        c.sft.optimizer.total_steps = 4
        # The dummy policy solves nothing, so verifier rollouts are all 0: leaf values from a PRM instead
        # (a few steps on the task's step grades make its scores differ between steps).
        c.stages = ("sft", "prm", "step")
        c.prm = prm_stage(steps=4, batch_size=2, learning_rate=1e-3, max_prompt_len=12, max_response_len=24)
        c.prm.data.source = "task"
        c.prm.data.num_examples, c.prm.data.samples_per_example, c.prm.data.eval_rows = 64, 2, 32
        c.step.search.value = "prm"
        c.step.batch_size = 2
        c.step.search.update(dict(num_problems=8, eval_problems=8, simulations=3, expansions=2, step_tokens=4,
                                  max_steps=3, min_q_gap=1e-6))
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 1, 2
    return c
