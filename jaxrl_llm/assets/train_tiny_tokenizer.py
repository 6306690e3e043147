"""Train the tiny byte-level BPE tokenizer of the reference workload and save it.

    python -m jaxrl_llm.assets.train_tiny_tokenizer            # rewrites the shipped copy
    python -m jaxrl_llm.assets.train_tiny_tokenizer --out DIR  # writes elsewhere

This is exactly the tokenizer of shared/BENCHMARK_WORKLOAD.md: byte-level BPE,
vocab 512, `<pad>`=0 and `<eos>`=1, no BOS, trained on 20,000 strings like
`12+34=46` drawn with `random.Random(0)`. The eight benchmark prompts
(`72+4=`, `7+7737=`, ...) are the first eight problems of the same generator
with seed 1 (`arithmetic_problems(8, seed=1)`).

Training is deterministic (tests/test_tokenizer.py re-trains in a fresh
process and compares every file byte for byte) and takes under a second on
one CPU core. Expected result: tokenizer.json, tokenizer_config.json and
chat_template.jinja (transformers 5 writes no special_tokens_map.json;
the template lives in its own file). The shipped copy lives in its own
directory, not inside a model directory, or `AutoTokenizer` would pick
Qwen2's tokenizer class from the model's config.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random

VOCAB_SIZE = 512
NUM_TRAIN_STRINGS = 20_000
TRAIN_SEED = 0
PAD, EOS = "<pad>", "<eos>"
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "tiny_tokenizer"

# Real chat templates are Jinja too, so the tiny tokenizer goes through the same
# `apply_chat_template` code path. No role markers: the model only ever sees the
# contents; an assistant turn is closed by EOS; a generation prompt adds nothing.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def _operand(rng: random.Random) -> int:
    # At most 1 to 4 digits; small numbers (and 0) are common, like in the prompts.
    return rng.randint(0, 10 ** rng.randint(1, 4) - 1)


def arithmetic_problems(n: int, seed: int) -> list[tuple[int, int]]:
    """`n` addition problems (a, b); seed 0 trains the tokenizer, seed 1 gives the benchmark prompts."""
    rng = random.Random(seed)
    return [(_operand(rng), _operand(rng)) for _ in range(n)]


def arithmetic_strings(n: int = NUM_TRAIN_STRINGS, seed: int = TRAIN_SEED) -> list[str]:
    """Training corpus: `"a+b=c"` for each problem."""
    return [f"{a}+{b}={a + b}" for a, b in arithmetic_problems(n, seed)]


def train_tokenizer():
    """The raw `tokenizers.Tokenizer` (no transformers wrapper)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: otherwise "12+34=46" would encode as " 12+34=46" and
    # decode with a leading space. The GPT-2 split regex keeps digit runs and
    # punctuation apart, so merges stay inside numbers and prompts are 4-5 tokens.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # No post-processor: no BOS, and encode(text) gives exactly the text's tokens.
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[PAD, EOS],  # ids 0 and 1, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tok.train_from_iterator(arithmetic_strings(), trainer=trainer)
    return tok


def build_tokenizer():
    """The trained tokenizer wrapped as the `PreTrainedTokenizerFast` that gets saved."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(),
        pad_token=PAD,
        eos_token=EOS,
        padding_side="left",
        truncation_side="left",
        model_max_length=512,  # the workload model's max_position_embeddings
        clean_up_tokenization_spaces=False,  # decode must give back the exact text
        chat_template=CHAT_TEMPLATE,
    )


def save(out: str | pathlib.Path = DEFAULT_OUT) -> pathlib.Path:
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save_pretrained(str(out))
    # transformers 5 writes tokenizer_class "TokenizersBackend", a name 4.x (still
    # allowed by pyproject) cannot load; "PreTrainedTokenizerFast" is its alias in 5.x
    # and loads as the same class in both.
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default: the shipped copy)")
    args = parser.parse_args(argv)
    out = save(args.out)
    print(f"wrote {sorted(p.name for p in out.iterdir())} to {out}")


if __name__ == "__main__":
    main()
