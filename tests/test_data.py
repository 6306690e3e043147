"""Data layer: file records and their errors, prompt/answer and preference loaders, preference encoding,
task datasets in TFDS (array_record, read without TensorFlow), the sharded resumable prompt iterator."""

import json
import sys

import numpy as np
import pytest

from jaxrl_llm.data import (DataError, PreferencePair, PromptIterator, build_task_dataset, encode_preferences,
                            load_preferences, load_prompt_answer, load_task_split, next_prompt_batch, read_records,
                            tokenize_batch)
from jaxrl_llm.tasks.base import Example, RewardOutput, register_task
from jaxrl_llm.tokenizer import load_tokenizer

TASK = "data_test_sums"


@register_task(TASK)
class SumsTask:
    """A stand-in task: "a+b=" prompts, deterministic in (split, num, seed, offset)."""

    name = TASK

    def __init__(self, offset: int = 0, chat: bool = False):
        self.offset, self.chat = offset, chat

    def examples(self, split, num, seed):
        rng = np.random.default_rng([seed, {"train": 0, "test": 1}[split]])
        out = []
        for _ in range(num):
            a, b = (int(x) + self.offset for x in rng.integers(0, 1000, 2))
            text = f"{a}+{b}="
            out.append(Example([{"role": "user", "content": text}] if self.chat else text, str(a + b),
                               {"operands": [a, b], "split": split}))
        return out

    def reward(self, inputs):
        return RewardOutput(np.zeros(len(inputs), np.float32))

    def extract_answer(self, completion):
        return completion.strip() or None

    def is_correct(self, completion, example):
        return completion.strip() == example.answer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def write(path, lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return path


# ----------------------------------------------------------------------------- records and their errors

def test_read_records_jsonl_json_parquet(tmp_path):
    f = write(tmp_path / "d.jsonl", [{"a": 1}, "", "  ", {"a": 2}])
    assert list(read_records(f)) == [(f"{f}:1", {"a": 1}), (f"{f}:4", {"a": 2})]
    j = tmp_path / "d.json"
    j.write_text(json.dumps([{"a": 1}, {"a": 2}]))
    assert list(read_records(j)) == [(f"{j}[0]", {"a": 1}), (f"{j}[1]", {"a": 2})]
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["1+1=", "2+2="], "answer": ["2", "4"]}), p)
    assert list(read_records(p)) == [(f"{p}:row 1", {"prompt": "1+1=", "answer": "2"}),
                                     (f"{p}:row 2", {"prompt": "2+2=", "answer": "4"})]
    assert [e.answer for e in load_prompt_answer(p)] == ["2", "4"]


def test_malformed_json_names_file_line_and_error(tmp_path):
    f = write(tmp_path / "bad.jsonl", [{"a": 1}, '{"a": 2,}'])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON \(Expecting property name .* at column 9\)"):
        list(read_records(f))


def test_non_utf8_names_line_and_byte_offset(tmp_path):
    f = tmp_path / "latin.jsonl"
    f.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: invalid UTF-8 byte b'\\xe9' at byte 10 of the line "
                                        r"\(byte 19 of the file\)"):
        list(read_records(f))


