"""chain_arithmetic: generation, difficulty splits, the per-step grader, the reward, preference pairs; the
SteppedTask / StepGradedTask abilities of the built-in tasks."""

import dataclasses
import json
import random

import numpy as np
import pytest

from jaxrl_llm.errors import TaskError
from jaxrl_llm.tasks import (Example, PreferencePairTask, RewardInputs, StepGradedTask, SteppedTask, get_task,
                             split_on_separator)


def chain(**kw):
    return get_task("chain_arithmetic", **kw)


# written by hand, as the generator would make it
EX = Example(prompt="12+7-3+9=", answer="25",
             meta={"start": 12, "ops": ["+", "-", "+"], "operands": [7, 3, 9], "values": [19, 16, 25], "n_steps": 3,
                   "steps": ["12+7=19", "19-3=16", "16+9=25"], "sft_target": "12+7=19;19-3=16;16+9=25"})


def inputs(completions, examples):
    b = len(completions)
    return RewardInputs(list(completions), list(examples), np.ones(b, np.int32), np.ones(b, bool), 32)


# ---------------------------------------------------------------------------------------------- generation


def test_examples_are_deterministic_and_written_step_by_step():
    task = chain()
    a, b = task.examples("train", 50, seed=3), task.examples("train", 50, seed=3)
    assert a == b and a != task.examples("train", 50, seed=4)
    for e in a:
        m = e.meta
        assert 2 <= m["n_steps"] == len(m["ops"]) == len(m["steps"]) <= 4
        assert 0 <= m["start"] <= 20 and all(0 <= y <= 9 for y in m["operands"])
        assert all(0 <= v <= 99 for v in m["values"]) and e.answer == str(m["values"][-1])
        assert e.prompt == f"{m['start']}" + "".join(f"{o}{y}" for o, y in zip(m["ops"], m["operands"])) + "="
        assert m["sft_target"] == ";".join(m["steps"]) and eval(e.prompt[:-1]) == int(e.answer)  # noqa: S307
        assert json.loads(json.dumps(e.to_json()))["meta"] == dict(m)  # meta survives a dataset round trip
    assert {e.meta["n_steps"] for e in a} == {2, 3, 4}


def test_the_running_value_stays_in_range():
    task = chain(min_steps=6, max_steps=6, max_operand=30, operators="+-*", min_value=0, max_value=60)
    for e in task.examples("train", 200, seed=0):
        assert all(0 <= v <= 60 for v in e.meta["values"]), e.meta
    assert {o for e in task.examples("train", 200, seed=0) for o in e.meta["ops"]} == {"+", "-", "*"}


def test_train_and_test_are_disjoint():
    task = chain(min_steps=2, max_steps=2)
    train = {e.prompt for e in task.examples("train", 3000, seed=0)}
    test = {e.prompt for e in task.examples("test", 300, seed=1)}
    assert len(test) > 100 and not train & test


def test_difficulty_splits_change_the_difficulty_and_stay_out_of_train():
    task = chain()
    six = task.examples("test@steps=6", 100, seed=0)
    assert {e.meta["n_steps"] for e in six} == {6}
    wide = task.examples("test@max_operand=20", 300, seed=0)
    operands = [y for e in wide for y in e.meta["operands"]]
    assert max(operands) > 9 and all(y <= 20 for y in operands)
    both = task.examples("test@steps=5,max_operand=20", 100, seed=0)
    assert {e.meta["n_steps"] for e in both} == {5} and max(y for e in both for y in e.meta["operands"]) > 9
    # the same generator as a train split: no problem of a held-out split is ever a train problem
    train_like = {e.prompt for e in task.examples("train@steps=6", 3000, seed=0)}
    assert not train_like & {e.prompt for e in six}
    assert not {e.prompt for e in task.examples("train", 3000, seed=0)} & {e.prompt for e in wide}


