"""Tasks with verifiable rewards: arithmetic (in-jit reward), Knights and Knaves, math answers.

See docs/tasks.md. `get_task(name, **kwargs)` builds a registered task.
"""

from jaxrl_llm.tasks.base import (Example, InJitRewardTask, RewardFn, RewardInputs, RewardOutput, Task, get_task,
                                  register_task, registered_tasks)

__all__ = ["Example", "InJitRewardTask", "RewardFn", "RewardInputs", "RewardOutput", "Task", "get_task", "register_task",
           "registered_tasks"]

# Built-in tasks register themselves on import.
from jaxrl_llm.tasks import arithmetic, knights_knaves, math_answers  # noqa: E402,F401
