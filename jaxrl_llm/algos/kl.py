"""KL to a reference policy: per-token estimators, the KL-in-reward shaping, and the KL controller.

Two places a KL to the reference enters RL post-training:

* in the **reward** (PPO for LMs, REINFORCE++): every completion token gets
  `-kl_coef * kl_t`, and the scalar score is added on the last real token
  (`kl_penalty_rewards`); `kl_coef` may follow a controller
  (`kl_coef_update`);
* in the **loss** (GRPO): `beta * kl_t` is added to each token's loss
  (`policy_loss.PolicyLossConfig.kl_coef`).

Both use `kl_estimate`, Schulman's single-sample estimators of KL(pi || ref)
from tokens sampled from pi (http://joschu.net/blog/kl-approx.html).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")

# exp(80) ~ 5.5e34 is finite in float32; exp(89) is not. Past this the k3
# estimate is meaningless anyway, and capping keeps values and gradients finite.
_K3_MAX_LOG_RATIO = 80.0


def check_kl_estimator(kind: str) -> str:
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"KL estimator {kind!r} is not known; choose one of {KL_ESTIMATORS} "
                         "(k1 = logp - ref, k2 = 0.5 (ref - logp)^2, k3 = exp(ref - logp) - (ref - logp) - 1, "
                         "abs = |logp - ref|)")
    return kind


def kl_estimate(logp_bt: jax.Array, ref_logp_bt: jax.Array, kind: str = "k3",
                clamp: float | None = None) -> jax.Array:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi; float32, same shape as the inputs.

    With d = ref_logp - logp (Schulman, "Approximating KL divergence", 2020):

    * k1 = -d = logp - ref_logp: unbiased, high variance, can be negative;
    * k2 = d^2 / 2: biased, low variance, >= 0;
    * k3 = exp(d) - d - 1: unbiased, low variance, >= 0 (GRPO's estimator,
      verl's "low_var_kl");
    * abs = |d| = |logp - ref_logp|: verl's "abs", >= 0, not an unbiased KL
      estimate (its gradient is sign(logp - ref_logp) grad logp).

    `clamp` clips the estimate to [-clamp, clamp]. verl's "low_var_kl" is k3
    with clamp=10: verl also clamps d to [-20, 20] before exp, which changes
    nothing once the estimate is clamped at 10 (|d| > 20 gives k3 > 19).
    Departure: for k3, d is capped at 80 before `exp` so that float32 never
    overflows (the value and gradient stay finite; the estimate there is
    ~5e34 either way). Masking is the caller's business: masked positions
    should carry equal log-probs (both 0), which give 0 for every kind.
    """
    check_kl_estimator(kind)
    logp = jnp.asarray(logp_bt, jnp.float32)
    ref = jnp.asarray(ref_logp_bt, jnp.float32)
    d = ref - logp
    if kind == "k1":
        kl = -d
    elif kind == "k2":
        kl = 0.5 * jnp.square(d)
    elif kind == "abs":
        kl = jnp.abs(d)
    else:
        d = jnp.minimum(d, _K3_MAX_LOG_RATIO)
        kl = jnp.expm1(d) - d  # expm1: exact near d = 0, where exp(d) - 1 - d cancels
    if clamp is not None:
        if clamp <= 0:
            raise ValueError(f"KL clamp={clamp}: must be > 0 or None")
        kl = jnp.clip(kl, -clamp, clamp)
    return kl


@dataclasses.dataclass(frozen=True)
class KLControllerConfig:
    """KL coefficient for the KL-in-reward penalty (Ziegler et al. 2019, arXiv 1909.08593, section 2.2).

    kind "fixed": the coefficient stays `init_coef`. kind "adaptive": it is
    steered so the observed KL follows `target` with time scale `horizon`
    (samples).
    """

    kind: str = "fixed"
    init_coef: float = 0.05
    target: float = 6.0
    horizon: int = 10000

    def __post_init__(self):
        if self.kind not in ("fixed", "adaptive"):
            import difflib
            near = difflib.get_close_matches(str(self.kind), ("fixed", "adaptive"), n=1)
            raise ValueError(f"KLControllerConfig.kind={self.kind!r}{f' (did you mean {near[0]!r}?)' if near else ''}"
                             "; expected 'fixed' or 'adaptive'")
        if not self.init_coef >= 0:
            raise ValueError(f"KLControllerConfig.init_coef={self.init_coef}: must be >= 0")
        if self.kind == "adaptive":
            if not self.target > 0:
                raise ValueError(f"KLControllerConfig.target={self.target}: the adaptive controller needs a "
                                 "target KL > 0")
            if not self.horizon > 0:
                raise ValueError(f"KLControllerConfig.horizon={self.horizon}: must be > 0")


def kl_coef_update(coef: jax.Array, observed_kl: jax.Array, n_steps: jax.Array | int,
                   cfg: KLControllerConfig) -> jax.Array:
    """New KL coefficient after observing `observed_kl` over `n_steps` samples (jittable).

    Ziegler et al. 2019 (eq. in section 2.2; TRL's `AdaptiveKLController`):
    e = clip(KL / target - 1, -0.2, 0.2); coef <- coef * (1 + e * n_steps / horizon).
    "fixed" returns `coef` unchanged. `observed_kl` should be the mean per
    sequence (summed over tokens) KL, as in the paper.
    """
    coef = jnp.asarray(coef, jnp.float32)
    if cfg.kind == "fixed":
        return coef
    err = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / cfg.target - 1.0, -0.2, 0.2)
    return coef * (1.0 + err * jnp.asarray(n_steps, jnp.float32) / cfg.horizon)


def last_token_onehot(mask_bt: jax.Array) -> jax.Array:
    """float32 [B, T]: 1 at the last position where the mask is set, all 0 for an all-masked row.

    Works for left- and right-aligned masks (and masks with gaps).
    """
    m = jnp.asarray(mask_bt).astype(bool)
    t = m.shape[-1]
    last = t - 1 - jnp.argmax(m[:, ::-1], axis=-1)
    onehot = jnp.arange(t)[None, :] == last[:, None]
    return (onehot & jnp.any(m, axis=-1, keepdims=True)).astype(jnp.float32)


def kl_penalty_rewards(scores_b: jax.Array, logp_bt: jax.Array, ref_logp_bt: jax.Array, mask_bt: jax.Array,
                       kl_coef: jax.Array | float, kind: str = "k1", clamp: float | None = None) -> jax.Array:
    """Token rewards [B, T] = -kl_coef * kl_t on every real token, plus the score on the last real token.

    The "KL in the reward" of PPO for LMs (Ziegler et al. 2019; Ouyang et
    al. 2022, eq. 2) and REINFORCE++ (arXiv 2501.03262, eq. for r(s_t, a_t)).
    The default estimator is k1 = logp - ref_logp, as in those papers.
    Masked positions get 0; an all-masked row gets no score.
    """
    m = jnp.asarray(mask_bt).astype(bool)
    logp = jnp.where(m, logp_bt, 0.0)
    ref = jnp.where(m, ref_logp_bt, 0.0)
    kl = kl_estimate(logp, ref, kind, clamp)
    rewards = -jnp.asarray(kl_coef, jnp.float32) * jnp.where(m, kl, 0.0)
    return rewards + jnp.asarray(scores_b, jnp.float32)[:, None] * last_token_onehot(m)
