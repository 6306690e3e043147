"""Max |logit difference| between jaxrl_llm and transformers (PyTorch CPU) on random-init models.

    .venv/bin/python bench/hf_parity.py

Builds the benchmark workload's tiny Qwen2 (torch.manual_seed(0)) plus small
Llama (llama3 RoPE scaling, untied) and Qwen3 (q/k norm) models, saves them as
safetensors, loads them with `load_hf` and compares float32 logits over the
real tokens of a left-padded batch. Needs the `test` extra (torch).
"""

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from jaxrl_llm.models import CausalLM, load_hf
from jaxrl_llm.sharding import ShardingEnv, make_mesh

MODELS = {
    "tiny-qwen2 (workload)": transformers.Qwen2Config(
        vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    "llama (llama3 rope, untied)": transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}),
    "qwen3 (q/k norm)": transformers.Qwen3Config(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
}


def main():
    env = ShardingEnv(make_mesh({"data": 1}, devices=jax.devices()[:1]))
    rng = np.random.default_rng(0)
    b, t = 8, 48
    lengths = rng.integers(4, t + 1, size=b)
    mask = np.arange(t)[None, :] >= (t - lengths)[:, None]
    tokens = np.where(mask, rng.integers(2, 512, size=(b, t)), 0)
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    print("| model | params | max abs logit diff (float32) | max abs logit |")
    print("|---|---|---|---|")
    for name, config in MODELS.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            cfg, params = load_hf(d, env)
        with torch.no_grad():
            ref = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                        position_ids=torch.tensor(positions)).logits.numpy()
        ours = np.asarray(jax.jit(lambda p: CausalLM(cfg).apply({"params": p}, jnp.asarray(tokens), None,
                                                                jnp.asarray(mask))[0])(params))
        err = np.abs(ours[mask] - ref[mask]).max()
        print(f"| {name} | {cfg.num_params():,} | {err:.2e} | {np.abs(ref[mask]).max():.2f} |")


if __name__ == "__main__":
    main()
