"""The shipped tiny tokenizer, loading rules (pad vs EOS), prompt encoding and completion decoding.

Token ids below are those of the shipped tokenizer: "72"=314 "+"=12 "4"=21
"="=30 "7"=24 "77"=303 "37"=288 "3"=20 "43"=312 "9"=26 "0"=17 "12"=259.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from jaxrl_llm.assets import train_tiny_tokenizer as tt
from jaxrl_llm.tokenizer import (
    TokenizerInfo,
    decode_completions,
    encode_prompts,
    load_tokenizer,
    tiny_tokenizer_dir,
    tokenizer_info,
)

PAD, EOS = 0, 1
BENCH_PROMPTS = ["72+4=", "7+7737=", "3439+7=", "6+9952=", "7+738=", "75+5=", "0+8=", "6+54="]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def _save_variant(tmp_path, *, generation_eos=None, **attrs):
    """The tiny tokenizer re-saved with some attributes changed (e.g. pad_token="<eos>")."""
    t = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()), local_files_only=True)
    for name, value in attrs.items():
        if name == "extra_specials":
            t.add_special_tokens({"additional_special_tokens": value})
        else:
            setattr(t, name, value)
    t.save_pretrained(str(tmp_path))
    if generation_eos is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return tmp_path


def test_shipped_tokenizer_loads_with_autotokenizer():
    path = tiny_tokenizer_dir()
    assert (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()
    t = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    assert isinstance(t, PreTrainedTokenizerFast)
    assert len(t) == 512
    assert (t.pad_token, t.pad_token_id, t.eos_token, t.eos_token_id) == ("<pad>", PAD, "<eos>", EOS)
    assert t.bos_token is None and t.padding_side == "left"
    assert t("72+4=")["input_ids"] == [314, 12, 21, 30]  # no BOS, no EOS appended


def test_load_tiny_info(tok):
    assert tokenizer_info(tok) == TokenizerInfo(pad_id=PAD, eos_ids=(EOS,), vocab_size=512, pad_added=False)
    assert tok.padding_side == "left"


@pytest.mark.parametrize(
    "text", tt.arithmetic_strings(20, seed=123) + ["12+34=46", "0+0=0", " 12 + 34 = 46\n", "héllo wörld"]
)
def test_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert EOS not in ids and PAD not in ids
    assert tok.decode(ids) == text


def test_benchmark_prompts_come_from_seed_1_and_are_short(tok):
    assert [f"{a}+{b}=" for a, b in tt.arithmetic_problems(8, seed=1)] == BENCH_PROMPTS
    assert tt.arithmetic_strings(3, seed=0) == ["6890+4=6894", "6634+991=7625", "5866+64=5930"]
    # Pinned: merges stay inside digit runs ("3439" -> "3" "43" "9").
    assert [len(tok(p)["input_ids"]) for p in BENCH_PROMPTS] == [4, 5, 6, 5, 5, 4, 4, 4]


def test_retraining_reproduces_shipped_files_byte_for_byte(tmp_path):
    shipped = tiny_tokenizer_dir()
    names = sorted(p.name for p in shipped.iterdir())
    assert "tokenizer.json" in names
    # Once in a fresh process through the command line, once in this one: both must
    # equal the shipped copy, which was written by yet another process.
    subprocess.run(
        [sys.executable, "-m", "jaxrl_llm.assets.train_tiny_tokenizer", "--out", str(tmp_path / "cli")],
        check=True, capture_output=True,
    )
    tt.save(tmp_path / "inproc")
    for out in (tmp_path / "cli", tmp_path / "inproc"):
        assert sorted(p.name for p in out.iterdir()) == names
        for name in names:
            assert (out / name).read_bytes() == (shipped / name).read_bytes(), f"{out / name} differs"


def test_chat_template(tok):
    messages = [
        {"role": "user", "content": "1+2="},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "4+5="},
    ]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == "1+2=3<eos>4+5="
    for gen_prompt in (True, False):  # the generation prompt adds nothing
        enc = encode_prompts(tok, [messages], 10, chat=True, add_generation_prompt=gen_prompt)
        np.testing.assert_array_equal(enc.tokens, [[18, 12, 19, 30, 20, EOS, 21, 12, 22, 30]])
        assert enc.mask.tolist() == [[True] * 10]


def test_left_padding_and_mask(tok):
    enc = encode_prompts(tok, ["72+4=", "7+7737=", "0"], 6)
    assert enc.tokens.dtype == np.int32 and enc.mask.dtype == np.bool_
    np.testing.assert_array_equal(
        enc.tokens,
        [
            [PAD, PAD, 314, 12, 21, 30],
            [PAD, 24, 12, 303, 288, 30],
            [PAD, PAD, PAD, PAD, PAD, 17],
        ],
    )
    np.testing.assert_array_equal(
        enc.mask,
        [
            [0, 0, 1, 1, 1, 1],
            [0, 1, 1, 1, 1, 1],
            [0, 0, 0, 0, 0, 1],
        ],
    )
    assert enc.num_truncated == 0


def test_truncation_left_keeps_the_end(tok):
    enc = encode_prompts(tok, ["72+4=", "3439+7="], 4, truncation="left")
    np.testing.assert_array_equal(enc.tokens, [[314, 12, 21, 30], [26, 12, 24, 30]])  # "3" "43" dropped
    assert enc.mask.all()
    assert enc.num_truncated == 1


def test_truncation_error_names_prompt_and_length(tok):
    with pytest.raises(ValueError, match=r"prompt 1 has 6 tokens, more than max_length=5"):
        encode_prompts(tok, ["72+4=", "3439+7="], 5, truncation="error")
    encode_prompts(tok, ["72+4=", "3439+7="], 6, truncation="error")  # fits exactly


def test_bad_prompts(tok):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        encode_prompts(tok, ["1", ""], 4)
    with pytest.raises(TypeError, match="chat=True"):
        encode_prompts(tok, [[{"role": "user", "content": "1"}]], 4)


def test_decode_completions_masks_and_stops_at_eos(tok):
    tokens = np.array(
        [
            [259, 12, 20, EOS, 21, 21],  # "12+3", then EOS and junk after it
            [17, 17, 17, 17, 17, 17],  # masked-out tokens are dropped
            [PAD, 314, 12, 21, 30, 21],  # no EOS: everything masked in
        ],
        np.int32,
    )
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1]], bool)
    assert decode_completions(tok, tokens, mask) == ["12+3", "00", "72+4=4"]
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        decode_completions(tok, tokens, mask[:, :3])


def test_pad_equal_to_eos_gets_a_distinct_pad(tmp_path):
    path = _save_variant(tmp_path, pad_token="<eos>")
    raw = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    assert raw.pad_token_id == EOS  # the setup
    with pytest.raises(ValueError, match="pad == EOS"):
        tokenizer_info(raw)  # not loaded through load_tokenizer: refused, not silently used
    t = load_tokenizer(path)
    info = tokenizer_info(t)
    assert info.pad_id == PAD and t.pad_token_id == PAD
    assert info.eos_ids == (EOS,) and t.eos_token_id == EOS
    assert not info.pad_added and len(t) == 512
    enc = encode_prompts(t, ["1+2=3<eos>", "5"], 7)  # an EOS inside a prompt stays in the mask
    assert enc.tokens.tolist() == [[PAD, 18, 12, 19, 30, 20, EOS], [PAD] * 6 + [22]]
    assert enc.mask.tolist() == [[False] + [True] * 6, [False] * 6 + [True]]


def test_missing_pad_picks_existing_pad_token(tmp_path):
    t = load_tokenizer(_save_variant(tmp_path, pad_token=None))
    assert tokenizer_info(t).pad_id == PAD and not tokenizer_info(t).pad_added


def test_generation_config_eos_ids_and_reserved_pad(tmp_path):
    # <pad> (0) is declared an EOS id by generation_config.json, so it cannot pad;
    # the reserved special token is the next choice.
    path = _save_variant(tmp_path, extra_specials=["<|reserved_special_token_0|>"], generation_eos=[EOS, PAD])
    info = tokenizer_info(load_tokenizer(path))
    assert info.eos_ids == (EOS, PAD)
    assert info.pad_id == 512 and not info.pad_added


def test_qwen_like_instruct_tokenizer_pads_with_fim_pad(tmp_path):
    # Qwen2.5-Instruct: eos <|im_end|>, pad <|endoftext|>, and generation_config.json
    # stops on both, so the shipped pad is an EOS id. <|vision_pad|> fills image
    # inputs; <|fim_pad|> (marked non-special by Qwen) is free. No <unk>, no <pad>.
    raw = Tokenizer(models.WordLevel({"1": 0, "2": 1, "3": 2}, unk_token="<unk>"))
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.Split("", "isolated"), decoders.Fuse()
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>"]
    t = PreTrainedTokenizerFast(tokenizer_object=raw, additional_special_tokens=names)
    t.add_tokens([AddedToken("<|fim_pad|>", special=False)])
    t.eos_token, t.pad_token = "<|im_end|>", "<|endoftext|>"
    t.save_pretrained(str(tmp_path))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 3]}))
    t = load_tokenizer(tmp_path)
    assert [t.convert_ids_to_tokens(i) for i in range(3, 8)] == names + ["<|fim_pad|>"]  # the setup
    assert t("12")["input_ids"] == [0, 1] and t.unk_token_id is None
    assert tokenizer_info(t) == TokenizerInfo(pad_id=7, eos_ids=(5, 3), vocab_size=8, pad_added=False)
    assert decode_completions(t, [[2, 0, 3, 1]], [[True] * 4]) == ["31"]  # <|endoftext|> stops too


def test_no_free_special_token_adds_pad_within_vocab_size(tmp_path):
    path = _save_variant(tmp_path, generation_eos=[EOS, PAD])
    with pytest.raises(ValueError, match=r"pad id 512 .* is >= the model's vocab_size 512"):
        load_tokenizer(path, vocab_size=512)
    t = load_tokenizer(path, vocab_size=576)  # embeddings padded to a multiple of 64 have room
    info = tokenizer_info(t)
    assert info == TokenizerInfo(pad_id=512, eos_ids=(EOS, PAD), vocab_size=513, pad_added=True)
    assert t.convert_ids_to_tokens(512) != "<pad>"  # "<pad>" already names id 0
    assert encode_prompts(t, ["5"], 2).tokens.tolist() == [[512, 22]]


def test_missing_directory_error(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer.*does not exist.*tokenizer.json"):
        load_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files in .*empty"):
        load_tokenizer(tmp_path / "empty")
