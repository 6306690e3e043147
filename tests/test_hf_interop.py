"""Hugging Face interop against transformers' PyTorch models (the independent reference).

Tiny random Llama (llama3 RoPE, untied head), Qwen2 (tied, qkv bias) and Qwen3
(qk norm, head_dim != hidden/heads, linear RoPE) models are saved with
`save_pretrained`, loaded with `load_hf`, and must give the same logits on a
left-padded batch. Norm weights and biases are perturbed away from HF's 1/0
init so a misplaced norm or bias changes the logits.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxrl_llm.models import hf
from jaxrl_llm.models.api import init_fn_for
from jaxrl_llm.models.hf import CheckpointError, config_from_hf, config_to_hf, load_hf, save_hf
from jaxrl_llm.models.transformer import CausalLM
from jaxrl_llm.sharding import ShardingEnv, make_mesh
from jaxrl_llm.sharding.params import abstract_params
from jaxrl_llm.tokenizer import load_tokenizer, tiny_tokenizer_dir, tokenizer_info

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=96, max_position_embeddings=256, rms_norm_eps=1e-5,
              initializer_range=0.1)
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True,
                                             rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3": (transformers.Qwen3Config, dict(
        tie_word_embeddings=False, head_dim=24,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
}
LENGTHS = (12, 7, 3)


def _batch(vocab):
    rng = np.random.default_rng(0)
    t = max(LENGTHS)
    mask = np.array([[0] * (t - n) + [1] * n for n in LENGTHS], np.int32)  # left padded
    tokens = rng.integers(0, vocab, (len(LENGTHS), t)).astype(np.int32) * mask
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    return tokens, mask, positions


def _hf_logits(model, tokens, mask, positions):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def _our_logits(cfg, params, env, tokens, mask):
    def fwd(p, t, m):
        with env.activate():
            return CausalLM(cfg).apply({"params": p}, t, None, m)[0]
    return np.asarray(jax.jit(fwd)(params, jnp.asarray(tokens), jnp.asarray(mask)).astype(jnp.float32))


def _assert_close(ours, ref, mask, atol):
    real = mask.astype(bool)
    err = np.max(np.abs(ours[real] - ref[real]))
    assert err <= atol, f"max |logit diff| over real tokens = {err:.3g} > {atol}"


@pytest.fixture(scope="module")
def one_device():
    return ShardingEnv(make_mesh({"data": 1}, devices=jax.devices()[:1]))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (dir, HF model, HF logits on the left-padded batch)."""
    out = {}
    for name, (config_cls, extra) in FAMILIES.items():
        torch.manual_seed(0)
        config = config_cls(**COMMON, **extra)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("norm.weight"):
                    p.copy_(1.0 + 0.5 * torch.randn_like(p))
                elif pname.endswith(".bias"):
                    p.copy_(0.5 * torch.randn_like(p))
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (path, model, _hf_logits(model, *_batch(config.vocab_size)))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_hf(checkpoints, one_device, family):
    path, _, ref = checkpoints[family]
    cfg, params = load_hf(path, one_device)
    assert cfg.family == family
    assert cfg.qkv_bias == (family == "qwen2") and cfg.qk_norm == (family == "qwen3")
    assert cfg.tie_word_embeddings == (family == "qwen2")
    assert cfg.head_dim == (24 if family == "qwen3" else 16)
    assert ("lm_head" in params) != cfg.tie_word_embeddings
    assert params["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 64, 4, cfg.head_dim)
    tokens, mask, _ = _batch(cfg.vocab_size)
    _assert_close(_our_logits(cfg, params, one_device, tokens, mask), ref, mask, 1e-4)


def test_sharded_checkpoint_loads(checkpoints, one_device, tmp_path):
    _, model, ref = checkpoints["llama"]
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    cfg, params = load_hf(tmp_path, one_device)
    tokens, mask, _ = _batch(cfg.vocab_size)
    _assert_close(_our_logits(cfg, params, one_device, tokens, mask), ref, mask, 1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_load_onto_fsdp_tensor_mesh(checkpoints, devices, tmp_path, family):
    path, _, ref = checkpoints[family]
    env = ShardingEnv(make_mesh({"fsdp": 4, "tensor": 2}, devices=devices))
    cfg, params = load_hf(path, env)
    q = params["model"]["layers"]["self_attn"]["q_proj"]
    assert q["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    if cfg.qkv_bias:
        assert q["bias"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
    assert len(q["kernel"].addressable_shards) == 8
    tokens, mask, _ = _batch(cfg.vocab_size)
    _assert_close(_our_logits(cfg, params, env, tokens, mask), ref, mask, 1e-4)
    # exporting the sharded params gathers them back to exactly the original tensors
    src, out = safe_open(path / "model.safetensors", "numpy"), safe_open(
        save_hf(params, cfg, tmp_path / "out") / "model.safetensors", "numpy")
    assert sorted(out.keys()) == sorted(src.keys())
    for k in src.keys():
        np.testing.assert_array_equal(out.get_tensor(k), src.get_tensor(k), err_msg=k)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_reloads_in_transformers(checkpoints, one_device, tmp_path, family):
    path, model, ref = checkpoints[family]
    cfg, params = load_hf(path, one_device)
    out = tmp_path / "export"
    save_hf(params, cfg, out, max_shard_bytes=60_000 if family == "qwen3" else 2**30)
    assert (out / "model.safetensors.index.json").exists() == (family == "qwen3")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dir left
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded) is type(model)
    assert reloaded.config.rope_parameters == model.config.rope_parameters
    tokens, mask, positions = _batch(cfg.vocab_size)
    _assert_close(_hf_logits(reloaded, tokens, mask, positions), ref, mask, 1e-4)
    # and our loader reads its own export back to identical parameters
    cfg2, params2 = load_hf(out, one_device)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_bfloat16_load(checkpoints, one_device):
    path, _, ref = checkpoints["qwen3"]
    cfg, params = load_hf(path, one_device, dtype="bfloat16", param_dtype=jnp.bfloat16)
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    tokens, mask, _ = _batch(cfg.vocab_size)
    _assert_close(_our_logits(cfg, params, one_device, tokens, mask), ref, mask,
                  0.05 * np.abs(ref).max())


def test_export_bfloat16_and_tokenizer(checkpoints, one_device, tmp_path):
    cfg, params = load_hf(checkpoints["qwen2"][0], one_device)
    tok = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir(), tok)
    (tok / "unrelated.txt").write_text("x")
    out = save_hf(params, cfg, tmp_path / "out", dtype="bfloat16", tokenizer_dir=tok)
    assert (out / "tokenizer.json").exists() and not (out / "unrelated.txt").exists()
    exported = json.loads((out / "config.json").read_text())
    assert exported["dtype"] == "bfloat16"
    # the special token ids come with the tokenizer, so generate() stops at EOS (they were all None)
    info = tokenizer_info(load_tokenizer(tok))
    assert (exported["eos_token_id"], exported["pad_token_id"]) == (info.eos_ids[0], info.pad_id)
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.eos_token_id, gen.pad_token_id) == (info.eos_ids[0], info.pad_id)
    f = safe_open(out / "model.safetensors", framework="numpy")
    assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    assert "lm_head.weight" not in f.keys()  # tied
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf(params, cfg, out)
    save_hf(params, cfg, out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert not (out / "tokenizer.json").exists()


def test_crash_during_export_leaves_nothing(checkpoints, one_device, tmp_path, monkeypatch):
    cfg, params = load_hf(checkpoints["llama"][0], one_device)
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_hf(params, cfg, tmp_path / "out", max_shard_bytes=50_000)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- errors


def _copy_with(src, dst, edit):
    """Copies a single-file checkpoint, passing its tensors dict through `edit`."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    f = safe_open(src / "model.safetensors", framework="numpy")
    tensors = edit({k: f.get_tensor(k) for k in f.keys()})
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named(checkpoints, one_device, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    path = _copy_with(checkpoints["llama"][0], tmp_path / "ck",
                      lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(CheckpointError, match=rf"missing tensor '{name}'.*model\.safetensors"):
        load_hf(path, one_device)


def test_missing_lm_head_of_untied_model_is_named(checkpoints, one_device, tmp_path):
    path = _copy_with(checkpoints["llama"][0], tmp_path / "ck",
                      lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
    with pytest.raises(CheckpointError, match="missing tensor 'lm_head.weight'"):
        load_hf(path, one_device)


def test_shape_mismatch_is_named(checkpoints, one_device, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    path = _copy_with(checkpoints["qwen2"][0], tmp_path / "ck", lambda t: {**t, name: t[name][:16]})
    with pytest.raises(CheckpointError, match=rf"shape mismatch for tensor '{name}'.*expected \(32, 64\).*"
                                              r"found \(16, 64\)"):
        load_hf(path, one_device)


def test_unexpected_tensor_is_an_error_but_inv_freq_is_ignored(checkpoints, one_device, tmp_path):
    src = checkpoints["llama"][0]
    inv = "model.layers.0.self_attn.rotary_emb.inv_freq"
    ok = _copy_with(src, tmp_path / "ok", lambda t: {**t, inv: np.ones(8, np.float32)})
    load_hf(ok, one_device)
    extra = "model.layers.0.self_attn.o_proj.bias"
    bad = _copy_with(src, tmp_path / "bad", lambda t: {**t, extra: np.zeros(64, np.float32)})
    with pytest.raises(CheckpointError, match=f"unexpected tensor '{extra}'"):
        load_hf(bad, one_device)


def test_tied_checkpoint_with_lm_head_loads(checkpoints, one_device, tmp_path):
    path = _copy_with(checkpoints["qwen2"][0], tmp_path / "ck",
                      lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"]})
    cfg, params = load_hf(path, one_device)
    assert cfg.tie_word_embeddings and "lm_head" not in params


def test_pickle_only_dir_is_refused(checkpoints, one_device, tmp_path):
    shutil.copy(checkpoints["llama"][0] / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*Convert them to safetensors"):
        load_hf(tmp_path, one_device)


def test_missing_config_and_weights(checkpoints, one_device, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        load_hf(tmp_path, one_device)
    shutil.copy(checkpoints["llama"][0] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=f"no weights found in {tmp_path}"):
        load_hf(tmp_path, one_device)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf(tmp_path / "nope", one_device)


def test_unsupported_architecture_is_named(one_device, tmp_path):
    gpt2 = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).to_dict()
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*LlamaForCausalLM"):
        config_from_hf(gpt2)
    (tmp_path / "config.json").write_text(json.dumps({**gpt2, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel.*Qwen3ForCausalLM"):
        load_hf(tmp_path, one_device)


LLAMA = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, vocab_size=96)


@pytest.mark.parametrize("change, match", [
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(attention_bias=True), "attention_bias.*o_proj"),
    (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True), "use_sliding_window"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn'.*llama3, linear"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope type 'dynamic'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks.*low_freq_factor"),
    (dict(hidden_size=None), "'hidden_size'"),
])
def test_config_rejections(change, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf({**LLAMA, **change})


def test_config_legacy_and_v5_rope_keys_agree():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    legacy = config_from_hf({**LLAMA, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **scaling}})
    v5 = config_from_hf({**LLAMA, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling}})
    assert legacy == v5 and legacy.rope_theta == 5e5 and legacy.rope_scaling["rope_type"] == "llama3"
    plain = config_from_hf({**LLAMA, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert plain.rope_scaling is None and plain.family == "llama"
    assert config_from_hf({**LLAMA, "architectures": None, "model_type": "qwen3"}).head_dim == 128
    over = config_from_hf(LLAMA, param_dtype=jnp.bfloat16, remat="full")
    assert (over.param_dtype, over.remat) == ("bfloat16", "full")
    with pytest.raises(TypeError, match="unknown ModelConfig field"):
        config_from_hf(LLAMA, hiden_size=3)


# Published config.json files (transformers v4 era: legacy rope keys, torch_dtype).
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256}
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}


@pytest.mark.parametrize("hf_config, preset", [(LLAMA_32_1B, "llama-3.2-1b"), (QWEN25_05B, "qwen2.5-0.5b")])
def test_published_configs_match_presets(hf_config, preset):
    from jaxrl_llm.models.config import get_preset
    assert config_from_hf(hf_config) == get_preset(preset)


@pytest.mark.parametrize("preset", ["llama-3.2-1b", "qwen2.5-0.5b", "qwen3-0.6b"])
def test_config_to_hf_round_trips_through_autoconfig(preset, tmp_path):
    from jaxrl_llm.models.config import get_preset
    cfg = get_preset(preset)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    auto = transformers.AutoConfig.from_pretrained(tmp_path)
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    assert auto.architectures == [arch[cfg.family]] and auto.model_type == cfg.family
    assert config_from_hf(auto.to_dict()) == cfg
    scaling = json.loads((tmp_path / "config.json").read_text())["rope_scaling"]
    if scaling is not None:  # HF types a position count as an int (it warns on 8192.0)
        assert type(scaling["original_max_position_embeddings"]) is int


def test_rope_position_count_stays_an_int_through_import_and_export():
    hf_cfg = {**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192.0}}
    cfg = config_from_hf(hf_cfg)
    out = config_to_hf(cfg)["rope_scaling"]
    assert type(out["original_max_position_embeddings"]) is int and type(out["factor"]) is float


def test_export_refuses_what_hf_cannot_represent(tmp_path):
    from jaxrl_llm.models.config import ModelConfig
    with pytest.raises(ValueError, match="qk_norm=True cannot be exported as family 'llama'"):
        config_to_hf(ModelConfig(family="llama", qk_norm=True))
    with pytest.raises(ValueError, match="qkv_bias=True cannot be exported as family 'qwen3'"):
        config_to_hf(ModelConfig(family="qwen3", qk_norm=True, qkv_bias=True))
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, qkv_bias=True)
    shapes, _ = abstract_params(init_fn_for(CausalLM(cfg)), jax.random.key(0))
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
    with pytest.raises(ValueError, match="param model/norm/scale has shape"):
        save_hf({**params, "model": {**params["model"], "norm": {"scale": np.ones(3)}}}, cfg, tmp_path / "x")
    with pytest.raises(ValueError, match=r"unmapped \[\('extra',\)\]"):
        save_hf({**params, "extra": np.ones(3)}, cfg, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []
