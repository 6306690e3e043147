"""What a task is: examples (prompt + gold answer) and a verifier that scores completions.

    task = get_task("arithmetic", digits=2)
    examples = task.examples("train", 1000, seed=0)      # generated tasks; file tasks load theirs
    inputs = RewardInputs(completions, examples, lengths, finished, max_new_tokens)
    out = task.reward(inputs)                            # RewardOutput: scores [B], components, correct [B]

Rewards computed on the host take a `RewardInputs` (decoded completions, the
examples they answer, token lengths, whether each emitted EOS) and return
float32 scores [B]; `rewards.combine` builds weighted sums of such functions
and `rewards.HostRewardRunner` calls them in batches with a time limit.

A task may have abilities beyond `Task`, each an explicit protocol that
callers test with `isinstance` rather than by the task's name:

* `InJitRewardTask` (arithmetic): its reward also runs inside jit, so a
  whole RL iteration can stay on the device;
* `PreferencePairTask` (arithmetic, knights_knaves, math with integer
  answers, chain_arithmetic): it makes a (chosen, rejected) completion pair
  from one of its examples, for DPO-family and reward-model stages;
* `SteppedTask` (chain_arithmetic, knights_knaves, math): its completions are
  written as steps separated by `step_separator`, and `split_steps` cuts one
  into them, for process reward models and step-level search;
* `StepGradedTask` (chain_arithmetic): a `SteppedTask` that also knows which
  steps are right (`grade_steps`), the ground truth a process reward model is
  measured against.

Layering: this package imports only `jaxrl_llm.errors`, `jaxrl_llm.records` (file reading) and
`jaxrl_llm.tokenizer` below it, never data/, rewards/, eval/ or train/.
"""

from __future__ import annotations

import dataclasses
import inspect
import random
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from jaxrl_llm.errors import TaskError, UserError

