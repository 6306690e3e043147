"""The per-device memory estimate: exact parameter and KV-cache terms, growth, and the budget check's fixes."""

import math

import jax
import numpy as np
import pytest

from jaxrl_llm.models import CausalLM, get_preset, init_fn_for
from jaxrl_llm.sharding import ShardingEnv, make_mesh, resolve_axis_sizes
from jaxrl_llm.train.memory import GIB, MemoryBudgetError, check_memory, estimate_memory
from jaxrl_llm.sharding.params import param_shardings
from jaxrl_llm.train.config import base_config, dpo_stage, grpo_stage, load_experiment, ppo_stage, sft_stage

QWEN_GSM8K = "experiments/qwen2_5_gsm8k_grpo.py"
DATA8 = {"data": 8, "fsdp": 1, "tensor": 1}
FSDP8 = {"data": 1, "fsdp": 8, "tensor": 1}


def _model_cfg(cfg):
    m = cfg.model
    return get_preset(m.preset, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)


def _sft_config(preset="qwen2.5-0.5b", param_dtype="float32"):
    c = base_config()
    c.model.preset, c.model.param_dtype = preset, param_dtype
    c.stages = ("sft",)
    c.sft = sft_stage(batch_size=16)
    return c


def _qwen_grpo(*overrides, preset="qwen2.5-0.5b"):
    return load_experiment(QWEN_GSM8K, [f"model.preset={preset}", *overrides])


def _real_sharded_bytes(model_cfg, axes):
    """Bytes of one device's shards of every parameter, from the NamedShardings of a real 8-device mesh."""
    env = ShardingEnv(make_mesh(axes))
    shapes, shardings = param_shardings(init_fn_for(CausalLM(model_cfg)), env)
    return sum(math.prod(sh.shard_shape(s.shape)) * np.dtype(s.dtype).itemsize
               for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))


@pytest.mark.parametrize("axes", [DATA8, FSDP8, {"data": 2, "fsdp": 2, "tensor": 2},
                                  {"data": 1, "fsdp": 2, "tensor": 4}])
def test_param_bytes_equal_the_real_shards(devices, axes):
    cfg = _sft_config()
    m = _model_cfg(cfg)
    est = estimate_memory(cfg, m, axes).stage("sft")
    assert est.terms["params"] == _real_sharded_bytes(m, axes)
    assert est.terms["input_params"] == est.terms["params"]
    assert est.terms["optimizer"] == 2 * est.terms["params"]  # adamw: mu and nu in the params' dtype


