"""GRPO on chain arithmetic with process rewards: a trained PRM's step scores, or an implicit PRM (PRIME).

    jaxrl-llm train experiments/prm_grpo.py            # SFT, a PRM on the task's step grades, GRPO + the PRM
    jaxrl-llm train experiments/prm_grpo.py:outcome    # SFT, GRPO on the outcome reward only (the baseline)
    jaxrl-llm train experiments/prm_grpo.py:implicit   # SFT, GRPO + an implicit PRM trained online (PRIME)
    jaxrl-llm train experiments/prm_grpo.py:smoke      # a few steps (the test suite runs this)

Model: the tiny default (random init) and the shipped tokenizer. Task: `chain_arithmetic` (2-4 "+"/"-"
steps, "12+7=19;19-3=16"; reward 1 for the right final value). "sft" trains on the gold step-by-step
solutions; "prm" (default preset) samples solutions from that policy and learns the task's true step grades
(as experiments/prm_chain.py); "rl" is GRPO (group mean/std, no KL) whose advantage is the outcome
advantage + coef x the process advantage (docs/process_rewards.md): DeepSeekMath's step-normalised PRM
scores, or with :implicit PRIME's leave-one-out returns of beta log(pi_phi / pi_ref), pi_phi updated every
iteration on the verifier's outcome labels. The three presets differ only in rl.process_reward (and the
prm stage). Greedy accuracy (final value) on 256 held-out problems.
Expect: see docs/process_rewards.md, "Measured" (one seed each).
"""

from jaxrl_llm.train.config import base_config, grpo_stage, prm_stage, sft_stage

PRESETS = ("outcome", "implicit", "smoke")


def get_config(preset=None):
    c = base_config()
    c.task.name = "chain_arithmetic"
    c.eval.num_examples, c.eval.max_new_tokens, c.eval.every = 256, 24, 20
    c.stages = ("sft", "prm", "rl") if preset in (None, "smoke") else ("sft", "rl")
    c.sft = sft_stage(steps=300, batch_size=128, learning_rate=1e-3, max_prompt_len=12, max_response_len=24)
    c.sft.optimizer.update(dict(warmup_steps=30, schedule="cosine", total_steps=300))
    c.prm = prm_stage(steps=300, batch_size=32, learning_rate=3e-4, max_prompt_len=12, max_response_len=24)
    c.prm.data.source, c.prm.data.num_examples, c.prm.data.eval_rows = "task", 1024, 256
    c.prm.data.sampling.max_new_tokens = 24
    c.rl = grpo_stage("grpo", iterations=40, prompts_per_iter=32, group_size=8, learning_rate=1e-4,
                      max_new_tokens=24, beta=0.0)
    c.rl.max_prompt_len = 12
    if preset in (None, "smoke"):
        c.rl.process_reward.update(dict(source="prm", prm_stage="prm", coef=1.0))
    elif preset == "implicit":
        c.rl.process_reward.update(dict(source="implicit", estimator="prime", coef=1.0, beta=0.05,
                                        learning_rate=1e-4))
    c.log.every, c.checkpoint.every = 10, 100
    if preset == "smoke":  # a few steps of each stage on the 2-layer dummy model
        c.model.preset = "dummy"
        c.sft.steps, c.sft.optimizer.total_steps, c.sft.optimizer.warmup_steps = 4, 4, 0
        c.prm.steps, c.prm.batch_size, c.prm.data.num_examples, c.prm.data.eval_rows = 2, 4, 32, 16
        c.prm.data.samples_per_example = 4  # the random dummy policy writes few usable solutions
        c.rl.iterations, c.rl.prompts_per_iter, c.rl.algo.group_size = 2, 4, 4
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 1, 2
    return c
