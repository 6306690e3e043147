"""Tasks with verifiable rewards: arithmetic (in-jit reward), Knights and Knaves, math answers.

See docs/tasks.md. `get_task(name, **kwargs)` builds a registered task. Abilities beyond `Task` are
protocols checked with isinstance: `InJitRewardTask` (reward inside jit), `PreferencePairTask`
(generated preference pairs).
"""

# Importing the built-in task modules registers them.
from jaxrl_llm.tasks import arithmetic, knights_knaves, math_answers  # noqa: F401
from jaxrl_llm.tasks.arithmetic import wrong_arithmetic_answer
from jaxrl_llm.tasks.base import (Example, InJitRewardTask, JaxRewardFn, PreferencePairTask, RewardFn, RewardInputs,
                                  RewardOutput, Task, get_task, register_task, registered_tasks)
from jaxrl_llm.tasks.knights_knaves import KK_REASONING
from jaxrl_llm.tasks.wrong_answers import wrong_number

__all__ = ["KK_REASONING", "Example", "InJitRewardTask", "JaxRewardFn", "PreferencePairTask", "RewardFn",
           "RewardInputs", "RewardOutput", "Task", "get_task", "register_task", "registered_tasks",
           "wrong_arithmetic_answer", "wrong_number"]
