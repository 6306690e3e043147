"""CISPO, SAPO, verl's GSPO clamp, the abs KL and TRL's bias-corrected KL against numpy float64 formulas.

Each reference is written from the paper's / peer's formula (verl core_algos.py, TRL grpo_trainer.py), per
token with loops over rows, and compared with `policy_loss` in value and in gradient w.r.t. logp (jax.grad).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.algos import grpo
from jaxrl_llm.algos.kl import kl_estimate
from jaxrl_llm.algos.policy_loss import PolicyLossConfig, policy_loss
from jaxrl_llm.train.config import ConfigError, grpo_stage
from jaxrl_llm.train.stages.rl import check_loss

B, T = 5, 7


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


def case(seed, log_ratio_scale=0.6):
    """Random [B, T] inputs; masked positions hold NaN (they must never reach the result)."""
    rng = np.random.default_rng(seed)
    mask = (rng.random((B, T)) < 0.75).astype(np.float64)
    mask[0, :4] = 1.0
    mask[-1] = 0.0                                            # an all-masked row
    logp = -rng.exponential(1.0, (B, T))
    old = logp - rng.normal(0.0, log_ratio_scale, (B, T))     # ratios inside and outside [0.8, 1.2]
    old[0, :4] = logp[0, :4] - np.array([0.0, 0.5, -1.5, 2.0])  # rho = 1, e^0.5, e^-1.5, e^2 for sure
    adv = rng.normal(0.0, 1.0, (B, 1)) * np.ones((B, T))      # per-row advantages of both signs
    adv[1] = -np.abs(adv[1])
    adv[2] = np.abs(adv[2])
    ref = logp + rng.normal(0.0, 0.5, (B, T))
    for x in (logp, old, adv, ref):
        x[mask == 0] = np.nan
    w = mask / mask.sum()                                      # token-mean weights
    return dict(mask=mask, logp=logp, old=old, adv=adv, ref=ref, w=w)


def run(cfg, c, **extra):
    """(loss, metrics, d loss / d logp) from our implementation, float32."""
    f32 = {k: jnp.asarray(v, jnp.float32) for k, v in c.items()}

    def f(logp):
        return policy_loss(cfg, logp, f32["old"], f32["adv"], f32["w"], f32["w"], mask_bt=f32["mask"],
                           ref_logp_bt=f32["ref"] if cfg.kl_coef > 0 else None, **extra)

    (loss, met), grad = jax.value_and_grad(f, has_aux=True)(f32["logp"])
    assert np.all(np.isfinite(np.asarray(grad))), "NaN/inf in the gradient"
    assert np.all(np.asarray(grad)[c["mask"] == 0] == 0.0), "masked tokens got a gradient"
    return float(loss), {k: float(v) for k, v in met.items()}, np.asarray(grad, np.float64)


def tokens(c):
    return [(i, t) for i in range(B) for t in range(T) if c["mask"][i, t] > 0]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------- CISPO


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("low, high", [(0.2, 0.2), (1.0, 0.2), (10.0, 0.28), (1.0, 4.0)])
def test_cispo_matches_sg_clipped_weight_times_logp(seed, low, high):
    c = case(seed)
    loss, met, grad = run(PolicyLossConfig(loss_fn="cispo", clip_eps_low=low, clip_eps_high=high), c)
    want_loss, want_grad = 0.0, np.zeros((B, T))
    n_low = n_high = 0.0
    for i, t in tokens(c):
        r = np.exp(c["logp"][i, t] - c["old"][i, t])
        wgt = min(max(r, 1.0 - low), 1.0 + high)           # verl: clamp(ratio, 1 - low, 1 + high).detach()
        if low >= 1.0:                                      # TRL: clamp(ratio, max=epsilon_high) with no floor
            assert wgt == min(r, 1.0 + high)
        a = c["adv"][i, t]
        want_loss += c["w"][i, t] * (-wgt * a * c["logp"][i, t])
        want_grad[i, t] = c["w"][i, t] * (-wgt * a)         # the weight is a constant: no d rho / d logp term
        n_low += c["w"][i, t] * (r < 1.0 - low)
        n_high += c["w"][i, t] * (r > 1.0 + high)
    close(loss, want_loss)
    close(grad, want_grad)
    close(met["pg_loss"], want_loss)
    close(met["clipfrac_low"], n_low)
    close(met["clipfrac_high"], n_high)
    assert met["dual_clipfrac"] == 0.0
    if seed == 0:
        assert n_high > 0 and (low >= 1.0 or n_low > 0), "the case must hit the clip"


def test_cispo_keeps_the_gradient_the_clip_drops():
    """A > 0 and rho = 2 > 1.2: PPO's clip gives no gradient; CISPO gives -1.2 A w (scaled, not dropped)."""
    logp, old = jnp.array([[-1.0]]), jnp.array([[-1.0 - np.log(2.0)]])
    args = (old, jnp.array([[1.5]]), jnp.ones((1, 1)), jnp.ones((1, 1)))
    for fn, want in (("clip", 0.0), ("cispo", -1.2 * 1.5)):
        g = jax.grad(lambda lp: policy_loss(PolicyLossConfig(loss_fn=fn), lp, *args, mask_bt=jnp.ones((1, 1)))[0])
        close(g(logp), [[want]])


