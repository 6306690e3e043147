"""Policy-gradient losses (PPO's clip, CISPO, SAPO; for PPO / GRPO / DAPO / GSPO / Dr. GRPO) and the value loss.

Both return `(loss, metrics)` in the form `train_state.accumulate` expects:
`loss = sum(weights_bt * per_token_loss)` with weights from
`aggregation.token_weights` computed on the whole minibatch, and metrics as
sums weighted by `metric_weights_bt` (`aggregation.token_mean_weights` of
the whole minibatch), so that summing over micro-batches gives batch means.
Names ending in `_max` are maxima.

Inputs at masked positions are replaced by 0 before any arithmetic, so
garbage or padding there never turns into inf * 0 = NaN, in the value or
in the gradient.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrl_llm.algos.aggregation import check_exclude_empty_rows, check_loss_agg, token_weights
from jaxrl_llm.algos.kl import KL_ESTIMATORS, kl_estimate
from jaxrl_llm.algos.preference import check_choice

RATIO_LEVELS = ("token", "sequence")
LOSS_FNS = ("clip", "cispo", "sapo")

# Log importance ratios are clamped here before exp (verl does the same, at 20
# for token ratios): the ratio stays finite in float32 and such tokens are
# clipped anyway.
_MAX_LOG_RATIO = 20.0

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """Hyper-parameters of `policy_loss`; see docs/algorithms.md for the peers' defaults.

    loss_fn: the per-token policy-gradient term: "clip" (PPO's clipped
        surrogate), "cispo" (MiniMax-M1's clipped, stop-gradient IS weight
        times log-prob, arXiv 2506.13585) or "sapo" (a sigmoid gate of the
        ratio instead of the clip, arXiv 2511.20347); see `policy_loss`.
    clip_eps_low / clip_eps_high: rho is clipped to [1 - low, 1 + high];
        high > low is DAPO's clip-higher (0.2 / 0.28). GSPO uses ~3e-4 / 4e-4.
        "clip" and "cispo" read them; with "cispo", low >= 1 means no lower
        bound (CISPO's paper and TRL have none; verl's example sets 10).
    dual_clip: c > 1 caps the loss of a token with A < 0 at c * |A|
        (Ye et al. 2020, "Mastering complex control in MOBA games", eq. 5); "clip" only.
    sapo_tau_pos / sapo_tau_neg: SAPO's gate temperatures for tokens with
        A > 0 / A <= 0 (1.0 / 1.05 in the paper, verl and TRL); "sapo" only.
    ratio_level: "token" (PPO/GRPO) or "sequence" (GSPO-token, arXiv 2507.18071).
    seq_log_ratio_clamp: None clamps every log ratio to [-20, 20] before exp;
        c > 0 (ratio_level "sequence" only) instead clamps the GSPO log
        ratio from above at c and nothing else, as verl's GSPO (c = 10).
    loss_agg / norm_length / exclude_empty_rows: the aggregation the
        caller's weights are built with (`cfg.token_weights(mask)` of the
        whole minibatch; see `aggregation`).
    entropy_coef: the loss gets `- entropy_coef * entropy_t` (needs `entropy_bt`).
    kl_coef, kl_estimator, kl_clamp: the loss gets `kl_coef * kl_estimate(logp,
        ref_logp, kl_estimator, kl_clamp)` (GRPO's beta; needs `ref_logp_bt`).
    kl_bias_correction: that KL term is multiplied by the importance ratio
        (with its gradient), as TRL's `use_bias_correction_kl` (DeepSeek-V3.2,
        arXiv 2512.02556): the token ratio, or with ratio_level "sequence"
        the sequence ratio exp(masked mean log ratio).
    tis_cap: truncated importance sampling for the sampler/trainer mismatch:
        the policy-gradient term of each token is multiplied by
        stop_grad(min(exp(old_logp - sampler_logp), tis_cap)) (needs `sampler_logp_bt`).
    """

    loss_fn: str = "clip"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip: float | None = None
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    ratio_level: str = "token"
    seq_log_ratio_clamp: float | None = None
    loss_agg: str = "seq-mean-token-mean"
    norm_length: float | None = None
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_clamp: float | None = None
    kl_bias_correction: bool = False
    tis_cap: float | None = None
    exclude_empty_rows: bool = False

    def __post_init__(self):
        def bad(field: str, why: str):
            raise ValueError(f"PolicyLossConfig.{field}={getattr(self, field)!r}: {why}")

        check_choice("PolicyLossConfig.loss_fn", self.loss_fn, LOSS_FNS)
        if self.loss_fn == "cispo":
            if not self.clip_eps_low >= 0.0:
                bad("clip_eps_low", "must be >= 0 (the IS weight is clipped below at 1 - clip_eps_low; >= 1: "
                    "no lower bound)")
        elif not 0.0 <= self.clip_eps_low < 1.0:
            bad("clip_eps_low", "must be in [0, 1) (the ratio is clipped below at 1 - clip_eps_low)")
        if not self.clip_eps_high >= 0.0:
            bad("clip_eps_high", "must be >= 0")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            bad("dual_clip", "must be None (off) or a constant c > 1 (3.0 is usual)")
        for tau in ("sapo_tau_pos", "sapo_tau_neg"):
            if not getattr(self, tau) > 0:
                bad(tau, "must be > 0 (SAPO's gate temperature; the paper uses 1.0 / 1.05 for A > 0 / A <= 0)")
        check_choice("PolicyLossConfig.ratio_level", self.ratio_level, RATIO_LEVELS)
        if self.seq_log_ratio_clamp is not None and not self.seq_log_ratio_clamp > 0:
            bad("seq_log_ratio_clamp", "must be None (clamp to [-20, 20]) or > 0 (verl's GSPO uses 10.0)")
        check_loss_agg(self.loss_agg)
        if self.norm_length is not None and not self.norm_length > 0:
            bad("norm_length", "must be None (the padded length) or > 0")
        check_exclude_empty_rows(self.exclude_empty_rows, "PolicyLossConfig")
        if not self.entropy_coef >= 0.0:
            bad("entropy_coef", "must be >= 0 (the loss subtracts entropy_coef * entropy)")
        if not self.kl_coef >= 0.0:
            bad("kl_coef", "must be >= 0")
        check_choice("PolicyLossConfig.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if self.kl_clamp is not None and not self.kl_clamp > 0:
            bad("kl_clamp", "must be None or > 0")
        if self.tis_cap is not None and not self.tis_cap > 0:
            bad("tis_cap", "must be None (off) or > 0 (verl uses 2.0)")

    def token_weights(self, mask_bt: jax.Array) -> jax.Array:
        """float32 [B, T] loss weights of this config's aggregation; call it on the whole minibatch."""
        return token_weights(mask_bt, self.loss_agg, self.norm_length, self.exclude_empty_rows)