@pytest.mark.parametrize("split, match", [
    ("val", r"split 'val'; expected 'train', 'test', or e\.g\. 'test@steps=6'"),
    ("test@", r"split 'test@'; expected"),
    ("test@stepz=6", r"split 'test@stepz=6': 'stepz=6' is not one key=value of steps, min_steps"),
    ("test@steps=six", r"split 'test@steps=six': steps='six' is not an integer"),
    ("test@steps=0", r"split 'test@steps=0' makes an invalid task: need 1 <= min_steps \(0\)"),
    ("test@steps=3,steps=4", r"'steps=4' is not one key=value .* \(each once\)"),
    ("test@steps=3,max_steps=4", r"give steps or min_steps/max_steps, not both"),
])
def test_bad_split_strings_say_what_is_accepted(split, match):
    with pytest.raises(ValueError, match=match) as e:
        chain().examples(split, 4, seed=0)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_steps=3, max_steps=2), r"need 1 <= min_steps \(3\) <= max_steps \(2\)"),
    (dict(operators=("+", "/")), r"operators \('\+', '/'\); each must be one of"),
    (dict(max_start=120), r"max_start \(120\) <= max_value \(99\)"),
    (dict(step_separator="="), r"step_separator='='; it must be non-empty text without digits"),
    (dict(step_separator=""), r"step_separator=''"),
    (dict(step_separator="  "), r"spaces only"),
    (dict(test_fraction=1.0), r"test_fraction=1.0 must be in \(0, 1\)"),
    (dict(n_steps=3), r"config\.task\.kwargs of task 'chain_arithmetic'.*it accepts min_steps"),
])
def test_bad_kwargs_raise_task_errors(kwargs, match):
    with pytest.raises(TaskError, match=match):
        chain(**kwargs)


def test_a_space_too_small_for_the_split_says_so():
    with pytest.raises(ValueError, match=r"could not draw 50 'test' problems .* widen the steps/operand range"):
        chain(min_steps=1, max_steps=1, max_operand=0, max_start=0).examples("test", 50, seed=0)


# ---------------------------------------------------------------------------------------------- grading


def test_the_gold_solution_is_right_in_every_step():
    task = chain()
    for e in task.examples("test", 100, seed=0) + task.examples("test@steps=6,max_operand=20", 50, seed=0):
        gold = e.meta["sft_target"]
        assert task.grade_steps(gold, e) == [True] * e.meta["n_steps"]
        assert task.first_error(gold, e) is None and task.is_correct(gold, e)
        assert task.extract_answer(gold) == e.answer


@pytest.mark.parametrize("completion, grades, first, correct", [
    ("12+7=19;19-3=16;16+9=25", [True, True, True], None, True),
    ("12+7=18;18-3=15;15+9=24", [False, False, False], 0, False),      # wrong at 0, carried forward
    ("12+7=19;19-3=17;17+9=26", [True, False, False], 1, False),       # wrong at 1, carried forward
    ("12+7=19;19-3=17;16+9=25", [True, False, True], 1, True),         # wrong at 1, then back on track
    ("12+7=19;19-3=16;16+9=26", [True, True, False], 2, False),        # wrong at the last step
    ("12+7=19;19+3=22;22+9=31", [True, False, False], 1, False),       # the wrong operation
    ("12+7=19;19-4=15;15+9=24", [True, False, False], 1, False),       # the wrong operand
    ("12+7=19;19-3=16", [True, True], 2, False),                       # a step missing
    ("12+7=19;19-3=16;16+9=25;25+0=25", [True, True, True, False], 3, True),  # a step too many
    ("12+7-3+9=25", [False], 0, True),                                 # no steps, right answer
    ("12+7=19;;16+9=25", [True, False, True], 1, True),                # an empty step
    ("12+7=19;19-3;16+9=25", [True, False, True], 1, True),            # malformed: no result
    ("12+7=19;19 minus 3=16;16+9=25", [True, False, True], 1, True),   # malformed: words
    ("12+7=19;19-3=16;16+9=", [True, True, False], 2, False),          # cut before the last result
    (" 12 + 7 = 19 ; 19 - 3 = 16 ; 16 + 9 = 25 ", [True, True, True], None, True),  # spaces are fine
    ("12+7=19;19-3=16;16+9=25;", [True, True, True], None, True),      # a trailing separator is dropped
    ("", [], 0, False),
])
def test_hand_made_completions_grade_as_expected(completion, grades, first, correct):
    task = chain()
    assert task.grade_steps(completion, EX) == grades
    assert task.first_error(completion, EX) == first
    assert task.is_correct(completion, EX) is correct


