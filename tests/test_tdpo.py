"""TDPO (token-level DPO): SeqKL, the TDPO1 / TDPO2 losses and gradients (the stop-gradient), the chunked head,
the update step against full-logit float64 values, exact accumulation, and the stage's config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_llm.algos.distill import divergence_from_hidden
from jaxrl_llm.algos.dpo import DPOConfig, make_dpo_step
from jaxrl_llm.algos.tdpo import tdpo_loss
from jaxrl_llm.algos.train_state import TrainState, jit_update
from jaxrl_llm.models import ModelConfig, create_model
from jaxrl_llm.sharding import ShardingEnv, make_mesh
from jaxrl_llm.train.config import ConfigError, load_experiment, validate

# Explicit tiny distributions: vocab 5, one response of 3 positions; the hidden states ARE the logits (W = I).
POLICY_LOGITS = np.array([[[1.0, 0.0, -1.0, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0], [3.0, -2.0, 0.1, 0.2, 0.3]]])
REF_LOGITS = np.array([[[0.0, 1.0, 0.0, -0.5, 1.0], [2.0, -1.0, 0.5, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0, -3.0]]])
TARGETS = np.array([[4, 0, 2]])


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_seq_kl_of_explicit_distributions_chunked_equals_unchunked():
    p, q = softmax(REF_LOGITS), softmax(POLICY_LOGITS)  # float64
    kl_t = np.sum(p * (np.log(p) - np.log(q)), -1)  # KL(ref || policy) per position, by hand
    assert kl_t.shape == (1, 3) and np.all(kl_t > 0.05)
    eye = jnp.eye(5, dtype=jnp.float32)
    for chunk in (1, 2, 3, 128):
        out = divergence_from_hidden(jnp.asarray(POLICY_LOGITS, jnp.float32), eye, jnp.asarray(REF_LOGITS,
                                     jnp.float32), eye, jnp.asarray(TARGETS), "forward_kl", chunk)
        np.testing.assert_allclose(out["divergence"], kl_t, rtol=1e-5, err_msg=f"chunk {chunk}")
        np.testing.assert_allclose(out["student_logp"], np.log(np.take_along_axis(q, TARGETS[..., None], -1))[..., 0],
                                   rtol=1e-5)
        np.testing.assert_allclose(out["teacher_logp"], np.log(np.take_along_axis(p, TARGETS[..., None], -1))[..., 0],
                                   rtol=1e-5)
    # SeqKL = the sum over positions: 3 hand-checked terms
    assert float(np.sum(kl_t)) == pytest.approx(float(np.sum(out["divergence"])), rel=1e-5)


# log-ratios (policy - ref, summed) and SeqKLs of 3 pairs
LC, LR = np.array([0.3, -0.2, 1.5]), np.array([-0.4, 0.1, 0.2])
DC, DR = np.array([0.05, 0.3, 0.02]), np.array([0.2, 0.01, 0.7])


@pytest.mark.parametrize("loss_type", ["tdpo1", "tdpo2"])
def test_tdpo_losses_rewards_and_gradients_by_hand(loss_type):
    beta, alpha = 0.5, 0.3
    u = LC - LR
    z = u - (DR - DC) if loss_type == "tdpo1" else u - alpha * (DR - DC)
    expect = -np.log(sig(beta * z))
    args = [jnp.asarray(x, jnp.float32) for x in (LC, LR, DC, DR)]
    losses, rc, rr = tdpo_loss(*args, beta=beta, alpha=alpha, loss_type=loss_type)
    np.testing.assert_allclose(losses, expect, rtol=1e-6)
    np.testing.assert_allclose(rc, beta * (LC + DC), rtol=1e-6)  # the official rewards: beta (log-ratio + SeqKL)
    np.testing.assert_allclose(rr, beta * (LR + DR), rtol=1e-6)
    grads = jax.grad(lambda *a: jnp.sum(tdpo_loss(*a, beta=beta, alpha=alpha, loss_type=loss_type)[0]),
                     argnums=(0, 1, 2, 3))(*args)
    g = -beta * (1.0 - sig(beta * z))  # dL/dz
    k = 1.0 if loss_type == "tdpo1" else alpha
    np.testing.assert_allclose(grads[0], g, rtol=1e-5)
    np.testing.assert_allclose(grads[1], -g, rtol=1e-5)
    np.testing.assert_allclose(grads[3], -k * g, rtol=1e-5)
    if loss_type == "tdpo1":
        np.testing.assert_allclose(grads[2], g, rtol=1e-5)
        assert np.all(np.abs(np.asarray(grads[2])) > 1e-2)
    else:  # the stop-gradient: nothing flows through the chosen SeqKL
        np.testing.assert_array_equal(grads[2], 0.0)


@pytest.mark.parametrize("loss_type", ["tdpo1", "tdpo2"])
def test_gradient_through_the_chunked_head_matches_the_hand_formula(loss_type):
    """Policy logits as the parameters: d/dz of the log-prob is onehot - q, of KL(p || q) it is q - p; TDPO2
    drops the chosen side's KL term."""
    beta, alpha = 0.7, 0.5
    pol_c, pol_r = POLICY_LOGITS, POLICY_LOGITS[:, ::-1] * 0.5
    ref_c, ref_r = REF_LOGITS, REF_LOGITS[:, ::-1]
    y_c, y_r = TARGETS, np.array([[1, 3, 3]])
    eye = jnp.eye(5, dtype=jnp.float32)

    def side(h, ref, y):
        out = divergence_from_hidden(h, eye, jnp.asarray(ref, jnp.float32), eye, jnp.asarray(y), "forward_kl", 2)
        return (out["student_logp"] - out["teacher_logp"]).sum(-1), out["divergence"].sum(-1)

    def loss(hc, hr):
        (lc, dc), (lr, dr) = side(hc, ref_c, y_c), side(hr, ref_r, y_r)
        return jnp.sum(tdpo_loss(lc, lr, dc, dr, beta=beta, alpha=alpha, loss_type=loss_type)[0])

    gc, gr = jax.grad(loss, argnums=(0, 1))(jnp.asarray(pol_c, jnp.float32), jnp.asarray(pol_r, jnp.float32))
    # by hand, float64
    qc, qr, pc, pr = softmax(pol_c), softmax(pol_r), softmax(ref_c), softmax(ref_r)
    pick = lambda d, y: np.log(np.take_along_axis(d, y[..., None], -1))[..., 0].sum(-1)  # noqa: E731
    kl = lambda p, q: np.sum(p * (np.log(p) - np.log(q)), (-1, -2))  # noqa: E731
    lc, lr = pick(qc, y_c) - pick(pc, y_c), pick(qr, y_r) - pick(pr, y_r)
    dc, dr = kl(pc, qc), kl(pr, qr)
    k = 1.0 if loss_type == "tdpo1" else alpha
    z = (lc - lr) - k * (dr - dc)
    g = -beta * (1.0 - sig(beta * z))
    onehot = lambda y: np.eye(5)[y]  # noqa: E731
    kl_c_weight = 1.0 if loss_type == "tdpo1" else 0.0
    expect_c = g * ((onehot(y_c) - qc) + kl_c_weight * (qc - pc))
    expect_r = g * (-(onehot(y_r) - qr) - k * (qr - pr))
    np.testing.assert_allclose(gc, expect_c, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gr, expect_r, rtol=1e-4, atol=1e-6)
    if loss_type == "tdpo2":  # guards the comparison: with the KL term the chosen gradient would differ
        assert np.max(np.abs(g * (qc - pc))) > 1e-2


