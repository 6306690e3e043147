"""The models test-time search needs, on chain arithmetic: a policy (SFT), a process reward model and an
outcome reward model. `bench/search_scaling.py` trains this run (when it has not finished) and then compares
greedy, best-of-N (majority, ORM, PRM, PRM-weighted vote), PRM-guided beam search, DVTS and MCTS at matched
budgets of generated tokens on held-out problems.

    jaxrl-llm train experiments/search_chain.py            # the three models (or: python bench/search_scaling.py)
    jaxrl-llm train experiments/search_chain.py:smoke      # a few steps on the dummy model (tests)

Stages:
* sft: the tiny default model (4M parameters, random init) learns to write "12+7=19;19-3=16;16+9=25"
  (experiments/chain_sft.py's warm start, shortened so the policy still makes step mistakes);
* prm: a PRM (the policy's backbone + a per-token head) trained on the policy's own sampled solutions, each
  step labelled by the task's checker (`data.source="task"`); evaluated by held-out step accuracy and AUC;
* orm: a Bradley-Terry outcome reward model on the task's (gold, one-step-wrong) solution pairs.

Measured figures: docs/search.md ("Measured").
"""

from jaxrl_llm.train.config import base_config, prm_stage, reward_model_stage, sft_stage

PRESETS = ("smoke",)


def get_config(preset=None):
    c = base_config()
    c.task.name = "chain_arithmetic"
    c.eval.num_examples, c.eval.max_new_tokens, c.eval.every = 256, 24, 100
    c.stages = ("sft", "prm", "orm")
    c.sft = sft_stage(steps=200, batch_size=128, learning_rate=1e-3, max_prompt_len=12, max_response_len=24)
    c.sft.optimizer.update(dict(warmup_steps=30, schedule="cosine", total_steps=200))
    c.prm = prm_stage(steps=300, batch_size=64, learning_rate=3e-4, max_prompt_len=12, max_response_len=24)
    c.prm.data.source = "task"
    c.prm.data.num_examples, c.prm.data.samples_per_example = 1024, 4
    c.prm.data.sampling.max_new_tokens = 24
    c.orm = reward_model_stage(steps=300, batch_size=64, learning_rate=3e-4, max_prompt_len=12, max_response_len=24)
    c.log.every, c.checkpoint.every = 50, 100
    if preset == "smoke":  # a few steps of each on the 2-layer dummy model
        c.model.preset = "dummy"
        c.sft.steps, c.prm.steps, c.orm.steps = 4, 4, 4
        c.sft.optimizer.total_steps = 4
        # the dummy model after 4 SFT steps writes few solutions with steps: sample many, batch few
        c.prm.data.num_examples, c.prm.data.samples_per_example, c.prm.data.eval_rows = 64, 2, 32
        c.prm.batch_size, c.orm.batch_size = 2, 8
        c.orm.data.num_pairs, c.orm.data.eval_pairs = 64, 16
        c.eval.every, c.eval.num_examples, c.log.every, c.checkpoint.every = 2, 16, 2, 2
    return c