# ----------------------------------------------------------------------------- SAPO


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau_pos, tau_neg", [(1.0, 1.05), (2.0, 5.0)])
def test_sapo_matches_the_sigmoid_gate(seed, tau_pos, tau_neg):
    c = case(seed, log_ratio_scale=1.0)
    cfg = PolicyLossConfig(loss_fn="sapo", sapo_tau_pos=tau_pos, sapo_tau_neg=tau_neg)
    loss, met, grad = run(cfg, c)
    want_loss, want_grad = 0.0, np.zeros((B, T))
    gate_mean = n_low = n_high = 0.0
    for i, t in tokens(c):
        r = np.exp(c["logp"][i, t] - c["old"][i, t])
        a = c["adv"][i, t]
        tau = tau_pos if a > 0 else tau_neg                 # verl / TRL: tau_pos if A > 0 else tau_neg
        s = sigmoid(tau * (r - 1.0))
        want_loss += c["w"][i, t] * (-s * 4.0 / tau * a)
        # d/dlogp [sigmoid(tau (r - 1)) 4 / tau] = 4 s (1 - s) r
        want_grad[i, t] = c["w"][i, t] * (-a * 4.0 * s * (1.0 - s) * r)
        gate = 4.0 * s * (1.0 - s)
        gate_mean += c["w"][i, t] * gate
        n_low += c["w"][i, t] * (r < 1.0 and gate < 0.5)
        n_high += c["w"][i, t] * (r > 1.0 and gate < 0.5)
    close(loss, want_loss)
    close(grad, want_grad)
    close(met["sapo_gate_mean"], gate_mean)
    close(met["clipfrac_low"], n_low)
    close(met["clipfrac_high"], n_high)
    if (seed, tau_pos) == (0, 2.0):
        assert n_high > 0 and n_low > 0, "the case must reach the damped part of the gate on both sides"


def test_sapo_on_policy_gradient_is_the_plain_policy_gradient():
    """At rho = 1 the gate is 1: the gradient is -A w, for either temperature."""
    logp = jnp.array([[-0.7, -1.3]])
    adv = jnp.array([[2.0, -3.0]])
    w = jnp.full((1, 2), 0.5)
    g = jax.grad(lambda lp: policy_loss(PolicyLossConfig(loss_fn="sapo", sapo_tau_neg=3.0), lp,
                                        jax.lax.stop_gradient(lp), adv, w, w, mask_bt=jnp.ones((1, 2)))[0])(logp)
    close(g, [[-1.0, 1.5]])


# ----------------------------------------------------------------------------- GSPO clamp (verl)


def verl_gspo(c, low, high, clamp):
    """verl compute_policy_loss_gspo per token: (value, d/dlogp) of the clipped loss with the combined ratio."""
    val, grad = np.zeros((B, T)), np.zeros((B, T))
    for i in range(B):
        ts = [t for t in range(T) if c["mask"][i, t] > 0]
        if not ts:
            continue
        log_s = sum(c["logp"][i, t] - c["old"][i, t] for t in ts) / len(ts)
        for t in ts:
            x = log_s if clamp is None else min(log_s, clamp)
            s = np.exp(x)
            d_s = 0.0 if (clamp is not None and log_s > clamp) else s   # torch.clamp passes no gradient past c
            a = c["adv"][i, t]
            unclipped, clipped = -a * s, -a * min(max(s, 1.0 - low), 1.0 + high)
            val[i, t] = max(unclipped, clipped)
            grad[i, t] = -a * d_s if unclipped >= clipped else 0.0
    return val, grad


