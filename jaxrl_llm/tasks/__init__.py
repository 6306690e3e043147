"""Tasks with verifiable rewards: arithmetic (in-jit reward), chain arithmetic (graded steps), Knights and
Knaves, math answers.

See docs/tasks.md. `get_task(name, **kwargs)` builds a registered task. Abilities beyond `Task` are
protocols checked with isinstance: `InJitRewardTask` (reward inside jit), `PreferencePairTask`
(generated preference pairs), `SteppedTask` (completions written as separated steps),
`StepGradedTask` (each step checked against the ground truth) and `ToolCallTask` (the tool calls
that solve an example, for demonstrations).
"""

# Importing the built-in task modules registers them.
from jaxrl_llm.tasks import arithmetic, chain_arithmetic, knights_knaves, math_answers  # noqa: F401
from jaxrl_llm.tasks.arithmetic import wrong_arithmetic_answer
from jaxrl_llm.tasks.base import (Example, InJitRewardTask, JaxRewardFn, PreferencePairTask, RewardFn, RewardInputs,
                                  RewardOutput, StepGradedTask, SteppedTask, Task, get_task, register_task,
                                  registered_tasks, split_on_separator, ToolCallTask)
from jaxrl_llm.tasks.knights_knaves import KK_REASONING
from jaxrl_llm.tasks.wrong_answers import wrong_number

__all__ = ["KK_REASONING", "Example", "InJitRewardTask", "JaxRewardFn", "PreferencePairTask", "RewardFn",
           "RewardInputs", "RewardOutput", "StepGradedTask", "SteppedTask", "Task", "get_task", "register_task",
           "registered_tasks", "split_on_separator", "ToolCallTask", "wrong_arithmetic_answer",
           "wrong_number"]
