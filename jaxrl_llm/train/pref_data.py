"""Preference pairs for the DPO-family and reward-model stages: generated from a task, or read from a file.

    train, held_out = stage_pairs(section.data, task, seed, where="config.dpo")   # list[PreferencePair] each
    arrays, stats = loaders.encode_preferences(tokenizer, train, max_prompt_len, max_response_len)

Generated (`data.source="task"`, the embedded default): for each of the task's examples, chosen = the gold
answer and rejected = a plausible wrong one, deterministic in (seed, split, example index):

* arithmetic (and math tasks with integer answers): the result off by 1..3 either way, or, with
  probability 1/2 when the result has two different digits, two of its digits swapped ("46" -> "64"),
  written in the task's answer format (spaced digits, reversed zero-padded digits);
* knights_knaves: the gold assignment with one person's role flipped, both inside Logic-RL's
  <think></think><answer></answer> format, so chosen scores +3 and rejected -0.5 under the task's reward.

Training pairs come from the task's "train" split, held-out pairs from its "test" split.

From a file (`data.source="jsonl"`; JSONL, JSON or Parquet): `loaders.load_preferences(data.path)`;
held-out pairs from `data.eval_path`, or else `data.eval_pairs` pairs (at most a tenth of the file) held
out of it after a shuffle with the run's seed.
"""

from __future__ import annotations

import random

import ml_collections as mc
import numpy as np

from jaxrl_llm.data.loaders import PreferencePair, load_preferences
from jaxrl_llm.tasks.base import Example, Task

KK_REASONING = "<think> Each statement is checked against the assignment. </think>\n"


def wrong_number(answer: str, rng: random.Random) -> str:
    """A plausible wrong integer answer: off by 1..3, or two different digits swapped. Never equals `answer`."""
    value = int(answer)
    digits = str(abs(value))
    pairs = [(i, j) for i in range(len(digits)) for j in range(i + 1, len(digits)) if digits[i] != digits[j]]
    if pairs and rng.random() < 0.5:
        i, j = rng.choice(pairs)
        d = list(digits)
        d[i], d[j] = d[j], d[i]
        swapped = int("".join(d))
        if swapped != abs(value):  # a leading zero can make "10" -> "01" = 1: still a different number
            return str(-swapped if value < 0 else swapped)
    return str(value + rng.choice((-3, -2, -1, 1, 2, 3)))


def wrong_arithmetic_answer(task: Task, answer: str, rng: random.Random) -> str:
    """`wrong_number` in the task's answer format (spaced digits; reversed, zero-padded digits)."""
    spaced, reverse = getattr(task, "spaced", False), getattr(task, "reverse_answer", False)
    text = answer.replace(" ", "") if spaced else answer
    if reverse:  # "540" is 45 written least-significant digit first, zero-padded to 3 places
        width = len(text)
        value = int(text[::-1])
        while True:
            wrong = int(wrong_number(str(value), rng))
            if 0 <= wrong < 10 ** width and wrong != value:
                break
        text = f"{wrong:0{width}d}"[::-1]
    else:
        text = wrong_number(text, rng)
    return " ".join(text) if spaced else text


def _kk_response(task: Task, answer: str) -> str:
    text = f"{KK_REASONING}<answer>\n{answer}\n</answer>"
    return text[len("<think>"):] if getattr(task, "prefill_think", False) else text


def pair_from_example(task: Task, example: Example, rng: random.Random) -> PreferencePair:
    """(prompt, gold answer, wrong answer) as a PreferencePair; chat prompts get assistant-message responses."""
    name = getattr(task, "name", type(task).__name__)
    if name == "knights_knaves":
        from jaxrl_llm.tasks.knights_knaves import format_answer
        solution = list(example.meta["solution"])
        k = rng.randrange(len(solution))
        flipped = solution[:k] + [not solution[k]] + solution[k + 1:]
        chosen = _kk_response(task, example.answer)
        rejected = _kk_response(task, format_answer(example.meta["names"], flipped))
    else:
        try:
            wrong = (wrong_arithmetic_answer(task, example.answer, rng) if name == "arithmetic"
                     else wrong_number(example.answer, rng))
        except ValueError:
            raise ValueError(f"preference pairs cannot be generated for task {name!r}: its gold answer "
                             f"{example.answer!r} is not an integer (generated pairs cover arithmetic, integer "
                             "math answers and knights_knaves); give pairs in a file with data.source='jsonl' "
                             "and data.path=...") from None
        chosen, rejected = example.answer, wrong
        if name == "math":
            chosen, rejected = f"\\boxed{{{chosen}}}", f"\\boxed{{{rejected}}}"
    if isinstance(example.prompt, str):
        return PreferencePair(example.prompt, chosen, rejected, meta={"answer": example.answer})
    as_msgs = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    return PreferencePair(list(example.prompt), as_msgs(chosen), as_msgs(rejected), meta={"answer": example.answer})


def task_pairs(task: Task, split: str, num: int, seed: int) -> list[PreferencePair]:
    """`num` generated pairs from `split` of the task; deterministic in (seed, split, index)."""
    examples = task.examples(split, num, seed)
    return [pair_from_example(task, e, random.Random(f"pairs/{seed}/{split}/{i}")) for i, e in enumerate(examples)]


def stage_pairs(data: mc.ConfigDict, task: Task, seed: int,
                where: str) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(training pairs, held-out pairs) for a stage's `data` section (see the module docstring)."""
    if data.source == "task":
        return (task_pairs(task, "train", int(data.num_pairs), seed),
                task_pairs(task, "test", int(data.eval_pairs), seed) if data.eval_pairs > 0 else [])
    if data.source != "jsonl":
        raise ValueError(f"{where}.data.source={data.source!r}; expected 'task' (pairs generated from the task) "
                         "or 'jsonl' (a preference file in data.path)")
    if not data.path:
        raise ValueError(f"{where}.data.source='jsonl' needs {where}.data.path (a .jsonl/.json/.parquet file of "
                         "{prompt, chosen, rejected} records)")
    pairs = load_preferences(data.path)
    if data.eval_path:
        return pairs, load_preferences(data.eval_path)
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_eval = min(int(data.eval_pairs), len(pairs) // 10)
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]
