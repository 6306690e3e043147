"""Peers' conventions in the GRPO family: each peer's formula written out in numpy float64 from its source
and compared with ours on many random batches, then the whole per-batch loss under convention="trl" / "verl".

Sources (read, not imported): TRL v1.9.0 trl/trainer/grpo_trainer.py (`_generate_and_score_completions`:
nansum / nanmean / nanstd grouping, `_compute_loss`), trl/trainer/rloo_trainer.py, trl/trainer/utils.py
(`nanstd`); verl main of 29 January 2026 (v0.7.0 + 125 commits) verl/trainer/ppo/core_algos.py
(`compute_grpo_outcome_advantage`, `compute_rloo_outcome_advantage`,
`compute_reinforce_plus_plus_outcome_advantage`, `agg_loss`, `compute_policy_loss_vanilla`,
`compute_policy_loss_gspo`, `kl_penalty_forward`), verl/utils/torch_functional.py (`masked_whiten`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.algos import advantages as adv_lib
from jaxrl_llm.algos import grpo
from jaxrl_llm.algos.aggregation import micro_batch_token_weights, token_mean_weights
from jaxrl_llm.algos.policy_loss import PolicyLossConfig, policy_loss
from jaxrl_llm.algos.train_state import OptimizerConfig, TrainState, jit_update, split_micro
from jaxrl_llm.models import ModelConfig, create_model
from jaxrl_llm.sharding import ShardingEnv, make_mesh
from jaxrl_llm.train.config import ConfigError, load_experiment
from jaxrl_llm.train.experience import reward_stats
from jaxrl_llm.train.stages import STAGE_KINDS

SEEDS = range(24)

# ----------------------------------------------------------------------------- numpy peers (float64)


def np_nanstd(x, axis=None, keepdims=False):
    """trl.trainer.utils.nanstd: Bessel-corrected std of the non-NaN entries, NaN when fewer than 2."""
    mean = np.nanmean(x, axis=axis, keepdims=True)
    var = np.nanmean((x - mean) ** 2, axis=axis, keepdims=True)
    count = np.sum(~np.isnan(x), axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = var * np.where(count > 1, count / (count - 1), np.nan)
    std = np.sqrt(var)
    return std if keepdims else np.squeeze(std, axis=axis) if axis is not None else std.reshape(())


def trl_grpo_advantages(rewards, g, scale_rewards="group"):
    """GRPOTrainer, multi_objective_aggregation="sum_then_normalize" with one reward function."""
    r = np.asarray(rewards, np.float64)
    with np.errstate(all="ignore"), _quiet():
        mean = np.repeat(np.nanmean(r.reshape(-1, g), axis=1), g)
        if scale_rewards in ("group", "none"):
            std = np.repeat(np_nanstd(r.reshape(-1, g), axis=1), g) if g > 1 else np.zeros_like(r)
        else:
            std = np.broadcast_to(np_nanstd(r), r.shape) if r.size > 1 else np.zeros_like(r)
        adv = r - mean
        if scale_rewards != "none":
            adv = adv / (std + 1e-4)
    return np.nan_to_num(adv, nan=0.0)


def trl_rloo_advantages(rewards, g, normalize):
    r = np.asarray(rewards, np.float64)
    grouped = r.reshape(-1, g)
    with np.errstate(all="ignore"), _quiet():
        counts = np.sum(~np.isnan(grouped), axis=1, keepdims=True)
        total = np.nansum(grouped, axis=1, keepdims=True)
        adv = r - ((total - grouped) / (counts - 1)).reshape(-1) if g > 1 else np.zeros_like(r)
        if normalize:
            adv = (adv - np.nanmean(adv)) / (np_nanstd(adv) + 1e-4)
    return np.nan_to_num(adv, nan=0.0)


class _quiet:
    """numpy's RuntimeWarnings of all-NaN slices (TRL's torch ops are silent) off."""

    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def verl_grpo_advantages(scores, index, eps=1e-6, norm_by_std=True):
    """compute_grpo_outcome_advantage: per index group, singletons get mean 0 and std 1."""
    scores = np.asarray(scores, np.float64).copy()
    groups = {}
    for i, k in enumerate(index):
        groups.setdefault(int(k), []).append(scores[i])
    stats = {k: (0.0, 1.0) if len(v) == 1 else (np.mean(v), np.std(v, ddof=1)) for k, v in groups.items()}
    for i, k in enumerate(index):
        mean, std = stats[int(k)]
        scores[i] = (scores[i] - mean) / (std + eps) if norm_by_std else scores[i] - mean
    return scores


def verl_rloo_advantages(scores, index):
    scores = np.asarray(scores, np.float64).copy()
    groups = {}
    for i, k in enumerate(index):
        groups.setdefault(int(k), []).append(scores[i])
    for i, k in enumerate(index):
        n = len(groups[int(k)])
        if n > 1:  # a singleton keeps its score (id2mean 0, no rescaling)
            mean = np.mean(groups[int(k)])
            scores[i] = scores[i] * n / (n - 1) - mean * n / (n - 1)
    return scores


def verl_masked_whiten(values, mask):
    m = mask.astype(np.float64)
    mean = (values * m).sum() / (m.sum() + 1e-8)
    var = ((values - mean) ** 2 * m).sum() / (m.sum() + 1e-8) * (m.sum() / (m.sum() - 1))
    return (values - mean) / np.sqrt(var + 1e-8)


def verl_reinforce_pp(token_rewards, mask, gamma):
    """compute_reinforce_plus_plus_outcome_advantage: the running return is multiplied by the mask."""
    returns = np.zeros_like(token_rewards)
    running = np.zeros(token_rewards.shape[0])
    for t in reversed(range(token_rewards.shape[1])):
        running = token_rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * mask[:, t]
    return verl_masked_whiten(returns, mask) * mask


def verl_agg(loss_mat, mask, mode):
    """agg_loss with its default arguments (batch_num_tokens, global_batch_size, loss_scale_factor None)."""
    m = mask.astype(np.float64)
    if mode == "token-mean":
        return (loss_mat * m).sum() / m.sum()
    seq_mask = (m.sum(-1) > 0).astype(np.float64)
    if mode == "seq-mean-token-sum":
        return ((loss_mat * m).sum(-1) * seq_mask).sum() / seq_mask.sum()
    if mode == "seq-mean-token-mean":
        return ((loss_mat * m).sum(-1) / (m.sum(-1) + 1e-8) * seq_mask).sum() / seq_mask.sum()
    assert mode == "seq-mean-token-sum-norm"
    return (loss_mat * m).sum() / m.shape[-1]


def verl_low_var_kl(logp, ref):
    kl = np.clip(ref - logp, -20, 20)
    return np.clip(np.exp(kl) - kl - 1, -10, 10)


# ----------------------------------------------------------------------------- random batches


def _rewards(rng, b, nan_frac=0.2, binary=False):
    r = (rng.random(b) < 0.5).astype(np.float64) if binary else rng.normal(size=b)
    r[rng.random(b) < nan_frac] = np.nan
    return r


def _batch(rng, b, t, empty_rows=True):
    lengths = rng.integers(1, t + 1, size=b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    if empty_rows:
        mask[rng.random(b) < 0.1] = False
    old = -rng.random((b, t)) * 3
    logp = old + rng.normal(scale=0.3, size=(b, t))
    ref = old + rng.normal(scale=0.3, size=(b, t))
    logp[~mask] = np.nan  # garbage at masked positions must not leak
    return mask, logp, old, ref


def _f32(x):
    return jnp.asarray(np.asarray(x), jnp.float32)


@functools.lru_cache(maxsize=None)
def _jitted(cfg):
    """Our per-batch loss under cfg: advantages (compute_advantages) + policy loss + aggregation, jitted."""
    lc = cfg.loss

    def fn(rewards, mask, logp, old, ref):
        adv = grpo.compute_advantages(cfg, rewards, mask)
        loss, _ = policy_loss(lc, logp, old, adv, lc.token_weights(mask), token_mean_weights(mask),
                              ref_logp_bt=ref if lc.kl_coef > 0 else None, mask_bt=mask)
        return loss, adv
    return jax.jit(fn)


def _our_loss(cfg, rewards, mask, logp, old, ref):
    loss, adv = _jitted(cfg)(_f32(rewards), jnp.asarray(mask), _f32(logp), _f32(old), _f32(ref))
    return float(loss), np.asarray(adv)


@functools.lru_cache(maxsize=None)
def _advantages(cfg):
    return jax.jit(lambda r, mask, ids=None: grpo.compute_advantages(cfg, r, mask, group_ids=ids))


# ----------------------------------------------------------------------------- TRL


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("g", [1, 2, 3, 8])
def test_trl_group_advantages_with_nan_rewards(g, scale_rewards):
    cfg = grpo.GRPOConfig(group_size=g, scale_rewards=scale_rewards, convention="trl")
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        r = _rewards(rng, 8 * g, binary=seed % 3 == 0)
        if seed % 5 == 0 and g > 1:
            r[:g] = np.nan  # a wholly unscored group
        want = trl_grpo_advantages(r, g, scale_rewards)
        got = np.asarray(adv_lib.group_advantages(_f32(r), g, scale_rewards != "none",
                                                  "batch" if scale_rewards == "batch" else "group",
                                                  cfg.std_eps, cfg.std_ddof, singleton=cfg.singleton_groups))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
        assert np.all(got[np.isnan(r)] == 0.0)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("g", [1, 2, 4])
def test_trl_rloo_advantages_with_nan_rewards(g, normalize):
    cfg = grpo.GRPOConfig(group_size=g, advantage_estimator="rloo", normalize_advantages=normalize,
                          convention="trl", loss=PolicyLossConfig())
    assert cfg.std_eps == (1e-4 if normalize else 1e-6) and cfg.reward_kl_coef == 0.05
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        r = _rewards(rng, 6 * g)
        want = trl_rloo_advantages(r, g, normalize)
        got = np.asarray(adv_lib.rloo_advantages(_f32(r), g, singleton=cfg.singleton_groups, normalize=normalize,
                                                 eps=cfg.std_eps, std_ddof=cfg.std_ddof))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")


def test_nan_reward_cannot_reach_loss_or_gradient():
    rng = np.random.default_rng(0)
    g, b, t = 4, 16, 6
    mask, logp, old, ref = _batch(rng, b, t, empty_rows=False)
    r = _rewards(rng, b, nan_frac=0.0)
    r[[1, 6, 7]] = np.nan
    r[8:12] = np.nan  # a whole group
    for est in grpo.ADVANTAGE_ESTIMATORS:
        cfg = grpo.GRPOConfig(group_size=g, advantage_estimator=est,
                              loss=PolicyLossConfig(kl_coef=0.05, loss_agg="token-mean"))
        adv = grpo.compute_advantages(cfg, _f32(r), jnp.asarray(mask))
        assert np.all(np.isfinite(adv)) and np.all(np.asarray(adv)[np.isnan(r)] == 0.0), est
        w, mw = cfg.loss.token_weights(jnp.asarray(mask)), token_mean_weights(jnp.asarray(mask))

        def f(lp):
            return policy_loss(cfg.loss, lp, _f32(old), adv, w, mw, ref_logp_bt=_f32(ref), mask_bt=jnp.asarray(mask))
        (loss, metrics), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(_f32(np.nan_to_num(logp)))
        assert np.isfinite(float(loss)) and np.all(np.isfinite(grad)), est
        assert all(np.all(np.isfinite(v)) for v in metrics.values()), est
    # the scored rows of a group are normalised among themselves: row 1's NaN is not a zero reward
    got = np.asarray(adv_lib.group_advantages(_f32(r), g))[:4]
    scored = r[[0, 2, 3]]
    want = (scored - scored.mean()) / (scored.std(ddof=1) + 1e-6)
    np.testing.assert_allclose(got[[0, 2, 3]], want, rtol=1e-5)
    # REINFORCE++: unscored rows are out of the whitening
    cfg = grpo.reinforce_pp(group_size=g, kl_coef=0.0)
    got = np.asarray(grpo.compute_advantages(cfg, _f32(r), jnp.asarray(mask)))
    keep = ~np.isnan(r)
    want = np.asarray(grpo.compute_advantages(cfg, _f32(r[keep]), jnp.asarray(mask[keep])))
    np.testing.assert_allclose(got[keep], want, atol=1e-6)
    assert np.all(got[~keep] == 0.0)


def test_reward_metrics_count_unscored():
    r = jnp.asarray([1.0, np.nan, 3.0, np.nan, 5.0], jnp.float32)
    stats = {k: float(v) for k, v in reward_stats(r).items()}
    assert stats == {"reward/mean": 3.0, "reward/std": pytest.approx(np.std([1, 3, 5])), "reward/unscored": 2.0}
    assert bool(np.asarray(adv_lib.nonzero_std_groups(jnp.asarray([1.0, np.nan, np.nan, np.nan]), 2)).any()) is False
    assert np.asarray(adv_lib.nonzero_std_groups(jnp.asarray([1.0, np.nan, 2.0, 1.0]), 4)).all()


def _trl_loss(adv_b, mask, logp, old, ref, beta, eps_low=0.2, eps_high=0.2):
    """_compute_loss with loss_type="dapo" (the default): sum(l m) / num_items_in_batch (one process)."""
    m = mask.astype(np.float64)
    lp = np.where(mask, logp, 0.0)  # the model's log-probs are finite at padded positions too
    coef_1 = np.exp(lp - old)
    coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
    a = adv_b[:, None]
    per_token = -np.minimum(coef_1 * a, coef_2 * a)
    if beta != 0.0:
        per_token = per_token + beta * (np.exp(ref - lp) - (ref - lp) - 1)
    return (per_token * m).sum() / max(m.sum(), 1.0)


@pytest.mark.parametrize("beta", [0.0, 0.02])
@pytest.mark.parametrize("scale_rewards", ["group", "batch"])
def test_trl_whole_loss(beta, scale_rewards):
    g, t = 4, 7
    loss_cfg = PolicyLossConfig(kl_coef=beta) if beta else grpo.GRPOConfig().loss
    cfg = grpo.GRPOConfig(group_size=g, scale_rewards=scale_rewards, loss=loss_cfg, convention="trl")
    assert cfg.loss.kl_coef == beta and cfg.loss.loss_agg == "token-mean" and cfg.std_eps == 1e-4
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        mask, logp, old, ref = _batch(rng, 4 * g, t)
        r = _rewards(rng, 4 * g, binary=seed % 4 == 0)
        want = _trl_loss(trl_grpo_advantages(r, g, scale_rewards), mask, logp, old, ref, beta)
        got, _ = _our_loss(cfg, r, mask, logp, old, ref)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6, err_msg=f"seed {seed}")


# ----------------------------------------------------------------------------- verl


def _index(rng, b):
    """verl-style uids: shuffled groups of different sizes, some of one row."""
    sizes, left = [], b
    while left:
        sizes.append(int(min(left, rng.integers(1, 6))))
        left -= sizes[-1]
    ids = np.repeat(rng.permutation(1000)[:len(sizes)], sizes)
    return rng.permutation(ids)


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_verl_group_ids_advantages(norm_by_std):
    cfg = grpo.GRPOConfig(scale_rewards="group" if norm_by_std else "none", convention="verl")
    assert cfg.singleton_groups == "raw"
    rloo = grpo.GRPOConfig(advantage_estimator="rloo", convention="verl", loss=PolicyLossConfig())
    mask = jnp.ones((24, 3), bool)
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        r, ids = rng.normal(size=24), _index(rng, 24)
        got = np.asarray(_advantages(cfg)(_f32(r), mask, jnp.asarray(ids)))[:, 0]
        np.testing.assert_allclose(got, verl_grpo_advantages(r, ids, 1e-6, norm_by_std), rtol=1e-5, atol=1e-5)
        got = np.asarray(_advantages(rloo)(_f32(r), mask, jnp.asarray(ids)))[:, 0]
        np.testing.assert_allclose(got, verl_rloo_advantages(r, ids), rtol=1e-5, atol=1e-5)


def test_group_ids_equal_contiguous_groups_in_any_order_and_under_jit():
    rng = np.random.default_rng(0)
    g, b = 4, 32
    r = _rewards(rng, b)
    perm = rng.permutation(b)
    ids = jnp.asarray((np.arange(b) // g * 7 - 3)[perm])  # any ints
    for est, kw in (("group_norm", {}), ("group_norm", {"scale_rewards": "batch"}), ("rloo", {}),
                    ("rloo", {"normalize_advantages": True})):
        cfg = grpo.GRPOConfig(group_size=g, advantage_estimator=est, **kw)
        want = np.asarray(grpo.compute_advantages(cfg, _f32(r), jnp.ones((b, 2))))[perm]
        fn = jax.jit(lambda rr, ii: grpo.compute_advantages(cfg, rr, jnp.ones((b, 2)), group_ids=ii))
        np.testing.assert_allclose(np.asarray(fn(_f32(r[perm]), ids)), want, atol=1e-6, err_msg=f"{est} {kw}")


def test_singleton_groups():
    r = jnp.asarray([0.5, -2.0, 3.0], jnp.float32)
    with pytest.raises(ValueError, match="GRPOConfig.group_size=1: group baselines need"):
        grpo.GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match=r"group_size=1 must be an int >= 2 \(or pass singleton="):
        adv_lib.group_advantages(r, 1)
    with pytest.raises(ValueError, match="group_ids has 1 group"):
        adv_lib.rloo_advantages(r, None, group_ids=jnp.asarray([4, 4, 9]))
    assert np.all(np.asarray(adv_lib.group_advantages(r, 1, singleton="zero")) == 0.0)  # TRL
    np.testing.assert_allclose(adv_lib.group_advantages(r, 1, singleton="raw"), np.asarray(r) / (1 + 1e-6))
    np.testing.assert_allclose(adv_lib.group_advantages(r, 1, scale_by_std=False, singleton="raw"), r)
    np.testing.assert_allclose(adv_lib.rloo_advantages(r, 1, singleton="raw"), r)  # verl's RLOO
    assert np.all(np.asarray(adv_lib.rloo_advantages(r, 1, singleton="zero")) == 0.0)
    cfg = grpo.GRPOConfig(group_size=1, singleton_groups="zero")
    assert np.all(np.asarray(grpo.compute_advantages(cfg, r, jnp.ones((3, 2)))) == 0.0)


def test_verl_reinforce_pp_reset_at_masked():
    cfg = grpo.reinforce_pp(kl_coef=0.0).replace(gamma=0.9, convention="verl")
    assert cfg.returns_reset_at_masked and cfg.singleton_groups == "error"
    assert cfg.replace(returns_reset_at_masked=False).returns_reset_at_masked  # our default: the convention's
    skip = cfg.replace(convention="none", returns_reset_at_masked=False)  # how to keep ours: leave the convention
    b, t = 12, 9
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        mask = rng.random((b, t)) < 0.7  # interior gaps
        mask[:, 0] = True
        r = rng.normal(size=b)
        last = t - 1 - np.argmax(mask[:, ::-1], axis=1)
        token_rewards = np.zeros((b, t))
        token_rewards[np.arange(b), last] = r
        want = verl_reinforce_pp(token_rewards, mask.astype(np.float64), 0.9)
        got = np.asarray(_advantages(cfg)(_f32(r), jnp.asarray(mask)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5, err_msg=f"seed {seed}")
        gapped = np.any(mask[:, :-1] & ~mask[:, 1:] & (np.arange(t - 1) < last[:, None]))
        other = np.asarray(_advantages(skip)(_f32(r), jnp.asarray(mask)))
        assert gapped == (np.abs(other - got).max() > 1e-3)
    right = np.arange(t)[None, :] < np.arange(1, b + 1)[:, None] % t + 1  # right padding: both agree
    np.testing.assert_allclose(grpo.compute_advantages(cfg, _f32(r), jnp.asarray(right)),
                               grpo.compute_advantages(skip, _f32(r), jnp.asarray(right)), atol=1e-6)


def _verl_loss(adv_bt, mask, logp, old, ref, mode, kl_coef, ratio_level="token"):
    """dp_actor's policy_loss for one micro-batch = the mini-batch: vanilla (or gspo) pg + kl_coef * kl."""
    lp = np.where(mask, logp, 0.0)
    if ratio_level == "token":
        log_ratio = np.clip(lp - old, -20, 20)
        ratio = np.exp(log_ratio)
        pg1, pg2 = -adv_bt * ratio, -adv_bt * np.clip(ratio, 0.8, 1.2)
        clip1 = np.maximum(pg1, pg2)
        pg = np.where(adv_bt < 0, np.minimum(-adv_bt * 3.0, clip1), clip1)
    else:  # compute_policy_loss_gspo (its value: sg parts are values here)
        m = mask.astype(np.float64)
        seq = ((lp - old) * m).sum(-1) / np.maximum(m.sum(-1), 1)
        ratio = np.exp(np.minimum(seq[:, None] + 0 * lp, 10.0))
        pg = np.maximum(-adv_bt * ratio, -adv_bt * np.clip(ratio, 1 - 3e-4, 1 + 4e-4))
        mode = "seq-mean-token-mean"
    loss = verl_agg(pg, mask, mode)
    if kl_coef:
        loss = loss + kl_coef * verl_agg(verl_low_var_kl(lp, ref), mask, mode)
    return loss


