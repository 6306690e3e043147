"""Advantage estimators: GAE (PPO), group baselines (GRPO, Dr. GRPO, RLOO) and REINFORCE++.

All are pure functions over float32 arrays and masks, jittable, and never
produce NaN for all-masked rows or groups of identical rewards.

Group layout (the sampler's): with G samples per prompt, prompt i owns rows
i*G .. i*G + G - 1 of the batch. The group estimators also take `group_ids`
[B] (any ints; rows with equal ids form a group, of any size, in any
order: verl's `index`/uid), reduced with segment sums inside jit.

Unscored completions: a non-finite reward (NaN, as TRL's reward functions
return None -> NaN for a completion they cannot score) gets advantage
exactly 0 and is left out of every statistic: the group mean and std, the
leave-one-out baseline, the batch std and REINFORCE++'s whitening use the
finite rewards only (TRL's nanmean / nanstd / nansum).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

STD_OVER = ("group", "batch")
# What a group of one row gets: "error" (a ValueError; the default), "zero" (advantage 0, TRL), "raw" (its
# baseline is 0 and its std 1, verl: r / (1 + eps) with the std division, r without, r under RLOO).
SINGLETON_GROUPS = ("error", "zero", "raw")


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


def _check_groups(rewards_b: jax.Array, group_size: int | None, min_size: int, who: str,
                  group_ids: jax.Array | None = None, singleton: str = "error") -> None:
    if singleton not in SINGLETON_GROUPS:
        raise ValueError(f"{who}: singleton={singleton!r}; expected one of {SINGLETON_GROUPS}")
    if rewards_b.ndim != 1:
        raise ValueError(f"{who}: rewards of shape {rewards_b.shape}; expected [B]")
    if group_ids is not None:
        ids = jnp.asarray(group_ids)
        if ids.shape != rewards_b.shape or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{who}: group_ids of shape {ids.shape} and dtype {ids.dtype}; expected ints of the "
                             f"rewards' shape {rewards_b.shape} (rows with equal ids form a group)")
        if singleton == "error" and not isinstance(ids, jax.core.Tracer):
            _, counts = np.unique(np.asarray(ids), return_counts=True)
            if np.any(counts == 1):
                raise ValueError(f"{who}: group_ids has {int(np.sum(counts == 1))} group(s) of one row (e.g. id "
                                 f"{int(np.unique(np.asarray(ids))[counts == 1][0])}); a group baseline needs 2 "
                                 "rows, or pass singleton='zero' (TRL: advantage 0) or 'raw' (verl: baseline 0, "
                                 "std 1)")
        return
    least = 1 if singleton != "error" else min_size
    if not isinstance(group_size, int) or group_size < least:
        raise ValueError(f"{who}: group_size={group_size!r} must be an int >= {least}"
                         + (" (or pass singleton='zero' or 'raw' for groups of one)" if least > 1 else ""))
    b = rewards_b.shape[0]
    if b % group_size:
        raise ValueError(f"{who}: rewards of shape {rewards_b.shape} do not split into groups of {group_size} "
                         "(expected [B] with B a multiple of group_size; prompt i owns rows i*G .. i*G+G-1)")


def _group_reducer(b: int, group_size: int | None, group_ids: jax.Array | None) -> Callable:
    """`reduce(x_b, op) -> [B]`: each row gets op ("sum", "max", "min") over the rows of its group.

    Contiguous groups of `group_size` (a reshape) or, with `group_ids`, segment reductions over the ids
    made dense by `jnp.unique(..., size=B)` (static shapes, jittable).
    """
    if group_ids is None:
        ops = {"sum": jnp.sum, "max": jnp.max, "min": jnp.min}
        return lambda x, op: jnp.repeat(ops[op](x.reshape(-1, group_size), axis=-1), group_size)
    _, inv = jnp.unique(jnp.asarray(group_ids), return_inverse=True, size=b)
    inv = inv.reshape(-1)
    seg = {"sum": jax.ops.segment_sum, "max": jax.ops.segment_max, "min": jax.ops.segment_min}
    return lambda x, op: seg[op](x, inv, num_segments=b)[inv]


def _scored_stats(r: jax.Array, reduce: Callable) -> tuple[jax.Array, ...]:
    """(scored [B] bool, rows [B] and scored rows [B] of each row's group, sum of its scored rewards [B],
    constant [B]: its scored rewards are all equal). Non-finite rewards are unscored."""
    scored = jnp.isfinite(r)
    rs = jnp.where(scored, r, 0.0)
    rows = reduce(jnp.ones_like(r), "sum")
    n = reduce(scored.astype(jnp.float32), "sum")
    total = reduce(rs, "sum")
    constant = reduce(jnp.where(scored, r, -jnp.inf), "max") == reduce(jnp.where(scored, r, jnp.inf), "min")
    return scored, rows, n, total, constant


def _nan_std(x: jax.Array, valid: jax.Array, ddof: int) -> jax.Array:
    """Std of the valid entries of x (TRL's `nanstd` for ddof=1): 0 where fewer than ddof + 1 are valid."""
    n = jnp.sum(valid.astype(jnp.float32))
    mean = jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(n, 1.0)
    var = jnp.sum(jnp.where(valid, jnp.square(x - mean), 0.0)) / jnp.maximum(n - ddof, 1.0)
    return jnp.where(n > ddof, jnp.sqrt(var), 0.0)


def group_advantages(rewards_b: jax.Array, group_size: int | None, scale_by_std: bool = True,
                     std_over: str = "group", eps: float = 1e-6, std_ddof: int = 1, *,
                     group_ids: jax.Array | None = None, singleton: str = "error") -> jax.Array:
    """Group-relative advantages [B]: (r_i - mean_group) / (std + eps).

    GRPO (DeepSeekMath, arXiv 2402.03300, section 4.1.2, outcome
    supervision). `scale_by_std=False` gives Dr. GRPO (arXiv 2503.20783):
    r_i - mean_group. `std_over="batch"` keeps the group mean but divides by
    the std of all B rewards (TRL's `scale_rewards="batch"`, the "LitePPO"
    recipe). `std_ddof=1` is the unbiased std (torch.std, which TRL and verl
    both use); `std_ddof=0` the population std. eps is added to the std
    (TRL 1e-4, verl 1e-6). A group of identical rewards gets advantage
    exactly 0: in float32 the mean of G equal rewards can be rounding steps
    away from them (G = 3, r = 0.1), and so can the leave-one-out baseline;
    the tiny centred value divided by a tiny std (+ eps) is then far from 0
    (about -7e-3 for that example with eps = 1e-6). Such a group carries no
    signal, so it is set to 0 by a select (other groups keep their values).

    Groups: contiguous runs of `group_size` rows, or `group_ids` [B] (then
    group_size is not used; groups may differ in size). Non-finite rewards
    are unscored: advantage 0, and left out of the mean and std (a group
    left with one scored reward gives it 0, as TRL). Groups of one row:
    `singleton="error"` raises (with G = 1 the group mean is the reward and
    every advantage would silently be 0; with traced `group_ids` it cannot
    raise and gives 0), "zero" gives 0 (TRL), "raw" uses baseline 0 and std
    1 (verl): r / (1 + eps), or r with scale_by_std=False.
    """
    r = _f32(rewards_b)
    _check_groups(r, group_size, 2, "group_advantages", group_ids, singleton)
    if std_over not in STD_OVER:
        raise ValueError(f"group_advantages: std_over={std_over!r}; expected one of {STD_OVER}")
    if std_ddof not in (0, 1):
        raise ValueError(f"group_advantages: std_ddof={std_ddof!r}; expected 0 (population) or 1 (unbiased)")
    reduce = _group_reducer(r.shape[0], group_size, group_ids)
    scored, rows, n, total, constant = _scored_stats(r, reduce)
    raw = (rows == 1) if singleton == "raw" else jnp.zeros_like(scored)
    mean = jnp.where(raw, 0.0, total / jnp.maximum(n, 1.0))
    centred = jnp.where(scored, r - mean, 0.0)
    if not scale_by_std:
        adv = centred
    else:
        if std_over == "group":
            var = reduce(jnp.square(centred), "sum") / jnp.maximum(n - std_ddof, 1.0)
            std = jnp.where(raw, 1.0, jnp.sqrt(var))
        else:
            std = _nan_std(r, scored, std_ddof)
        adv = centred / (std + eps)
    return jnp.where(scored & ~(constant & ~raw), adv, 0.0)


def nonzero_std_groups(rewards_b: jax.Array, group_size: int) -> jax.Array:
    """bool [B]: rows whose group has at least two different scored (finite) rewards (DAPO dynamic sampling
    keeps these)."""
    r = _f32(rewards_b).reshape(-1, group_size)
    scored = jnp.isfinite(r)
    keep = jnp.max(jnp.where(scored, r, -jnp.inf), axis=-1) > jnp.min(jnp.where(scored, r, jnp.inf), axis=-1)
    return jnp.repeat(keep, group_size)


def rloo_advantages(rewards_b: jax.Array, group_size: int | None, *, group_ids: jax.Array | None = None,
                    singleton: str = "error", normalize: bool = False, eps: float = 1e-4,
                    std_ddof: int = 1) -> jax.Array:
    """REINFORCE leave-one-out advantages [B]: r_i - mean of the other scored rewards of the group.

    Kool et al. 2019 ("Buy 4 REINFORCE samples, get a baseline for free");
    Ahmadian et al. 2024 (arXiv 2402.14740, eq. 6). Equals G/(G-1) times the
    group-mean-centred reward. A group of identical rewards gets exactly 0.
    Groups, unscored (non-finite) rewards and `singleton` as in
    `group_advantages` ("raw": baseline 0, advantage r, as verl); a scored
    reward with no scored sibling gets 0 (TRL).

    `normalize=True` is TRL's RLOO `normalize_advantages`: after the
    baseline, (A - mean) / (std + eps) over the batch's scored rows (TRL:
    eps 1e-4, unbiased std), leaving out rows of a group of two or more
    rows with no scored sibling (TRL's NaN there).
    """
    r = _f32(rewards_b)
    _check_groups(r, group_size, 2, "rloo_advantages", group_ids, singleton)
    if std_ddof not in (0, 1):
        raise ValueError(f"rloo_advantages: std_ddof={std_ddof!r}; expected 0 (population) or 1 (unbiased)")
    reduce = _group_reducer(r.shape[0], group_size, group_ids)
    scored, rows, n, total, constant = _scored_stats(r, reduce)
    single = rows == 1
    baseline = (total - jnp.where(scored, r, 0.0)) / jnp.maximum(n - 1.0, 1.0)
    adv = jnp.where(scored & (n >= 2) & ~constant, r - baseline, 0.0)
    if singleton == "raw":
        adv = jnp.where(scored & single, r, adv)
    if not normalize:
        return adv
    valid = scored & ((n >= 2) | single)
    mean = jnp.sum(jnp.where(valid, adv, 0.0)) / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
    return jnp.where(valid, (adv - mean) / (_nan_std(adv, valid, std_ddof) + eps), 0.0)


def reinforce_pp_returns(token_rewards_bt: jax.Array, mask_bt: jax.Array, gamma: float = 1.0,
                         reset_at_masked: bool = False) -> jax.Array:
    """Discounted returns-to-go [B, T]: G_t = sum_{s >= t} gamma^(s - t) r_s over real tokens; 0 where masked.

    REINFORCE++ (Hu, arXiv 2501.03262, section 3) with the token rewards of
    `kl.kl_penalty_rewards`. Rewards at masked positions are ignored and,
    as in `gae`, masked positions are skipped (no discount step is spent on
    them). `reset_at_masked=True` is verl's
    `compute_reinforce_plus_plus_outcome_advantage` instead: the running
    return is multiplied by the mask at every step, so a masked position
    inside a row (a multi-turn observation) cuts it: the real tokens before
    it see none of the rewards after it. Right padding gives the same
    returns either way.
    """
    check_bool(reset_at_masked, "reinforce_pp_returns: reset_at_masked")
    m = jnp.asarray(mask_bt).astype(bool)
    r = jnp.where(m, _f32(token_rewards_bt), 0.0)

    def step(next_ret, xs):
        r_t, m_t = xs
        ret = r_t + gamma * next_ret
        carry = jnp.where(m_t, ret, 0.0 if reset_at_masked else next_ret)
        return carry, jnp.where(m_t, ret, 0.0)

    _, ret_tb = jax.lax.scan(step, jnp.zeros((r.shape[0],), jnp.float32), (r.T, m.T), reverse=True)
    return ret_tb.T


def reinforce_pp_advantages(token_rewards_bt: jax.Array, mask_bt: jax.Array, gamma: float = 1.0,
                            eps: float = 1e-8, reset_at_masked: bool = False) -> jax.Array:
    """REINFORCE++ advantages [B, T]: returns-to-go whitened over all real tokens of the global batch.

    arXiv 2501.03262, "global advantage normalisation": unbiased variance,
    as `whiten` (and verl's implementation). Call it on the whole rollout
    batch, not on micro-batches. `reset_at_masked`: see `reinforce_pp_returns`.
    """
    returns = reinforce_pp_returns(token_rewards_bt, mask_bt, gamma, reset_at_masked)
    return whiten(returns, mask_bt, shift_mean=True, eps=eps)


def check_bool(value: object, where: str) -> None:
    """`where` must be a Python bool: it picks a branch when the arrays are traced."""
    if not isinstance(value, bool):
        raise ValueError(f"{where}={value!r} must be True or False")


def broadcast_to_tokens(adv_b: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """[B] sequence advantages -> float32 [B, T], the same value on every real token, 0 where masked."""
    m = jnp.asarray(mask_bt).astype(bool)
    return jnp.where(m, _f32(adv_b)[:, None], 0.0)
