"""Environments for multi-turn episodes: the model writes a turn, the environment answers, up to a budget.

    task = get_task("arithmetic", min_digits=2, max_digits=3, operators=("*",))
    env = make_env("tools", task, tools=("calculator",), max_turns=4)
    example = task.examples("train", 1, seed=0)[0]              # prompt "11*898=", answer "9878"
    state = env.reset(example)
    step = env.step(state, "<calculator>11*898</calculator>")  # Step(observation='9878', reward=0.0, done=False, ...)
    step = env.step(state, "9878")                              # Step(observation='', reward=1.0, done=True,
                                                                #      info={..., 'correct': True})
    env.system_prompt()       # the tools and the call format, for the system message
    env.demonstration(example, ["11*898"])   # chat messages of a correct episode, for SFT data

An `Environment` makes a per-episode state from an example (`reset`) and answers each model turn
(`step(state, turn)` -> `Step`: the observation to append as the environment's message, this turn's
reward, whether the episode is over, and `info` for metrics). The rollout driver calls `step_batch` once
per turn for all live episodes of a batch; `EnvironmentBase.step_batch` calls `step` for each, and an
environment may answer them together (`ToolEnv` runs the batch's tool calls in threads and scores its
final answers in one call of the task's reward).

`ToolEnv` ("tools") gives the model tools (`envs.tools`: a calculator, a Python sandbox) called in a
format from `envs.calls`. A turn with a tool call gets the tool's output as the observation; a turn
without one is the final answer, scored by the task. See `ToolEnv` for the rules and the knobs.

Environments are registered by name (`register_env`) and built with `make_env(name, task, **kwargs)`.

Layering: imports `jaxrl_llm.errors` and `jaxrl_llm.tasks` below it, nothing above.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from jaxrl_llm.envs.calls import CALL_FORMATS, ToolCall, format_tool_call, parse_tool_call
from jaxrl_llm.envs.tools import Tool, ToolResult, get_tool, run_many, truncate
from jaxrl_llm.errors import ConfigError, UserError
from jaxrl_llm.tasks.base import Example, RewardInputs, Task


@dataclasses.dataclass(frozen=True)
class Step:
    """The environment's answer to one model turn.

    observation: the text to append as the environment's message ("" when done).
    reward: this turn's reward (the episode's return is the sum over its turns).
    done: the episode is over; the driver stops sampling for it.
    info: what happened, for metrics (ToolEnv: "tool_call", "tool", "tool_error", "final", "correct",
        "out_of_turns", "components", "turns", "tool_calls", "tool_errors").
    """

    observation: str
    reward: float
    done: bool
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    """A multi-turn environment.

    name: registry name.
    reset(example) -> state: a fresh per-episode state object for one example.
    step(state, turn) -> Step: answers the model's turn (its text, end-of-turn token stripped); may mutate
        `state`. Calling it again after a Step with done=True is an error.
    step_batch(states, turns) -> list[Step]: `step` for each pair, in order (may run them concurrently).
    system_prompt() -> str | None: text for the system message (e.g. the tools and how to call them), or None.
    """

    name: str

    def reset(self, example: Example) -> Any: ...

    def step(self, state: Any, turn: str) -> Step: ...

    def step_batch(self, states: Sequence[Any], turns: Sequence[str]) -> list[Step]: ...

    def system_prompt(self) -> str | None: ...


class EnvironmentBase:
    """Defaults for an `Environment`: `step_batch` calls `step` one pair at a time, no system prompt."""

    name: str = "environment"

    def reset(self, example: Example) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.reset")

    def step(self, state: Any, turn: str) -> Step:
        raise NotImplementedError(f"{type(self).__name__}.step")

    def step_batch(self, states: Sequence[Any], turns: Sequence[str]) -> list[Step]:
        _check_batch(self, states, turns)
        return [self.step(s, t) for s, t in zip(states, turns)]

    def system_prompt(self) -> str | None:
        return None


def _check_batch(env: Any, states: Sequence[Any], turns: Sequence[str]) -> None:
    if len(states) != len(turns):
        raise ValueError(f"{type(env).__name__}.step_batch: {len(states)} states but {len(turns)} turns; give one "
                         "turn per live episode, in the same order")


# ----------------------------------------------------------------------------- registry

_ENVS: dict[str, Callable[..., Environment]] = {}


def register_env(name: str):
    """Decorator: make an environment factory (usually its class) available to `make_env(name, task, ...)`."""
    def deco(factory):
        if name in _ENVS:
            raise ValueError(f"environment {name!r} is registered twice")
        _ENVS[name] = factory
        return factory
    return deco


def check_env_name(name: str) -> None:
    """A ConfigError naming the nearest registered environment when `name` is not one."""
    import jaxrl_llm.envs  # noqa: F401  (registers the built-in environments)
    if name not in _ENVS:
        near = difflib.get_close_matches(str(name), _ENVS, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown environment {name!r}.{hint} Registered: {', '.join(sorted(_ENVS))} "
                          "(add one with @register_env)")


def make_env(name: str, task: Task, **kwargs) -> Environment:
    """Builds the registered environment `name` for `task`; an unknown name or a bad argument is a ConfigError."""
    check_env_name(name)
    factory = _ENVS[name]
    try:
        inspect.signature(factory).bind(task, **kwargs)
    except TypeError as e:
        params = [p for p in inspect.signature(factory).parameters if p not in ("self", "task", "args", "kwargs")]
        unknown = [k for k in kwargs if k not in params]
        near = difflib.get_close_matches(unknown[0], params, n=1) if unknown else []
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"environment {name!r}: {e}{hint}; it accepts {', '.join(params) or 'no arguments'}"
                          ) from None
    try:
        return factory(task, **kwargs)
    except UserError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"environment {name!r}: {e}") from e


def registered_envs() -> list[str]:
    import jaxrl_llm.envs  # noqa: F401
    return sorted(_ENVS)


# ----------------------------------------------------------------------------- tools

LAST_TURN_NOTE = "(Your next turn is your last: give your final answer, without a tool call.)"
_TOOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


@dataclasses.dataclass
class ToolEpisode:
    """The state of one `ToolEnv` episode; `ToolEnv.step` updates it.

    turns: model turns answered so far; tool_calls: turns that called a tool (malformed calls and the call
    that ran out of turns included); tool_errors: calls whose tool reported an error (malformed calls
    included); done: the episode is over.
    """

    example: Example
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    done: bool = False


@register_env("tools")
@dataclasses.dataclass(frozen=True)
class ToolEnv(EnvironmentBase):
    """The model may call tools before it answers; the answer is scored by the task.

    Each turn is read for a tool call (`envs.calls.parse_tool_call` in `call_format`):

    * a call, with turns left: the tool runs; the observation is its output truncated to
      `max_observation_chars`; the turn's reward is `call_reward`, or `error_reward` when the tool
      reported an error or the call was malformed (the observation then says "error: <why>"); not done.
    * no call: the turn is the final answer. Reward: the task's reward for that text alone (the
      environment sees text only, so the task's `RewardInputs` get lengths 0, finished True and
      max_new_tokens 0); done; info["correct"] = task.is_correct(turn, example).
    * a call on turn `max_turns` (no turn left for the answer after its output): done, reward 0,
      info["out_of_turns"] = True, correct False; the tool is not run.

    task: the `Task` that scores final answers (its `reward` and `is_correct`).
    tools: tool names (`envs.tools.get_tool`) or `Tool` objects (e.g. `PythonSandbox(timeout_s=2)`).
    tool_options: keyword arguments of named tools, by name, e.g. {"python": {"timeout_s": 2, "memory_mb": 256}}
        (how a config file sets a tool's limits).
    max_turns: model turns per episode, the final answer included (1: no tool call is possible).
    call_format: "tags" or "json" (`envs.calls.CALL_FORMATS`).
    call_reward, error_reward: the reward of a turn with a successful / failed tool call (e.g. 0.0 and -0.1).
    max_observation_chars: tool output longer than this is cut (ending in "...[truncated]").
    answer_on_last_turn: append LAST_TURN_NOTE to the observation before the last turn, telling the model
        its next turn must be the answer.
    max_workers: threads that run a batch's tool calls at once in `step_batch` (a sandbox call is a process).

    info of every Step: "tool_call" (the turn called a tool, malformed calls included), "tool" (the called
    tool's name; "" for none, or a malformed call naming no tool), "tool_error", "final" (the turn was the
    answer), "correct" (None before the end), "out_of_turns", "components" (the task's reward components
    of a final answer), and the episode's running "turns", "tool_calls", "tool_errors".
    """

    task: Task
    tools: tuple = ("calculator",)
    max_turns: int = 4
    call_format: str = "tags"
    call_reward: float = 0.0
    error_reward: float = 0.0
    max_observation_chars: int = 200
    answer_on_last_turn: bool = True
    max_workers: int = 8
    tool_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    name: str = "tools"
    _tools: Mapping[str, Tool] = dataclasses.field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self):
        where = "environment 'tools'"
        if not isinstance(self.task, Task):
            raise ConfigError(f"{where}: task={self.task!r} is not a Task (it needs examples, reward, extract_answer "
                              "and is_correct); build one with tasks.get_task(name, ...)")
        tools = (self.tools,) if isinstance(self.tools, str) or isinstance(self.tools, Tool) else self.tools
        try:
            tools = tuple(tools)
        except TypeError:
            raise ConfigError(f"{where}: tools={self.tools!r} must be a sequence of tool names or Tool objects"
                              ) from None
        if not tools:
            raise ConfigError(f"{where}: tools is empty; give at least one, e.g. tools=('calculator',)")
        options = self.tool_options
        if not isinstance(options, Mapping) or not all(isinstance(v, Mapping) for v in options.values()):
            raise ConfigError(f"{where}: tool_options={options!r} must map tool names to keyword arguments, e.g. "
                              "{'python': {'timeout_s': 2}}")
        unused = sorted(set(options) - {t for t in tools if isinstance(t, str)})
        if unused:
            raise ConfigError(f"{where}: tool_options names {unused}, which are not tool names in tools={tools!r}; "
                              "add the tool to tools or remove its options")
        resolved: dict[str, Tool] = {}
        for t in tools:
            if isinstance(t, str):
                try:
                    t = get_tool(t, **dict(options.get(t, {})))
                except UserError as e:
                    raise ConfigError(f"{where}: tools: {e}") from None
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"{where}: tool_options[{t!r}]={dict(options[t])!r}: {e}") from None
            if not isinstance(t, Tool):
                raise ConfigError(f"{where}: tools entry {t!r} is neither a tool name nor a Tool (an object with "
                                  "name, description, parameter and __call__(argument) -> ToolResult)")
            if not isinstance(t.name, str) or not _TOOL_NAME.fullmatch(t.name):
                raise ConfigError(f"{where}: tool name {t.name!r} must be a word (letters, digits, _ . -), since the "
                                  "model writes it in its calls")
            if t.name in resolved:
                raise ConfigError(f"{where}: tools names {t.name!r} twice; give each tool once")
            resolved[t.name] = t
        object.__setattr__(self, "tools", tools)
        object.__setattr__(self, "_tools", resolved)
        _check_int(where, "max_turns", self.max_turns, 1)
        if self.call_format not in CALL_FORMATS:
            near = difflib.get_close_matches(str(self.call_format), CALL_FORMATS, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{where}: call_format={self.call_format!r} is not a tool-call format.{hint} Choose "
                              f"one of {', '.join(map(repr, CALL_FORMATS))}")
        for knob in ("call_reward", "error_reward"):
            v = getattr(self, knob)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise ConfigError(f"{where}: {knob}={v!r} must be a finite number (the reward of a turn with a "
                                  f"{'successful' if knob == 'call_reward' else 'failed'} tool call, e.g. 0.0)")
        _check_int(where, "max_observation_chars", self.max_observation_chars, 1)
        if not isinstance(self.answer_on_last_turn, bool):
            raise ConfigError(f"{where}: answer_on_last_turn={self.answer_on_last_turn!r} must be True or False")
        _check_int(where, "max_workers", self.max_workers, 1)

    # ------------------------------------------------------------------ the protocol

    @property
    def tool_names(self) -> list[str]:
        return list(self._tools)

    def reset(self, example: Example) -> ToolEpisode:
        if not isinstance(example, Example):
            raise TypeError(f"ToolEnv.reset: expected a tasks.Example, got {type(example).__name__}")
        return ToolEpisode(example)

    def step(self, state: ToolEpisode, turn: str) -> Step:
        return self.step_batch([state], [turn])[0]

    def step_batch(self, states: Sequence[ToolEpisode], turns: Sequence[str]) -> list[Step]:
        """Answers every (state, turn) pair: their tool calls run together in `max_workers` threads, their
        final answers are scored in one call of the task's reward."""
        _check_batch(self, states, turns)
        for i, (s, t) in enumerate(zip(states, turns)):
            if not isinstance(s, ToolEpisode):
                raise TypeError(f"ToolEnv.step: state {i} is a {type(s).__name__}; pass what reset() returned")
            if s.done:
                raise ValueError(f"ToolEnv.step: episode {i} is over (a Step with done=True was returned); call "
                                 "reset(example) for a new one")
            if not isinstance(t, str):
                raise TypeError(f"ToolEnv.step: turn {i} is a {type(t).__name__}; pass the turn's decoded text")
        calls = [parse_tool_call(t, self.tool_names, self.call_format) for t in turns]
        for s, c in zip(states, calls):
            s.turns += 1
            s.tool_calls += c is not None
        finals = [i for i, c in enumerate(calls) if c is None]
        to_run = [i for i, c in enumerate(calls) if c is not None and states[i].turns < self.max_turns]
        steps: list[Step | None] = [None] * len(states)
        for i, (s, c) in enumerate(zip(states, calls)):
            if c is not None and s.turns >= self.max_turns:
                s.done = True
                steps[i] = Step("", 0.0, True, self._info(s, call=c, out_of_turns=True, correct=False))
        results = run_many(self._call, [calls[i] for i in to_run], self.max_workers)
        for i, r in zip(to_run, results):
            s = states[i]
            s.tool_errors += r.error
            observation = truncate(r.text, self.max_observation_chars)
            if self.answer_on_last_turn and s.turns == self.max_turns - 1:
                observation = f"{observation}\n{LAST_TURN_NOTE}" if observation else LAST_TURN_NOTE
            steps[i] = Step(observation, float(self.error_reward if r.error else self.call_reward), False,
                            self._info(s, call=calls[i], tool_error=r.error))
        if finals:
            out = self.task.reward(RewardInputs(
                [turns[i] for i in finals], [states[i].example for i in finals], np.zeros(len(finals), np.int32),
                np.ones(len(finals), bool), 0))
            scores = np.asarray(out.scores, np.float64)
            for k, i in enumerate(finals):
                s = states[i]
                s.done = True
                components = {name: float(np.asarray(v)[k]) for name, v in out.components.items()}
                steps[i] = Step("", float(scores[k]), True, self._info(
                    s, final=True, correct=bool(self.task.is_correct(turns[i], s.example)), components=components))
        return steps

    def _call(self, call: ToolCall) -> ToolResult:
        if call.error is not None:
            return ToolResult(f"error: {call.error}", True)
        return self._tools[call.name](call.argument)

    @staticmethod
    def _info(s: ToolEpisode, call: ToolCall | None = None, tool_error: bool = False, final: bool = False,
              correct=None, out_of_turns: bool = False, components: Mapping[str, float] | None = None
              ) -> dict[str, Any]:
        return {"tool_call": call is not None, "tool": call.name if call else "", "tool_error": bool(tool_error),
                "final": final, "correct": correct, "out_of_turns": out_of_turns, "components": dict(components or {}),
                "turns": s.turns, "tool_calls": s.tool_calls, "tool_errors": s.tool_errors}

    def system_prompt(self) -> str:
        """One paragraph: each tool (its argument's name too in the "json" format), the call format, the budget."""
        json_fmt = self.call_format == "json"
        described = "; ".join(f"{t.name}" + (f' (argument "{t.parameter}")' if json_fmt else "") + f": {t.description}"
                              for t in self._tools.values())
        budget = (f"You have {self.max_turns} turns in all, the answer included. " if self.max_turns > 1 else
                  "You have one turn: answer directly. ")
        return (f"You can use {'this tool' if len(self._tools) == 1 else 'these tools'}: {described}. "
                f"{CALL_FORMATS[self.call_format]} {budget}When you know the answer, reply with your final answer, "
                "without a tool call.")

    # ------------------------------------------------------------------ SFT data

    def demonstration(self, example: Example, calls: Sequence[str | tuple[str, str]],
                      allow_errors: bool = False) -> list[dict[str, str]]:
        """The chat messages of an episode that makes `calls` and then answers `example.answer`.

        calls: the arguments of the tool calls, in order; a string calls the first tool, a (tool name,
            argument) pair names the tool. The tools really run, and each "tool" message is the observation
            `step` gives (truncated, with the last-turn note where it applies), so the messages are what a
            rollout would show.
        Returns [{"role": "assistant", "content": <call>}, {"role": "tool", "content": <output>}, ...,
        {"role": "assistant", "content": example.answer}]. A ValueError when there are more calls than
        max_turns - 1, or (unless allow_errors) a call's tool reports an error.
        """
        if len(calls) > self.max_turns - 1:
            raise ValueError(f"ToolEnv.demonstration: {len(calls)} calls but max_turns={self.max_turns} leaves "
                             f"{self.max_turns - 1} turns for calls before the answer")
        state = self.reset(example)
        messages: list[dict[str, str]] = []
        for c in calls:
            name, argument = (self.tool_names[0], c) if isinstance(c, str) else c
            if name not in self._tools:
                raise ValueError(f"ToolEnv.demonstration: unknown tool {name!r}; the tools are "
                                 f"{', '.join(self.tool_names)}")
            text = format_tool_call(name, argument, self.call_format, self._tools[name].parameter)
            step = self.step(state, text)
            if step.info["tool_error"] and not allow_errors:
                raise ValueError(f"ToolEnv.demonstration: the call {text!r} failed: {step.observation!r}")
            messages += [{"role": "assistant", "content": text}, {"role": "tool", "content": step.observation}]
        self.step(state, example.answer)
        messages.append({"role": "assistant", "content": example.answer})
        return messages


def _check_int(where: str, knob: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{where}: {knob}={value!r} must be an integer >= {minimum}")


__all__ = ["EnvironmentBase", "Environment", "LAST_TURN_NOTE", "Step", "ToolEnv", "ToolEpisode", "make_env",
           "register_env", "registered_envs"]