def test_not_an_object_empty_and_missing(tmp_path):
    f = write(tmp_path / "list.jsonl", [{"a": 1}, "[1, 2]"])
    with pytest.raises(DataError, match=r"list\.jsonl:2: line is an array, expected a JSON object"):
        list(read_records(f))
    empty = write(tmp_path / "empty.jsonl", ["", " "])
    with pytest.raises(DataError, match=r"empty\.jsonl: empty dataset \(no records\)"):
        load_prompt_answer(empty)
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        list(read_records(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        list(read_records(write(tmp_path / "x.csv", ["a,b"])))


# ----------------------------------------------------------------------------- prompt / answer

def test_load_prompt_answer_text_and_chat(tmp_path):
    f = write(tmp_path / "pa.jsonl", [
        {"prompt": "1+2=", "answer": "3", "level": 1},
        {"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": "2+2="}], "answer": 4},
        {"question": "5+5=", "solution": "10"},
    ])
    with pytest.raises(DataError, match=r"pa\.jsonl:3: missing field 'prompt' \(a string\) or 'messages'"):
        load_prompt_answer(f)
    f2 = write(tmp_path / "pa2.jsonl", [{"prompt": "1+2=", "answer": "3", "level": 1},
                                        {"messages": [{"role": "system", "content": "Add."},
                                                      {"role": "user", "content": "2+2="}], "answer": 4}])
    assert load_prompt_answer(f2) == [
        Example("1+2=", "3", {"level": 1}),
        Example([{"role": "system", "content": "Add."}, {"role": "user", "content": "2+2="}], "4", {})]
    f3 = write(tmp_path / "pa3.jsonl", [{"question": "5+5=", "solution": "10"}])
    assert load_prompt_answer(f3, prompt_field="question", answer_field="solution") == [Example("5+5=", "10")]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "1+1="}, r"x\.jsonl:1: missing field 'answer'"),
    ({"prompt": "1+1=", "answer": ["2"]}, r"x\.jsonl:1: field 'answer' is an array; expected a string"),
    ({"prompt": 7, "answer": "2"}, r"x\.jsonl:1: field 'prompt' is a number; expected a list of"),
    ({"messages": [{"role": "user", "content": 5}], "answer": "2"},
     r"x\.jsonl:1: field 'messages'\[0\]\.content is a number; expected a string"),
    ({"messages": [{"content": "hi"}], "answer": "2"}, r"field 'messages'\[0\] has no 'role'"),
    ({"messages": [], "answer": "2"}, r"field 'messages' is an array \(empty\)"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "a"}], "answer": "2"},
     r"has both 'prompt' and 'messages'"),
])
def test_prompt_answer_errors(tmp_path, record, message):
    with pytest.raises(DataError, match=message):
        load_prompt_answer(write(tmp_path / "x.jsonl", [record]))


# ----------------------------------------------------------------------------- preferences

def test_preferences_text_encoding(tmp_path, tok):
    f = write(tmp_path / "p.jsonl", [{"prompt": "12+3=", "chosen": "15", "rejected": "16", "id": 7}])
    pairs = load_preferences(f)
    assert pairs == [PreferencePair("12+3=", "15", "16", {"id": 7})] and not pairs[0].is_chat
    arrays, stats = encode_preferences(tok, pairs, max_prompt_len=6, max_response_len=4)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    p, eos, pad = ids("12+3="), 1, 0
    np.testing.assert_array_equal(arrays["prompt_tokens"][0], [pad] * (6 - len(p)) + p)  # left-padded
    np.testing.assert_array_equal(arrays["prompt_mask"][0], [False] * (6 - len(p)) + [True] * len(p))
    for side, text in (("chosen", "15"), ("rejected", "16")):
        want = ids(text) + [eos]  # right-padded, ends with EOS
        np.testing.assert_array_equal(arrays[f"{side}_tokens"][0], want + [pad] * (4 - len(want)))
        np.testing.assert_array_equal(arrays[f"{side}_mask"][0], [True] * len(want) + [False] * (4 - len(want)))
    assert {k: v.dtype for k, v in arrays.items()} == {
        "prompt_tokens": np.int32, "prompt_mask": bool, "chosen_tokens": np.int32, "chosen_mask": bool,
        "rejected_tokens": np.int32, "rejected_mask": bool}
    assert stats.kept == (0,) and stats.prompts_truncated == stats.responses_truncated == 0


def test_preferences_chat_formats(tmp_path, tok):
    user = {"role": "user", "content": "12+3="}
    f = write(tmp_path / "c.jsonl", [
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "15"}], "rejected": "16"},
        {"chosen": [user, {"role": "assistant", "content": "15"}], "rejected": [user, {"role": "assistant",
                                                                                       "content": "16"}]},
    ])
    a, b = load_preferences(f)
    assert a.is_chat and a == b and a.prompt == [user] and a.rejected == [{"role": "assistant", "content": "16"}]
    arrays, _ = encode_preferences(tok, [a, b], max_prompt_len=8, max_response_len=4)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    p = ids(tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True))
    np.testing.assert_array_equal(arrays["prompt_tokens"][:, -len(p):], [p, p])
    # The template already ends the assistant turn with <eos>: exactly one EOS, nothing after it.
    want = ids("15") + [1]
    np.testing.assert_array_equal(arrays["chosen_tokens"][:, :len(want)], [want, want])
    assert arrays["chosen_mask"].sum(1).tolist() == [len(want)] * 2
    assert (arrays["chosen_tokens"][arrays["chosen_mask"]] == 1).sum() == 2