# ----------------------------------------------------------------------------- the update step on a tiny model

V = 32
CFG = ModelConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def lm():
    module, params, _ = create_model(CFG, jax.random.key(0), ShardingEnv(make_mesh({"data": 1},
                                                                                   devices=jax.devices()[:1])))
    params = jax.device_get(params)
    rng = np.random.default_rng(3)
    ref = jax.tree.map(lambda x: (x + 0.3 * rng.standard_normal(x.shape)).astype(x.dtype), params)
    return module, params, ref


def pair_batch(b=4, p=3, nc=4, nr=3):
    rng = np.random.default_rng(0)
    pl = rng.integers(1, p + 1, b)
    pm = np.arange(p)[None] >= (p - pl)[:, None]
    out = {"prompt_tokens": np.where(pm, rng.integers(1, V, (b, p)), 0).astype(np.int32), "prompt_mask": pm}
    for side, n in (("chosen", nc), ("rejected", nr)):
        m = np.arange(n)[None] < rng.integers(1, n + 1, b)[:, None]
        out[f"{side}_tokens"], out[f"{side}_mask"] = np.where(m, rng.integers(1, V, (b, n)), 0).astype(np.int32), m
    return out


def full_tdpo_loss(module, params, ref, batch, cfg):
    """The batch's TDPO loss from each model's full logits, in float64."""
    apply = jax.jit(lambda p, t, m: module.apply({"params": p}, t, None, m)[0])
    p = batch["prompt_tokens"].shape[1]
    sides = {}
    for side in ("chosen", "rejected"):
        t = np.concatenate([batch["prompt_tokens"], batch[f"{side}_tokens"]], 1)
        m = np.concatenate([batch["prompt_mask"], batch[f"{side}_mask"]], 1)
        n = batch[f"{side}_tokens"].shape[1]
        lq, lp = (np.log(softmax(np.asarray(apply(x, t, m), np.float64)[:, p - 1:p - 1 + n])) for x in (params, ref))
        y, cm = batch[f"{side}_tokens"], batch[f"{side}_mask"]
        ratio = np.sum((np.take_along_axis(lq - lp, y[..., None], -1)[..., 0]) * cm, -1)
        sides[side] = ratio, np.sum(np.sum(np.exp(lp) * (lp - lq), -1) * cm, -1)
    (lc, dc), (lr, dr) = sides["chosen"], sides["rejected"]
    k = 1.0 if cfg.loss_type == "tdpo1" else cfg.tdpo_alpha
    z = (lc - lr) - k * (dr - dc)
    return float(np.mean(-np.log(sig(cfg.beta * z)))), dc, dr