@pytest.mark.parametrize("mode,ours,kl_coef", [
    ("token-mean", None, 0.0),                            # verl's defaults
    ("token-mean", None, 0.001),                          # use_kl_loss=True, kl_loss_coef=0.001
    ("seq-mean-token-sum", "seq-mean-token-sum", 0.0),    # explicit aggregation, empty rows excluded as verl
    ("seq-mean-token-sum-norm", "token-sum-norm", 0.01),  # verl's name for our token-sum-norm
])
def test_verl_whole_loss(mode, ours, kl_coef):
    g, t = 4, 7
    loss = dataclasses.replace(grpo.GRPOConfig().loss, **({"loss_agg": ours} if ours else {}),
                               **({"kl_coef": kl_coef} if kl_coef else {}))
    cfg = grpo.GRPOConfig(group_size=g, loss=loss, convention="verl")
    assert cfg.loss.dual_clip == 3.0 and cfg.loss.exclude_empty_rows
    assert cfg.loss.kl_clamp == (10.0 if kl_coef else None) and cfg.loss.kl_coef == kl_coef
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        mask, logp, old, ref = _batch(rng, 4 * g, t)
        r = rng.normal(size=4 * g)
        ref[:, :2] -= 25.0 * (seed % 2)  # KL estimates past verl's clamps
        ids = np.repeat(np.arange(4), g)
        adv = verl_grpo_advantages(r, ids)[:, None] * mask
        want = _verl_loss(adv, mask, logp, old, ref, mode, kl_coef)
        got, _ = _our_loss(cfg, r, mask, logp, old, ref)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6, err_msg=f"seed {seed}")


