"""Task abilities (InJitRewardTask, PreferencePairTask), the generated preference pairs pinned byte for byte,
and the package layering that keeps tasks/ below data/, rewards/, eval/ and train/."""

import ast
import hashlib
import json
import pathlib
import random

import numpy as np
import pytest

from jaxrl_llm.tasks import Example, InJitRewardTask, PreferencePairTask, RewardOutput, Task, get_task
from jaxrl_llm.train.config import preference_data
from jaxrl_llm.train.pref_data import pair_from_example, stage_pairs, task_pairs

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxrl_llm"


class ToyTask:
    """The four Task methods and nothing more."""

    name = "toy"

    def examples(self, split, num, seed):
        return [Example(prompt=f"{i}+1=", answer=str(i + 1)) for i in range(num)]

    def reward(self, inputs):
        ok = np.array([self.is_correct(c, e) for c, e in zip(inputs.completions, inputs.examples)])
        return RewardOutput(scores=ok.astype(np.float32), correct=ok)

    def extract_answer(self, completion):
        return completion.strip() or None

    def is_correct(self, completion, example):
        return completion == example.answer


class NoCorrectScore(ToyTask):
    """InJitRewardTask's methods without its `correct_score`."""

    def encode_targets(self, examples):
        return np.zeros((len(examples), 1), np.int32), np.ones(len(examples), np.int32)

    def jax_reward(self, tokenizer, vocab_size=None, eos_ids=None):
        return lambda tokens, mask, targets, lengths: np.zeros(len(tokens), np.float32)


class NoEncodeTargets(ToyTask):
    """`jax_reward` and `correct_score` without `encode_targets`."""

    correct_score = 1.0
    jax_reward = NoCorrectScore.jax_reward


def _write_math(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


MATH_ROWS = ([{"question": f"What is {i} times {i + 3} minus {i % 7}?", "answer": f"Work.\n#### {i * (i + 3) - i % 7}"}
              for i in range(12)]
             + [{"question": "Below zero?", "answer": "#### -48"}, {"question": "Ten?", "answer": "#### 10"},
                {"question": "Same digits?", "answer": "#### 777"}])


# ---------------------------------------------------------------------------------------------- abilities


def test_built_in_tasks_have_the_abilities_they_implement(tmp_path):
    math = get_task("math", train_path=_write_math(tmp_path / "m.jsonl", MATH_ROWS[:2]))
    has = {name: (isinstance(t, InJitRewardTask), isinstance(t, PreferencePairTask))
           for name, t in [("arithmetic", get_task("arithmetic")), ("knights_knaves", get_task("knights_knaves")),
                           ("math", math)]}
    assert has == {"arithmetic": (True, True), "knights_knaves": (False, True), "math": (False, True)}


def test_a_plain_task_has_no_ability_and_jax_reward_alone_is_not_in_jit():
    toy = ToyTask()
    assert isinstance(toy, Task)
    assert not isinstance(toy, InJitRewardTask) and not isinstance(toy, PreferencePairTask)
    # the protocol asks for correct_score and encode_targets too, not just a method called jax_reward
    assert not isinstance(NoCorrectScore(), InJitRewardTask) and not isinstance(NoEncodeTargets(), InJitRewardTask)

    class Complete(NoCorrectScore):
        correct_score = 1.0

    assert isinstance(Complete(), InJitRewardTask)


def test_a_task_without_preference_pairs_gets_a_clear_error():
    data = preference_data()
    assert data.source == "task"
    with pytest.raises(ValueError, match=r"task 'toy': it has no preference_pair\(example, rng\) method.*"
                                         r"data\.source='jsonl' and data\.path"):
        stage_pairs(data, ToyTask(), 0, "config.pref")


def test_math_pairs_need_integer_gold_answers(tmp_path):
    task = get_task("math", train_path=_write_math(tmp_path / "f.jsonl", [{"question": "q", "answer": "#### 1/2"}]))
    with pytest.raises(ValueError, match=r"task 'math': its gold answer '1/2' \(.*f\.jsonl:1\) is not an integer"
                                         r".*data\.source='jsonl' and data\.path"):
        task_pairs(task, "train", 1, 0)


def test_pairs_wrap_the_task_completions_as_assistant_messages_for_chat_prompts():
    class ChatPairs(ToyTask):
        def preference_pair(self, example, rng):
            return f"yes {example.answer}", f"no {rng.randrange(10)}"

    task = ChatPairs()
    assert isinstance(task, PreferencePairTask)
    chat = Example(prompt=[{"role": "user", "content": "1+1="}], answer="2")
    pair = pair_from_example(task, chat, random.Random(0))
    assert pair.prompt == [{"role": "user", "content": "1+1="}] and pair.meta == {"answer": "2"}
    assert pair.chosen == [{"role": "assistant", "content": "yes 2"}]
    assert pair.rejected == [{"role": "assistant", "content": f"no {random.Random(0).randrange(10)}"}]
    text = pair_from_example(task, Example(prompt="1+1=", answer="2"), random.Random(0))
    assert (text.prompt, text.chosen) == ("1+1=", "yes 2")


# ---------------------------------------------------------------------------------------------- pinned pairs

# sha256 of the generated pairs, recorded from the pair code as it was inside train/pref_data.py before each
# task took its own: runs and experiments depend on these pairs, so any change here must be deliberate.
PINNED = [
    ("arithmetic", {}, "train", 0, 200, "636e4942a1878cec6277f8564486ceea17c4d0f64bf01f22d44919cc81bf8c3c"),
    ("arithmetic", {"spaced": True}, "test", 1, 100,
     "2359cab1dc86ab0ec123b3337577ed782970b3480384574b72704e386fba40d2"),
    ("arithmetic", {"spaced": True, "pad_operands": True, "reverse_answer": True}, "train", 3, 200,
     "d6cbf5936995659fa38d1e6fd89bff70b0df0c3f41e95479081b51bfd01c196a"),
    ("arithmetic", {"operators": ("+", "-", "*"), "max_digits": 3}, "train", 2, 200,
     "b3a87bb43d258f71c6d24e3ddd1014c809f1f8ae70a3945a2915cc73eb41aa0e"),
    ("knights_knaves", {"n_people": (3, 4)}, "test", 0, 20,
     "19478b264855a28a28803178f9ed56c1bdb5b96360ecdc50d71dad877d9653de"),
    ("knights_knaves", {"n_people": (2, 5), "chat": False, "prefill_think": True}, "train", 1, 20,
     "728d1f606d33aea092cb106fbc667978a9af62fe8722b3b64cb50ceee7def029"),
    ("math", {}, "train", 0, None, "3393a1d1aea1a8a50290055c9f50973fcd765a3f986232ef6c68df9f8b0cd146"),
    ("math", {"chat": False}, "train", 5, None, "f5bb31452b0d8c4b71e741cfe84899f7e9385f0750c546d2f27ded53f9bab1d3"),
]


def _pinned_pairs(name, kwargs, split, seed, num, tmp_path):
    if name == "math":
        kwargs = dict(kwargs, train_path=_write_math(tmp_path / "math.jsonl", MATH_ROWS))
    return task_pairs(get_task(name, **kwargs), split, num, seed)


@pytest.mark.parametrize("name,kwargs,split,seed,num,digest", PINNED,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(PINNED)])
def test_generated_pairs_are_pinned(name, kwargs, split, seed, num, digest, tmp_path):
    pairs = _pinned_pairs(name, kwargs, split, seed, num, tmp_path)
    rows = [[p.prompt, p.chosen, p.rejected, dict(p.meta)] for p in pairs]
    assert len(rows) == (num or len(MATH_ROWS))
    assert hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest() == digest