@pytest.mark.parametrize("seed", [0, 1])
def test_seq_log_ratio_clamp_is_verls_gspo_clamp(seed):
    c = case(seed, log_ratio_scale=0.3)
    c["old"][0] = c["logp"][0] - 12.0                        # log s = 12: clamped to 10 (ours: 12 by default)
    c["old"][1] = c["logp"][1] + 25.0                        # log s = -25: verl has no floor (ours: -20)
    c["adv"][0] = np.where(c["mask"][0] > 0, -1.0, np.nan)   # A < 0: the unclipped branch carries s
    for x in ("old", "adv"):
        c[x][c["mask"] == 0] = np.nan
    low, high = 0.2, 0.2
    cfg = PolicyLossConfig(ratio_level="sequence", seq_log_ratio_clamp=10.0)
    loss, met, grad = run(cfg, c)
    val, want_grad = verl_gspo(c, low, high, 10.0)
    close(loss, np.sum(c["w"] * np.nan_to_num(val)), tol=2e-5)
    close(grad, c["w"] * want_grad, tol=2e-5)
    # the default keeps the symmetric clamp at 20: row 0 now carries e^12, not e^10
    loss_default, _, _ = run(PolicyLossConfig(ratio_level="sequence"), c)
    val_default, _ = verl_gspo(c, low, high, None)
    close(loss_default, np.sum(c["w"] * np.nan_to_num(val_default)), tol=2e-5)
    assert loss_default - loss > 0.5 * np.sum(c["w"][0][c["mask"][0] > 0]) * (np.exp(12) - np.exp(10))


# ----------------------------------------------------------------------------- KL estimators


def test_abs_kl_estimate_and_gradient():
    c = case(3)
    m = c["mask"] > 0
    logp, ref = jnp.asarray(np.where(m, c["logp"], 0.0)), jnp.asarray(np.where(m, c["ref"], 0.0))
    close(kl_estimate(logp, ref, "abs"), np.abs(np.where(m, c["logp"] - c["ref"], 0.0)))
    g = jax.grad(lambda lp: jnp.sum(kl_estimate(lp, ref, "abs")))(logp)
    close(np.asarray(g)[m], np.sign(c["logp"] - c["ref"])[m])
    # through the loss: kl_coef * |logp - ref| per token, with A = 0 the only term
    c["adv"] = np.where(m, 0.0, np.nan)
    loss, met, grad = run(PolicyLossConfig(kl_coef=0.1, kl_estimator="abs"), c)
    close(loss, np.sum(c["w"][m] * 0.1 * np.abs(c["logp"] - c["ref"])[m]))
    close(grad[m], (c["w"] * 0.1 * np.sign(c["logp"] - c["ref"]))[m])


def test_k3_with_clamp_10_is_verls_low_var_kl():
    """verl low_var_kl: d = clamp(ref - logp, -20, 20); clamp(exp(d) - d - 1, -10, 10)."""
    d = np.array([-30.0, -20.5, -9.0, -2.0, -0.3, 0.0, 0.4, 1.5, 2.4, 3.0, 19.0, 20.5, 40.0])
    logp = -np.linspace(0.5, 3.0, d.size)
    ref = logp + d
    dc = np.clip(d, -20, 20)
    want = np.clip(np.exp(dc) - dc - 1.0, -10, 10)
    got = kl_estimate(jnp.asarray(logp[None]), jnp.asarray(ref[None]), "k3", clamp=10.0)[0]
    close(got, want, tol=1e-5)
    g = jax.grad(lambda lp: jnp.sum(kl_estimate(lp, jnp.asarray(ref), "k3", clamp=10.0)))(jnp.asarray(logp))
    close(g, np.where(np.abs(want) < 10, 1.0 - np.exp(dc), 0.0), tol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_kl_bias_correction_is_trls(seed, level):
    """TRL: per_token_kl = k3 * coef_1, coef_1 = exp(log ratio) (token) or exp(masked mean log ratio)
    (sequence), not detached; A = 0 leaves the KL term alone."""
    c = case(seed, log_ratio_scale=0.4)
    m = c["mask"] > 0
    c["adv"] = np.where(m, 0.0, np.nan)
    beta = 0.05
    loss, met, grad = run(PolicyLossConfig(kl_coef=beta, kl_bias_correction=True, ratio_level=level), c)
    want_loss, want_grad = 0.0, np.zeros((B, T))
    for i in range(B):
        ts = [t for t in range(T) if m[i, t]]
        if not ts:
            continue
        k3 = {t: np.exp(c["ref"][i, t] - c["logp"][i, t]) - (c["ref"][i, t] - c["logp"][i, t]) - 1 for t in ts}
        dk3 = {t: 1.0 - np.exp(c["ref"][i, t] - c["logp"][i, t]) for t in ts}
        if level == "token":
            for t in ts:
                r = np.exp(c["logp"][i, t] - c["old"][i, t])
                want_loss += c["w"][i, t] * beta * k3[t] * r
                want_grad[i, t] = c["w"][i, t] * beta * (dk3[t] * r + k3[t] * r)
        else:
            s = np.exp(sum(c["logp"][i, t] - c["old"][i, t] for t in ts) / len(ts))
            row_kl = sum(c["w"][i, t] * beta * k3[t] for t in ts)
            want_loss += row_kl * s
            for t in ts:
                want_grad[i, t] = c["w"][i, t] * beta * dk3[t] * s + row_kl * s / len(ts)
    close(loss, want_loss)
    close(grad, want_grad)
    close(met["kl_loss"], want_loss)
    # without the correction the KL term is beta * k3 (TRL's default)
    loss_plain, _, _ = run(PolicyLossConfig(kl_coef=beta, ratio_level=level), c)
    close(loss_plain, sum(c["w"][i, t] * beta * (np.exp(c["ref"][i, t] - c["logp"][i, t])
                                                 - (c["ref"][i, t] - c["logp"][i, t]) - 1) for i, t in tokens(c)))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("kw, match", [
    (dict(loss_fn="ppo"), r"PolicyLossConfig\.loss_fn"),
    (dict(loss_fn="sapo", sapo_tau_neg=0.0), r"PolicyLossConfig\.sapo_tau_neg=0\.0: must be > 0"),
    (dict(clip_eps_low=1.0), r"PolicyLossConfig\.clip_eps_low=1\.0: must be in \[0, 1\)"),
    (dict(loss_fn="cispo", clip_eps_low=-0.1), r"PolicyLossConfig\.clip_eps_low=-0\.1: must be >= 0"),
    (dict(ratio_level="sequence", seq_log_ratio_clamp=0.0), r"PolicyLossConfig\.seq_log_ratio_clamp=0\.0"),
    (dict(kl_estimator="abs2"), r"PolicyLossConfig\.kl_estimator"),
])
def test_bad_values_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**kw)


