"""KL estimators, advantage estimators, policy and value losses against hand-written numpy loops.

Every expected value is computed here with plain Python/numpy loops over
rows and tokens, not with a vectorised copy of the implementation.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.algos import aggregation
from jaxrl_llm.algos.advantages import (
    broadcast_to_tokens,
    gae,
    group_advantages,
    reinforce_pp_advantages,
    reinforce_pp_returns,
    rloo_advantages,
    whiten,
)
from jaxrl_llm.algos.kl import (
    KLControllerConfig,
    kl_coef_update,
    kl_estimate,
    kl_penalty_rewards,
)
from jaxrl_llm.algos.policy_loss import PolicyLossConfig, policy_loss, value_loss
from jaxrl_llm.algos.train_state import split_micro

MODES = aggregation.LOSS_AGG_MODES

# 4 x 5: a right-padded row, a left-padded row, an all-masked row, a row with a gap (multi-turn: an
# environment observation inside the completion, skipped by the estimators)
MASK = np.array([[1, 1, 1, 0, 0],
                 [0, 1, 1, 1, 1],
                 [0, 0, 0, 0, 0],
                 [1, 0, 0, 1, 1]], np.float32)
LOGP = np.array([[-1.0, -0.5, -2.0, 0.0, 0.0],
                 [0.0, -0.3, -1.2, -0.7, -2.5],
                 [0.0, 0.0, 0.0, 0.0, 0.0],
                 [-0.2, 0.0, 0.0, -1.1, -0.4]], np.float32)
REF = np.array([[-1.2, -0.1, -2.0, 0.0, 0.0],
                [0.0, -0.9, -0.2, -0.8, -1.0],
                [0.0, 0.0, 0.0, 0.0, 0.0],
                [-0.3, 0.0, 0.0, -0.6, -0.5]], np.float32)


def real(mask_row):
    return [t for t in range(len(mask_row)) if mask_row[t] > 0]


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- KL


def np_kl(lp, rf, kind):
    d = rf - lp
    return {"k1": -d, "k2": 0.5 * d * d, "k3": math.exp(d) - d - 1.0}[kind]


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators_and_clamp(kind):
    got = np.asarray(kl_estimate(LOGP, REF, kind))
    got_c = np.asarray(kl_estimate(LOGP, REF, kind, clamp=0.3))
    for b in range(len(MASK)):
        for t in range(5):
            want = np_kl(float(LOGP[b, t]), float(REF[b, t]), kind)
            close(got[b, t], want)
            close(got_c[b, t], min(max(want, -0.3), 0.3))
    if kind == "k1":
        assert got_c.min() == pytest.approx(-0.3)  # logp - ref = -0.4 somewhere: clamp active below
    assert got_c.max() == pytest.approx(0.3)


def test_kl_estimator_errors_and_extremes():
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(LOGP, REF, "k4")
    # a huge log-ratio stays finite (value and gradient) with a clamp
    g = jax.grad(lambda x: jnp.sum(kl_estimate(x, jnp.array([500.0]), "k3", clamp=10.0)))(jnp.array([0.0]))
    assert np.isfinite(np.asarray(g)).all()
    assert float(kl_estimate(jnp.array([0.0]), jnp.array([500.0]), "k3", clamp=10.0)[0]) == 10.0


def test_kl_controller():
    cfg = KLControllerConfig(kind="adaptive", init_coef=0.1, target=6.0, horizon=10000)
    for observed, err in [(9.0, 0.2), (3.0, -0.2), (6.6, 0.1), (6.0, 0.0)]:
        want = 0.1 * (1.0 + err * 256 / 10000)
        close(kl_coef_update(jnp.float32(0.1), observed, 256, cfg), want, 1e-7)
    jitted = jax.jit(kl_coef_update, static_argnums=3)
    close(jitted(jnp.float32(0.1), jnp.float32(9.0), jnp.int32(256), cfg), 0.1 * (1 + 0.2 * 0.0256), 1e-7)
    fixed = KLControllerConfig(kind="fixed", init_coef=0.05)
    assert float(kl_coef_update(jnp.float32(0.05), 100.0, 256, fixed)) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="kind"):
        KLControllerConfig(kind="pid")
    with pytest.raises(ValueError, match="target"):
        KLControllerConfig(kind="adaptive", target=0.0)
    with pytest.raises(ValueError, match="horizon"):
        KLControllerConfig(kind="adaptive", horizon=0)


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_kl_penalty_rewards_left_and_right_aligned(kind):
    scores = np.array([2.0, -1.0, 5.0, 0.5], np.float32)
    logp = np.where(MASK > 0, LOGP, 7.0)  # garbage at masked positions must not leak
    got = np.asarray(kl_penalty_rewards(scores, logp, REF, MASK, 0.1, kind=kind))
    for b in range(len(MASK)):
        idx = real(MASK[b])
        for t in range(5):
            want = 0.0
            if t in idx:
                want = -0.1 * np_kl(float(LOGP[b, t]), float(REF[b, t]), kind)
                if t == idx[-1]:
                    want += scores[b]
            close(got[b, t], want)
    assert got[0, 2] != 0 and got[1, 4] != 0 and np.all(got[2] == 0)  # right-aligned, left-aligned, empty


# ----------------------------------------------------------------------------- advantages

REW = np.array([[0.1, -0.2, 1.0, 9.0, 9.0],
                [9.0, 0.3, 0.0, -0.5, 2.0],
                [9.0, 9.0, 9.0, 9.0, 9.0],
                [0.4, 9.0, 9.0, -0.3, 1.5]], np.float32)
VAL = np.array([[0.5, 0.4, 0.3, 9.0, 9.0],
                [9.0, -0.1, 0.2, 0.6, 0.9],
                [9.0, 9.0, 9.0, 9.0, 9.0],
                [0.2, 9.0, 9.0, 0.7, -0.4]], np.float32)


def np_gae(rew, val, mask, gamma, lam):
    """Explicit sum form: A_t = sum_l (gamma lam)^l delta_{t+l} over the real tokens of each row."""
    adv = np.zeros_like(rew, np.float64)
    for b in range(rew.shape[0]):
        idx = real(mask[b])
        deltas = []
        for k, t in enumerate(idx):
            v_next = val[b, idx[k + 1]] if k + 1 < len(idx) else 0.0
            deltas.append(rew[b, t] + gamma * v_next - val[b, t])
        for k, t in enumerate(idx):
            adv[b, t] = sum((gamma * lam) ** (j - k) * deltas[j] for j in range(k, len(idx)))
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_vs_numpy(gamma, lam):
    adv, ret = gae(REW, VAL, MASK, gamma=gamma, lam=lam)
    want = np_gae(REW, VAL, MASK, gamma, lam)
    close(adv, want)
    for b in range(len(MASK)):
        for t in range(5):
            close(ret[b, t], (want[b, t] + VAL[b, t]) if MASK[b, t] else 0.0)
    assert np.isfinite(np.asarray(adv)).all() and np.all(np.asarray(adv)[2] == 0)


def test_gae_lambda1_gamma1_is_returns_to_go_minus_values():
    adv, ret = gae(REW, VAL, MASK, gamma=1.0, lam=1.0)
    for b in range(len(MASK)):
        idx = real(MASK[b])
        for k, t in enumerate(idx):
            rtg = sum(float(REW[b, s]) for s in idx[k:])
            close(adv[b, t], rtg - VAL[b, t])
            close(ret[b, t], rtg)


def test_whiten_masked_stats():
    x = np.where(MASK > 0, REW * 3.0 + 1.0, 123.0)
    out = np.asarray(whiten(x, MASK))
    vals = [out[b, t] for b in range(len(MASK)) for t in range(5) if MASK[b, t]]
    n = len(vals)
    mean = sum(vals) / n
    var_unbiased = sum((v - mean) ** 2 for v in vals) / (n - 1)
    assert abs(mean) < 1e-6 and var_unbiased == pytest.approx(1.0, abs=1e-5)
    assert np.all(out[MASK == 0] == 0)
    # scale only: the mean is kept
    xs = [x[b, t] for b in range(len(MASK)) for t in range(5) if MASK[b, t]]
    out2 = np.asarray(whiten(x, MASK, shift_mean=False))
    x_mean = sum(xs) / n
    x_std = math.sqrt(sum((v - x_mean) ** 2 for v in xs) / (n - 1))
    for b in range(len(MASK)):
        for t in range(5):
            if MASK[b, t]:
                close(out2[b, t], (x[b, t] - x_mean) / x_std + x_mean, 1e-4)
    empty = np.asarray(whiten(x, np.zeros_like(MASK)))
    assert np.all(empty == 0)


GROUP_REWARDS = np.array([1.0, 0.0, 0.5, 2.0, 2.0, 2.0, -1.0, 3.0, 0.0], np.float32)  # G = 3; group 2 all equal


def np_std(xs, ddof):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - ddof))


@pytest.mark.parametrize("std_over", ["group", "batch"])
@pytest.mark.parametrize("ddof", [0, 1])
def test_group_advantages(std_over, ddof):
    g, eps = 3, 1e-6
    got = np.asarray(group_advantages(GROUP_REWARDS, g, std_over=std_over, eps=eps, std_ddof=ddof))
    batch_std = np_std(list(GROUP_REWARDS), ddof)
    for i in range(3):
        grp = [float(r) for r in GROUP_REWARDS[i * g:(i + 1) * g]]
        mean = sum(grp) / g
        std = np_std(grp, ddof) if std_over == "group" else batch_std
        for j in range(g):
            close(got[i * g + j], (grp[j] - mean) / (std + eps), 1e-4)
    assert np.all(got[3:6] == 0)  # identical rewards: 0, not NaN


def test_group_advantages_dr_grpo_and_errors():
    got = np.asarray(group_advantages(GROUP_REWARDS, 3, scale_by_std=False))
    for i in range(3):
        grp = GROUP_REWARDS[i * 3:(i + 1) * 3].tolist()
        for j in range(3):
            close(got[i * 3 + j], grp[j] - sum(grp) / 3)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(GROUP_REWARDS, 1)
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(GROUP_REWARDS, 4)
    with pytest.raises(ValueError, match="std_over"):
        group_advantages(GROUP_REWARDS, 3, std_over="prompt")


def test_rloo_vs_numpy():
    got = np.asarray(rloo_advantages(GROUP_REWARDS, 3))
    for i in range(3):
        grp = GROUP_REWARDS[i * 3:(i + 1) * 3].tolist()
        for j in range(3):
            others = [grp[k] for k in range(3) if k != j]
            close(got[i * 3 + j], grp[j] - sum(others) / len(others))
    with pytest.raises(ValueError, match=">= 2"):
        rloo_advantages(GROUP_REWARDS, 1)


def test_reinforce_pp_vs_numpy():
    gamma = 0.9
    rets = np.asarray(reinforce_pp_returns(REW, MASK, gamma))
    want = np.zeros(MASK.shape)
    for b in range(len(MASK)):
        idx = real(MASK[b])
        for k, t in enumerate(idx):
            want[b, t] = sum(gamma ** (j - k) * float(REW[b, idx[j]]) for j in range(k, len(idx)))
    close(rets, want)
    adv = np.asarray(reinforce_pp_advantages(REW, MASK, gamma))
    vals = [want[b, t] for b in range(len(MASK)) for t in range(5) if MASK[b, t]]
    mean = sum(vals) / len(vals)
    std = np_std(vals, 1)
    for b in range(len(MASK)):
        for t in range(5):
            close(adv[b, t], (want[b, t] - mean) / std if MASK[b, t] else 0.0, 1e-4)


def test_broadcast_to_tokens():
    adv = [1.5, -2.0, 3.0, 0.25]
    got = np.asarray(broadcast_to_tokens(np.array(adv), MASK))
    for b in range(len(MASK)):
        for t in range(5):
            assert got[b, t] == (adv[b] if MASK[b, t] else 0.0)


# ----------------------------------------------------------------------------- policy loss

# 3 x 5 with every clipping regime: ratios 0.5 (A<0: low clip), 1.5 (A>0: high clip), 4.0 (A<0: dual clip),
# 1.1 (A>0: inside), 0.7 (A>0: no clip: min picks rho A), 1.6 (A<0: unclipped branch larger)
PL_MASK = np.array([[1, 1, 1, 1, 0],
                    [0, 1, 1, 1, 1],
                    [0, 0, 0, 0, 0]], np.float32)
PL_OLD = np.array([[-1.0, -0.8, -2.0, -1.5, 0.0],
                   [0.0, -0.4, -1.1, -0.6, -2.0],
                   [0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
PL_RATIO = np.array([[0.5, 1.5, 4.0, 1.1, 1.0],
                     [1.0, 0.7, 1.6, 1.25, 0.9],
                     [1.0, 1.0, 1.0, 1.0, 1.0]], np.float32)
PL_LOGP = (PL_OLD + np.log(PL_RATIO)).astype(np.float32)
PL_ADV = np.array([[-1.0, 2.0, -0.5, 1.0, 0.0],
                   [0.0, 1.5, -2.0, 0.5, -1.0],
                   [0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)


def np_agg(per_token, mask, mode, norm_length=None):
    """The aggregation modes written out as loops (independent of aggregation.token_weights)."""
    n_rows, t_len = mask.shape
    if mode == "token-mean":
        n = sum(1 for b in range(n_rows) for t in range(t_len) if mask[b, t])
        return sum(per_token[b][t] for b in range(n_rows) for t in range(t_len) if mask[b, t]) / max(n, 1)
    if mode == "token-sum-norm":  # no division by the number of rows (verl's "seq-mean-token-sum-norm")
        return sum(per_token[b][t] for b in range(n_rows) for t in range(t_len) if mask[b, t]) / (
            t_len if norm_length is None else norm_length)
    total = 0.0
    for b in range(n_rows):
        idx = real(mask[b])
        s = sum(per_token[b][t] for t in idx)
        if mode == "seq-mean-token-mean":
            total += s / len(idx) if idx else 0.0
        elif mode == "seq-mean-token-sum":
            total += s
        else:
            total += s / (t_len if norm_length is None else norm_length)
    return total / n_rows


def np_pg_token(rho, a, lo, hi, dual):
    loss = max(-rho * a, -min(max(rho, 1 - lo), 1 + hi) * a)
    if dual is not None and a < 0:
        loss = min(loss, -dual * a)
    return loss


def weights(mask, mode, norm_length=None):
    return (aggregation.token_weights(jnp.asarray(mask), mode, norm_length),
            aggregation.token_mean_weights(jnp.asarray(mask)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dual", [None, 3.0])
def test_policy_loss_token_ratio_vs_numpy(mode, dual):
    cfg = PolicyLossConfig(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual, loss_agg=mode)
    w, mw = weights(PL_MASK, mode)
    loss, met = policy_loss(cfg, PL_LOGP, PL_OLD, PL_ADV, w, mw, mask_bt=PL_MASK)
    per = [[np_pg_token(float(PL_RATIO[b, t]), float(PL_ADV[b, t]), 0.2, 0.28, dual) if PL_MASK[b, t] else 0.0
            for t in range(5)] for b in range(3)]
    close(loss, np_agg(per, PL_MASK, mode), 1e-5)
    close(met["pg_loss"], np_agg(per, PL_MASK, "token-mean"), 1e-5)
    n = PL_MASK.sum()
    # low clip: (0,0) rho .5 A<0.  high clip: (0,1) rho 1.5 A>0.  dual: (0,2) rho 4 A<0 (-4*-.5=2 > 3*.5=1.5)
    close(met["clipfrac_low"], 1 / n)
    close(met["clipfrac_high"], 1 / n)
    close(met["dual_clipfrac"], (1 / n) if dual else 0.0)
    close(met["ratio_mean"], sum(PL_RATIO[b, t] for b in range(3) for t in range(5) if PL_MASK[b, t]) / n)
    close(met["ratio_max"], 4.0)
    k3_old = [math.log(PL_RATIO[b, t]) for b in range(3) for t in range(5) if PL_MASK[b, t]]
    close(met["approx_kl"], sum(math.exp(x) - 1 - x for x in k3_old) / n)
    assert "kl_loss" not in met and "kl_ref" not in met and "mismatch_kl" not in met


def test_policy_loss_kl_entropy_parts_and_errors():
    ent = np.abs(PL_LOGP) * 0.3
    cfg = PolicyLossConfig(loss_agg="token-mean", kl_coef=0.04, entropy_coef=0.01)
    ref = PL_OLD + 0.3 * PL_MASK
    w, mw = weights(PL_MASK, "token-mean")
    loss, met = policy_loss(cfg, PL_LOGP, PL_OLD, PL_ADV, w, mw, ref_logp_bt=ref, entropy_bt=ent, mask_bt=PL_MASK)
    per, kls, ents = [], [], []
    for b in range(3):
        row = []
        for t in range(5):
            if not PL_MASK[b, t]:
                row.append(0.0)
                continue
            pg = np_pg_token(float(PL_RATIO[b, t]), float(PL_ADV[b, t]), 0.2, 0.2, None)
            k3 = np_kl(float(PL_LOGP[b, t]), float(ref[b, t]), "k3")
            kls.append(k3)
            ents.append(float(ent[b, t]))
            row.append(pg + 0.04 * k3 - 0.01 * ent[b, t])
        per.append(row)
    n = len(kls)
    close(loss, np_agg(per, PL_MASK, "token-mean"), 1e-5)
    close(met["kl_loss"], 0.04 * sum(kls) / n)
    close(met["kl_ref"], sum(kls) / n)
    close(met["entropy"], sum(ents) / n)
    close(met["entropy_loss"], -0.01 * sum(ents) / n)
    close(met["pg_loss"] + met["kl_loss"] + met["entropy_loss"], loss)  # token-mean: the parts add up
    with pytest.raises(ValueError, match="ref_logp_bt"):
        policy_loss(cfg, PL_LOGP, PL_OLD, PL_ADV, w, mw, entropy_bt=ent, mask_bt=PL_MASK)
    with pytest.raises(ValueError, match="entropy_bt"):
        policy_loss(cfg, PL_LOGP, PL_OLD, PL_ADV, w, mw, ref_logp_bt=ref, mask_bt=PL_MASK)
    with pytest.raises(ValueError, match="same"):
        policy_loss(cfg, PL_LOGP[:, :4], PL_OLD, PL_ADV, w, mw, ref_logp_bt=ref, entropy_bt=ent, mask_bt=PL_MASK)


def test_policy_loss_config_validation():
    for kwargs, field in [({"clip_eps_low": 1.0}, "clip_eps_low"), ({"clip_eps_high": -0.1}, "clip_eps_high"),
                          ({"dual_clip": 1.0}, "dual_clip"), ({"ratio_level": "seq"}, "ratio_level"),
                          ({"loss_agg": "token_mean"}, "loss_agg"), ({"norm_length": 0.0}, "norm_length"),
                          ({"entropy_coef": -1.0}, "entropy_coef"), ({"kl_coef": -0.1}, "kl_coef"),
                          ({"kl_estimator": "k5"}, "kl_estimator"), ({"kl_clamp": 0.0}, "kl_clamp"),
                          ({"tis_cap": 0.0}, "tis_cap")]:
        with pytest.raises(ValueError, match=field):
            PolicyLossConfig(**kwargs)


def test_gspo_sequence_ratio_value_and_gradient():
    lo, hi = 3e-4, 4e-4
    cfg = PolicyLossConfig(clip_eps_low=lo, clip_eps_high=hi, ratio_level="sequence")
    mask = PL_MASK
    # row 0: tiny log-ratios (mean 1e-4: inside the clip range); row 1: mean 2e-3 > hi with A > 0: clipped
    logp = PL_OLD + np.array([[1e-4, 2e-4, -1e-4, 2e-4, 0.0],
                              [0.0, 1e-3, 3e-3, 2e-3, 2e-3],
                              [0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    adv_seq = [1.5, 2.0, -1.0]
    adv = np.asarray(broadcast_to_tokens(np.array(adv_seq, np.float32), mask))
    w, mw = weights(mask, "seq-mean-token-mean")
    loss_fn = lambda lp: policy_loss(cfg, lp, PL_OLD, adv, w, mw, mask_bt=mask)[0]
    loss = loss_fn(jnp.asarray(logp))
    grad = np.asarray(jax.grad(loss_fn)(jnp.asarray(logp)))

    n_rows = 3
    want_loss, want_grad = 0.0, np.zeros((3, 5))
    for b in range(n_rows):
        idx = real(mask[b])
        if not idx:
            continue
        s = math.exp(sum(float(logp[b, t]) - float(PL_OLD[b, t]) for t in idx) / len(idx))
        a = adv_seq[b]
        clipped = min(max(s, 1 - lo), 1 + hi)
        want_loss += max(-s * a, -clipped * a) / n_rows   # GSPO: 1/G sum_i -min(s_i A_i, clip(s_i) A_i)
        unclipped_active = -s * a >= -clipped * a
        for t in idx:  # d/dlogp_t = -(1/G) s_i A_i / |y_i| on the unclipped branch, else 0
            want_grad[b, t] = -s * a / len(idx) / n_rows if unclipped_active else 0.0
    close(loss, want_loss, 1e-6)
    close(grad, want_grad, 1e-6)
    assert np.all(grad[1] == 0) and np.all(grad[0][:4] != 0)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_gspo_token_with_per_token_advantages(mode):
    """GSPO-token (eq. 13-14): each token's value is s_i, its gradient s_i * A_t * grad logp_t (per-token A)."""
    lo, hi = 0.2, 0.28
    cfg = PolicyLossConfig(clip_eps_low=lo, clip_eps_high=hi, ratio_level="sequence", loss_agg=mode)
    logp = PL_OLD + np.array([[0.3, -0.1, 0.2, 0.0, 0.0],       # s = exp(0.1): inside the clip range
                              [0.0, 0.9, 0.5, 0.6, 0.4],        # s = exp(0.6) > 1 + hi: clipped for A > 0
                              [0.0] * 5], np.float32)
    w, mw = weights(PL_MASK, mode)
    loss_fn = lambda lp: policy_loss(cfg, lp, PL_OLD, PL_ADV, w, mw, mask_bt=PL_MASK)[0]
    loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(logp))
    n_tok = int(PL_MASK.sum())
    want_loss, want_grad = 0.0, np.zeros(PL_MASK.shape)
    for b in range(3):
        idx = real(PL_MASK[b])
        if not idx:
            continue
        s = math.exp(sum(float(logp[b, t] - PL_OLD[b, t]) for t in idx) / len(idx))
        for t in idx:
            wt = 1.0 / n_tok if mode == "token-mean" else 1.0 / (3 * len(idx))
            a = float(PL_ADV[b, t])
            clipped = min(max(s, 1 - lo), 1 + hi)
            want_loss += wt * max(-s * a, -clipped * a)
            want_grad[b, t] = -wt * s * a if -s * a >= -clipped * a else 0.0
    close(loss, want_loss, 1e-6)
    close(grad, want_grad, 1e-6)
    # row 1: A = 1.5 and 0.5 (clipped: no gradient), A = -2 and -1 (unclipped branch: gradient)
    assert grad[1, 1] == 0 and grad[1, 3] == 0 and grad[1, 2] != 0 and grad[1, 4] != 0