def test_qwen2_5_0_5b_by_hand():
    cfg = _sft_config()
    m = _model_cfg(cfg)
    n = 494_032_768
    assert m.num_params() == n
    assert estimate_memory(cfg, m, DATA8).stage("sft").terms["params"] == n * 4  # data divides no parameter
    bf16 = _sft_config(param_dtype="bfloat16")
    assert estimate_memory(bf16, _model_cfg(bf16), DATA8).stage("sft").terms["params"] == n * 2
    # fsdp=8 splits every array with an embed (896) dim; the q/k/v biases (heads, head_dim) have none and stay
    # whole on tensor=1: 896 + 128 + 128 per layer
    replicated = 24 * (896 + 128 + 128)
    fsdp = estimate_memory(cfg, m, FSDP8).stage("sft").terms["params"]
    assert fsdp == ((n - replicated) // 8 + replicated) * 4
    assert 7.9 < n * 4 / fsdp < 8.0


def test_decode_weights_term_follows_split_layer_weights():
    cfg = _qwen_grpo()
    m = _model_cfg(cfg)
    split = estimate_memory(cfg, m, FSDP8).stage("rl").terms
    assert split["decode_weights"] == split["params"] > 0
    unsplit = estimate_memory(_qwen_grpo("rl.sampling.split_layer_weights=False"), m, FSDP8).stage("rl").terms
    assert unsplit["decode_weights"] == 0
    assert {k: v for k, v in unsplit.items() if k != "decode_weights"} == {
        k: v for k, v in split.items() if k != "decode_weights"}


def test_kv_cache_term_is_the_formula():
    cfg = _qwen_grpo()  # 64 prompts x 8 samples, prompts 384 + 512 new tokens, bfloat16 compute
    m = _model_cfg(cfg)
    layers, kv_heads, head_dim, length, b = 24, 2, 64, 384 + 512, 2
    for axes, rows_dev, heads_dev in (({"data": 2, "fsdp": 4, "tensor": 1}, 512 // 8, kv_heads),
                                      ({"data": 2, "fsdp": 2, "tensor": 2}, 512 // 4, kv_heads // 2),
                                      ({"data": 1, "fsdp": 1, "tensor": 8}, 512, kv_heads)):  # 2 heads on 8: whole
        terms = estimate_memory(cfg, m, axes).stage("rl").terms
        assert terms["kv_cache"] == layers * 2 * rows_dev * length * heads_dev * head_dim * b
    eval_rows = cfg.eval.num_examples * cfg.eval.n_samples
    terms = estimate_memory(cfg, m, FSDP8).stage("rl").terms
    assert terms["eval_kv_cache"] == layers * 2 * (eval_rows // 8) * (384 + cfg.eval.max_new_tokens) * 2 * 64 * 2


def test_kv_cache_growth_is_the_previous_segment_buffer():
    cfg = _qwen_grpo()  # 512 new tokens: 4 segments, the last grows from 384 + 384 slots to 384 + 512
    m = _model_cfg(cfg)
    terms = estimate_memory(cfg, m, FSDP8).stage("rl").terms
    assert terms["kv_cache_growth"] == terms["kv_cache"] * (384 + 384) // (384 + 512)
    one = estimate_memory(_qwen_grpo("rl.sampling.cache_segments=1"), m, FSDP8).stage("rl").terms
    assert one["kv_cache_growth"] == 0
    assert {k: v for k, v in one.items() if k != "kv_cache_growth"} == {
        k: v for k, v in terms.items() if k != "kv_cache_growth"}


def test_estimate_grows_with_group_size_and_new_tokens():
    m = _model_cfg(_qwen_grpo())
    base = estimate_memory(_qwen_grpo(), m, FSDP8).stage("rl")
    group = estimate_memory(_qwen_grpo("rl.algo.group_size=16"), m, FSDP8).stage("rl")
    longer = estimate_memory(_qwen_grpo("rl.sampling.max_new_tokens=1024"), m, FSDP8).stage("rl")
    assert group.terms["kv_cache"] == 2 * base.terms["kv_cache"]
    assert longer.terms["kv_cache"] > base.terms["kv_cache"]
    for bigger in (group, longer):
        assert bigger.total_bytes > base.total_bytes
        assert bigger.terms["activations"] > base.terms["activations"]
        assert bigger.terms["params"] == base.terms["params"]


def test_remat_and_micro_batches_shrink_the_update():
    cfg = _qwen_grpo()
    acts = [estimate_memory(cfg, _model_cfg(cfg).replace(remat=r), FSDP8).stage("rl").terms["activations"]
            for r in ("none", "dots", "full")]
    assert acts[0] > acts[1] > acts[2]
    one = estimate_memory(_qwen_grpo("rl.algo.num_micro_batches=1"), _model_cfg(cfg), FSDP8).stage("rl")
    four = estimate_memory(cfg, _model_cfg(cfg), FSDP8).stage("rl")  # the experiment's 4 micro-batches
    assert one.terms["activations"] > four.terms["activations"]
    assert four.terms["gradients"] == 2 * one.terms["gradients"]  # accumulator + one micro-batch's gradients


def test_which_stages_keep_a_reference_or_value_model():
    def terms(stage):
        c = base_config()
        c.stages, c.rl = ("rl",), stage
        return estimate_memory(c, get_preset("tiny"), DATA8).stage("rl").terms

    assert terms(grpo_stage("grpo"))["reference"] > 0                   # k3 KL in the loss
    assert terms(grpo_stage("dapo"))["reference"] == 0                  # no KL
    assert terms(grpo_stage("reinforce_pp"))["reference"] > 0           # KL folded into the rewards
    assert terms(dpo_stage("sigmoid"))["reference"] > 0
    assert terms(dpo_stage("simpo"))["reference"] == terms(dpo_stage("orpo"))["reference"] == 0
    separate, shared = terms(ppo_stage()), terms(ppo_stage(shared_backbone=True))
    assert separate["value"] > 0 and separate["reference"] > 0 and shared["value"] == 0
    assert shared["params"] > separate["params"]                        # the policy plus its value head
    assert separate["activations"] == 2 * shared["activations"]         # two backbones in the loss


def test_over_budget_raises_with_fixes_that_fit():
    cfg = _qwen_grpo("mesh.device_memory_gb=16.0", preset="qwen2.5-1.5b")
    with pytest.raises(MemoryBudgetError) as info:
        check_memory(cfg, _model_cfg(cfg), DATA8)
    err = info.value
    text = str(err)
    assert "stage 'rl'" in text and "budget of 14.4 GiB" in text and "optimizer" in text
    assert err.suggestions
    for sug in err.suggestions:
        assert str(sug) in text
        fixed = _qwen_grpo("mesh.device_memory_gb=16.0", *sug.as_overrides(), preset="qwen2.5-1.5b")
        axes = resolve_axis_sizes(fixed.mesh.axes.to_dict(), 8)
        est = check_memory(fixed, _model_cfg(fixed), axes)  # no error: it fits
        assert est.peak_bytes <= est.budget_bytes == int(0.9 * 16 * GIB)
        assert est.peak_bytes == sug.after_bytes


def test_tight_budget_gets_a_combined_fix():
    cfg = _qwen_grpo("mesh.device_memory_gb=8.0", preset="qwen2.5-1.5b")
    with pytest.raises(MemoryBudgetError) as info:
        check_memory(cfg, _model_cfg(cfg), DATA8)
    (sug,) = info.value.suggestions  # no single change fits 7.2 GiB: one combination that does
    keys = {k for k, _ in sug.overrides}
    assert "mesh.axes.fsdp" in keys and len(keys) > 3
    fixed = _qwen_grpo("mesh.device_memory_gb=8.0", *sug.as_overrides(), preset="qwen2.5-1.5b")
    check_memory(fixed, _model_cfg(fixed), resolve_axis_sizes(fixed.mesh.axes.to_dict(), 8))


def test_no_budget_on_cpu_returns_the_estimate_and_a_table():
    cfg = load_experiment("experiments/grpo.py")
    est = check_memory(cfg, _model_cfg(cfg), DATA8)
    assert est.budget_bytes is None and est.peak_stage.name in ("sft", "rl")
    table = est.table()
    assert "sft (sft)" in table and "rl (grpo)" in table and "kv_cache" in table and "GiB" in table
    with pytest.raises(ValueError, match="resolved sizes"):
        estimate_memory(cfg, _model_cfg(cfg), {"data": -1, "fsdp": 1})