def test_preferences_chatml_template_ends_at_end_of_turn(chatml_tokenizer):
    # Qwen-style ChatML: the turn ends "<|im_end|>\n"; generation stops at <|im_end|> (an EOS id), so the
    # response must end exactly there, not with the newline after it nor with a second EOS appended.
    tok = chatml_tokenizer
    pair = PreferencePair([{"role": "user", "content": "1+2="}], [{"role": "assistant", "content": "3"}],
                          [{"role": "assistant", "content": "4"}])
    arrays, _ = encode_preferences(tok, [pair], max_prompt_len=24, max_response_len=4)
    text = lambda k: tok.decode(arrays[f"{k}_tokens"][0][arrays[f"{k}_mask"][0]])  # noqa: E731
    assert text("prompt") == "<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n"
    assert (text("chosen"), text("rejected")) == ("3<|im_end|>", "4<|im_end|>")


@pytest.mark.parametrize("record, message", [
    ({"prompt": "1+1=", "chosen": "2"}, r"p\.jsonl:1: missing field 'rejected'"),
    ({"prompt": "1+1=", "chosen": [{"role": "assistant", "content": "2"}], "rejected": "3"},
     r"field 'chosen' is a message list but 'prompt' is a string"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": 3}, r"p\.jsonl:1: field 'rejected' is a number; expected a string"),
    ({"chosen": "2", "rejected": "3"}, r"missing field 'prompt'"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
     r"share no leading message"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}], "rejected": "c"},
     r"field 'chosen' starts with a 'user' message"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": [{"role": "assistant"}]},
     r"field 'rejected'\[0\] has no 'content'"),
])
def test_preference_errors(tmp_path, record, message):
    with pytest.raises(DataError, match=message):
        load_preferences(write(tmp_path / "p.jsonl", [record]))


def test_preferences_overlong(tok):
    pairs = [PreferencePair("1+2=", "3", "4", where="f:1"),
             PreferencePair("123456+654321=", "777777", "1", where="f:2"),  # long prompt, long chosen
             PreferencePair("1+2=", "33333333333", "4", where="f:3")]  # long chosen
    _, s = encode_preferences(tok, pairs, 5, 3)
    assert (s.prompts_truncated, s.responses_truncated, s.dropped_prompt, s.dropped_response, s.kept) == (1, 2, 0, 0,
                                                                                                          (0, 1, 2))
    arrays, s = encode_preferences(tok, pairs, 5, 3, overlong_prompt="drop", overlong_response="drop")
    assert (s.dropped_prompt, s.dropped_response, s.kept) == (1, 1, (0,)) and arrays["chosen_tokens"].shape == (1, 3)
    with pytest.raises(DataError, match=r"f:2: prompt has \d+ tokens > max_prompt_len=5"):
        encode_preferences(tok, pairs, 5, 3, overlong_prompt="error")
    with pytest.raises(DataError, match=r"f:2: chosen response has \d+ tokens \(with EOS\) > max_response_len=3"):
        encode_preferences(tok, pairs, 50, 3, overlong_response="error")


# ----------------------------------------------------------------------------- TFDS task datasets

def test_tfds_build_read_back_rebuild_identical(tmp_path):
    splits = {"train": 40, "test": 7}
    path = build_task_dataset(TASK, {"offset": 3}, data_dir=tmp_path / "a", splits=splits, seed=5)
    want = SumsTask(offset=3).examples("train", 40, 5)
    train = load_task_split(path, "train")
    assert len(train) == 40 and list(train) == want and train[-1] == want[-1] and train[2:5] == want[2:5]
    assert load_task_split(TASK, "test", tmp_path / "a")[:] == SumsTask(offset=3).examples("test", 7, 5)
    assert train.config == {"task": TASK, "task_kwargs": {"offset": 3}, "splits": splits, "seed": 5,
                            "format": "jaxrl_llm.Example/json-v1"}
    assert "tensorflow" not in sys.modules  # built and read on numpy alone

    import tensorflow_datasets as tfds  # an ordinary TFDS directory
    raw = tfds.builder_from_directory(str(path)).as_data_source(split="train")
    assert Example.from_json(json.loads(raw[0]["example"])) == want[0]

    again = build_task_dataset(TASK, {"offset": 3}, data_dir=tmp_path / "b", splits=splits, seed=5)
    assert again.relative_to(tmp_path / "b") == path.relative_to(tmp_path / "a")
    files = sorted(p.name for p in path.iterdir())
    assert any("array_record" in f for f in files) and "metadata.json" in files
    for name in files:
        assert (path / name).read_bytes() == (again / name).read_bytes(), name
    stamp = (path / "dataset_info.json").stat().st_mtime_ns
    assert build_task_dataset(TASK, {"offset": 3}, data_dir=tmp_path / "a", splits=splits, seed=5) == path
    assert (path / "dataset_info.json").stat().st_mtime_ns == stamp  # reused, not regenerated