def test_generated_pairs_literally(tmp_path):
    """The first pair of some pinned cases, written out so a change shows what it changed."""
    first = {i: _pinned_pairs(*PINNED[i][:5], tmp_path)[0] for i in (0, 2, 5, 7)}
    assert (first[0].prompt, first[0].chosen, first[0].rejected) == ("0+21=", "21", "12")
    assert (first[2].prompt, first[2].chosen, first[2].rejected) == ("0 1 + 0 1 =", "2 0 0", "5 0 0")
    kk = first[5]
    assert kk.prompt.endswith("Assistant: <think>")  # prefill_think: the completions continue inside <think>
    think = " Each statement is checked against the assignment. </think>\n"
    assert kk.chosen == think + "<answer>\n(1) Aria is a knight\n(2) Jacob is a knave\n</answer>"
    assert kk.rejected == think + "<answer>\n(1) Aria is a knight\n(2) Jacob is a knight\n</answer>"
    assert (first[7].chosen, first[7].rejected, first[7].meta) == ("\\boxed{70}", "\\boxed{7}", {"answer": "70"})


# ---------------------------------------------------------------------------------------------- layering


def _imports(path: pathlib.Path) -> list[str]:
    """Every absolute jaxrl_llm name a file imports, at top level or inside functions: `import a.b` gives
    "a.b"; `from a import b` gives "a" and "a.b" (b may be a module)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return [m for m in out if m.split(".")[0] == "jaxrl_llm"]


def test_records_is_the_bottom_layer():
    """records imports only the user-error classes (errors.py), which import nothing of the package."""
    assert {m.split(".")[1] for m in _imports(PACKAGE / "records.py")} == {"errors"}
    assert _imports(PACKAGE / "errors.py") == []


def test_tasks_import_nothing_above_them():
    above = ("data", "rewards", "eval", "train", "cli")
    files = sorted((PACKAGE / "tasks").glob("*.py"))
    assert "jaxrl_llm.records" in _imports(PACKAGE / "tasks" / "math_answers.py")  # the scan sees imports
    bad = [f"{f.name} imports {m}" for f in files for m in _imports(f) if m.split(".")[1] in above]
    assert not bad, f"tasks/ must not import data/, rewards/, eval/, train/ or cli (layering): {bad}"


def test_no_module_outside_tasks_imports_a_specific_task():
    """Task-specific behaviour belongs to the task (an ability protocol), not to a switch in the caller."""
    builtin = {f"jaxrl_llm.tasks.{f.stem}" for f in (PACKAGE / "tasks").glob("*.py")
               if "@register_task(" in f.read_text()}
    assert {"jaxrl_llm.tasks.arithmetic", "jaxrl_llm.tasks.knights_knaves", "jaxrl_llm.tasks.math_answers"} <= builtin
    bad = [f"{f.relative_to(PACKAGE)} imports {m}" for f in sorted(PACKAGE.rglob("*.py"))
           if f.relative_to(PACKAGE).parts[0] != "tasks" for m in _imports(f) if m in builtin]
    assert not bad, f"import the task through get_task and its ability protocols instead: {bad}"