def test_extract_answer_reads_the_last_step():
    task = chain()
    assert task.extract_answer("12+7=19;19-3=16;16+9=025") == "25"
    assert task.extract_answer("12+7=19;19-3=16;16+9=25.") is None
    assert task.extract_answer("12+7=19;25") is None      # the last step states no result
    assert task.extract_answer("") is None
    assert chain(min_value=-50, min_start=-5).extract_answer("-5-9=-14") == "-14"


@pytest.mark.parametrize("sep", [";", "\n", "; ", " ; ", "\n\n", " then "])
def test_separator_variants(sep):
    task = chain(step_separator=sep)
    e = task.examples("train", 1, seed=0)[0]
    assert e.meta["sft_target"] == sep.join(e.meta["steps"])
    assert task.grade_steps(e.meta["sft_target"], e) == [True] * e.meta["n_steps"]
    tight = sep.strip() or sep  # the separator without its spaces still splits: the pieces are stripped anyway
    assert task.split_steps(tight.join(e.meta["steps"]) + tight) == e.meta["steps"]
    ex = dataclasses.replace(EX, meta={**EX.meta, "sft_target": sep.join(EX.meta["steps"])})
    wrong = sep.join(["12+7=19", "19-3=17", "17+9=26"])
    assert task.grade_steps(wrong, ex) == [True, False, False] and task.first_error(wrong, ex) == 1


def test_a_newline_separator_keeps_a_blank_line_as_a_wrong_step():
    task = chain(step_separator="\n")
    assert task.split_steps("12+7=19\n\n19-3=16\n16+9=25\n") == ["12+7=19", "", "19-3=16", "16+9=25"]
    assert task.grade_steps("12+7=19\n\n19-3=16\n16+9=25\n", EX) == [True, False, False, False]
    assert chain().split_steps("12+7=19\n19-3=16") == ["12+7=19\n19-3=16"]  # ";" does not split lines


# ---------------------------------------------------------------------------------------------- reward


def test_reward_components():
    completions = ["12+7=19;19-3=16;16+9=25", "12+7=19;19-3=17;17+9=26", "12-7-3+9=25", "12+7=19;x"]
    out = chain().reward(inputs(completions, [EX] * 4))
    assert out.correct.tolist() == [True, False, True, False]
    assert out.scores.tolist() == [1.0, 0.0, 1.0, 0.0] and set(out.components) == {"answer", "step_accuracy"}
    np.testing.assert_allclose(out.components["step_accuracy"], [1.0, 1 / 3, 0.0, 1 / 3])
    out = chain(step_score=0.5, correct_score=2.0, wrong_score=-1.0).reward(inputs(completions, [EX] * 4))
    np.testing.assert_allclose(out.components["answer"], [2.0, -1.0, 2.0, -1.0])
    np.testing.assert_allclose(out.components["steps"], [0.5, 0.5 / 3, 0.0, 0.5 / 3])
    np.testing.assert_allclose(out.scores, out.components["answer"] + out.components["steps"])
    padded = chain(step_score=1.0).reward(inputs(["12+7=19;19-3=16;16+9=25;25+0=25;25+0=25"], [EX]))
    np.testing.assert_allclose(padded.components["steps"], [3 / 5])  # padding with extra steps does not pay


def test_examples_without_the_chain_meta_are_refused_clearly():
    with pytest.raises(ValueError, match=r"example '1\+1=' has no meta\['start'\]; grade examples this task made"):
        chain().grade_steps("1+1=2", Example("1+1=", "2"))


# ---------------------------------------------------------------------------------------------- pairs and abilities