def test_verl_gspo_whole_loss():
    g, t = 4, 7
    cfg = grpo.gspo(group_size=g, convention="verl")
    assert cfg.loss.seq_log_ratio_clamp == 10.0 and cfg.loss.dual_clip is None
    assert cfg.loss.loss_agg == "seq-mean-token-mean" and cfg.loss.exclude_empty_rows
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        mask, logp, old, ref = _batch(rng, 4 * g, t)
        logp = np.where(mask, old + rng.normal(scale=1e-3, size=old.shape), np.nan)
        if seed % 3 == 0:
            logp[0] = old[0] + 12.0  # a sequence log ratio past verl's clamp at 10
        r = rng.normal(size=4 * g)
        adv = verl_grpo_advantages(r, np.repeat(np.arange(4), g))[:, None] * mask
        want = _verl_loss(adv, mask, logp, old, ref, None, 0.0, ratio_level="sequence")
        got, _ = _our_loss(cfg, r, mask, logp, old, ref)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6, err_msg=f"seed {seed}")


# ----------------------------------------------------------------------------- the presets' semantics


def test_convention_replaces_only_library_defaults():
    d = grpo.GRPOConfig()
    trl = grpo.GRPOConfig(convention="trl")
    assert (trl.std_eps, trl.loss.loss_agg, trl.loss.kl_coef, trl.singleton_groups) == (1e-4, "token-mean", 0.0,
                                                                                          "zero")
    assert grpo.GRPOConfig(convention="none") == d
    explicit = grpo.GRPOConfig(std_eps=1e-3, loss=PolicyLossConfig(kl_coef=0.1, loss_agg="seq-mean-token-sum"),
                               singleton_groups="error", convention="trl")
    assert (explicit.std_eps, explicit.loss.loss_agg, explicit.loss.kl_coef) == (1e-3, "seq-mean-token-sum", 0.1)
    assert explicit.singleton_groups == "zero"  # "error" is our default: indistinguishable from unset
    assert grpo.dr_grpo(16, convention="trl").loss.loss_agg == "seq-mean-token-sum-norm"  # the variant's own
    assert grpo.GRPOConfig(scale_rewards="none", convention="trl").std_eps == d.std_eps  # not read: unchanged
    verl = grpo.GRPOConfig(convention="verl")
    assert verl.replace(epochs=2) == dataclasses.replace(verl, epochs=2)  # resolved values are stable
    assert verl.replace(convention="none").loss.dual_clip == 3.0  # resolved fields stay when the label changes
    assert grpo.GRPOConfig(loss=PolicyLossConfig(kl_coef=0.01, kl_estimator="k1"), convention="verl").loss.kl_clamp \
        is None  # verl clamps only low_var_kl
    assert grpo.sapo(convention="verl").loss.loss_agg == "seq-mean-token-mean"
    with pytest.raises(ValueError, match="GRPOConfig.convention='tlr'.*Did you mean 'trl'"):
        grpo.GRPOConfig(convention="tlr")