@pytest.mark.parametrize("kw, key", [
    (dict(loss_fn="sapo", clip_eps_high=0.28), "clip_eps_high=0.28 is not read by loss_fn='sapo'"),
    (dict(loss_fn="sapo", clip_eps_low=0.1), "clip_eps_low=0.1 is not read by loss_fn='sapo'"),
    (dict(loss_fn="cispo", dual_clip=3.0), "dual_clip=3.0 is not read by loss_fn='cispo'"),
    (dict(loss_fn="sapo", dual_clip=3.0), "dual_clip=3.0 is not read by loss_fn='sapo'"),
    (dict(sapo_tau_pos=2.0), "sapo_tau_pos=2.0 is not read by loss_fn='clip'"),
    (dict(loss_fn="cispo", sapo_tau_neg=2.0), "sapo_tau_neg=2.0 is not read by loss_fn='cispo'"),
    (dict(seq_log_ratio_clamp=10.0), "seq_log_ratio_clamp=10.0 is not read by ratio_level='token'"),
    (dict(kl_bias_correction=True), "kl_bias_correction=True is not read with kl_coef=0.0"),
])
def test_unread_keys_are_refused(kw, key):
    with pytest.raises(ConfigError, match="^config.rl.algo.loss." + key.replace("(", r"\(")) as e:
        check_loss(PolicyLossConfig(**kw), "config.rl.algo.loss")
    assert "\n" not in str(e.value)


def test_read_keys_pass():
    for kw in (dict(loss_fn="cispo", clip_eps_low=10.0, clip_eps_high=0.28),
               dict(loss_fn="sapo", sapo_tau_pos=1.5, sapo_tau_neg=2.0),
               dict(ratio_level="sequence", seq_log_ratio_clamp=10.0),
               dict(kl_coef=0.01, kl_estimator="abs", kl_bias_correction=True)):
        check_loss(PolicyLossConfig(**kw), "config.rl.algo.loss")


def test_named_variants_and_stage():
    assert grpo.VARIANTS["cispo"] is grpo.cispo and grpo.VARIANTS["sapo"] is grpo.sapo
    cis, sap = grpo.cispo().loss, grpo.sapo().loss
    assert (cis.loss_fn, cis.clip_eps_low, cis.clip_eps_high, cis.loss_agg, cis.kl_coef) == (
        "cispo", 1.0, 0.2, "token-mean", 0.0)
    assert (sap.loss_fn, sap.sapo_tau_pos, sap.sapo_tau_neg, sap.loss_agg, sap.kl_coef) == (
        "sapo", 1.0, 1.05, "seq-mean-token-mean", 0.0)
    for name in ("cispo", "sapo"):
        s = grpo_stage(name)
        assert s.variant == name and s.algo.loss.loss_fn == name
        check_loss(PolicyLossConfig(**s.algo.loss.to_dict()), "config.rl.algo.loss")
