"""bench/workload.py's real-shape workload ("smollm2-135m GRPO") built from a tiny random Llama GGUF.

The builder exports a GGUF (weights + tokenizer + chat template) to an HF directory that both sides load:
transformers must see the same weights (logits equal to ours), the same prompt ids and the same pad;
ours must decode every row to max_new_tokens (no EOS), and peers.py must refuse peers that cannot run a
workload without EOS. The real SmolLM2 file is exported the same way (`bench/workload.py --workload smollm2`).
"""

import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import workload as workload_lib  # noqa: E402

from jaxrl_llm.models import CausalLM, load_hf  # noqa: E402
from jaxrl_llm.sharding import ShardingEnv, make_mesh  # noqa: E402

HIDDEN, LAYERS, HEADS, KV, FFN = 32, 2, 4, 2, 64
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_tokens():
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) if b in printable else chr(256 + rest.index(b)) for b in range(256)]


def _tiny_llama_gguf(path):
    """A SmolLM2-like file: byte-level BPE with SmolLM2's three control tokens first (pad = EOS in the file, as
    SmolLM2's), its chat-template shape, tied embeddings, random float32 weights."""
    tokens = SPECIALS + _byte_tokens() + ["Ġt"]
    vocab, d = len(tokens), HIDDEN // HEADS
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_key_length(d)
    w.add_value_length(d)
    w.add_rope_dimension_count(d)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(TEMPLATE)

    def t(*shape):
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)
    w.add_tensor("token_embd.weight", t(vocab, HIDDEN))
    w.add_tensor("output_norm.weight", 1 + t(HIDDEN))
    for i in range(LAYERS):
        for name, shape in (("attn_norm", (HIDDEN,)), ("ffn_norm", (HIDDEN,)), ("attn_q", (HEADS * d, HIDDEN)),
                            ("attn_k", (KV * d, HIDDEN)), ("attn_v", (KV * d, HIDDEN)),
                            ("attn_output", (HIDDEN, HEADS * d)), ("ffn_gate", (FFN, HIDDEN)),
                            ("ffn_up", (FFN, HIDDEN)), ("ffn_down", (HIDDEN, FFN))):
            w.add_tensor(f"blk.{i}.{name}.weight", 1 + t(*shape) if name.endswith("norm") else t(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("wl")
    gguf_path = _tiny_llama_gguf(root / "tiny.gguf")
    out = workload_lib.build_smollm2(root / "smollm2", gguf_path=gguf_path, num_params=None)
    return out, workload_lib.load(out)


def test_workload_json_and_the_hf_side_see_the_same_prompts_and_pad(built):
    out, wl = built
    assert wl["name"] == "smollm2-135m GRPO" and wl["eos_id"] is None and wl["pad_id"] == 0
    assert len(wl["prompts"]) == 8 and wl["num_generations"] == 4 and wl["max_new_tokens"] == 64
    assert wl["prompts"][0].startswith("<|im_start|>user\nWhat is 7 * 8? Answer with just the number.<|im_end|>")
    assert wl["prompts"][0].endswith("<|im_start|>assistant\n")
    assert wl["prompt_tokens"] == [len(x) for x in wl["prompt_ids"]]
    tok = transformers.AutoTokenizer.from_pretrained(wl["tokenizer_dir"])  # what TRL loads
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2)  # the file's pad (= EOS) replaced by ours
    assert tok(wl["prompts"], add_special_tokens=False)["input_ids"] == wl["prompt_ids"]
    assert wl["prompt_ids"][0][0] == 1 and 0 not in sum(wl["prompt_ids"], [])  # <|im_start|> first, no pad


def test_transformers_loads_the_same_weights(built):
    _, wl = built
    env = ShardingEnv(make_mesh({"data": 1}, devices=jax.devices()[:1]))
    cfg, params = load_hf(wl["model_dir"], env)
    assert (cfg.num_layers, cfg.hidden_size, cfg.tie_word_embeddings) == (LAYERS, HIDDEN, True)
    ids = np.asarray([wl["prompt_ids"][0]], np.int32)
    ours = CausalLM(cfg).apply({"params": params}, jnp.asarray(ids), None, jnp.ones(ids.shape, bool))[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(wl["model_dir"], dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids).long()).logits.numpy()
    assert np.abs(np.asarray(ours) - ref).max() < 1e-4


def test_ours_decodes_every_row_to_max_new_tokens(built):
    out, wl = built
    import ours_grpo
    o = ours_grpo.Ours(wl)
    assert o.sampling.eos_token_ids == () and o.sampling.n_samples == 4
    times = o.iteration(0)
    assert o.last["num_steps"] == 64 and o.last["mean_len"] == 64.0  # no EOS: 32 rows x 64 tokens
    assert set(times) >= {"generation", "reference", "update", "total"}


def test_peers_refuses_peers_without_a_no_eos_mode(built, capsys):
    out, _ = built
    import peers
    with pytest.raises(SystemExit) as e:
        peers.main(["--workload", str(out), "--peers", "trl,tunix", "--setup-only"])
    assert e.value.code == 2
    assert "--peers tunix: the smollm2-135m GRPO workload has no EOS" in capsys.readouterr().err
    assert peers.targets_for({"name": "smollm2-135m GRPO"})["trl"] == 2.0
    assert peers.decode_label(wl := json.loads((out / "workload.json").read_text())) == (
        "decode 32 rows x 64 new tokens") and wl["eos_id"] is None


def test_the_decode_matmul_chain_is_the_same_work_on_both_sides(built, monkeypatch):
    """bench/ours_grpo.py and bench/peers/hf_generate.py time one decode step's matmuls alone
    (`matmuls_only_step_ms`, side by side in peers.py's decode table): with the same weights, the same result."""
    _, wl = built
    for name, value in (("OMP_NUM_THREADS", "2"), ("TOKENIZERS_PARALLELISM", "false")):  # hf_generate sets them
        monkeypatch.setenv(name, os.environ.get(name, value))
    monkeypatch.syspath_prepend(str(BENCH / "peers"))
    import hf_generate
    import ours_grpo
    fn, args = ours_grpo.matmul_chain(ours_grpo.Ours(wl), steps=1)
    model = transformers.AutoModelForCausalLM.from_pretrained(wl["model_dir"], dtype=torch.float32).eval()
    chain, x = hf_generate.matmul_chain(model, len(wl["prompts"]) * wl["num_generations"], steps=1)
    ours, theirs = np.asarray(fn(*args)), chain(x).numpy()
    assert ours.shape == theirs.shape == (32, HIDDEN) and np.abs(ours - 1.0).max() > 1e-2  # the chain moved h
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    assert hf_generate.matmuls_only_step_ms(model, 4, 2, repeats=1) > 0
