"""Preference pairs for the DPO-family and reward-model stages: generated from a task, or read from a file.

    train, held_out = stage_pairs(section.data, task, seed, where="config.dpo")   # list[PreferencePair] each
    arrays, stats = loaders.encode_preferences(tokenizer, train, max_prompt_len, max_response_len)

Generated (`data.source="task"`, the embedded default): from a task with the `PreferencePairTask` ability
(jaxrl_llm/tasks/base.py), which makes (chosen, rejected) completions from one of its examples: chosen
correct, rejected a plausible wrong one, deterministic in (seed, split, example index). The built-in tasks:

* arithmetic (and math tasks with integer answers, inside \\boxed{}): the result off by 1..3 either way,
  or, with probability 1/2 when the result has two different digits, two of its digits swapped
  ("46" -> "64"), written in the task's answer format (spaced digits, reversed zero-padded digits);
* knights_knaves: the gold assignment with one person's role flipped, both inside Logic-RL's
  <think></think><answer></answer> format, so chosen scores +3 and rejected -0.5 under the task's reward.

Training pairs come from the task's "train" split, held-out pairs from its "test" split. This module only
wraps the task's completions into PreferencePairs (assistant messages for chat prompts); the pair logic
lives with each task.

From a file (`data.source="jsonl"`; JSONL, JSON or Parquet): `loaders.load_preferences(data.path)`;
held-out pairs from `data.eval_path`, or else `data.eval_pairs` pairs (at most a tenth of the file) held
out of it after a shuffle with the run's seed.

A pair whose chosen and rejected responses are the same carries no preference: a DataError, naming the
file:line of such a record (`load_preferences`), or the task, split and example of a generated one.
"""

from __future__ import annotations

import random

import ml_collections as mc
import numpy as np

from jaxrl_llm.data.loaders import PreferencePair, load_preferences
from jaxrl_llm.errors import ConfigError, DataError
from jaxrl_llm.tasks import KK_REASONING, wrong_arithmetic_answer, wrong_number  # noqa: F401  (see __all__)
from jaxrl_llm.tasks.base import Example, PreferencePairTask, Task

# KK_REASONING, wrong_arithmetic_answer and wrong_number were defined here before each task took its own
# pair logic; they stay importable from here.
__all__ = ["KK_REASONING", "pair_from_example", "stage_pairs", "task_pairs", "wrong_arithmetic_answer",
           "wrong_number"]


def _no_pairs(task: Task) -> str:
    name = getattr(task, "name", type(task).__name__)
    return (f"preference pairs cannot be generated for task {name!r}: it has no preference_pair(example, rng) "
            "method (the PreferencePairTask ability, see docs/tasks.md); give pairs in a file with "
            "data.source='jsonl' and data.path=..., or add the method to the task")


def check_pair_task(task: Task, where: str) -> None:
    """A ConfigError naming `where`.data.source when `task` cannot generate pairs."""
    if not isinstance(task, PreferencePairTask):
        raise ConfigError(f"{where}.data.source='task': {_no_pairs(task)}")


def pair_from_example(task: Task, example: Example, rng: random.Random) -> PreferencePair:
    """The task's (chosen, rejected) completions for `example` as a PreferencePair; chat prompts get
    assistant-message responses. Raises ValueError for a task without the PreferencePairTask ability."""
    if not isinstance(task, PreferencePairTask):
        raise ValueError(_no_pairs(task))
    chosen, rejected = task.preference_pair(example, rng)
    if isinstance(example.prompt, str):
        return PreferencePair(example.prompt, chosen, rejected, meta={"answer": example.answer})
    as_msgs = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    return PreferencePair(list(example.prompt), as_msgs(chosen), as_msgs(rejected), meta={"answer": example.answer})


def task_pairs(task: Task, split: str, num: int, seed: int) -> list[PreferencePair]:
    """`num` generated pairs from `split` of the task; deterministic in (seed, split, index)."""
    examples = task.examples(split, num, seed)
    pairs = [pair_from_example(task, e, random.Random(f"pairs/{seed}/{split}/{i}")) for i, e in enumerate(examples)]
    same = [i for i, p in enumerate(pairs) if p.chosen == p.rejected]
    if same:
        name = getattr(task, "name", type(task).__name__)
        raise DataError(f"task {name!r} generated {len(same)} of {len(pairs)} preference pairs ({split} split, seed "
                        f"{seed}; the first: example {same[0]}, prompt {pairs[same[0]].prompt!r}) whose chosen and "
                        f"rejected responses are the same ({pairs[same[0]].chosen!r}): such a pair carries no "
                        "preference. The task's preference_pair(example, rng) must return two different "
                        "completions")
    return pairs


def stage_pairs(data: mc.ConfigDict, task: Task, seed: int,
                where: str) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(training pairs, held-out pairs) for a stage's `data` section (see the module docstring)."""
    if data.source == "task":
        check_pair_task(task, where)
        return (task_pairs(task, "train", int(data.num_pairs), seed),
                task_pairs(task, "test", int(data.eval_pairs), seed) if data.eval_pairs > 0 else [])
    if data.source != "jsonl":
        raise ConfigError(f"{where}.data.source={data.source!r}; expected 'task' (pairs generated from the task) "
                          "or 'jsonl' (a preference file in data.path)")
    if not data.path:
        raise ConfigError(f"{where}.data.source='jsonl' needs {where}.data.path (a .jsonl/.json/.parquet file of "
                          "{prompt, chosen, rejected} records)")
    pairs = load_preferences(data.path)
    if data.eval_path:
        return pairs, load_preferences(data.eval_path)
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_eval = min(int(data.eval_pairs), len(pairs) // 10)
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]