@pytest.mark.parametrize("overrides", [
    ["rl.algo.convention=trl"], ["rl.algo.convention=verl"],
    ["rl.algo.convention=verl", "rl.algo.advantage_estimator=reinforce_pp", "rl.algo.scale_rewards=batch"],
    ["rl.algo.convention=trl", "rl.algo.advantage_estimator=rloo", "rl.algo.normalize_advantages=True"],
    ["rl.algo.convention=verl", "rl.algo.loss.kl_coef=0.001"],
])
def test_conventions_pass_the_stage_checks(overrides):
    cfg = load_experiment("experiments/grpo.py:smoke", overrides)
    algo = STAGE_KINDS["grpo"].algo(cfg.rl, "config.rl")
    assert algo.convention == overrides[0].split("=")[1]
    assert algo != dataclasses.replace(algo, convention="none", loss=grpo.GRPOConfig().loss)


@pytest.mark.parametrize("overrides,match", [
    (["rl.algo.normalize_advantages=True"], r"config\.rl\.algo\.normalize_advantages=True is not read"),
    (["rl.algo.returns_reset_at_masked=True"], r"config\.rl\.algo\.returns_reset_at_masked=True is not read"),
    (["rl.algo.convention=peft"], r"config\.rl\.algo\.convention='peft'"),
])
def test_new_keys_unread_or_misspelt(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_experiment("experiments/grpo.py:smoke", overrides)


# ----------------------------------------------------------------------------- bnpo: per micro-batch


def test_micro_batch_weights_are_trls_bnpo():
    rng = np.random.default_rng(0)
    b, t, m = 8, 6, 4
    mask = np.arange(t)[None, :] < rng.integers(1, t + 1, size=b)[:, None]
    loss_bt = rng.normal(size=(b, t))
    micro = split_micro({"mask": jnp.asarray(mask), "loss": jnp.asarray(loss_bt, jnp.float32)}, m)
    share = jnp.full((b // m,), 1.0 / b)
    got = sum(float(jnp.sum(micro_batch_token_weights(micro["mask"][i], share, "token-mean") * micro["loss"][i]))
              for i in range(m))
    rows = [np.arange(i, b, m) for i in range(m)]  # split_micro's strided micro-batches
    want = np.mean([(loss_bt[r] * mask[r]).sum() / mask[r].sum() for r in rows])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    exact = (loss_bt * mask).sum() / mask.sum()
    assert abs(want - exact) > 1e-3  # micro-batches with different token counts: not token-mean


TINY = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def tiny():
    env = ShardingEnv(make_mesh({"data": 1}, devices=jax.devices()[:1]))
    module, params, _ = create_model(TINY, jax.random.key(0), env)
    rng = np.random.default_rng(1)
    b, p, n = 8, 3, 5
    cmask = np.arange(n)[None, :] < np.asarray([1, 5, 2, 5, 1, 4, 3, 5])[:, None]
    batch = {"prompt_tokens": jnp.asarray(rng.integers(2, 32, (b, p)), jnp.int32),
             "prompt_mask": jnp.ones((b, p), bool),
             "completion_tokens": jnp.asarray(rng.integers(2, 32, (b, n)), jnp.int32),
             "completion_mask": jnp.asarray(cmask)}
    return module, params, env, batch


def test_nan_rewards_through_the_stage_learner(tiny):
    from types import SimpleNamespace

    from jaxrl_llm.train.stages.grpo import GRPOLearner
    module, params, env, batch = tiny
    algo = grpo.GRPOConfig(group_size=4, logprob_chunk=8, loss=PolicyLossConfig(kl_coef=0.1), convention="trl")
    assert algo.loss.kl_coef == 0.1 and not algo.needs_old_logprobs
    state = TrainState.create(jax.tree.map(jnp.copy, params), OptimizerConfig(name="sgd", learning_rate=0.1))
    rewards = jnp.asarray([1.0, np.nan, 0.0, 1.0, np.nan, np.nan, np.nan, np.nan], jnp.float32)
    exp = SimpleNamespace(batch=dict(batch), rewards=rewards)
    new, metrics = GRPOLearner(module, TINY, algo, env)(state, params, exp, jax.random.key(3))
    assert float(metrics["skipped"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(new.params))


def test_bnpo_mode_in_the_update_step(tiny):
    module, params, env, batch = tiny
    cfg_m = TINY
    rng = np.random.default_rng(1)
    b, m = 8, 4
    cmask = np.asarray(batch["completion_mask"])
    batch = dict(batch)
    logp = np.asarray(grpo.policy_logprobs(module, params, cfg_m, batch, temperature=1.0, chunk=8)[0], np.float64)
    old = logp + rng.normal(scale=0.2, size=logp.shape)
    adv = rng.normal(size=b)
    batch.update(old_logprobs=_f32(old), advantages=_f32(np.where(cmask, adv[:, None], 0.0)))
    base = grpo.dapo(group_size=4).replace(num_micro_batches=m, logprob_chunk=8)

    def loss_of(cfg):
        state = TrainState.create(jax.tree.map(jnp.copy, params),
                                  OptimizerConfig(name="sgd", learning_rate=0.1, max_grad_norm=None))
        _, metrics = jit_update(grpo.make_grpo_step(module, cfg_m, cfg), state, batch, env)(state, batch,
                                                                                           jax.random.key(2))
        return float(metrics["loss"])

    ratio = np.exp(np.where(cmask, logp - old, 0.0))
    per_token = np.maximum(-adv[:, None] * ratio, -adv[:, None] * np.clip(ratio, 0.8, 1.28))
    rows = [np.arange(i, b, m) for i in range(m)]
    trl_bnpo = np.mean([(per_token[r] * cmask[r]).sum() / cmask[r].sum() for r in rows])
    token_mean = (per_token * cmask).sum() / cmask.sum()
    np.testing.assert_allclose(loss_of(base.replace(loss_agg_per_micro_batch=True)), trl_bnpo, rtol=1e-5)
    np.testing.assert_allclose(loss_of(base), token_mean, rtol=1e-5)  # the exact mode
    assert abs(trl_bnpo - token_mean) > 1e-2
