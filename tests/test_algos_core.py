"""Chunked log-probs, aggregation weights, accumulation, optimiser step, epoch runner."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_llm.algos.aggregation import LOSS_AGG_MODES, aggregate, check_loss_agg, token_weights
from jaxrl_llm.algos.logprobs import completion_logprobs, logprobs_from_hidden
from jaxrl_llm.algos.train_state import (OptimizerConfig, TrainState, accumulate, apply_gradients,
                                         make_epoch_runner, make_schedule, split_micro)
from jaxrl_llm.models import ModelConfig, create_model, unembedding
from jaxrl_llm.sharding import ShardingEnv, make_mesh

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, qkv_bias=True)


@pytest.fixture(scope="module")
def model():
    env = ShardingEnv(make_mesh({"data": 1}, devices=jax.devices()[:1]))
    module, params, _ = create_model(CFG, jax.random.key(0), env)
    return module, params


def _seqs(seed=0):
    r = np.random.default_rng(seed)
    pt = jnp.asarray(r.integers(2, 96, (4, 5)), jnp.int32)
    pm = jnp.asarray(np.arange(5)[None] >= np.array([0, 1, 2, 3])[:, None])
    ct = jnp.asarray(r.integers(2, 96, (4, 7)), jnp.int32)
    cm = jnp.asarray(np.arange(7)[None] < np.array([7, 5, 1, 0])[:, None])  # last row: empty completion
    return pt, pm, ct, cm


def _reference(module, params, pt, pm, ct, cm, temperature):
    logits, _ = module.apply({"params": params}, jnp.concatenate([pt, ct], 1), None, jnp.concatenate([pm, cm], 1))
    logp_all = np.asarray(jax.nn.log_softmax(logits[:, 4:11].astype(jnp.float32) / temperature), np.float64)
    m = np.asarray(cm)
    logp = np.take_along_axis(logp_all, np.asarray(ct)[..., None], -1)[..., 0] * m
    ent = -(np.exp(logp_all) * logp_all).sum(-1) * m
    return logp, ent


@pytest.mark.parametrize("chunk", [1, 3, 7, 128])
def test_chunked_logprobs_and_entropy_equal_full_softmax(model, chunk):
    module, params = model
    pt, pm, ct, cm = _seqs()
    logp, ent = completion_logprobs(module, params, CFG, pt, pm, ct, cm, temperature=0.7, chunk=chunk)
    ref_logp, ref_ent = _reference(module, params, pt, pm, ct, cm, 0.7)
    assert logp.dtype == jnp.float32 and logp.shape == (4, 7)
    np.testing.assert_allclose(logp, ref_logp, atol=2e-6)
    np.testing.assert_allclose(ent, ref_ent, atol=2e-6)
    assert np.all(np.asarray(logp)[3] == 0) and np.all(np.asarray(ent)[3] == 0)


def test_chunked_logprob_gradients_equal_full(model):
    module, params = model
    pt, pm, ct, cm = _seqs(1)

    def chunked(p):
        return jnp.sum(completion_logprobs(module, p, CFG, pt, pm, ct, cm, temperature=0.7, chunk=3)[0])

    def full(p):
        logits, _ = module.apply({"params": p}, jnp.concatenate([pt, ct], 1), None, jnp.concatenate([pm, cm], 1))
        lp = jax.nn.log_softmax(logits[:, 4:11] / 0.7)
        return jnp.sum(jnp.take_along_axis(lp, ct[..., None], -1)[..., 0] * cm)

    g1, g2 = jax.grad(chunked)(params), jax.grad(full)(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-6), g1, g2)


def test_chunked_logprobs_never_build_full_float32_logits(model):
    """The jaxpr holds [B, chunk, V] logits blocks but no [B, N, V] float32 array."""
    module, params = model
    pt, pm, ct, cm = _seqs()
    b, n, v = 4, 7, CFG.vocab_size

    def loss(p):
        return jnp.sum(completion_logprobs(module, p, CFG, pt, pm, ct, cm, chunk=2)[0])

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    shapes = set()

    def walk(jx):
        for eqn in jx.eqns:
            for var in eqn.outvars:
                aval = var.aval
                if hasattr(aval, "shape"):
                    shapes.add((tuple(aval.shape), str(aval.dtype)))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert ((b, 2, v), "float32") in shapes  # the chunk blocks are there
    big = [s for s in shapes if len(s[0]) >= 3 and s[0][-1] == v and np.prod(s[0]) >= b * n * v]
    assert not big, f"full logits materialised: {big}"


def test_logprobs_from_hidden_rejects_zero_temperature(model):
    module, params = model
    with pytest.raises(ValueError, match="temperature=0.0: must be > 0"):
        logprobs_from_hidden(jnp.zeros((1, 2, 32)), unembedding(params, CFG), jnp.zeros((1, 2), jnp.int32),
                             temperature=0.0)


def test_token_weights_by_hand():
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    loss = np.array([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0], [100.0] * 4], np.float32)
    expected = {
        "token-mean": (1 + 2 + 3 + 4) / 4,
        "seq-mean-token-mean": ((1 + 2 + 3) / 3 + 4 / 1 + 0) / 3,
        "seq-mean-token-sum": ((1 + 2 + 3) + 4 + 0) / 3,
        "seq-mean-token-sum-norm": ((1 + 2 + 3) + 4 + 0) / (3 * 4),
    }
    for mode, value in expected.items():
        np.testing.assert_allclose(aggregate(jnp.asarray(loss), jnp.asarray(mask), mode), value, rtol=1e-6)
    np.testing.assert_allclose(aggregate(jnp.asarray(loss), jnp.asarray(mask), "seq-mean-token-sum-norm", 10.0),
                               10 / 30, rtol=1e-6)
    with pytest.raises(ValueError, match="Did you mean 'token-mean'"):
        check_loss_agg("token_mean")
    allmasked = token_weights(jnp.zeros((2, 3)), "seq-mean-token-mean")
    assert np.all(np.isfinite(allmasked)) and float(allmasked.sum()) == 0.0


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_accumulation_equals_full_batch(mode):
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=(8, 6)), jnp.float32)
    mask = jnp.asarray(r.random((8, 6)) < 0.6)
    w = {"a": jnp.asarray(r.normal(size=(6,)), jnp.float32)}
    batch = {"x": x, "weights": token_weights(mask, mode), "mask": mask}

    def loss_fn(params, mb, rng):
        per_tok = jnp.tanh(mb["x"] * params["a"]) ** 2
        return jnp.sum(mb["weights"] * per_tok), {"tok_max": jnp.max(jnp.where(mb["mask"], per_tok, -jnp.inf))}

    g1, m1 = accumulate(loss_fn, w, batch, jax.random.key(0), 1)
    g4, m4 = accumulate(loss_fn, w, batch, jax.random.key(0), 4)
    np.testing.assert_allclose(g4["a"], g1["a"], atol=1e-6)
    np.testing.assert_allclose(m4["loss"], m1["loss"], atol=1e-6)
    np.testing.assert_allclose(m4["tok_max"], m1["tok_max"], atol=0)


def test_split_micro_is_strided():
    x = jnp.arange(8)
    np.testing.assert_array_equal(split_micro(x, 4), [[0, 4], [1, 5], [2, 6], [3, 7]])
    with pytest.raises(ValueError, match="not divisible by num_micro_batches=3"):
        split_micro(x, 3)


def test_apply_gradients_skips_non_finite():
    params = {"w": jnp.ones(3)}
    state = TrainState.create(params, OptimizerConfig(name="sgd", learning_rate=0.5, max_grad_norm=None))
    good, m = apply_gradients(state, {"w": jnp.array([1.0, 0.0, -1.0])}, {"loss": jnp.float32(1.0)})
    np.testing.assert_allclose(good.params["w"], [0.5, 1.0, 1.5])
    assert float(m["skipped"]) == 0 and float(m["grad_norm"]) == pytest.approx(np.sqrt(2))
    bad, m = apply_gradients(good, {"w": jnp.array([np.nan, 0.0, 0.0])}, {"loss": jnp.float32(1.0)})
    np.testing.assert_array_equal(bad.params["w"], good.params["w"])
    assert float(m["skipped"]) == 1 and int(bad.step) == 2 and float(m["update_norm"]) == 0
    bad, m = apply_gradients(good, {"w": jnp.zeros(3)}, {"loss": jnp.float32(np.inf)})
    assert float(m["skipped"]) == 1


def test_optimizer_config_and_schedule():
    sched = make_schedule(OptimizerConfig(learning_rate=1.0, schedule="linear", warmup_steps=2, total_steps=6))
    np.testing.assert_allclose([float(sched(i)) for i in range(7)], [0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="needs optimizer.total_steps"):
        OptimizerConfig(schedule="cosine")
    with pytest.raises(ValueError, match="optimizer.name='adan'"):
        OptimizerConfig(name="adan")
    # clipping is part of the optimiser: a huge gradient moves SGD by at most lr * max_grad_norm
    state = TrainState.create({"w": jnp.zeros(2)}, OptimizerConfig(name="sgd", learning_rate=1.0, max_grad_norm=1.0))
    new, m = apply_gradients(state, {"w": jnp.array([300.0, 400.0])}, {"loss": jnp.float32(0.0)})
    np.testing.assert_allclose(new.params["w"], [-0.6, -0.8], atol=1e-6)
    assert float(m["grad_norm"]) == pytest.approx(500.0)


def test_epoch_runner_visits_every_row_once_per_epoch():
    state = TrainState.create({"w": jnp.zeros(())}, optax.sgd(1.0))

    def step(state, mb, rng):
        # gradient of -sum(rows) -> w accumulates the sum of the rows visited
        grads = {"w": -jnp.sum(mb["x"])}
        return apply_gradients(state, grads, {"loss": jnp.float32(0.0), "rows": jnp.sum(mb["x"])})

    run = jax.jit(make_epoch_runner(step, num_minibatches=4, epochs=3))
    batch = {"x": jnp.arange(1.0, 9.0)}
    new, metrics = run(state, batch, jax.random.key(0))
    assert metrics["rows"].shape == (12,)
    assert float(new.params["w"]) == pytest.approx(3 * 36.0)
    sums = np.asarray(metrics["rows"]).reshape(3, 4).sum(1)
    np.testing.assert_allclose(sums, [36.0] * 3)
    assert not np.array_equal(np.asarray(metrics["rows"])[:4], np.asarray(metrics["rows"])[4:8])  # reshuffled
