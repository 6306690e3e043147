"""Model family: presets, KV cache, remat, dtypes, value/reward heads, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.models import (PRESETS, CausalLM, KVCache, ModelConfig, ScalarHeadModel, create_model,
                              get_preset, init_fn_for, positions_from_mask, unembedding)
from jaxrl_llm.sharding import ShardingEnv, make_mesh
from jaxrl_llm.sharding.params import abstract_params

SMALL = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, qkv_bias=True)


@pytest.fixture(scope="module")
def env():
    return ShardingEnv(make_mesh({"data": 1}, devices=jax.devices()[:1]))


def _batch(b=3, t=7, vocab=96, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.array([t, t - 3, 2][:b])
    mask = np.arange(t)[None, :] >= (t - lengths)[:, None]
    tokens = np.where(mask, rng.integers(2, vocab, size=(b, t)), 0).astype(np.int32)
    return jnp.asarray(tokens), jnp.asarray(mask)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_counts_match_shapes(name):
    cfg = get_preset(name)
    shapes, logical = abstract_params(init_fn_for(CausalLM(cfg), seq_len=2), jax.random.key(0))
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == cfg.num_params()
    # every parameter carries logical names, one per dimension
    for s, spec in zip(jax.tree.leaves(shapes), jax.tree.leaves(logical, is_leaf=lambda x: x is not None and
                                                                  type(x).__name__ == "PartitionSpec")):
        assert len(spec) == len(s.shape)


def test_known_parameter_counts():
    assert get_preset("tiny").num_params() == 4_067_584  # the benchmark workload's tiny-qwen2
    assert abs(get_preset("qwen2.5-0.5b").num_params() - 494_032_768) == 0
    assert abs(get_preset("llama-3.1-8b").num_params() - 8_030_261_248) == 0


def test_prefill_then_decode_equals_full_forward(env):
    module, params, _ = create_model(SMALL, jax.random.key(1), env)
    tokens, mask = _batch()
    full, _ = module.apply({"params": params}, tokens, None, mask)
    # prefill 4 tokens into a cache of 10 slots, then feed the remaining 3 one at a time
    cache = KVCache.zeros(SMALL, 3, 10)
    pos = positions_from_mask(mask)
    out, cache = module.apply({"params": params}, tokens[:, :4], pos[:, :4], mask[:, :4], cache)
    pieces = [out]
    for t in range(4, 7):
        out, cache = module.apply({"params": params}, tokens[:, t:t + 1], pos[:, t:t + 1], mask[:, t:t + 1], cache)
        pieces.append(out)
    assert int(cache.index) == 7
    stepped = jnp.concatenate(pieces, axis=1)
    m = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(stepped)[m], np.asarray(full)[m], atol=1e-5)


def test_padding_does_not_change_real_tokens(env):
    module, params, _ = create_model(SMALL, jax.random.key(2), env)
    tokens, mask = _batch()
    padded, _ = module.apply({"params": params}, tokens, None, mask)
    row = 1  # 4 real tokens, left-padded by 3
    alone, _ = module.apply({"params": params}, tokens[row:row + 1, 3:], None, None)
    np.testing.assert_allclose(np.asarray(padded[row, 3:]), np.asarray(alone[0]), atol=1e-5)
    assert np.isfinite(np.asarray(padded)).all()


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_same_loss_and_grads(env, policy):
    tokens, mask = _batch()

    def loss_and_grad(cfg):
        module, params, _ = create_model(cfg, jax.random.key(3), env)

        def loss(p):
            logits, _ = module.apply({"params": p}, tokens, None, mask)
            return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)[..., 5])
        return jax.jit(jax.value_and_grad(loss))(params)

    ref_l, ref_g = loss_and_grad(SMALL)
    l, g = loss_and_grad(SMALL.replace(remat=policy))
    np.testing.assert_allclose(l, ref_l, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g, ref_g)


def test_bfloat16_compute_and_params(env):
    tokens, mask = _batch()
    module, params, _ = create_model(SMALL, jax.random.key(4), env)
    ref, _ = module.apply({"params": params}, tokens, None, mask)
    bf = SMALL.replace(dtype="bfloat16")
    out, _ = CausalLM(bf).apply({"params": params}, tokens, None, mask)
    assert out.dtype == jnp.bfloat16
    m = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(out, np.float32)[m], np.asarray(ref)[m], atol=0.05)
    bf_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out2, _ = CausalLM(SMALL.replace(dtype="bfloat16", param_dtype="bfloat16")).apply(
        {"params": bf_params}, tokens, None, mask)
    assert out2.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out2, np.float32)).all()


def test_rope_tables_below_gathers_the_same_values():
    """The forward's RoPE tables for positions from the mask (cos/sin of [0, T) gathered) equal the tables
    computed per position (the same float32 angles and cos/sin; bitwise on this backend), and the model's
    output is the same either way."""
    from jaxrl_llm.models.layers import rope_tables, rope_tables_below
    from jaxrl_llm.models.transformer import positions_from_mask
    cfg = SMALL.replace(rope_theta=1e6)
    pos = jnp.asarray(np.random.default_rng(0).integers(0, 300, size=(3, 300)), jnp.int32)
    for a, b in zip(jax.jit(rope_tables_below, static_argnums=(0, 2))(cfg, pos, 300),
                    jax.jit(rope_tables, static_argnums=0)(cfg, pos)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-7)
    tokens, mask = _batch()
    module, params, _ = create_model(SMALL, jax.random.key(4), ShardingEnv(make_mesh({"data": 1}, jax.devices()[:1])))
    apply = jax.jit(lambda p, t, pos, m: module.apply({"params": p}, t, pos, m)[0])
    np.testing.assert_allclose(np.asarray(apply(params, tokens, None, mask)),
                               np.asarray(apply(params, tokens, positions_from_mask(mask), mask)), rtol=0, atol=1e-6)


def _bf16_round(x):
    return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def test_matmul_dtype_operands_forward_and_backward():
    """The dense layers' dot with matmul_dtype="bfloat16": bf16 operands in the forward and in both backward
    products (the incoming gradient rounded too), float32 accumulation and results, here for the o_proj
    shape (two contracted axes). Checked against float64 products of the rounded values."""
    from jaxrl_llm.models.layers import matmul_fn
    dot = matmul_fn(SMALL.replace(matmul_dtype="bfloat16"))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 4, 8)), jnp.float32)   # [tokens, heads, head_dim]
    w = jnp.asarray(rng.normal(size=(4, 8, 5)), jnp.float32)   # [heads, head_dim, embed]
    g = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    dims = (((1, 2), (0, 1)), ((), ()))
    out, vjp = jax.vjp(lambda a, b: dot(a, b, dims), x, w)
    dx, dw = vjp(g)
    assert out.dtype == dx.dtype == dw.dtype == jnp.float32
    xr, wr, gr = _bf16_round(x).reshape(6, 32), _bf16_round(w).reshape(32, 5), _bf16_round(g)
    np.testing.assert_allclose(out, xr @ wr, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, (gr @ wr.T).reshape(6, 4, 8), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, (xr.T @ gr).reshape(4, 8, 5), rtol=1e-5, atol=1e-5)
    # and not the float32 products
    assert np.abs(np.asarray(dw) - (np.asarray(x).reshape(6, 32).T @ np.asarray(g)).reshape(4, 8, 5)).max() > 1e-4
    with pytest.raises(NotImplementedError, match="not a dense layer's"):
        dot(x, w, (((2,), (1,)), ((), ())))


@pytest.mark.parametrize("matmul_dtype", [None, "float32", "bfloat16"])
def test_dense_backward_is_row_major_on_cpu(matmul_dtype):
    """The dense layers' hand-written backward: in float32 (the default) it equals the float64 products, and
    on CPU no gradient dot contracts over both operands' first axis (the form XLA:CPU runs on its generic
    kernel, and upcasts to float32 first when the operands are bf16); both weight-gradient branches (the
    transposed input, or the transposed incoming gradient and result) are exercised."""
    from jaxrl_llm.models.layers import matmul_fn
    dot = matmul_fn(SMALL.replace(matmul_dtype=matmul_dtype))
    rng = np.random.default_rng(1)
    dims = (((1,), (0,)), ((), ()))
    for fan_in, fan_out in ((16, 48), (48, 16)):
        x = jnp.asarray(rng.normal(size=(40, fan_in)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(fan_in, fan_out)), jnp.float32)
        g = jnp.asarray(rng.normal(size=(40, fan_out)), jnp.float32)

        def grads(x, w, g):
            return jax.vjp(lambda a, b: dot(a, b, dims), x, w)[1](g)

        dx, dw = jax.jit(grads)(x, w, g)
        if matmul_dtype != "bfloat16":
            x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
            np.testing.assert_allclose(dx, g64 @ w64.T, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(dw, x64.T @ g64, rtol=1e-5, atol=1e-5)
        hlo = jax.jit(grads).lower(x, w, g).compile().as_text()
        assert " dot(" in hlo and "lhs_contracting_dims={0}" not in hlo, hlo


def test_matmul_dtype_model_close_to_float32(env):
    tokens, mask = _batch()
    module, params, _ = create_model(SMALL, jax.random.key(4), env)
    cfg = SMALL.replace(matmul_dtype="bfloat16")

    def loss_and_grad(c):
        def loss(p):
            logits, _ = CausalLM(c).apply({"params": p}, tokens, None, mask)
            return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)[..., 5]), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (l32, logits32), g32 = loss_and_grad(SMALL)
    (l16, logits16), g16 = loss_and_grad(cfg)
    assert logits16.dtype == jnp.float32  # activations and logits stay in the compute dtype
    m = np.asarray(mask)
    diff = np.abs(np.asarray(logits16)[m] - np.asarray(logits32)[m]).max()
    assert 0 < diff < 0.05
    np.testing.assert_allclose(l16, l32, rtol=2e-2)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        assert a.dtype == jnp.float32
        assert np.linalg.norm(np.asarray(a) - np.asarray(b)) <= 0.05 * np.linalg.norm(np.asarray(b)) + 1e-6
    # the KV-cache path (what the sampler runs, with kernels cast once by matmul_weights) gives the same
    from jaxrl_llm.models.layers import matmul_weights
    cast = matmul_weights(params, cfg)
    kinds = {str(p[-1].key): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(cast)}
    assert kinds["kernel"] == jnp.bfloat16 and kinds["scale"] == kinds["bias"] == kinds["embedding"] == jnp.float32
    cache = KVCache.zeros(cfg, 3, 10)
    pos = positions_from_mask(mask)
    out, cache = CausalLM(cfg).apply({"params": cast}, tokens[:, :4], pos[:, :4], mask[:, :4], cache)
    pieces = [out]
    for t in range(4, 7):
        out, cache = CausalLM(cfg).apply({"params": cast}, tokens[:, t:t + 1], pos[:, t:t + 1], mask[:, t:t + 1],
                                         cache)
        pieces.append(out)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, 1))[m], np.asarray(logits16)[m], atol=1e-5)


def test_untied_head_and_unembedding(env):
    cfg = SMALL.replace(tie_word_embeddings=False)
    module, params, _ = create_model(cfg, jax.random.key(5), env)
    assert "lm_head" in params
    tokens, mask = _batch()
    logits, _ = module.apply({"params": params}, tokens, None, mask)
    hidden, _ = module.apply({"params": params}, tokens, None, mask, return_hidden=True)
    np.testing.assert_allclose(logits, hidden @ unembedding(params, cfg), atol=1e-5)
    _, tied, _ = create_model(SMALL, jax.random.key(5), env)
    assert "lm_head" not in tied
    np.testing.assert_array_equal(unembedding(tied, SMALL), tied["model"]["embed_tokens"]["embedding"].T)


def test_value_and_reward_heads(env):
    value = ScalarHeadModel(SMALL, per_token=True, zero_init_head=False)
    reward = ScalarHeadModel(SMALL, per_token=False, zero_init_head=False)
    _, params, _ = create_model(SMALL, jax.random.key(6), env, module=value)
    assert params["score"]["kernel"].shape == (32, 1)
    tokens, mask = _batch()
    v = value.apply({"params": params}, tokens, None, mask)
    assert v.shape == (3, 7) and v.dtype == jnp.float32
    r = reward.apply({"params": params}, tokens, None, mask)
    np.testing.assert_allclose(r, v[:, -1], atol=1e-6)  # left padding: last real token is the last slot
    # right padding: the reward is read at the last real token, not the last slot
    right_tokens = jnp.asarray([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]], jnp.int32)
    right_mask = right_tokens > 0
    rv = value.apply({"params": params}, right_tokens, None, right_mask)
    rr = reward.apply({"params": params}, right_tokens, None, right_mask)
    np.testing.assert_allclose(rr, jnp.stack([rv[0, 2], rv[1, 4]]), atol=1e-6)
    _, zero_params, _ = create_model(SMALL, jax.random.key(6), env, module=ScalarHeadModel(SMALL))
    assert float(jnp.abs(ScalarHeadModel(SMALL).apply({"params": zero_params}, tokens, None, mask)).max()) == 0.0


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="remat='some'"):
        ModelConfig(remat="some")
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(KeyError, match="Did you mean 'qwen2.5-0.5b'"):
        get_preset("qwen2.5-05b")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        ModelConfig(dtype="fp8")
    with pytest.raises(ValueError, match="unknown dtype 'bf16'"):
        ModelConfig(matmul_dtype="bf16")
    hash(get_preset("llama-3.2-1b"))  # configs with rope_scaling stay hashable (static jit args)


def test_cache_positions_required(env):
    module, params, _ = create_model(SMALL, jax.random.key(7), env)
    with pytest.raises(ValueError, match="positions are required"):
        module.apply({"params": params}, jnp.zeros((1, 1), jnp.int32), None, None, KVCache.zeros(SMALL, 1, 4))
