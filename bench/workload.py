"""Builds the artifacts of the reference workload "tiny-qwen2 GRPO" (shared/BENCHMARK_WORKLOAD.md).

    .venv/bin/python bench/workload.py                  # -> bench/.cache/workload
    .venv/bin/python bench/workload.py --out DIR --force

Writes, deterministically:

    tokenizer/      the byte-level BPE tokenizer (vocab 512, <pad>=0, <eos>=1, no BOS), in its own
                    directory; it is the tokenizer shipped in jaxrl_llm/assets/tiny_tokenizer,
                    re-trained here and checked byte for byte against the shipped copy
    model/          Qwen2ForCausalLM, torch.manual_seed(0) init, float32 safetensors, 4,067,584 params
    workload.json   the prompts and every setting of one GRPO iteration, read by ours and the peers

Needs transformers + torch (the project's `test` extra). Every runner reads
`workload.json`, so the settings live in one place.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import pathlib
import shutil
import tempfile

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / ".cache" / "workload"
NUM_PARAMS = 4_067_584
PROMPTS = ["72+4=", "7+7737=", "3439+7=", "6+9952=", "7+738=", "75+5=", "0+8=", "6+54="]
PROMPT_TOKENS = [4, 5, 6, 5, 5, 4, 4, 4]
MODEL_CONFIG = {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                "tie_word_embeddings": True}
SETTINGS = {
    "name": "tiny-qwen2 GRPO",
    "prompts": PROMPTS,
    "prompt_tokens": PROMPT_TOKENS,
    "num_generations": 8,          # 8 prompts x 8 = 64 completions per iteration
    "max_new_tokens": 64,
    "max_prompt_length": 16,       # Tunix pads every prompt to this; ours/TRL pad to the longest prompt
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "beta": 0.04,
    "epsilon": 0.2,
    "epochs": 1,
    "learning_rate": 1e-5,
    "adam_b1": 0.9,
    "adam_b2": 0.999,
    "adam_eps": 1e-8,
    "weight_decay": 0.0,
    "max_grad_norm": None,
    "pad_id": 0,
    "eos_id": 1,
    "reward": "-abs(len(completion_text) - 20) / 20",
}


def reward(text: str) -> float:
    """The workload's Python reward on a decoded completion."""
    return -abs(len(text) - 20) / 20


def build_tokenizer(out: pathlib.Path) -> None:
    from jaxrl_llm.assets import train_tiny_tokenizer
    from jaxrl_llm.tokenizer import tiny_tokenizer_dir

    shipped = tiny_tokenizer_dir()
    with tempfile.TemporaryDirectory() as d:
        train_tiny_tokenizer.save(d)  # the workload's recipe: 20k strings, seed 0, vocab 512
        names = sorted(p.name for p in pathlib.Path(d).iterdir())
        same = names == sorted(p.name for p in shipped.iterdir() if p.is_file()) and all(
            filecmp.cmp(pathlib.Path(d) / n, shipped / n, shallow=False) for n in names)
    if not same:
        raise AssertionError(f"re-trained tokenizer differs from the shipped copy in {shipped}")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(shipped, out, ignore=shutil.ignore_patterns("__pycache__"))

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 512 and tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.bos_token_id is None, tok
    # The workload file says 4-5 tokens; "3439+7=" is in fact 6 (3|43|9|+|7|=) with this tokenizer.
    lens = [len(tok(p, add_special_tokens=True)["input_ids"]) for p in PROMPTS]
    assert lens == PROMPT_TOKENS, f"prompt token lengths {lens}, expected {PROMPT_TOKENS}"


def build_model(out: pathlib.Path) -> int:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**MODEL_CONFIG)).to(torch.float32)
    n = sum(p.numel() for p in model.parameters())
    assert n == NUM_PARAMS, f"{n:,} parameters, expected {NUM_PARAMS:,}"
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out), safe_serialization=True)
    assert (out / "model.safetensors").is_file()
    return n


def build(out: str | pathlib.Path = DEFAULT_OUT, force: bool = False) -> pathlib.Path:
    """Writes the artifacts into `out` (skipped when workload.json is already there, unless `force`)."""
    out = pathlib.Path(out)
    if (out / "workload.json").is_file() and not force:
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "workload.json").unlink(missing_ok=True)
    build_tokenizer(out / "tokenizer")
    n = build_model(out / "model")
    meta = dict(SETTINGS, num_params=n, model_config=MODEL_CONFIG,
                tokenizer_dir=str((out / "tokenizer").resolve()), model_dir=str((out / "model").resolve()))
    (out / "workload.json").write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks completion
    return out


def load(out: str | pathlib.Path = DEFAULT_OUT) -> dict:
    """The workload settings written by `build` (prompts, sampling, optimiser, artifact paths)."""
    return json.loads((pathlib.Path(out) / "workload.json").read_text())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--force", action="store_true", help="rebuild even when the cache is complete")
    args = ap.parse_args(argv)
    out = build(args.out, force=args.force)
    print(f"workload artifacts in {out}: {sorted(p.name for p in out.iterdir())}")


if __name__ == "__main__":
    main()
