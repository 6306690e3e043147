"""Preference losses against values computed independently in plain Python (math), on tiny hand-written arrays."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.algos.preference import (bradley_terry_loss, dpo_loss, log_odds, orpo_loss, sft_nll,
                                        simpo_loss)

# policy / reference summed log-probs of 3 pairs
PC = [-10.0, -4.0, -7.5]
PR = [-12.0, -4.0, -7.5]
RC = [-11.0, -4.5, -6.0]
RR = [-11.5, -2.0, -8.0]
LEN_C = [5, 2, 3]
LEN_R = [4, 1, 6]


def logsig(x):
    # independent of jax: log(1 / (1 + e^-x)) written stably
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def h_of(i, lengths=False):
    pc, pr, rc, rr = PC[i], PR[i], RC[i], RR[i]
    if lengths:
        pc, rc, pr, rr = pc / LEN_C[i], rc / LEN_C[i], pr / LEN_R[i], rr / LEN_R[i]
    return (pc - rc) - (pr - rr)


def _dpo(**kw):
    out = dpo_loss(jnp.array(PC), jnp.array(PR), jnp.array(RC), jnp.array(RR), **kw)
    return [np.asarray(x, np.float64) for x in out]


def test_dpo_sigmoid_and_rewards():
    beta = 0.1
    losses, rc, rr = _dpo(beta=beta)
    expected = [-logsig(beta * h_of(i)) for i in range(3)]
    np.testing.assert_allclose(losses, expected, rtol=1e-6)
    np.testing.assert_allclose(rc, [beta * (PC[i] - RC[i]) for i in range(3)], rtol=1e-6)
    np.testing.assert_allclose(rr, [beta * (PR[i] - RR[i]) for i in range(3)], rtol=1e-6)
    # h by hand for pair 0: (-10 + 11) - (-12 + 11.5) = 1.5
    assert h_of(0) == 1.5 and losses[0] == pytest.approx(math.log1p(math.exp(-0.15)), rel=1e-6)


def test_dpo_sigmoid_is_log2_when_policy_equals_reference():
    x = jnp.array([-3.0, -17.25, -0.5, -40.0])
    y = jnp.array([-8.0, -1.0, -2.5, -39.0])
    for beta in (0.01, 0.1, 1.0):
        losses, rc, rr = dpo_loss(x, y, x, y, beta=beta)
        np.testing.assert_allclose(np.asarray(losses), math.log(2.0), rtol=1e-6)
        assert np.all(np.asarray(rc) == 0) and np.all(np.asarray(rr) == 0)


def test_cdpo_label_smoothing():
    beta, ls = 0.5, 0.2
    losses, _, _ = _dpo(beta=beta, label_smoothing=ls)
    expected = [-(1 - ls) * logsig(beta * h_of(i)) - ls * logsig(-beta * h_of(i)) for i in range(3)]
    np.testing.assert_allclose(losses, expected, rtol=1e-6)
    # ls = 0.5 trusts neither label: swapping chosen and rejected changes nothing (it does at ls = 0.2)
    half, _, _ = _dpo(beta=beta, label_smoothing=0.5)
    swapped = dpo_loss(jnp.array(PR), jnp.array(PC), jnp.array(RR), jnp.array(RC), beta=beta, label_smoothing=0.5)[0]
    np.testing.assert_allclose(half, np.asarray(swapped), rtol=1e-6)
    swapped_02 = dpo_loss(jnp.array(PR), jnp.array(PC), jnp.array(RR), jnp.array(RC), beta=beta, label_smoothing=ls)[0]
    assert not np.allclose(losses, np.asarray(swapped_02))


def test_robust_dpo():
    beta, ls = 0.3, 0.1
    losses, _, _ = _dpo(beta=beta, loss_type="robust", label_smoothing=ls)
    expected = [((1 - ls) * -logsig(beta * h_of(i)) + ls * logsig(-beta * h_of(i))) / (1 - 2 * ls)
                for i in range(3)]
    np.testing.assert_allclose(losses, expected, rtol=1e-6)
    # without smoothing it is plain DPO
    np.testing.assert_allclose(_dpo(beta=beta, loss_type="robust")[0], _dpo(beta=beta)[0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"label_smoothing=0.5 must be in \[0, 0.5\)"):
        _dpo(loss_type="robust", label_smoothing=0.5)


def test_hinge():
    beta = 0.5
    losses, _, _ = _dpo(beta=beta, loss_type="hinge")
    expected = [max(0.0, 1 - beta * h_of(i)) for i in range(3)]
    np.testing.assert_allclose(losses, expected, rtol=1e-6)
    assert expected[0] == 0.25 and expected[1] == 0.0  # h = 1.5 -> 1 - 0.75; h = 2.5 -> 0


def test_ipo_summed_vs_length_normalised_is_explicit():
    beta = 0.1
    summed, _, _ = _dpo(beta=beta, loss_type="ipo")
    np.testing.assert_allclose(summed, [(h_of(i) - 1 / (2 * beta)) ** 2 for i in range(3)], rtol=1e-6)
    normed, rc_n, _ = _dpo(beta=beta, loss_type="ipo", chosen_lengths_b=jnp.array(LEN_C),
                           rejected_lengths_b=jnp.array(LEN_R))
    np.testing.assert_allclose(normed, [(h_of(i, True) - 1 / (2 * beta)) ** 2 for i in range(3)], rtol=1e-6)
    assert not np.allclose(summed, normed)
    # rewards follow the same normalisation (TRL)
    np.testing.assert_allclose(rc_n, [beta * (PC[i] - RC[i]) / LEN_C[i] for i in range(3)], rtol=1e-6)
    with pytest.raises(ValueError, match="both chosen_lengths_b and rejected_lengths_b"):
        _dpo(loss_type="ipo", chosen_lengths_b=jnp.array(LEN_C))


def test_dpo_errors_are_clear():
    with pytest.raises(ValueError, match=r"loss_type='sigmiod' is not supported. Did you mean 'sigmoid'\?"):
        _dpo(loss_type="sigmiod")
    with pytest.raises(ValueError, match=r"label_smoothing=0.1 only applies to loss_type"):
        _dpo(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"beta=0 must be > 0"):
        _dpo(beta=0)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    g = jax.grad(lambda pc, pr: jnp.sum(dpo_loss(pc, pr, jnp.array(RC), jnp.array(RR))[0]), argnums=(0, 1))(
        jnp.array(PC), jnp.array(PR))
    assert np.all(np.asarray(g[0]) < 0) and np.all(np.asarray(g[1]) > 0)


def test_simpo():
    ac, ar = [-0.5, -1.2, -2.0], [-0.9, -1.0, -2.0]
    beta, gamma = 2.0, 0.5
    losses, rc, rr = simpo_loss(jnp.array(ac), jnp.array(ar), beta=beta, gamma=gamma)
    expected = [-logsig(beta * (c - r) - gamma) for c, r in zip(ac, ar)]
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(rc), [beta * c for c in ac], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(rr), [beta * r for r in ar], rtol=1e-6)
    # pair 0 by hand: 2 * 0.4 - 0.5 = 0.3
    assert float(losses[0]) == pytest.approx(math.log1p(math.exp(-0.3)), rel=1e-6)
    ls = 0.1
    smoothed, _, _ = simpo_loss(jnp.array(ac), jnp.array(ar), beta=beta, gamma=gamma, label_smoothing=ls)
    expected = [-(1 - ls) * logsig(beta * (c - r) - gamma) - ls * logsig(-(beta * (c - r) - gamma))
                for c, r in zip(ac, ar)]
    np.testing.assert_allclose(np.asarray(smoothed), expected, rtol=1e-6)


def exact_log_odds(x):
    # float64 reference: log(p / (1 - p)), p = e^x
    return x - math.log(-math.expm1(x))


def test_orpo_matches_formula():
    ac, ar, nll = [-0.3, -1.5], [-0.8, -0.7], [0.4, 1.1]
    lam = 0.25
    losses, rc, rr, ratio = orpo_loss(jnp.array(ac), jnp.array(ar), jnp.array(nll), lam)
    for i in range(2):
        lor = exact_log_odds(ac[i]) - exact_log_odds(ar[i])
        assert float(ratio[i]) == pytest.approx(lor, rel=1e-5)
        assert float(losses[i]) == pytest.approx(nll[i] - lam * logsig(lor), rel=1e-5)
    np.testing.assert_allclose(np.asarray(rc), [lam * a for a in ac], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(rr), [lam * a for a in ar], rtol=1e-6)
    # pair 0 by hand: p = e^-0.3 = 0.7408, odds = 2.858; p = e^-0.8 = 0.4493, odds = 0.8160
    assert float(ratio[0]) == pytest.approx(math.log(2.8583 / 0.81606), rel=1e-3)


def test_orpo_log_odds_stable_near_zero():
    xs = [-1e-6, -1e-5, -3e-4, -0.1, -0.69, -0.7, -5.0, -30.0]
    got = np.asarray(log_odds(jnp.array(xs, jnp.float32)))
    np.testing.assert_allclose(got, [exact_log_odds(x) for x in xs], rtol=2e-5)
    # the naive float32 form (TRL's log1p(-exp(x))) is off by percents at -1e-6 and infinite at -1e-8
    def naive(x):
        with np.errstate(divide="ignore"):
            return x - np.log1p(-np.exp(np.float32(x)))
    assert abs(naive(-1e-6) - exact_log_odds(-1e-6)) > 1e-3 * abs(exact_log_odds(-1e-6))
    assert np.isinf(naive(-1e-8))
    # p = 1 (avg log-prob exactly 0) stays finite, with finite gradients through the ORPO loss
    zero = jnp.array([0.0, -1e-9, -0.5], jnp.float32)
    assert np.all(np.isfinite(np.asarray(log_odds(zero))))
    g = jax.grad(lambda a: jnp.sum(orpo_loss(a, jnp.array([-0.2, -0.3, -1.0]), jnp.zeros(3))[0]))(zero)
    assert np.all(np.isfinite(np.asarray(g)))
    # gradient of log odds is finite and correct away from the clamp: d/dx = 1 / (1 - e^x)
    dx = jax.grad(lambda x: log_odds(x))(jnp.float32(-1e-3))
    assert float(dx) == pytest.approx(1.0 / -math.expm1(-1e-3), rel=1e-4)


def test_bradley_terry_with_and_without_margin():
    rc, rr, m = [1.0, -0.5, 2.0], [0.0, 0.5, 2.0], [0.5, 0.0, -1.0]
    plain = np.asarray(bradley_terry_loss(jnp.array(rc), jnp.array(rr)))
    np.testing.assert_allclose(plain, [-logsig(c - r) for c, r in zip(rc, rr)], rtol=1e-6)
    assert plain[2] == pytest.approx(math.log(2.0), rel=1e-6)
    marg = np.asarray(bradley_terry_loss(jnp.array(rc), jnp.array(rr), jnp.array(m)))
    np.testing.assert_allclose(marg, [-logsig(c - r - mm) for c, r, mm in zip(rc, rr, m)], rtol=1e-6)
    # a positive margin asks for a larger gap: the loss goes up
    assert marg[0] > plain[0] and marg[2] < plain[2]


def test_sft_nll_weights():
    logp = jnp.array([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    token_mean = mask / mask.sum()
    assert float(sft_nll(logp, token_mean)) == pytest.approx((1.0 + 2.0 + 0.5) / 3, rel=1e-6)
    seq_mean = mask / mask.sum(-1, keepdims=True) / 2
    assert float(sft_nll(logp, seq_mean)) == pytest.approx((1.5 + 0.5) / 2, rel=1e-6)