Prompt = str | Sequence[Mapping[str, str]]  # plain text, or chat messages [{"role", "content"}, ...]


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt and what a correct completion must contain.

    prompt: text, or chat messages (the tokenizer's chat template renders them).
    answer: the gold answer in the task's canonical text form.
    meta: task-specific data (e.g. the K&K solution, the number of people, the operands).
    """

    prompt: Prompt
    answer: str
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {"prompt": self.prompt if isinstance(self.prompt, str) else [dict(m) for m in self.prompt],
                "answer": self.answer, "meta": dict(self.meta)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Example":
        return cls(prompt=d["prompt"], answer=d["answer"], meta=d.get("meta", {}))


@dataclasses.dataclass(frozen=True)
class RewardInputs:
    """Everything a host-side reward function may look at, for B completions.

    completions: decoded completion texts (EOS stripped).
    examples: the example each completion answers (len B; repeated for n samples per prompt).
    lengths: int32 [B] completion lengths in tokens (EOS included when emitted).
    finished: bool [B], the completion ended with EOS (False: cut at max_new_tokens).
    max_new_tokens: the sampler's completion budget.
    """

    completions: Sequence[str]
    examples: Sequence[Example]
    lengths: np.ndarray
    finished: np.ndarray
    max_new_tokens: int

    def __post_init__(self):
        b = len(self.completions)
        for name in ("examples", "lengths", "finished"):
            if len(getattr(self, name)) != b:
                raise ValueError(f"RewardInputs.{name} has {len(getattr(self, name))} entries; "
                                 f"expected one per completion ({b})")

    def __len__(self) -> int:
        return len(self.completions)

    def subset(self, idx: Sequence[int]) -> "RewardInputs":
        idx = list(idx)
        return RewardInputs([self.completions[i] for i in idx], [self.examples[i] for i in idx],
                            np.asarray(self.lengths)[idx], np.asarray(self.finished)[idx], self.max_new_tokens)


# A reward function: RewardInputs -> float [B] (array-like). Written in a few lines in an experiment file.
RewardFn = Callable[[RewardInputs], Any]


@dataclasses.dataclass(frozen=True)
class RewardOutput:
    """scores: float32 [B] total reward; components: name -> float32 [B] (each term before weighting);
    correct: bool [B] task success (for accuracy), or None when the reward has no notion of it;
    errors / timeouts: how many calls of each component failed (their outcome is in the scores)."""

    scores: np.ndarray
    components: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    correct: np.ndarray | None = None
    errors: Mapping[str, int] = dataclasses.field(default_factory=dict)
    timeouts: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        """Scalar summaries for logging: mean total, mean of each component, accuracy, error counts."""
        out = {f"{prefix}/mean": float(np.mean(self.scores)) if len(self.scores) else 0.0}
        for k, v in self.components.items():
            out[f"{prefix}/{k}"] = float(np.mean(v)) if len(v) else 0.0
        if self.correct is not None:
            out["accuracy"] = float(np.mean(self.correct)) if len(self.correct) else 0.0
        for k, v in self.errors.items():
            out[f"{prefix}/errors/{k}"] = float(v)
        for k, v in self.timeouts.items():
            out[f"{prefix}/timeouts/{k}"] = float(v)
        return out


@runtime_checkable
class Task(Protocol):
    """A task: where examples come from, how a completion is scored, what counts as correct.

    name: registry name.
    examples(split, num, seed): deterministic for (split, num, seed); file-backed tasks ignore `num`
        beyond truncation and `seed` beyond shuffling.
    reward(inputs) -> RewardOutput: the training reward (may combine format and answer terms).
    extract_answer(completion) -> str | None: the final answer in canonical form (None: unparseable),
        used by maj@k.
    is_correct(completion, example) -> bool: used by pass@k and accuracy.
    """

    name: str

    def examples(self, split: str, num: int, seed: int) -> list[Example]: ...

    def reward(self, inputs: RewardInputs) -> RewardOutput: ...

    def extract_answer(self, completion: str) -> str | None: ...

    def is_correct(self, completion: str, example: Example) -> bool: ...


# A jittable reward: (completion_tokens int [B, N], completion_mask [B, N], targets [B, L], target_lengths
# int32 [B]) -> float32 rewards [B]; targets and lengths come from the task's `encode_targets`.
JaxRewardFn = Callable[[Any, Any, Any, Any], Any]


@runtime_checkable
class InJitRewardTask(Protocol):
    """Ability: the task's reward can also run inside jit, on token ids, with no host round trip.

    correct_score: the reward of a correct completion; a completion counts as correct (for accuracy)
        when its in-jit reward is >= correct_score.
    encode_targets(examples) -> (targets, lengths): host arrays, one row per example, that the jitted
        reward compares completions with (arithmetic: the answer's bytes [B, L] padded with -1, lengths [B]).
    jax_reward(tokenizer, vocab_size, eos_ids) -> JaxRewardFn: built once per run; vocab_size is the
        model's (padded) vocabulary, eos_ids the tokens that end a completion (None: the tokenizer's).
        It must score a completion exactly as the task's host `reward` does.

    GRPO and PPO stages use the in-jit reward when the task has this ability and `reward.in_jit` is set,
    else the host reward. A task whose configuration has no in-jit reward (arithmetic with a free-form
    answer_format) says so with `in_jit_reward = False` (`has_in_jit_reward`).
    """

    correct_score: float

    def encode_targets(self, examples: Sequence[Example]) -> tuple[np.ndarray, np.ndarray]: ...

    def jax_reward(self, tokenizer, vocab_size: int | None = None,
                   eos_ids: Sequence[int] | None = None) -> JaxRewardFn: ...


def has_in_jit_reward(task: Any) -> bool:
    """The task has the in-jit reward ability, and its configuration uses it (`in_jit_reward`, default True)."""
    return isinstance(task, InJitRewardTask) and bool(getattr(task, "in_jit_reward", True))


@runtime_checkable
class PreferencePairTask(Protocol):
    """Ability: the task can make a (chosen, rejected) pair from one of its examples.

    preference_pair(example, rng) -> (chosen, rejected): completion texts as the policy would write them
        after the example's prompt (for a chat prompt, the assistant message's content); chosen is
        correct, rejected is a plausible wrong completion in the same format. Deterministic in `rng`
        (a `random.Random` the caller seeds per example); raises ValueError naming the example when
        this example cannot make a pair.

    `train/pref_data.py` builds generated preference data (`data.source="task"`) from this; a task
    without it needs pairs from a file (`data.source="jsonl"`).
    """

    def preference_pair(self, example: Example, rng: random.Random) -> tuple[str, str]: ...


@runtime_checkable
class SteppedTask(Protocol):
    """Ability: the task's completions are written as steps, one after another, separated by a string.

    step_separator: the text between two steps (chain_arithmetic ";", knights_knaves and math "\\n"); a task
        knob, so the format the policy is taught and the one a process reward model reads are the same.
    split_steps(completion) -> list[str]: the completion's steps, each stripped of surrounding whitespace
        (`split_on_separator` is the shared rule).

    Process reward models score a completion step by step and step-level search extends a partial
    solution one step at a time; both cut completions with `split_steps` and join steps with
    `step_separator`. A task with this ability alone has no per-step ground truth (knights_knaves, math).
    """

    step_separator: str

    def split_steps(self, completion: str) -> list[str]: ...


@runtime_checkable
class StepGradedTask(SteppedTask, Protocol):
    """Ability: a `SteppedTask` that can tell, for each step of a completion, whether the step is right.

    grade_steps(completion, example) -> list[bool]: one flag per step of `split_steps(completion)`; what
        makes a step right is the task's (chain_arithmetic: "x op y = z" with x the true running value, op
        and y the prompt's operation, z the true result; a step beyond the last operation is wrong).

    The ground truth that a process reward model's step scores, and a search's step choices, are
    measured against (e.g. the index of the first wrong step).
    """

    def grade_steps(self, completion: str, example: Example) -> list[bool]: ...


@runtime_checkable
class ToolCallTask(Protocol):
    """Ability: the task can say which tool calls solve an example.

    tool_calls(example) -> list of (tool name, argument) pairs, in order (e.g. arithmetic: [("calculator",
        "123*45")]). An SFT stage with an environment (`env.name`) runs them through the environment to build
        demonstrations: the calls, the tools' outputs, then the gold answer.
    """

    def tool_calls(self, example: Example) -> list[tuple[str, str]]: ...


def split_on_separator(completion: str, separator: str, drop_empty: bool = False) -> list[str]:
    """The pieces of `completion` between separators, each stripped of surrounding whitespace.

    The split is on the separator with its surrounding whitespace removed ("; " splits on ";"), since the
    pieces are stripped anyway: a model that writes "a;b" where the format says "a; b" still gives two
    steps. A separator of whitespace only splits on its line breaks (" \\n" on "\\n"), or on itself. A
    trailing empty piece (the completion ends with a separator, or is empty) is dropped; with drop_empty,
    every empty piece is (blank lines in free text are not steps); without it, an empty piece inside the
    completion stays, a step that is wrong.
    """
    if not separator:
        raise ValueError("step separator is empty; give the text that stands between two steps, e.g. ';' or '\\n'")
    pieces = [p.strip() for p in completion.split(separator.strip() or separator.strip(" \t") or separator)]
    if drop_empty:
        return [p for p in pieces if p]
    return pieces[:-1] if pieces and not pieces[-1] else pieces


_REGISTRY: dict[str, Callable[..., Task]] = {}


def register_task(name: str):
    """Decorator: make a task factory available to `get_task(name, **kwargs)` and to configs by name."""
    def deco(factory):
        if name in _REGISTRY:
            raise ValueError(f"task {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory
    return deco


def get_task(name: str, **kwargs) -> Task:
    """Builds a registered task by name (e.g. 'arithmetic', 'knights_knaves', 'math')."""
    import jaxrl_llm.tasks  # noqa: F401  (registers the built-in tasks)
    if name not in _REGISTRY:
        import difflib
        near = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise TaskError(f"config.task.name: unknown task {name!r}.{hint} Registered: "
                        f"{', '.join(sorted(_REGISTRY))}")
    factory = _REGISTRY[name]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        params = [p for p in inspect.signature(factory).parameters if p not in ("self", "args", "kwargs")]
        raise TaskError(f"config.task.kwargs of task {name!r}: {e}; it accepts {', '.join(params) or 'no arguments'}"
                        ) from None
    try:
        return factory(**kwargs)
    except UserError:
        raise  # a data file's error names the file and line already
    except (ValueError, TypeError) as e:
        raise TaskError(f"config.task.kwargs of task {name!r}: {e}") from e


def registered_tasks() -> list[str]:
    import jaxrl_llm.tasks  # noqa: F401
    return sorted(_REGISTRY)
