"""GRPO on chain arithmetic with process rewards: a trained PRM's step scores, or an implicit PRM (PRIME).

    jaxrl-llm train experiments/prm_grpo.py            # SFT, a PRM on the task's step grades, GRPO + the PRM
    jaxrl-llm train experiments/prm_grpo.py:outcome    # SFT, GRPO on the outcome reward only (the baseline)
    jaxrl-llm train experiments/prm_grpo.py:implicit   # SFT, GRPO + an implicit PRM trained online (PRIME)
    jaxrl-llm train experiments/prm_grpo.py:smoke      # a few steps (the test suite runs this)

Model: the 2-layer "dummy" preset (random init) and the shipped tokenizer. Task: `chain_arithmetic` with
small numbers (start 0..9, 2-3 "+"/"-" steps of 0..4: "7+3=10;10-4=6"; reward 1 for the right final
value). "sft" and "prm" are experiments/prm_chain.py's (SFT on the gold step-by-step solutions; a PRM on
the task's true grades of solutions sampled from that policy); every preset runs them, so the three rl
stages start from the same policy and see the same prompts and keys. "rl" is GRPO (group mean/std, no
KL) whose advantage is the outcome advantage + coef x the process advantage (docs/process_rewards.md):
DeepSeekMath's step-normalised PRM probabilities, or with :implicit PRIME's leave-one-out returns of
beta log(pi_phi / pi_ref), pi_phi updated every iteration on the verifier's outcome labels. The presets
differ only in rl.process_reward. Greedy accuracy (final value) on 256 held-out problems.
Expect (measured, one seed, 2 shared AMD EPYC cores; docs/process_rewards.md "Measured"): SFT greedy 0.324,
PRM held-out step AUC 0.734; after 100 GRPO iterations outcome only 0.219, + PRM 0.184, + implicit PRM
0.145 (no process reward beat the outcome-only baseline here); about 4-6 min per preset.
"""

from jaxrl_llm.train.config import base_config, grpo_stage, prm_stage, sft_stage

PRESETS = ("outcome", "implicit", "smoke")


def get_config(preset=None):
    c = base_config()
    c.model.preset = "dummy"
    c.task.name = "chain_arithmetic"
    c.task.kwargs.update(dict(max_start=9, max_operand=4, max_value=30, max_steps=3))
    c.eval.num_examples, c.eval.max_new_tokens, c.eval.every = 256, 24, 20
    c.stages = ("sft", "prm", "rl")  # in every preset: the rl stage then sees the same prompts and keys
    c.sft = sft_stage(steps=400, batch_size=64, learning_rate=3e-3, max_prompt_len=12, max_response_len=24)
    c.sft.optimizer.update(dict(warmup_steps=20, schedule="cosine", total_steps=400))
    c.prm = prm_stage(steps=800, batch_size=32, learning_rate=1e-3, max_prompt_len=12, max_response_len=24)
    c.prm.data.source, c.prm.data.num_examples, c.prm.data.eval_rows = "task", 2048, 256
    c.prm.data.sampling.max_new_tokens, c.prm.data.sampling.temperature = 24, 0.6
    c.rl = grpo_stage("grpo", iterations=100, prompts_per_iter=32, group_size=8, learning_rate=1e-4,
                      max_new_tokens=24, beta=0.0)
    c.rl.max_prompt_len = 12
    if preset in (None, "smoke"):
        c.rl.process_reward.update(dict(source="prm", prm_stage="prm", coef=0.1))
    elif preset == "implicit":
        c.rl.process_reward.update(dict(source="implicit", estimator="prime", coef=0.1, beta=0.05,
                                        learning_rate=1e-4))
    c.log.every, c.checkpoint.every = 10, 0
    if preset == "smoke":  # a few steps of each stage
        c.sft.steps, c.sft.optimizer.total_steps, c.sft.optimizer.warmup_steps = 4, 4, 0
        c.prm.steps, c.prm.batch_size, c.prm.data.num_examples, c.prm.data.eval_rows = 2, 4, 32, 16
        c.prm.data.samples_per_example = 4  # the untrained policy writes few usable solutions
        c.rl.iterations, c.rl.prompts_per_iter, c.rl.algo.group_size = 2, 4, 4
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 1, 2
    return c
