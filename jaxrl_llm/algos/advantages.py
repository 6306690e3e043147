"""Advantage estimators: GAE (PPO), group baselines (GRPO, Dr. GRPO, RLOO) and REINFORCE++.

All are pure functions over float32 arrays and masks, jittable, and never
produce NaN for all-masked rows or groups of identical rewards.

Group layout (the sampler's): with G samples per prompt, prompt i owns rows
i*G .. i*G + G - 1 of the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

STD_OVER = ("group", "batch")


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def gae(rewards_bt: jax.Array, values_bt: jax.Array, mask_bt: jax.Array, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv 1506.02438, eq. 16) as a reverse scan.

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  returns R_t = A_t + V_t.
    The value after the last real token is 0 (a finished completion is a
    terminal state). Masked positions are skipped, not treated as steps:
    the next real token's value and advantage pass through them unchanged
    (verl's handling), so right-padded, left-padded and gapped masks all
    work. Rewards and values at masked positions are ignored; both outputs
    are 0 there. Returns float32 (advantages_bt, returns_bt).
    """
    m = jnp.asarray(mask_bt).astype(bool)
    r = jnp.where(m, _f32(rewards_bt), 0.0)
    v = jnp.where(m, _f32(values_bt), 0.0)

    def step(carry, xs):
        next_v, next_adv = carry
        r_t, v_t, m_t = xs
        delta = r_t + gamma * next_v - v_t
        adv = delta + gamma * lam * next_adv
        adv = jnp.where(m_t, adv, 0.0)
        carry = (jnp.where(m_t, v_t, next_v), jnp.where(m_t, adv, next_adv))
        return carry, adv

    b = r.shape[0]
    init = (jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.float32))
    _, adv_tb = jax.lax.scan(step, init, (r.T, v.T, m.T), reverse=True)
    adv = adv_tb.T
    return adv, jnp.where(m, adv + v, 0.0)


def masked_mean_var(x_bt: jax.Array, mask_bt: jax.Array, ddof: int = 1) -> tuple[jax.Array, jax.Array]:
    """Mean and variance over the real tokens of the whole batch (safe for an empty mask: 0, 0)."""
    m = jnp.asarray(mask_bt).astype(jnp.float32)
    x = jnp.where(m > 0, _f32(x_bt), 0.0)
    n = jnp.sum(m)
    mean = jnp.sum(x) / jnp.maximum(n, 1.0)
    var = jnp.sum(m * jnp.square(x - mean)) / jnp.maximum(n - ddof, 1.0)
    return mean, var