def _check_shapes(who: str, **arrays: jax.Array | None) -> None:
    shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items() if v is not None}
    if len(set(shapes.values())) > 1 or any(len(s) != 2 for s in shapes.values()):
        raise ValueError(f"{who}: every array must have the same [B, T] shape; got {shapes}")


def _zero_masked(m_bt: jax.Array, x_bt: jax.Array | None) -> jax.Array | None:
    return None if x_bt is None else jnp.where(m_bt, jnp.asarray(x_bt, jnp.float32), 0.0)


def policy_loss(cfg: PolicyLossConfig, logp_bt: jax.Array, old_logp_bt: jax.Array, adv_bt: jax.Array,
                weights_bt: jax.Array, metric_weights_bt: jax.Array, *, ref_logp_bt: jax.Array | None = None,
                entropy_bt: jax.Array | None = None, sampler_logp_bt: jax.Array | None = None,
                mask_bt: jax.Array) -> tuple[jax.Array, Metrics]:
    """Policy-gradient term (+ KL to the reference, - entropy bonus), aggregated by `weights_bt`.

    Per token, with rho = exp(logp - old_logp), by `cfg.loss_fn`:

    * "clip" (PPO, Schulman et al. 2017, eq. 7, as a loss):
      pg = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A); with dual
      clip, for A < 0: pg = min(pg, -c A);
    * "cispo" (MiniMax-M1, arXiv 2506.13585, without the paper's
      optional token mask, as verl and TRL): pg = -sg(clip(rho, 1 - eps_low, 1 + eps_high)) A logp;
      its gradient is -w A grad logp for every token, none is dropped;
    * "sapo" (arXiv 2511.20347, as verl and TRL): pg = -(4 / tau)
      sigmoid(tau (rho - 1)) A, tau = tau_pos if A > 0 else tau_neg; its
      gradient is -A rho 4 s (1 - s) grad logp with s = sigmoid(tau (rho - 1)):
      the clip's hard 0/1 becomes a gate that is 1 at rho = 1 and decays smoothly.

    GRPO adds beta * k3 KL to the reference per token (arXiv 2402.03300, eq. 3).

    ratio_level="sequence" is GSPO-token (arXiv 2507.18071, eq. 13-14, the
    form verl ships): log s_i = masked mean_t (logp - old_logp), and every
    token uses log rho_t = sg(log s_i) + logp_t - sg(logp_t): its value is
    s_i, its gradient s_i * grad logp_t. With loss_agg
    "seq-mean-token-mean" this is exactly GSPO's objective; other modes
    re-weight its tokens.

    Departures: log ratios are clamped to [-20, 20] before exp (as verl's
    token-level losses; `seq_log_ratio_clamp` gives verl's GSPO clamp);
    TIS multiplies only the policy-gradient term (as verl), not the KL or
    entropy terms.

    Metrics (sums weighted by `metric_weights_bt`): pg_loss, kl_loss
    (kl_coef * estimator, the term as added; with kl_coef > 0), kl_ref (k3
    to the reference, when given), entropy (when given), entropy_loss
    (-entropy_coef * entropy), clipfrac_low / clipfrac_high (tokens the
    clip or gate acts on, below / above: "clip": A < 0 and rho < 1 - eps_low
    / A > 0 and rho > 1 + eps_high, whose gradient is zeroed; "cispo": rho
    < 1 - eps_low / rho > 1 + eps_high, any A, whose IS weight is clipped;
    "sapo": rho < 1 / rho > 1 with gate 4 s (1 - s) < 1/2, whose gradient
    is more than halved), sapo_gate_mean (the mean gate, 1 on-policy; with
    "sapo"), dual_clipfrac (the dual clip is active; 0 unless "clip"),
    ratio_mean, ratio_max, approx_kl (k3 estimate of
    KL(old || new), i.e. rho - 1 - log rho), mismatch_kl / mismatch_abs
    (k3 KL(sampler || old) and |old_logp - sampler_logp|, when sampler
    log-probs are given), tis_weight_mean (with tis_cap).
    """
    if cfg.kl_coef > 0 and ref_logp_bt is None:
        raise ValueError(f"policy_loss: kl_coef={cfg.kl_coef} > 0 needs ref_logp_bt (reference log-probs); "
                         "pass them or set kl_coef=0")
    if cfg.entropy_coef > 0 and entropy_bt is None:
        raise ValueError(f"policy_loss: entropy_coef={cfg.entropy_coef} > 0 needs entropy_bt; "
                         "compute log-probs with with_entropy=True or set entropy_coef=0")
    if cfg.tis_cap is not None and sampler_logp_bt is None:
        raise ValueError(f"policy_loss: tis_cap={cfg.tis_cap} needs sampler_logp_bt (the sampler's log-probs)")

    _check_shapes("policy_loss", logp_bt=logp_bt, old_logp_bt=old_logp_bt, adv_bt=adv_bt, weights_bt=weights_bt,
                  metric_weights_bt=metric_weights_bt, ref_logp_bt=ref_logp_bt, entropy_bt=entropy_bt,
                  sampler_logp_bt=sampler_logp_bt, mask_bt=mask_bt)
    m = jnp.asarray(mask_bt).astype(bool)
    mf = m.astype(jnp.float32)
    logp, old, adv = (_zero_masked(m, x) for x in (logp_bt, old_logp_bt, adv_bt))
    ref, ent, samp = (_zero_masked(m, x) for x in (ref_logp_bt, entropy_bt, sampler_logp_bt))
    w = jnp.asarray(weights_bt, jnp.float32)
    mw = jnp.asarray(metric_weights_bt, jnp.float32)
    old = jax.lax.stop_gradient(old)

    token_log_ratio = jnp.clip(logp - old, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    seq_clamp = cfg.seq_log_ratio_clamp if cfg.ratio_level == "sequence" else None
    if cfg.ratio_level == "sequence":
        # with seq_log_ratio_clamp (verl's GSPO): raw token log ratios, log s_it <= c and no other clamp
        per_token = token_log_ratio if seq_clamp is None else logp - old
        seq_log_ratio = jnp.sum(per_token * mf, axis=-1) / jnp.maximum(jnp.sum(mf, axis=-1), 1.0)
        log_ratio = jax.lax.stop_gradient(seq_log_ratio)[:, None] + logp - jax.lax.stop_gradient(logp)
        if seq_clamp is None:
            log_ratio = jnp.clip(log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
            seq_log_ratio = jnp.clip(seq_log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        else:
            log_ratio = jnp.minimum(log_ratio, seq_clamp)
            seq_log_ratio = jnp.minimum(seq_log_ratio, seq_clamp)
        log_ratio = jnp.where(m, log_ratio, 0.0)
    else:
        log_ratio = token_log_ratio
    rho = jnp.exp(log_ratio)
    rho_sg = jax.lax.stop_gradient(rho)

    lo, hi = 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high
    dual_active = jnp.zeros_like(m)
    metrics: Metrics = {}
    if cfg.loss_fn == "clip":
        pg_unclipped = -adv * rho
        pg_clipped = -adv * jnp.clip(rho, lo, hi)
        pg = jnp.maximum(pg_unclipped, pg_clipped)
        if cfg.dual_clip is not None:
            cap = -adv * cfg.dual_clip
            dual_active = m & (adv < 0) & (pg > cap)
            pg = jnp.where(adv < 0, jnp.minimum(pg, cap), pg)
        # tokens whose gradient the clip zeroes
        clipped_low, clipped_high = m & (adv < 0) & (rho_sg < lo), m & (adv > 0) & (rho_sg > hi)
    elif cfg.loss_fn == "cispo":
        # lo <= 0 (clip_eps_low >= 1) never binds: rho > 0
        pg = -adv * jax.lax.stop_gradient(jnp.clip(rho, lo, hi)) * logp
        # tokens whose IS weight is clipped, whatever the sign of A (their gradient is scaled, not zeroed)
        clipped_low, clipped_high = m & (rho_sg < lo), m & (rho_sg > hi)
    else:  # sapo
        tau = jnp.where(adv > 0, cfg.sapo_tau_pos, cfg.sapo_tau_neg)
        sig = jax.nn.sigmoid(tau * (rho - 1.0))
        pg = -adv * sig * (4.0 / tau)
        # d pg / d logp = -A rho * gate: the gate (1 at rho = 1) replaces the clip's 0/1
        sig_sg = jax.lax.stop_gradient(sig)
        gate = 4.0 * sig_sg * (1.0 - sig_sg)
        metrics["sapo_gate_mean"] = jnp.sum(mw * gate)
        # tokens whose gradient the gate more than halves, below / above rho = 1
        clipped_low, clipped_high = m & (rho_sg < 1.0) & (gate < 0.5), m & (rho_sg > 1.0) & (gate < 0.5)

    if cfg.tis_cap is not None:
        # min(exp(x), cap) == exp(min(x, log cap)): no overflow for any x
        tis_w = jax.lax.stop_gradient(jnp.exp(jnp.minimum(old - samp, jnp.log(cfg.tis_cap))))
        pg = pg * tis_w
        metrics["tis_weight_mean"] = jnp.sum(mw * tis_w)

    total = pg
    metrics["pg_loss"] = jnp.sum(mw * pg)
    if cfg.kl_coef > 0:
        kl_term = cfg.kl_coef * kl_estimate(logp, ref, cfg.kl_estimator, cfg.kl_clamp)
        if cfg.kl_bias_correction:  # TRL's use_bias_correction_kl: times the ratio, not detached
            kl_term = kl_term * (rho if cfg.ratio_level == "token" else jnp.exp(seq_log_ratio)[:, None])
        total = total + kl_term
        metrics["kl_loss"] = jnp.sum(mw * kl_term)
    if ref is not None:
        metrics["kl_ref"] = jnp.sum(mw * jax.lax.stop_gradient(kl_estimate(logp, ref, "k3")))
    ent_term = jnp.zeros_like(pg)
    if ent is not None:
        metrics["entropy"] = jnp.sum(mw * ent)
        if cfg.entropy_coef > 0:
            ent_term = -cfg.entropy_coef * ent
            total = total + ent_term
    metrics["entropy_loss"] = jnp.sum(mw * ent_term)

    loss = jnp.sum(w * total)

    token_log_ratio_sg = jax.lax.stop_gradient(token_log_ratio)
    metrics["clipfrac_low"] = jnp.sum(mw * clipped_low)
    metrics["clipfrac_high"] = jnp.sum(mw * clipped_high)
    metrics["dual_clipfrac"] = jnp.sum(mw * dual_active)
    metrics["ratio_mean"] = jnp.sum(mw * rho_sg)
    metrics["ratio_max"] = jnp.max(jnp.where(m, rho_sg, 0.0))  # rho > 0, so 0 is a safe floor
    # k3 with d = log rho: an estimate of KL(old || new) from the old policy's samples
    metrics["approx_kl"] = jnp.sum(mw * kl_estimate(jnp.zeros_like(token_log_ratio_sg), token_log_ratio_sg, "k3"))
    if samp is not None:
        metrics["mismatch_kl"] = jnp.sum(mw * kl_estimate(samp, old, "k3"))
        metrics["mismatch_abs"] = jnp.sum(mw * jnp.abs(old - samp))
    return loss, metrics


def value_loss(values_bt: jax.Array, old_values_bt: jax.Array, returns_bt: jax.Array, weights_bt: jax.Array,
               metric_weights_bt: jax.Array, clip_range: float | None = 0.2) -> tuple[jax.Array, Metrics]:
    """Clipped value loss: 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), weighted.

    The value clipping of OpenAI baselines' PPO2 (Huang et al., "The 37
    implementation details of PPO", detail 9) as used for LMs by TRL and
    verl. `clip_range=None` gives the plain 0.5 (V - R)^2. Real tokens are
    those with nonzero weight in `weights_bt` or `metric_weights_bt` (there
    is no mask argument); inputs elsewhere are zeroed first. Metrics:
    vf_loss, vf_clipfrac (the clipped branch is strictly larger), value_mean.
    """
    if clip_range is not None and not clip_range > 0:
        raise ValueError(f"value_loss: clip_range={clip_range}: must be None (off) or > 0")
    _check_shapes("value_loss", values_bt=values_bt, old_values_bt=old_values_bt, returns_bt=returns_bt,
                  weights_bt=weights_bt, metric_weights_bt=metric_weights_bt)
    w = jnp.asarray(weights_bt, jnp.float32)
    mw = jnp.asarray(metric_weights_bt, jnp.float32)
    m = (w != 0) | (mw != 0)
    v, old, ret = (_zero_masked(m, x) for x in (values_bt, old_values_bt, returns_bt))
    old = jax.lax.stop_gradient(old)
    ret = jax.lax.stop_gradient(ret)
    loss_unclipped = jnp.square(v - ret)
    if clip_range is None:
        per_token = 0.5 * loss_unclipped
        clipfrac = jnp.zeros((), jnp.float32)
    else:
        v_clipped = old + jnp.clip(v - old, -clip_range, clip_range)
        loss_clipped = jnp.square(v_clipped - ret)
        per_token = 0.5 * jnp.maximum(loss_unclipped, loss_clipped)
        clipfrac = jnp.sum(mw * (loss_clipped > loss_unclipped))
    metrics = {"vf_loss": jnp.sum(mw * per_token), "vf_clipfrac": clipfrac,
               "value_mean": jnp.sum(mw * jax.lax.stop_gradient(v))}
    return jnp.sum(w * per_token), metrics