def test_tis_and_mismatch_metrics():
    cap = 1.5
    samp = PL_OLD - np.array([[0.1, -0.2, 0.9, 0.0, 0.0],
                              [0.0, 0.3, -0.05, 1.0, 0.2],
                              [0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)  # old - samp
    cfg = PolicyLossConfig(loss_agg="seq-mean-token-sum", tis_cap=cap)
    w, mw = weights(PL_MASK, "seq-mean-token-sum")
    loss_fn = lambda lp: policy_loss(cfg, lp, PL_OLD, PL_ADV, w, mw, sampler_logp_bt=samp,
                                     mask_bt=PL_MASK)
    loss, met = loss_fn(jnp.asarray(PL_LOGP))
    per, tis, mk, ma = [], [], [], []
    for b in range(3):
        row = []
        for t in range(5):
            if not PL_MASK[b, t]:
                row.append(0.0)
                continue
            x = float(PL_OLD[b, t]) - float(samp[b, t])
            tw = min(math.exp(x), cap)
            tis.append(tw)
            mk.append(math.exp(x) - x - 1)  # k3 of KL(sampler || old)
            ma.append(abs(x))
            row.append(tw * np_pg_token(float(PL_RATIO[b, t]), float(PL_ADV[b, t]), 0.2, 0.2, None))
        per.append(row)
    n = len(tis)
    close(loss, np_agg(per, PL_MASK, "seq-mean-token-sum"), 1e-5)
    close(met["tis_weight_mean"], sum(tis) / n)
    close(met["mismatch_kl"], sum(mk) / n)
    close(met["mismatch_abs"], sum(ma) / n)
    # the weight is a constant: the gradient is the plain one times the weight
    plain = PolicyLossConfig(loss_agg="seq-mean-token-sum")
    g_plain = jax.grad(lambda lp: policy_loss(plain, lp, PL_OLD, PL_ADV, w, mw, mask_bt=PL_MASK)[0])(PL_LOGP)
    g_tis = jax.grad(lambda lp: loss_fn(lp)[0])(jnp.asarray(PL_LOGP))
    tis_w = np.minimum(np.exp(PL_OLD - samp), cap) * PL_MASK
    close(g_tis, np.asarray(g_plain) * tis_w, 1e-6)
    with pytest.raises(ValueError, match="sampler_logp_bt"):
        policy_loss(cfg, PL_LOGP, PL_OLD, PL_ADV, w, mw, mask_bt=PL_MASK)


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_all_masked_rows_and_garbage_give_finite_loss_and_grads(ratio_level):
    garbage = np.where(PL_MASK > 0, 0.0, np.nan).astype(np.float32)
    big = np.where(PL_MASK > 0, 0.0, 1e30).astype(np.float32)
    cfg = PolicyLossConfig(ratio_level=ratio_level, dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01, tis_cap=2.0)
    for mode in MODES:
        w, mw = weights(PL_MASK, mode)

        def f(lp, w=w, mw=mw):
            return policy_loss(cfg, lp, PL_OLD + big, PL_ADV + garbage, w, mw, ref_logp_bt=PL_OLD - big,
                               entropy_bt=PL_OLD + garbage, sampler_logp_bt=PL_OLD + garbage, mask_bt=PL_MASK)

        (loss, met), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(PL_LOGP + big))
        assert np.isfinite(float(loss)), mode
        assert np.isfinite(np.asarray(g)).all() and np.all(np.asarray(g)[PL_MASK == 0] == 0), mode
        assert all(np.isfinite(np.asarray(v)).all() for v in met.values()), (mode, met)
    # a fully masked batch: 0 loss, 0 gradient
    zero = np.zeros_like(PL_MASK)
    w, mw = weights(zero, "seq-mean-token-mean")
    loss, g = jax.value_and_grad(lambda lp: policy_loss(PolicyLossConfig(ratio_level=ratio_level), lp, PL_OLD,
                                                        PL_ADV, w, mw, mask_bt=zero)[0])(jnp.asarray(PL_LOGP))
    assert float(loss) == 0.0 and np.all(np.asarray(g) == 0)


@pytest.mark.parametrize("std_over", ["group", "batch"])
def test_grpo_gradient_zero_when_group_rewards_equal(std_over):
    rng = np.random.default_rng(0)
    g, n_prompts, t_len = 4, 2, 6
    rewards = np.repeat(np.array([0.7, -1.0], np.float32), g)
    mask = (rng.random((g * n_prompts, t_len)) > 0.3).astype(np.float32)
    old = rng.normal(-1.0, 0.3, mask.shape).astype(np.float32)
    logp = (old + rng.normal(0, 0.2, mask.shape)).astype(np.float32)
    adv = broadcast_to_tokens(group_advantages(rewards, g, std_over=std_over), mask)
    assert np.all(np.asarray(adv) == 0)
    for level in ("token", "sequence"):
        cfg = PolicyLossConfig(ratio_level=level, kl_coef=0.0, dual_clip=3.0)
        w, mw = weights(mask, cfg.loss_agg)
        grad = jax.grad(lambda lp, cfg=cfg, w=w, mw=mw: policy_loss(cfg, lp, old, adv, w, mw, mask_bt=mask)[0])(
            jnp.asarray(logp))
        assert np.all(np.asarray(grad) == 0.0)
    # and not zero once one reward differs (the test can fail)
    rewards[0] += 1.0
    adv = broadcast_to_tokens(group_advantages(rewards, g, std_over=std_over), mask)
    grad = jax.grad(lambda lp: policy_loss(cfg, lp, old, adv, w, mw, mask_bt=mask)[0])(jnp.asarray(logp))
    assert np.abs(np.asarray(grad)).max() > 0


@pytest.mark.parametrize("clip", [0.2, None])
def test_value_loss_vs_numpy(clip):
    old = np.array([[0.5, 0.4, 0.3, 9.0, 9.0], [9.0, -0.1, 0.2, 0.6, 0.9], [9.0] * 5, [0.1, 9, 9, 0.2, 0.3]],
                   np.float32)
    vals = old + np.array([[0.5, -0.1, 0.05, 0.0, 0.0], [0.0, -0.4, 0.3, 0.1, -0.25], [0.0] * 5,
                           [0.3, 0, 0, -0.3, 0.0]], np.float32)
    rets = np.array([[1.2, 0.0, 0.5, 9.0, 9.0], [9.0, 0.4, -0.3, 0.65, 0.1], [9.0] * 5, [0.0, 9, 9, 1.0, 0.3]],
                    np.float32)
    mode = "seq-mean-token-mean"
    w, mw = weights(MASK, mode)
    loss, met = value_loss(vals, old, rets, w, mw, clip_range=clip)
    per, clipped, vs = [], [], []
    for b in range(len(MASK)):
        row = []
        for t in range(5):
            if not MASK[b, t]:
                row.append(0.0)
                continue
            v, o, r = float(vals[b, t]), float(old[b, t]), float(rets[b, t])
            l1 = (v - r) ** 2
            if clip is None:
                row.append(0.5 * l1)
                clipped.append(0.0)
            else:
                vc = o + min(max(v - o, -clip), clip)
                l2 = (vc - r) ** 2
                row.append(0.5 * max(l1, l2))
                clipped.append(1.0 if l2 > l1 else 0.0)
            vs.append(v)
        per.append(row)
    n = len(vs)
    close(loss, np_agg(per, MASK, mode))
    close(met["vf_loss"], np_agg(per, MASK, "token-mean"))
    close(met["vf_clipfrac"], sum(clipped) / n)
    close(met["value_mean"], sum(vs) / n)
    if clip is not None:
        assert 0 < float(met["vf_clipfrac"]) < 1  # some tokens take the clipped branch, some do not


# ----------------------------------------------------------------------------- micro-batch consistency


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_micro_batches_sum_to_full_batch(mode, ratio_level):
    rng = np.random.default_rng(1)
    b, t, m = 8, 7, 4
    lengths = rng.integers(0, t + 1, size=b)
    lengths[3] = 0  # an all-masked row
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    old = (rng.normal(-1.5, 0.5, (b, t)) * mask).astype(np.float32)
    logp = (old + rng.normal(0, 0.3, (b, t)) * mask).astype(np.float32)
    ref = (old + rng.normal(0, 0.2, (b, t)) * mask).astype(np.float32)
    samp = (old + rng.normal(0, 0.1, (b, t)) * mask).astype(np.float32)
    ent = (rng.random((b, t)) * mask).astype(np.float32)
    adv = broadcast_to_tokens(group_advantages(rng.normal(size=b).astype(np.float32), 4), mask)
    cfg = PolicyLossConfig(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0, ratio_level=ratio_level,
                           loss_agg=mode, norm_length=10.0, entropy_coef=0.01, kl_coef=0.05, tis_cap=2.0)
    w = aggregation.token_weights(jnp.asarray(mask), mode, cfg.norm_length)
    mw = aggregation.token_mean_weights(jnp.asarray(mask))
    batch = {"old": old, "adv": adv, "w": w, "mw": mw, "ref": ref, "ent": ent, "samp": samp, "mask": mask}

    def f(lp, bt):
        return policy_loss(cfg, lp, bt["old"], bt["adv"], bt["w"], bt["mw"], ref_logp_bt=bt["ref"],
                           entropy_bt=bt["ent"], sampler_logp_bt=bt["samp"], mask_bt=bt["mask"])

    (full_loss, full_met), full_g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp), batch)

    def summed(lp):
        micro_lp, micro = split_micro(lp, m), split_micro(batch, m)
        total, mets = 0.0, []
        for k in range(m):
            loss_k, met_k = f(micro_lp[k], jax.tree.map(lambda x, k=k: x[k], micro))
            total = total + loss_k
            mets.append(met_k)
        return total, mets

    (acc_loss, mets), acc_g = jax.value_and_grad(summed, has_aux=True)(jnp.asarray(logp))
    close(acc_loss, full_loss, 1e-6)
    close(acc_g, full_g, 1e-6)
    assert np.abs(np.asarray(full_g)).max() > 0
    for name, full_v in full_met.items():
        parts = [float(mk[name]) for mk in mets]
        close(max(parts) if name.endswith("_max") else sum(parts), full_v, 1e-6)

    vals = (old * 0.5).astype(np.float32)
    vf = lambda v, bt: value_loss(v, bt["old"] * 0.4, bt["ent"], bt["w"], bt["mw"])[0]
    full_vl, full_vg = jax.value_and_grad(vf)(jnp.asarray(vals), batch)
    micro_v, micro = split_micro(jnp.asarray(vals), m), split_micro(batch, m)
    acc_vl = sum(float(vf(micro_v[k], jax.tree.map(lambda x, k=k: x[k], micro))) for k in range(m))
    close(acc_vl, full_vl, 1e-6)
    assert np.isfinite(np.asarray(full_vg)).all()