def _update(module, params, ref, batch, cfg, num_micro, lr=0.1):
    state = TrainState.create(jax.device_put(jax.device_get(params)), optax.sgd(lr))
    update = jit_update(make_dpo_step(module, CFG, cfg, num_micro), state, batch, aux_example=ref)
    new, metrics = update(state, batch, jax.random.key(0), ref)
    return jax.device_get(new.params), jax.device_get(metrics)


@pytest.mark.parametrize("loss_type", ["tdpo1", "tdpo2"])
def test_step_loss_matches_full_logits_and_accumulation_is_exact(lm, loss_type):
    module, params, ref = lm
    cfg = DPOConfig(loss_type=loss_type, beta=0.5, logprob_chunk=2)
    batch = pair_batch()
    expect, dc, dr = full_tdpo_loss(module, params, ref, batch, cfg)
    p1, m1 = _update(module, params, ref, batch, cfg, 1)
    p2, m2 = _update(module, params, ref, batch, cfg, 2)
    assert float(m1["loss"]) == pytest.approx(expect, rel=1e-4)
    assert float(m1["seq_kl/chosen"]) == pytest.approx(float(np.mean(dc)), rel=1e-4)
    assert float(m1["seq_kl/rejected"]) == pytest.approx(float(np.mean(dr)), rel=1e-4)
    assert np.mean(dc) > 0.05  # the reference differs: the KL terms are not vanishing
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)))
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)))
    assert moved > 1e-4 and diff < 1e-6 * max(1.0, moved) + 1e-7, (moved, diff)
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)


def test_step_needs_the_reference_params(lm):
    module, params, _ = lm
    state = TrainState.create(jax.device_put(jax.device_get(params)), optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"needs the reference params as its 4th argument"):
        make_dpo_step(module, CFG, DPOConfig(loss_type="tdpo2"))(state, pair_batch(), jax.random.key(0))


def test_tdpo_config_errors_are_one_line(tmp_path):
    c = load_experiment("experiments/tdpo.py:smoke", [f"run_root={tmp_path}"])
    c.pref.algo.loss_type, c.pref.algo.tdpo_alpha = "tdpo1", 0.3
    with pytest.raises(ConfigError, match=r"^config\.pref\.algo\.tdpo_alpha=.* is not read by loss_type='tdpo1'") as e:
        validate(c)
    assert "\n" not in str(e.value)
    c.pref.algo.loss_type, c.pref.algo.tdpo_alpha = "tdpo2", 0.0
    with pytest.raises((ConfigError, ValueError), match=r"tdpo_alpha=0\.0 must be > 0"):
        validate(c)
