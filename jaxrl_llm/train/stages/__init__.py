"""Stage kinds: the one registry (kind -> `StageKind`) and the config helpers experiment files use.

    from jaxrl_llm.train.stages import STAGE_KINDS, grpo_stage, sft_stage
    c.rl = grpo_stage("dapo", iterations=100)            # a config section of kind "grpo"
    STAGE_KINDS["grpo"].stage                            # its Stage class; .memory, .algo, .helper, ...

Each kind lives in one module here: its Stage subclass, its config helper, how its algorithm config is
resolved from a section (`algo`: one source of truth for what it computes, read by the stage and by the
memory planner) and its memory terms. Adding a kind is a module here plus its line below.
"""

from jaxrl_llm.train.stage import StageKind
from jaxrl_llm.train.stages import (expert_iteration, grpo, kto, lessons, online_dpo, ppo, preference, prm, sft,
                                   step_dpo)

STAGE_KINDS: dict[str, StageKind] = {k.kind: k for k in (sft.KIND, grpo.KIND, ppo.KIND, preference.DPO_KIND,
                                                         preference.REWARD_MODEL_KIND, prm.KIND,
                                                         expert_iteration.KIND, step_dpo.KIND,
                                                         lessons.KIND, online_dpo.KIND, kto.KIND)}

# The config helpers (also importable from jaxrl_llm.train.config, as experiment files do).
sft_stage, addition_warm_start = sft.sft_stage, sft.addition_warm_start
grpo_stage, ppo_stage = grpo.grpo_stage, ppo.ppo_stage
dpo_stage, reward_model_stage = preference.dpo_stage, preference.reward_model_stage
preference_data = preference.preference_data
expert_iteration_stage = expert_iteration.expert_iteration_stage
prm_stage, prm_data = prm.prm_stage, prm.prm_data
step_dpo_stage = step_dpo.step_dpo_stage
lessons_stage = lessons.lessons_stage
online_dpo_stage = online_dpo.online_dpo_stage
kto_stage, kto_data = kto.kto_stage, kto.kto_data


def stage_kind(kind: str, where: str = "config") -> StageKind:
    """The registered kind, or a ConfigError naming the nearest one."""
    from jaxrl_llm.train.config import ConfigError, nearest
    if kind not in STAGE_KINDS:
        raise ConfigError(f"{where}.kind={kind!r}{nearest(str(kind), STAGE_KINDS)}; expected one of "
                          f"{tuple(STAGE_KINDS)}")
    return STAGE_KINDS[kind]


__all__ = ["STAGE_KINDS", "StageKind", "addition_warm_start", "dpo_stage", "expert_iteration_stage", "grpo_stage",
           "ppo_stage", "preference_data", "prm_data", "prm_stage", "reward_model_stage", "sft_stage", "stage_kind",
           "step_dpo_stage", "lessons_stage", "online_dpo_stage", "kto_stage", "kto_data"]
