"""Lessons: the base and its file, near duplicates, the token budget, the paired test, prompt injection and
the reflection prompt (jaxrl_llm.lessons; pure Python, no model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from jaxrl_llm.errors import ConfigError, DataError
from jaxrl_llm.lessons import (REFLECTION_PROMPT, Attempt, InjectConfig, Lesson, LessonBase, PairedGain,
                               block_tokens, call_lesson_function, decide, fit_budget, fixed_lessons, inject,
                               inject_example, lesson_block, lesson_id, near_duplicate, paired_gain, parse_lesson,
                               pick_attempts, reflection_prompt, render_attempts, resolve_function, similarity,
                               token_counter)
from jaxrl_llm.tasks.base import Example
from jaxrl_llm.tokenizer import load_tokenizer

LESSONS = ["Check the carry.", "Write only the number."]
BLOCK = "Lessons learned from earlier attempts:\n- Check the carry.\n- Write only the number."


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def _render(tok, messages):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _base() -> LessonBase:
    base = LessonBase(version=3, token_budget=40)
    base.add(Lesson.create("Check the carry when a column sums past nine.", status="kept", round=1,
                           source="policy",
                           evidence={"rewards": [0.0, 1.0], "prompts": ["72+4="], "b": {"z": 1, "a": 2}},
                           gain=0.125, ci=(0.03125, 0.21875), n=32, tokens=12, note="kept: ..."))
    base.add(Lesson.create("Write only the final number.", status="rejected", round=2, source="function:mine.f",
                           gain=-0.1, ci=(-0.2, 0.0), n=16, tokens=7))
    base.add(Lesson.create("Answer with the number alone.", status="merged", round=2, source="model:/m",
                           merged_into=lesson_id("Write only the final number."), tokens=6))
    return base


# ----------------------------------------------------------------------------------------- base and file


def test_json_round_trip_is_exact(tmp_path):
    base = _base()
    path = tmp_path / "lessons.json"
    base.save(path)
    loaded = LessonBase.load(path)
    assert loaded == base
    assert loaded.lessons[0].ci == (0.03125, 0.21875) and isinstance(loaded.lessons[0].ci, tuple)
    first = path.read_text()
    loaded.save(path)
    assert path.read_text() == first  # stable output
    entry = json.loads(first)["lessons"][0]
    assert list(entry)[0] == "text"
    assert list(entry["evidence"]["b"]) == ["a", "z"]
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed


def test_active_tokens_add_replace():
    base = _base()
    assert base.active_texts() == ["Check the carry when a column sums past nine."]
    assert base.tokens() == 12
    lid = base.lessons[1].id
    new = base.replace(lid, status="kept", note="re-measured")
    assert new.status == "kept" and base.get(lid) is new and base.tokens() == 19
    with pytest.raises(ValueError, match="already in the base"):
        base.add(Lesson.create("check the CARRY, when a column sums past nine"))  # same normalised text
    with pytest.raises(ValueError, match="unknown status 'kep'"):
        Lesson.create("A lesson here.", status="kep")


def test_hand_written_entry_and_txt_file(tmp_path):
    path = tmp_path / "lessons.json"
    path.write_text(json.dumps({"lessons": [{"text": "Read the question twice."}]}))
    (lesson,) = LessonBase.load(path, count_tokens=len).lessons
    assert (lesson.status, lesson.source, lesson.id, lesson.tokens) == ("kept", "file", lesson_id(lesson.text), 24)
    txt = tmp_path / "lessons.txt"
    txt.write_text("# comments are skipped\n- Read the question twice.\n\n  Write the answer last.  \n")
    base = LessonBase.load(txt, count_tokens=lambda t: len(t.split()))
    assert base.active_texts() == ["Read the question twice.", "Write the answer last."]
    assert [les.tokens for les in base] == [4, 4]
    txt.write_text("Read the question twice.\nread the question, twice\n")
    with pytest.raises(DataError, match=r"lessons.txt:2: repeats the lesson of line 1"):
        LessonBase.load(txt)
    assert LessonBase.from_texts(["One lesson here.", "Another one here."], len).tokens() == 33
    with pytest.raises(ValueError, match="lesson 1 .* repeats an earlier one"):
        LessonBase.from_texts(["One lesson here.", "one lesson here"])


@pytest.mark.parametrize("entry, match", [
    ({"text": "Check it.", "status": "kep"},
     r"lessons\[1\] \(\"Check it.\"\)\.status: unknown status \"kep\" \(did you mean 'kept'\?\); allowed: "
     r"candidate, kept, rejected, merged, evicted, distilled"),
    ({"text": ""}, r"lessons\[1\]\.text: is a string; every lesson needs"),
    ({"status": "kept"}, r"lessons\[1\]\.text: is missing"),
    ({"text": "Check it.", "gain": "high"}, r"lessons\[1\] \(\"Check it.\"\)\.gain: is a string .*a finite number"),
    ({"text": "Check it.", "ci": [0.2, 0.1]},
     r"lessons\[1\] \(\"Check it.\"\)\.ci: is an array .*\[lo, hi\] with lo <= hi"),
    ({"text": "Check it.", "round": -1}, r"lessons\[1\] \(\"Check it.\"\)\.round: is a number .*an integer >= 0"),
    ({"text": "Check it.", "n": True}, r"lessons\[1\] \(\"Check it.\"\)\.n: is a boolean"),
    ({"text": "Check it.", "source": "human"},
     r"lessons\[1\] \(\"Check it.\"\)\.source: .*one of fixed, function:<name>, policy, model:<path>"),
    ({"text": "Check it.", "evidence": []}, r"lessons\[1\] \(\"Check it.\"\)\.evidence: is an array"),
    ({"text": "Check it.", "staus": "kept"}, r"lessons\[1\]: unknown field 'staus' \(did you mean 'status'\?\)"),
    ({"text": "Check it.", "merged_into": "nope"}, r"lessons\[1\]\.merged_into: no lesson has id 'nope'"),
    ("Check it.", r"lessons\[1\]: is a string, expected an object"),
])
def test_load_errors_name_file_entry_and_field(tmp_path, entry, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"version": 1, "lessons": [{"text": "A fine lesson."}, entry]}, indent=2))
    with pytest.raises(DataError, match=str(path).replace(".", r"\.") + ": " + match):
        LessonBase.load(path)


def test_load_errors_of_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"lessons": [\n  {"text": "x",}\n]}')
    with pytest.raises(DataError, match=r"bad.json:2: malformed JSON"):
        LessonBase.load(path)
    path.write_text("[]")
    with pytest.raises(DataError, match=r"bad.json: holds an array, expected an object"):
        LessonBase.load(path)
    path.write_text('{"lessons": [], "token_budget": -5}')
    with pytest.raises(DataError, match=r"token_budget is -5; expected an integer >= 0"):
        LessonBase.load(path)
    path.write_text('{"lessons": [{"text": "Same text."}, {"text": "same text"}]}')
    with pytest.raises(DataError, match=r"lessons\[1\] .* the same as lessons\[0\]"):
        LessonBase.load(path)
    with pytest.raises(DataError, match="no such lesson file"):
        LessonBase.load(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------ duplicates


def test_similarity_and_near_duplicate():
    a = "Always check the carry digit."
    assert similarity(a, "always check the CARRY digit") == 1.0
    assert similarity(a, "Always check the carry digits!") > 0.9
    assert similarity(a, "Check the carry digit always.") > 0.8  # same words, another order
    unrelated = "Read the question twice before you answer."
    assert similarity(a, unrelated) < 0.5
    assert 0.0 <= similarity(a, unrelated) <= 1.0 and similarity("", a) == 0.0
    texts = [unrelated, "Write only the final number.", "Check the carry digit, always."]
    assert near_duplicate(a, texts, threshold=0.8) == 2
    assert near_duplicate("Name every knight before any knave.", texts, threshold=0.8) is None


# ---------------------------------------------------------------------------------------------- budget


def test_fit_budget_evicts_lowest_gain_and_fits():
    base = LessonBase(token_budget=0)
    spec = [("a", 0.30, 0, 10), ("b", 0.05, 1, 10), ("c", 0.20, 2, 10), ("d", 0.05, 3, 10), ("e", None, 4, 10)]
    for name, gain, rnd, tokens in spec:
        base.add(Lesson.create(f"Lesson {name} is here.", status="kept", gain=gain, round=rnd, tokens=tokens))
    base.add(Lesson.create("A rejected one.", status="rejected", gain=-1.0, tokens=100))
    ids = {name: lesson_id(f"Lesson {name} is here.") for name, *_ in spec}
    for budget in range(0, 60):
        new, evicted = fit_budget(base, budget)
        assert budget == 0 or new.tokens() <= budget
        assert all(new.get(i).status == "evicted" and "token budget" in new.get(i).note for i in evicted)
    new, evicted = fit_budget(base, 25)
    # unmeasured (0.0) first, then the two 0.05s: the newer (round 3) before the older
    assert evicted == [ids["e"], ids["d"], ids["b"]]
    assert new.active_texts() == ["Lesson a is here.", "Lesson c is here."]
    assert base.tokens() == 50 and all(les.status != "evicted" for les in base)  # the input is unchanged
    assert fit_budget(base, 0) == (base, [])  # 0: no limit
    base.token_budget = 30
    assert fit_budget(base)[1] == [ids["e"], ids["d"]]


# ----------------------------------------------------------------------------------------- paired test


def test_paired_gain_matches_hand_computation_and_scipy():
    with_r = np.array([1.0, 0.5, 0.75, 1.0, 0.25])
    without = np.array([0.5, 0.5, 0.25, 0.75, 0.25])
    g = paired_gain(with_r, without, confidence=0.9)
    d = [0.5, 0.0, 0.5, 0.25, 0.0]
    mean = sum(d) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    half = stats.t.ppf(0.95, 4) * std / math.sqrt(5)
    assert g.n == 5 and g.mean == pytest.approx(mean) and g.std == pytest.approx(std)
    assert (g.lo, g.hi) == pytest.approx((mean - half, mean + half))
    lo, hi = stats.t.interval(0.9, 4, loc=mean, scale=stats.sem(d))
    assert (g.lo, g.hi) == pytest.approx((lo, hi))
    assert paired_gain([1.0, 1.0], [0.5, 0.5]) == PairedGain(0.5, 0.5, 0.5, 2, 0.0, 0.9)  # zero variance
    assert paired_gain([1.0], [0.0])[:3] == (1.0, 1.0, 1.0)  # n == 1: std 0
    for a, b in [([1.0, 2.0], [1.0]), ([], []), ([[1.0]], [[1.0]]), ([np.nan], [0.0])]:
        with pytest.raises(ValueError):
            paired_gain(a, b)


def test_decide_never_keeps_a_non_positive_mean():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 20))
        a, b = rng.random(n), rng.random(n)
        g = paired_gain(a, b)
        for min_gain in (-1.0, -0.1, 0.0, 0.05):
            keep, note = decide(g, min_gain)
            assert keep == (g.mean > 0 and g.lo > min_gain), note
            if g.mean <= 0:
                assert not keep and note.startswith("rejected")
    keep, note = decide(PairedGain(0.2, 0.1, 0.3, 32, 0.3))
    assert keep and note.startswith("kept: gain +0.2 (90% CI [+0.1, +0.3], n=32)")
    assert not decide(PairedGain(0.2, 0.1, 0.3, 32, 0.3), min_gain=0.1)[0]
    assert not decide(PairedGain(0.0, 0.0, 0.0, 8, 0.0), min_gain=-1.0)[0]
    assert not decide(PairedGain(-0.1, 0.5, 0.6, 8, 0.0), min_gain=-1.0)[0]
    assert not decide(PairedGain(1.0, 1.0, 1.0, 1, 0.0), min_n=2)[0]


# ---------------------------------------------------------------------------------------------- inject


def test_inject_chat_without_system_message(tok):
    prompt = [{"role": "user", "content": "What is 2+3?"}]
    out = inject(prompt, LESSONS, InjectConfig())
    assert out == [{"role": "system", "content": BLOCK}, {"role": "user", "content": "What is 2+3?"}]
    assert _render(tok, out) == ("Lessons learned from earlier attempts:\n- Check the carry.\n"
                                 "- Write only the number.What is 2+3?")
    assert prompt == [{"role": "user", "content": "What is 2+3?"}]  # not mutated
    cfg = InjectConfig(system_prompt="You solve sums.")
    assert _render(tok, inject(prompt, LESSONS, cfg)) == (
        "You solve sums.\n\nLessons learned from earlier attempts:\n- Check the carry.\n"
        "- Write only the number.What is 2+3?")
    assert _render(tok, inject(prompt, [], cfg)) == "You solve sums.What is 2+3?"  # the baseline side
    same = inject(prompt, [], InjectConfig())
    assert same == prompt and same is not prompt


def test_inject_chat_with_system_message(tok):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]
    out = inject(prompt, LESSONS, InjectConfig(system_prompt="ignored: the prompt has its own"))
    assert _render(tok, out) == ("Be brief.\n\nLessons learned from earlier attempts:\n- Check the carry.\n"
                                 "- Write only the number.What is 2+3?")
    assert prompt[0]["content"] == "Be brief."
    prefix = inject(prompt, LESSONS, InjectConfig(position="prefix"))
    assert prefix == [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": BLOCK + "\n\nWhat is 2+3?"}]


def test_inject_text_prompt_and_example(tok):
    assert inject("72+4=", LESSONS, InjectConfig()) == BLOCK + "\n72+4="
    assert inject("72+4=", [], InjectConfig(system_prompt="x")) == "72+4="
    cfg = InjectConfig(header="", bullet="* ")
    assert inject("72+4=", LESSONS, cfg) == "* Check the carry.\n* Write only the number.\n72+4="
    ex = Example("72+4=", "76", {"k": 1})
    new = inject_example(ex, LESSONS, InjectConfig())
    assert (new.prompt, new.answer, new.meta) == (BLOCK + "\n72+4=", "76", {"k": 1}) and ex.prompt == "72+4="
    assert lesson_block([], InjectConfig()) == "" and block_tokens(tok, [], InjectConfig()) == 0
    assert block_tokens(tok, LESSONS, InjectConfig()) == len(tok(BLOCK, add_special_tokens=False)["input_ids"]) > 0
    assert token_counter(tok)("Check the carry.") == len(tok("Check the carry.", add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="position"):
        InjectConfig(position="middle")


# --------------------------------------------------------------------------------------------- reflect


def test_reflection_prompt():
    attempts = [Attempt([{"role": "system", "content": "s"}, {"role": "user", "content": "12+44="}], "56", 1.0,
                        "correct"),
                Attempt("9+9=", "17", 0.0, "wrong; expected 18")]
    assert render_attempts(attempts) == ("Attempt 1 (reward 1):\nTask: 12+44=\nAnswer: 56\nFeedback: correct\n\n"
                                         "Attempt 2 (reward 0):\nTask: 9+9=\nAnswer: 17\nFeedback: wrong; expected 18")
    chat = reflection_prompt(attempts)
    assert len(chat) == 1 and chat[0]["role"] == "user"
    assert chat[0]["content"] == REFLECTION_PROMPT.replace("{attempts}", render_attempts(attempts))
    assert "ONE short, general lesson" in chat[0]["content"] and chat[0]["content"].endswith("Lesson:")
    assert reflection_prompt(attempts, "{x} {attempts}", chat=False) == "{x} " + render_attempts(attempts)
    with pytest.raises(ValueError, match=r"no \{attempts\} placeholder"):
        reflection_prompt(attempts, "no placeholder")


@pytest.mark.parametrize("text, expected", [
    ("Lesson: Always check the carry.", "Always check the carry."),
    ("lesson - keep the answer short", "keep the answer short"),
    ("- **Lesson:** \"Carry the one when needed.\"", "Carry the one when needed."),
    ("\n\nLesson:\n1. Write the answer last.\nSecond line.", "Write the answer last."),
    ("'Check your work twice.'", "Check your work twice."),
    ("Lessons are best kept short.", "Lessons are best kept short."),
    ("Lesson: ok", None),
    ("", None),
    ("  \n- \n", None),
    ("Work digit by digit. " + "then more words " * 40, "Work digit by digit."),
    ("word " * 100, None),  # too long and no sentence end
])
def test_parse_lesson(text, expected):
    assert parse_lesson(text) == expected


def test_pick_attempts_deterministic_and_mixed():
    rewards = [[1.0, 0.0, 0.5], [0.0, 1.0, 1.0], [0.25, 0.75]]
    picks = pick_attempts(rewards, 4, seed=7)
    assert picks == pick_attempts(rewards, 4, seed=7) == sorted(picks) and len(set(picks)) == 4
    chosen = sorted(rewards[p][s] for p, s in picks)
    assert chosen == [0.0, 0.0, 1.0, 1.0]  # two of the best, two of the worst
    assert sorted(rewards[p][s] for p, s in pick_attempts(rewards, 3, seed=0)) == [0.0, 1.0, 1.0]
    ties = [[1.0] * 10]
    assert len({tuple(pick_attempts(ties, 3, seed=s)) for s in range(10)}) > 1  # ties vary with the seed
    assert pick_attempts([[1.0], [0.0]], 5, seed=0) == [(0, 0), (1, 0)]
    with pytest.raises(ValueError, match="k=0"):
        pick_attempts(rewards, 0, seed=0)


# ------------------------------------------------------------------------------------ lesson functions


def test_resolve_function(tmp_path, monkeypatch):
    f = tmp_path / "my_lessons.py"
    f.write_text("def propose(attempts, round):\n    return [f'Lesson of round {round}.']\nVALUE = 3\n")
    fn = resolve_function(f"{f}:propose")
    assert call_lesson_function(fn, [], 2) == ["Lesson of round 2."]
    assert resolve_function("jaxrl_llm.lessons.reflect:fixed_lessons") is fixed_lessons
    assert resolve_function("jaxrl_llm.lessons:LessonBase.from_texts") == LessonBase.from_texts
    forms = r"expected 'package\.module:name' or 'path/to/file\.py:name'"
    for spec, match in [
        ("no_colon", r"lesson function 'no_colon': " + forms),
        (":name", r"':name': the module is empty"),
        ("jaxrl_llm.lessons.nope:f", r"'jaxrl_llm.lessons.nope:f': no module named 'jaxrl_llm.lessons.nope'"),
        ("jaxrl_llm.lessons.reflect:fixed_lesson",
         r"jaxrl_llm.lessons.reflect has no attribute 'fixed_lesson' \(did you mean 'fixed_lessons'\?\)"),
        (f"{tmp_path}/missing.py:f", r"file '.*missing.py' does not exist"),
        (f"{f}:VALUE", r"VALUE is int, not callable; it must be fn\(attempts: list\[Attempt\], round: int\)"),
    ]:
        with pytest.raises(ConfigError, match=match):
            resolve_function(spec)
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match=r"importing .*broken.py failed: RuntimeError: boom"):
        resolve_function(f"{broken}:f")
    with pytest.raises(ConfigError, match="must return a list of lesson strings"):
        call_lesson_function(lambda attempts, round: "one string", [], 0)


def test_fixed_lessons():
    fn = fixed_lessons([" Check the carry. ", "Write only the number."])
    assert fn([Attempt("1+1=", "2", 1.0)], 0) == fn([], 5) == LESSONS
    assert fn.__name__ == "fixed_lessons"
    with pytest.raises(ValueError, match="lesson 1 is empty"):
        fixed_lessons(["ok lesson", "  "])
