"""The experiment the multi-process tests run: a few GRPO iterations (host rewards: each process scores its
own rollouts) then a few DPO steps, on the dummy model, with checkpoints every 2 steps and an evaluation at
the start and end of each stage. Mesh: batch over data x fsdp, parameters over fsdp (2).

    python -m jaxrl_llm.cli train tests/multihost_exp.py --coordinator localhost:PORT --num-processes 2 \\
        --process-id I --set run_root=/tmp/runs          # each of 2 processes with 2 CPU devices
"""

import dataclasses

import ml_collections as mc
import numpy as np

from jaxrl_llm.tasks import RewardOutput, register_task, registered_tasks
from jaxrl_llm.tasks.arithmetic import ArithmeticTask
from jaxrl_llm.train.config import base_config, dpo_stage, grpo_stage


@dataclasses.dataclass(frozen=True)
class LengthRewardArithmetic(ArithmeticTask):
    """Arithmetic prompts scored in Python by how close the completion's length is to 8 characters, so a
    random model's rollouts already get different rewards (non-zero advantages)."""

    def reward(self, inputs) -> RewardOutput:
        scores = np.array([-abs(len(t) - 8) / 8 for t in inputs.completions], np.float32)
        return RewardOutput(scores=scores, components={"length": scores},
                            correct=np.array([self.is_correct(t, e) for t, e in zip(inputs.completions,
                                                                                  inputs.examples)]))


if "arithmetic_length" not in registered_tasks():
    register_task("arithmetic_length")(LengthRewardArithmetic)


def get_config(preset=None):
    c = base_config()
    c.name = "multihost"
    c.model.preset = "dummy"  # what is compared is the processes' arithmetic, not what the model learns
    c.mesh.axes = mc.ConfigDict({"data": -1, "fsdp": 2, "tensor": 1})
    c.task.name = "arithmetic_length"
    c.task.kwargs = mc.ConfigDict(dict(min_digits=1, max_digits=2, operators=("+",), spaced=True,
                                       pad_operands=True, reverse_answer=True))
    c.stages = ("rl", "pref")
    c.rl = grpo_stage("grpo", iterations=4, prompts_per_iter=8, group_size=4, learning_rate=3e-4,
                      max_new_tokens=6, beta=0.04)
    c.rl.max_prompt_len = 12
    c.rl.reward.in_jit = False
    c.pref = dpo_stage("sigmoid", steps=3, batch_size=8, learning_rate=1e-4, max_prompt_len=12,
                       max_response_len=6, beta=0.1)
    c.pref.data.num_pairs, c.pref.data.eval_pairs = 64, 16
    c.eval.every, c.eval.num_examples, c.eval.max_new_tokens = 100, 16, 6
    c.log.every, c.log.progress, c.log.tensorboard, c.log.samples_every = 1, False, False, 2
    c.checkpoint.every = 2
    return c
