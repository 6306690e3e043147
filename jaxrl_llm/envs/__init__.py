"""Environments for multi-turn rollouts, and the tools a model may call in them (host side).

    from jaxrl_llm.envs import make_env
    from jaxrl_llm.tasks import get_task

    task = get_task("arithmetic", min_digits=2, max_digits=3, operators=("*",))
    env = make_env("tools", task, tools=("calculator",), max_turns=4, call_format="tags")
    system = env.system_prompt()                  # the tools and how to call them
    states = [env.reset(e) for e in task.examples("train", 8, seed=0)]
    steps = env.step_batch(states, turns)         # each turn: the model's text; Step(observation, reward, done, info)

The rollout driver appends each live episode's observation as the environment's message, samples the next
turn, and stops an episode at done. `env.demonstration(example, calls)` writes the chat messages of a
correct episode (tools really run) for SFT data.

* base.py: `Step`, the `Environment` protocol, `EnvironmentBase`, the registry (`register_env`, `make_env`,
  `registered_envs`), `ToolEnv` ("tools").
* tools.py: `Tool`, `ToolResult`, `Calculator` ("calculator"), `PythonSandbox` ("python"; its limits and
  what it is not), the tool registry, `run_many`.
* calls.py: tool-call formats ("tags", "json"): `parse_tool_call`, `format_tool_call`, `CALL_FORMATS`.
* rollout.py: the episode driver (`run_episodes`) on the jitted turn / observe functions of
  `rollout.multiturn`, and `ObservationFormat` (how an observation is rendered after a model turn).

See docs/agents.md. Layering: imports `errors`, `tokenizer`, `rollout` and `tasks` below it; nothing above.
"""

from jaxrl_llm.envs.base import (LAST_TURN_NOTE, Environment, EnvironmentBase, Step, ToolEnv, ToolEpisode, make_env,
                                 register_env, registered_envs)
from jaxrl_llm.envs.calls import (CALL_FORMATS, JSON_FORMAT, TAGS_FORMAT, ToolCall, check_call_format,
                                  format_tool_call, parse_tool_call)
from jaxrl_llm.envs.tools import (TRUNCATION_MARK, Calculator, PythonSandbox, Tool, ToolResult, get_tool,
                                  register_tool, registered_tools, run_many, truncate)

__all__ = ["CALL_FORMATS", "JSON_FORMAT", "LAST_TURN_NOTE", "TAGS_FORMAT", "TRUNCATION_MARK", "Calculator",
           "Environment", "EnvironmentBase", "PythonSandbox", "Step", "Tool", "ToolCall", "ToolEnv", "ToolEpisode",
           "ToolResult", "check_call_format", "format_tool_call", "get_tool", "make_env", "parse_tool_call",
           "register_env", "register_tool", "registered_envs", "registered_tools", "run_many", "truncate"]