def test_tfds_config_change_is_a_new_dataset(tmp_path):
    kw = {"data_dir": tmp_path, "splits": {"train": 8}}
    p0 = build_task_dataset(TASK, {"offset": 0}, seed=0, **kw)
    for other in (build_task_dataset(TASK, {"offset": 1}, seed=0, **kw),
                  build_task_dataset(TASK, {"offset": 0}, seed=1, **kw)):
        assert other != p0 and list(load_task_split(other, "train")) != list(load_task_split(p0, "train"))
    bigger = build_task_dataset(TASK, {"offset": 0}, seed=0, data_dir=tmp_path, splits={"train": 9})
    assert bigger != p0 and len(load_task_split(bigger, "train")) == 9
    with pytest.raises(DataError, match=r"4 datasets of task 'data_test_sums' .* match"):
        load_task_split(TASK, "train", tmp_path)
    assert load_task_split(TASK, "train", tmp_path, task_kwargs={"offset": 1}).config["task_kwargs"] == {"offset": 1}
    with pytest.raises(DataError, match=r"no dataset of task 'data_test_sums' .* matches \{'seed': 7\}"):
        load_task_split(TASK, "train", tmp_path, seed=7)
    with pytest.raises(DataError, match=r"no split 'test'; it has \['train'\]"):
        load_task_split(p0, "test")
    meta = json.loads((p0 / "metadata.json").read_text())  # a directory whose contents do not match its name
    (p0 / "metadata.json").write_text(json.dumps({**meta, "seed": 3}))
    with pytest.raises(DataError, match=r"holds a dataset for config"):
        build_task_dataset(TASK, {"offset": 0}, seed=0, **kw)


# ----------------------------------------------------------------------------- iterator

def ids_of(batches):
    return [[e.meta["i"] for e in b] for b in batches]


def flat(batches):
    return [i for b in batches for i in b]


def numbered(n):
    return [Example(f"{i}+{i}=", str(2 * i), {"i": i}) for i in range(n)]


def test_iterator_deterministic_and_epochs_reshuffle():
    data = numbered(24)
    run = lambda seed: ids_of(next(it) for it in [PromptIterator(data, 6, seed, process_index=0,  # noqa: E731
                                                                 process_count=1)] for _ in range(8))
    a = run(0)
    assert a == run(0) and a != run(1)
    e0, e1 = flat(a[:4]), flat(a[4:])
    assert sorted(e0) == sorted(e1) == list(range(24)) and e0 != e1  # each epoch is a new permutation
    it = PromptIterator(data, 5, 0, shuffle=False, process_index=0, process_count=1, drop_remainder=False)
    assert ids_of(next(it) for _ in range(6)) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14],
                                                 [15, 16, 17, 18, 19], [20, 21, 22, 23], [0, 1, 2, 3, 4]]
    it = PromptIterator(data, 5, 0, shuffle=False, process_index=0, process_count=1)
    assert ids_of(next(it) for _ in range(5))[-1] == [0, 1, 2, 3, 4] and it.batches_per_epoch == 4


@pytest.mark.parametrize("n", [20, 21])
def test_iterator_shards_split_the_global_batches(n):
    data = numbered(n)
    whole = PromptIterator(data, 10, 3, process_index=0, process_count=1)
    its = [PromptIterator(data, 10, 3, process_index=p, process_count=2) for p in range(2)]
    for _ in range(3):  # epochs
        for _ in range(2):  # the global batch is the same however many shards read it; shard p has block p
            shards = [ids_of([next(it)])[0] for it in its]
            assert len(shards[0]) == len(shards[1]) == 5
            assert shards[0] + shards[1] == ids_of([next(whole)])[0]
    with pytest.raises(ValueError, match="divisible by the 3 shards"):
        PromptIterator(data, 10, 3, process_index=0, process_count=3)