def test_preference_pairs_have_one_wrong_step_carried_to_a_wrong_answer():
    task = chain(operators="+-*", max_steps=5)
    for i, e in enumerate(task.examples("train", 200, seed=0)):
        chosen, rejected = task.preference_pair(e, random.Random(i))
        assert chosen == e.meta["sft_target"] and task.is_correct(chosen, e) and not task.is_correct(rejected, e)
        k = task.first_error(rejected, e)
        grades = task.grade_steps(rejected, e)
        assert grades == [True] * k + [False] * (len(grades) - k) and len(grades) == e.meta["n_steps"]
        steps = task.split_steps(rejected)
        for prev, step in zip(steps[k:], steps[k + 1:]):  # every later step computes right from the wrong value
            x_op_y, _, z = step.partition("=")
            assert step.startswith(prev.rpartition("=")[2]) and eval(x_op_y) == int(z), (rejected, e.prompt)  # noqa: S307
    assert task.preference_pair(EX, random.Random(0)) == task.preference_pair(EX, random.Random(0))


def test_step_abilities_of_the_built_in_tasks(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    math, kk, task = get_task("math", train_path=str(path)), get_task("knights_knaves"), chain()
    assert isinstance(task, StepGradedTask) and isinstance(task, SteppedTask) and isinstance(task, PreferencePairTask)
    for t in (kk, math):
        assert isinstance(t, SteppedTask) and not isinstance(t, StepGradedTask) and t.step_separator == "\n"
        assert t.split_steps("<think> A is a knight.\n\nSo B lies. \n</think>\n") == \
            ["<think> A is a knight.", "So B lies.", "</think>"]
    assert not isinstance(get_task("arithmetic"), SteppedTask)
    kk2 = get_task("knights_knaves", step_separator=" || ")
    assert kk2.split_steps("a || b||c") == ["a", "b", "c"]
    assert get_task("math", train_path=str(path), step_separator="\n\n").split_steps("a\nb\n\nc") == ["a\nb", "c"]
    with pytest.raises(TaskError, match=r"step_separator=''; expected non-empty text"):
        get_task("knights_knaves", step_separator="")


def test_split_on_separator():
    assert split_on_separator("a; b;c;", "; ") == ["a", "b", "c"]
    assert split_on_separator("a\nb \n", " \n") == ["a", "b"]
    assert split_on_separator("a;;b", ";") == ["a", "", "b"]
    assert split_on_separator("a;;b", ";", drop_empty=True) == ["a", "b"]
    assert split_on_separator("   ", ";") == [] and split_on_separator("", "\n") == []
    with pytest.raises(ValueError, match="step separator is empty"):
        split_on_separator("a", "")


def test_sft_trains_on_the_worked_solution_when_an_example_has_one():
    from types import SimpleNamespace

    from jaxrl_llm.tokenizer import load_tokenizer, tokenizer_info
    from jaxrl_llm.train.build import encode_answers
    tok = load_tokenizer()
    info = tokenizer_info(tok)
    comp = SimpleNamespace(tokenizer=tok, pad_id=info.pad_id, eos_ids=tuple(info.eos_ids))
    plain = Example("12+7=", "19")
    toks, mask = encode_answers(comp, [EX, plain], 24)
    texts = [tok.decode(t[m.astype(bool)][:-1]) for t, m in zip(toks, mask)]
    assert texts == ["12+7=19;19-3=16;16+9=25", "19"]
    assert [t[m.astype(bool)][-1] for t, m in zip(toks, mask)] == [info.eos_ids[0]] * 2


def test_templates_make_chat_prompts_with_the_same_problems():
    from jaxrl_llm.tasks.chain_arithmetic import ChainArithmeticTask
    plain = ChainArithmeticTask(step_separator="\n")
    chat = ChainArithmeticTask(step_separator="\n", templates=("Compute {problem}, one step per line.",))
    a, b = plain.examples("test", 20, 3), chat.examples("test", 20, 3)
    assert [e.answer for e in a] == [e.answer for e in b]
    assert b[0].prompt == [{"role": "user", "content": f"Compute {a[0].prompt[:-1]}, one step per line."}]
    assert chat.is_correct(a[0].meta["sft_target"], b[0]) and all(chat.grade_steps(a[0].meta["sft_target"], b[0]))
    with pytest.raises(ValueError, match=r"template 'Compute' must be a string with \{problem\}"):
        ChainArithmeticTask(templates=("Compute",))