def whiten(x_bt: jax.Array, mask_bt: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over the real tokens of the whole batch; 0 where masked.

    Matches TRL's and verl's `masked_whiten`: the variance is the unbiased
    one (Bessel's correction, n / (n - 1)), eps is added to the variance,
    and `shift_mean=False` adds the mean back (scale only). A single real
    token divides by max(n - 1, 1) instead of raising as TRL does.
    """
    m = jnp.asarray(mask_bt).astype(bool)
    x = _f32(x_bt)
    mean, var = masked_mean_var(x, m, ddof=1)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(m, out, 0.0)


def _check_groups(rewards_b: jax.Array, group_size: int, min_size: int, who: str) -> None:
    if not isinstance(group_size, int) or group_size < min_size:
        raise ValueError(f"{who}: group_size={group_size!r} must be an int >= {min_size}")
    b = rewards_b.shape[0]
    if rewards_b.ndim != 1 or b % group_size:
        raise ValueError(f"{who}: rewards of shape {rewards_b.shape} do not split into groups of {group_size} "
                         "(expected [B] with B a multiple of group_size; prompt i owns rows i*G .. i*G+G-1)")


def _zero_constant_groups(r_gk: jax.Array, adv_gk: jax.Array) -> jax.Array:
    """adv_gk with every group whose rewards are all equal (max == min) set to exactly 0.

    In float32 the mean of G equal rewards can be rounding steps away
    from them (G = 3, r = 0.1), and so can the leave-one-out baseline; the
    tiny centred value divided by a tiny std (+ eps) is then far from 0
    (about -7e-3 for that example with eps = 1e-6). Such a group carries
    no signal, so its advantage is exactly 0 whatever the rounding. Only a
    select: every other group keeps its value bit for bit.
    """
    constant = jnp.max(r_gk, axis=-1, keepdims=True) == jnp.min(r_gk, axis=-1, keepdims=True)
    return jnp.where(constant, 0.0, adv_gk)


def group_advantages(rewards_b: jax.Array, group_size: int, scale_by_std: bool = True, std_over: str = "group",
                     eps: float = 1e-6, std_ddof: int = 1) -> jax.Array:
    """Group-relative advantages [B]: (r_i - mean_group) / (std + eps).

    GRPO (DeepSeekMath, arXiv 2402.03300, section 4.1.2, outcome
    supervision). `scale_by_std=False` gives Dr. GRPO (arXiv 2503.20783):
    r_i - mean_group. `std_over="batch"` keeps the group mean but divides by
    the std of all B rewards (TRL's `scale_rewards="batch"`, the "LitePPO"
    recipe). `std_ddof=1` is the unbiased std (torch.std, which TRL and verl
    both use); `std_ddof=0` the population std. eps is added to the std
    (TRL 1e-4, verl 1e-6). A group of identical rewards gets advantage
    exactly 0 (`_zero_constant_groups`). group_size must be >= 2: with G = 1
    the group mean is the reward itself and every advantage would silently
    be 0.
    """
    r = _f32(rewards_b)
    _check_groups(r, group_size, 2, "group_advantages")
    if std_over not in STD_OVER:
        raise ValueError(f"group_advantages: std_over={std_over!r}; expected one of {STD_OVER}")
    if std_ddof not in (0, 1):
        raise ValueError(f"group_advantages: std_ddof={std_ddof!r}; expected 0 (population) or 1 (unbiased)")
    r_gk = r.reshape(-1, group_size)
    centred = r_gk - jnp.mean(r_gk, axis=-1, keepdims=True)
    if not scale_by_std:
        return _zero_constant_groups(r_gk, centred).reshape(-1)
    if std_over == "group":
        std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / (group_size - std_ddof))
    else:
        std = jnp.sqrt(jnp.sum(jnp.square(r - jnp.mean(r))) / (r.shape[0] - std_ddof))
    return _zero_constant_groups(r_gk, centred / (std + eps)).reshape(-1)


def nonzero_std_groups(rewards_b: jax.Array, group_size: int) -> jax.Array:
    """bool [B]: rows whose group has at least two different rewards (DAPO dynamic sampling keeps these)."""
    r = _f32(rewards_b).reshape(-1, group_size)
    keep = jnp.max(r, axis=-1) > jnp.min(r, axis=-1)
    return jnp.repeat(keep, group_size)


def rloo_advantages(rewards_b: jax.Array, group_size: int) -> jax.Array:
    """REINFORCE leave-one-out advantages [B]: r_i - mean of the other G - 1 rewards of the group.

    Kool et al. 2019 ("Buy 4 REINFORCE samples, get a baseline for free");
    Ahmadian et al. 2024 (arXiv 2402.14740, eq. 6). Equals G/(G-1) times the
    group-mean-centred reward. A group of identical rewards gets exactly 0.
    Needs G >= 2.
    """
    r = _f32(rewards_b)
    _check_groups(r, group_size, 2, "rloo_advantages")
    r_gk = r.reshape(-1, group_size)
    baseline = (jnp.sum(r_gk, axis=-1, keepdims=True) - r_gk) / (group_size - 1)
    return _zero_constant_groups(r_gk, r_gk - baseline).reshape(-1)


def reinforce_pp_returns(token_rewards_bt: jax.Array, mask_bt: jax.Array, gamma: float = 1.0) -> jax.Array:
    """Discounted returns-to-go [B, T]: G_t = sum_{s >= t} gamma^(s - t) r_s over real tokens; 0 where masked.

    REINFORCE++ (Hu, arXiv 2501.03262, section 3) with the token rewards of
    `kl.kl_penalty_rewards`. Rewards at masked positions are ignored and,
    as in `gae`, masked positions are skipped (no discount step is spent on
    them).
    """
    m = jnp.asarray(mask_bt).astype(bool)
    r = jnp.where(m, _f32(token_rewards_bt), 0.0)

    def step(next_ret, xs):
        r_t, m_t = xs
        ret = r_t + gamma * next_ret
        return jnp.where(m_t, ret, next_ret), jnp.where(m_t, ret, 0.0)

    _, ret_tb = jax.lax.scan(step, jnp.zeros((r.shape[0],), jnp.float32), (r.T, m.T), reverse=True)
    return ret_tb.T


def reinforce_pp_advantages(token_rewards_bt: jax.Array, mask_bt: jax.Array, gamma: float = 1.0,
                            eps: float = 1e-8) -> jax.Array:
    """REINFORCE++ advantages [B, T]: returns-to-go whitened over all real tokens of the global batch.

    arXiv 2501.03262, "global advantage normalisation": unbiased variance,
    as `whiten` (and verl's implementation). Call it on the whole rollout
    batch, not on micro-batches.
    """
    return whiten(reinforce_pp_returns(token_rewards_bt, mask_bt, gamma), mask_bt, shift_mean=True, eps=eps)


def broadcast_to_tokens(adv_b: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """[B] sequence advantages -> float32 [B, T], the same value on every real token, 0 where masked."""
    m = jnp.asarray(mask_bt).astype(bool)
    return jnp.where(m, _f32(adv_b)[:, None], 0.0)
