"""The arithmetic task: generation, splits, the Python verifier and the in-jit reward agree."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.errors import TaskError
from jaxrl_llm.tasks import RewardInputs, get_task
from jaxrl_llm.tasks.arithmetic import ArithmeticTask, token_byte_table
from jaxrl_llm.tokenizer import decode_completions, load_tokenizer, tokenizer_info


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def test_examples_deterministic_disjoint_and_correct():
    task = get_task("arithmetic", min_digits=1, max_digits=3, operators=("+", "-", "*"))
    train = task.examples("train", 500, seed=0)
    assert train == task.examples("train", 500, seed=0)
    assert train != task.examples("train", 500, seed=1)
    test = task.examples("test", 200, seed=0)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    for e in train[:100] + test[:100]:
        a, op, b = e.meta["a"], e.meta["op"], e.meta["b"]
        assert e.prompt == f"{a}{op}{b}=" and int(e.answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert 0 <= a < 1000 and 0 <= b < 1000
    assert any(int(e.answer) < 0 for e in train)
    no_neg = ArithmeticTask(operators=("-",), allow_negative=False).examples("train", 200, 0)
    assert all(int(e.answer) >= 0 for e in no_neg)


def test_config_errors():
    with pytest.raises(ValueError, match="each must be one of"):
        ArithmeticTask(operators=("/",))
    with pytest.raises(ValueError, match="min_digits"):
        ArithmeticTask(min_digits=3, max_digits=2)
    with pytest.raises(KeyError, match="Did you mean 'arithmetic'"):
        get_task("arithmatic")


def test_python_reward_and_answer_extraction():
    task = ArithmeticTask()
    ex = task.examples("train", 2, 0)
    inputs = RewardInputs([ex[0].answer, ex[1].answer + "0"], ex, np.array([2, 3]), np.array([True, True]), 8)
    out = task.reward(inputs)
    np.testing.assert_array_equal(out.scores, [1.0, 0.0])
    np.testing.assert_array_equal(out.correct, [True, False])
    assert task.extract_answer(" 046 ") == "46" and task.extract_answer("4x6") is None
    assert out.metrics()["accuracy"] == 0.5


def test_token_byte_table_matches_decoding(tok):
    table, lens = token_byte_table(tok, 512)
    info = tokenizer_info(tok)
    assert lens[info.pad_id] == 0 and all(lens[e] == 0 for e in info.eos_ids)
    for i in range(2, 512):
        assert bytes(table[i, :lens[i]].astype(np.uint8)) == tok.decode([i]).encode("utf-8", "surrogatepass") or \
            "\ufffd" in tok.decode([i])


def test_in_jit_reward_equals_python_verifier(tok):
    """Thousands of random completions: right answers in several tokenizations, near misses, noise."""
    task = ArithmeticTask(min_digits=1, max_digits=3, operators=("+", "-", "*"))
    info = tokenizer_info(tok)
    eos, pad = info.eos_ids[0], info.pad_id
    digit_ids = {str(d): tok.convert_tokens_to_ids(str(d)) for d in range(10)}
    minus_id = tok.convert_tokens_to_ids("-")
    rng = np.random.default_rng(0)
    examples = task.examples("train", 3000, seed=3)
    n_new = 12
    tokens = np.full((len(examples), n_new), pad, np.int32)
    mask = np.zeros((len(examples), n_new), np.int32)
    for i, e in enumerate(examples):
        kind = i % 6
        ans = e.answer
        if kind == 0:
            ids = tok.encode(ans, add_special_tokens=False)                       # BPE tokenization
        elif kind == 1:
            ids = [digit_ids[c] if c != "-" else minus_id for c in ans]            # one digit per token
        elif kind == 2:
            ids = tok.encode(ans + str(rng.integers(10)), add_special_tokens=False)  # one digit too many
        elif kind == 3:
            ids = tok.encode(ans[:-1] or "7", add_special_tokens=False)           # one digit short
        elif kind == 4:
            ids = tok.encode(str(int(ans) + int(rng.integers(1, 5))), add_special_tokens=False)
        else:
            ids = list(rng.integers(2, 512, size=rng.integers(1, 6)))              # noise
        if rng.random() < 0.7:
            ids = ids + [eos]
        ids = ids[:n_new]
        tokens[i, :len(ids)] = ids
        mask[i, :len(ids)] = 1
        if rng.random() < 0.3 and len(ids) < n_new:  # garbage after the mask must not count
            tokens[i, len(ids):] = rng.integers(2, 512, size=n_new - len(ids))
    texts = decode_completions(tok, tokens, mask)
    python = task.reward(RewardInputs(texts, examples, mask.sum(1), np.ones(len(examples), bool), n_new)).scores
    target_bytes, target_len = task.encode_targets(examples)
    reward = jax.jit(task.jax_reward(tok, 512))
    in_jit = np.asarray(reward(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(target_bytes),
                               jnp.asarray(target_len)))
    np.testing.assert_array_equal(in_jit, python)
    assert 0.25 < python.mean() < 0.5  # both right and wrong answers are well represented


def test_spaced_format_gives_one_token_per_digit(tok):
    task = ArithmeticTask(min_digits=2, max_digits=2, spaced=True)
    plain = ArithmeticTask(min_digits=2, max_digits=2)
    ex, ref = task.examples("train", 50, 0), plain.examples("train", 50, 0)
    for e, r in zip(ex, ref):  # the same problems, written digit by digit
        assert e.prompt.replace(" ", "") == r.prompt and e.answer.replace(" ", "") == r.answer
        pieces = [tok.convert_ids_to_tokens(i) for i in tok.encode(e.prompt + e.answer, add_special_tokens=False)]
        assert all(len(p) == 1 for p in pieces), pieces
    assert task.is_correct(ex[0].answer, ex[0]) and not task.is_correct(ex[0].answer.replace(" ", ""), ex[0])
    assert task.extract_answer("1 2 3") == "123"


# ----------------------------------------------------------------- chat prompts, free-form answers

def test_extract_integer_formats():
    from jaxrl_llm.tasks.extraction import extract_integer
    assert extract_integer("7 * 8 = 56.", "last_number") == (56, True)
    assert extract_integer("The total is 1,234 apples", "last_number") == (1234, True)
    assert extract_integer("It is 3.5 or -4", "last_number") == (-4, True)
    assert extract_integer("half of it: 2.5", "last_number") == (None, False)
    assert extract_integer("no digits", "last_number") == (None, False)
    assert extract_integer("so 3+4 = \\boxed{7}. Check: 7", "boxed") == (7, True)
    assert extract_integer("\\boxed{x}", "boxed") == (None, True)
    assert extract_integer("7", "boxed") == (None, False)
    assert extract_integer("3 + 4 = 7\n**Answer:** 7", "answer_line") == (7, True)
    assert extract_integer("answer: seven", "answer_line") == (None, True)
    assert extract_integer("7", "answer_line") == (None, False)
    assert extract_integer(" 12 ", "exact") == (12, True)
    assert extract_integer("12.", "exact") == (None, False)
    with pytest.raises(ValueError, match="answer_format"):
        extract_integer("1", "first_number")


def test_chat_arithmetic_prompts_reward_and_format_term():
    task = ArithmeticTask(min_digits=1, max_digits=1, operators=("+", "*"),
                          templates=("What is {a} {op} {b}? Answer with just the number.", "Compute {a}{op}{b}."),
                          answer_format="last_number", format_score=0.1)
    exs = task.examples("train", 40, 0)
    assert all(isinstance(e.prompt, list) and e.prompt[0]["role"] == "user" for e in exs)
    assert {e.prompt[0]["content"].split()[0] for e in exs} == {"What", "Compute"}
    e = exs[0]
    a, op, b = e.meta["a"], e.meta["op"], e.meta["b"]
    right, wrong = f"{a} {op} {b} = {e.answer}.", f"{a} {op} {b} = {int(e.answer) + 1}."
    out = task.reward(RewardInputs([right, wrong, "I do not know"], [e] * 3, np.ones(3, np.int32),
                                   np.ones(3, bool), 16))
    np.testing.assert_allclose(out.scores, [1.1, 0.1, 0.0])
    assert out.correct.tolist() == [True, False, False]
    np.testing.assert_allclose(out.components["format"], [0.1, 0.1, 0.0])
    assert task.extract_answer(right) == e.answer and not task.in_jit_reward
    chosen, rejected = task.preference_pair(e, random.Random(0))
    assert task.is_correct(chosen, e) and not task.is_correct(rejected, e)
    with pytest.raises(TaskError, match="in_jit=False"):
        task.jax_reward(load_tokenizer("tiny"))


def test_chat_arithmetic_bad_kwargs():
    with pytest.raises(ValueError, match="answer_format"):
        ArithmeticTask(answer_format="first")
    with pytest.raises(ValueError, match="template"):
        ArithmeticTask(templates=("What is {x}?",), answer_format="last_number")
    with pytest.raises(ValueError, match="spaced"):
        ArithmeticTask(templates=("{a}{op}{b}",), spaced=True)