def test_iterator_state_restore_resumes_exactly(tok):
    data = numbered(23)

    def make(p=1, count=2):
        return PromptIterator(data, 4, 11, process_index=p, process_count=count)  # 5 global batches + 3 rows

    it = make()
    for _ in range(3):
        next(it)
    it.take(2)  # a refill, mid-epoch: 2 rows of this shard = 4 global rows
    saved = json.loads(json.dumps(it.state()))
    assert saved["epoch"] == 0 and saved["position"] == 16
    later = [next(it) for _ in range(5)] + [it.take(3)]
    resumed = make()
    resumed.restore(saved)
    assert ids_of([next(resumed) for _ in range(5)] + [resumed.take(3)]) == ids_of(later)
    with pytest.raises(ValueError, match=r"source_len: saved 23, now 22"):
        PromptIterator(data[:22], 4, 11, process_index=0, process_count=4).restore(saved)
    # every process saves the same state, which counts global rows: it restores on another process layout too
    assert "process_index" not in saved and "process_count" not in saved
    shards = [make(p) for p in range(2)]
    one = make(0, 1)
    for x in shards + [one]:
        x.restore(saved)
    assert ids_of([next(shards[0])])[0] + ids_of([next(shards[1])])[0] == ids_of([next(one)])[0]
    with pytest.raises(ValueError, match=r"position=99"):
        make().restore({**saved, "position": 99})


def test_iterator_over_task_source(tmp_path):
    path = build_task_dataset(TASK, data_dir=tmp_path, splits={"train": 12}, seed=0)
    source = load_task_split(path, "train")
    batches = [next(it) for it in [PromptIterator(source, 4, 0, process_index=0, process_count=1)] for _ in range(3)]
    assert sorted(e.answer for b in batches for e in b) == sorted(e.answer for e in source)


def test_tokenize_overlong_truncate_drop_error_and_refill(tok):
    short = [Example("1+1=", "2", {"i": i}) for i in range(3)]
    long_ = Example("123456789+987654321=", "x", {"i": 99})
    n = len(tok("123456789+987654321=")["input_ids"])
    t = tokenize_batch(tok, short[:2] + [long_], max_prompt_len=6)
    assert t.tokens.shape == (3, 6) and (t.num_truncated, t.num_dropped) == (1, 0) and t.mask[2].all()
    np.testing.assert_array_equal(t.tokens[2], tok("123456789+987654321=")["input_ids"][-6:])  # keeps the end
    assert n > 6
    t = tokenize_batch(tok, short[:2] + [long_], max_prompt_len=6, overlong="drop")
    assert t.tokens.shape == (2, 6) and (t.num_truncated, t.num_dropped) == (0, 1) and t.examples == short[:2]
    with pytest.raises(DataError, match=r"batch example 2 \(answer 'x'\): prompt is longer than max_prompt_len=6"):
        tokenize_batch(tok, short[:2] + [long_], max_prompt_len=6, overlong="error")
    chat = tokenize_batch(tok, [Example([{"role": "user", "content": "1+1="}], "2")], max_prompt_len=6)
    np.testing.assert_array_equal(chat.tokens, tokenize_batch(tok, short[:1], 6).tokens)  # tiny template: content

    # Refilling: every third example is too long; batches stay [4, 6] and the stream resumes exactly.
    data = [long_ if i % 3 == 0 else Example(f"{i}+1=", str(i + 1), {"i": i}) for i in range(30)]
    it = PromptIterator(data, 4, 0, process_index=0, process_count=1)
    got = [next_prompt_batch(it, tok, 6, overlong="drop") for _ in range(3)]
    assert all(b.tokens.shape == (4, 6) and len(b.examples) == 4 for b in got)
    assert all(e.meta["i"] % 3 for b in got for e in b.examples)
    pulled = it.state()
    consumed = it.shard_indices(0)[:pulled["position"]]
    assert pulled["epoch"] == 0 and pulled["position"] == 12 + sum(b.num_dropped for b in got)
    assert sum(b.num_dropped for b in got) == sum(i % 3 == 0 for i in consumed) > 0
    after = next_prompt_batch(it, tok, 6, overlong="drop")
    again = PromptIterator(data, 4, 0, process_index=0, process_count=1)
    again.restore(pulled)
    assert ids_of([next_prompt_batch(again, tok, 6, overlong="drop").examples]) == ids_of([after.examples])
    with pytest.raises(DataError, match=r"nearly every prompt is longer than max_prompt_len=6"):
        next_prompt_batch(PromptIterator([long_] * 8, 4, 0, process_index=0, process_count=1), tok, 6, "drop")
