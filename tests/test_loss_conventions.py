"""Conventions that must hold exactly: zero advantages for groups of equal rewards, and verl's loss_agg_mode.

verl's `agg_loss` (verl/trainer/ppo/core_algos.py) is written out below in numpy, float64, once per
behaviour it has had: v0.4.0 .. v0.6.0, v0.6.1, and v0.7.0 (called with its default arguments, i.e. on
one [B, T] loss matrix). Our aggregation under the settings docs/algorithms.md gives must equal it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.algos import grpo
from jaxrl_llm.algos.advantages import group_advantages, rloo_advantages
from jaxrl_llm.algos.aggregation import LOSS_AGG_MODES, NORM_MODES, aggregate, token_weights
from jaxrl_llm.algos.dpo import DPOConfig
from jaxrl_llm.algos.policy_loss import PolicyLossConfig
from jaxrl_llm.algos.sft import SFTConfig, make_sft_step
from jaxrl_llm.algos.train_state import OptimizerConfig, TrainState, accumulate, split_micro
from jaxrl_llm.models import ModelConfig, create_model
from jaxrl_llm.sharding import ShardingEnv, make_mesh

# ----------------------------------------------------------------------------- groups of equal rewards

GROUP_SIZES = (2, 3, 4, 5, 7, 8, 16)


def _all_group_estimators(rewards, g):
    """name -> advantages [B] of every group estimator (both std placements, both ddofs, no std, RLOO)."""
    out = {"rloo": rloo_advantages(rewards, g), "no_std": group_advantages(rewards, g, scale_by_std=False)}
    for std_over in ("group", "batch"):
        for ddof in (0, 1):
            out[f"std_{std_over}_ddof{ddof}"] = group_advantages(rewards, g, std_over=std_over, eps=1e-6,
                                                                 std_ddof=ddof)
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("value", [0.1, 1 / 3, 0.7, 123.456, 1e7 + 0.1])
def test_constant_groups_get_exactly_zero_advantage(value):
    # Each value has some group size where float32 rounding left a residue before (0.1 x 3 gave -7.4e-3
    # with the std; 1e7 + 0.1 gave 1.0 with RLOO at G = 16), so every case here failed before the fix.
    bad = []
    for g in GROUP_SIZES:
        rewards = np.full(2 * g, value, np.float32)
        for name, adv in _all_group_estimators(rewards, g).items():
            if np.any(adv != 0.0):
                bad.append((g, name, float(np.abs(adv).max())))
    assert not bad, f"reward {value}: non-zero advantages (G, estimator, max |A|): {bad}"


def _np_group_reference(r, g, name):
    r = r.astype(np.float64).reshape(-1, g)
    mean = r.mean(-1, keepdims=True)
    if name == "rloo":
        return (r - (r.sum(-1, keepdims=True) - r) / (g - 1)).reshape(-1)
    if name == "no_std":
        return (r - mean).reshape(-1)
    ddof = int(name[-1])
    std = r.std(-1, ddof=ddof, keepdims=True) if "group" in name else r.reshape(-1).std(ddof=ddof)
    return ((r - mean) / (std + 1e-6)).reshape(-1)


def test_mixed_batch_zeroes_only_the_constant_groups():
    g = 3
    tiny = np.nextafter(np.float32(0.1), np.float32(1.0))  # one float32 step above 0.1: not a constant group
    rewards = np.array([0.1, 0.1, 0.1,  0.0, 1.0, 0.5,  1 / 3, 1 / 3, 1 / 3,  0.1, 0.1, tiny,  2.0, -1.0, 0.25],
                       np.float32)
    constant = np.repeat([True, False, True, False, False], g)
    for name, adv in _all_group_estimators(rewards, g).items():
        assert np.all(adv[constant] == 0.0), (name, adv[constant])
        want = _np_group_reference(rewards, g, name)
        # groups 1 and 4 are ordinary; group 3 differs by one rounding step and is NOT zeroed
        np.testing.assert_allclose(adv[3:6], want[3:6], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(adv[12:15], want[12:15], rtol=1e-5, err_msg=name)
        assert np.any(adv[9:12] != 0.0), (name, adv[9:12])


# ----------------------------------------------------------------------------- verl's agg_loss in numpy


def verl_agg_v060(loss, mask, mode):
    """verl v0.4.0 .. v0.6.0: per-row means and torch.mean over all B rows; no epsilon per row."""
    loss, mask = loss.astype(np.float64), mask.astype(np.float64)
    seq_sum = (loss * mask).sum(-1)
    if mode == "token-mean":
        return (loss * mask).sum() / (mask.sum() + 1e-8)  # verl_F.masked_mean
    if mode == "seq-mean-token-sum":
        return seq_sum.mean()
    if mode == "seq-mean-token-mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            return (seq_sum / mask.sum(-1)).mean()
    if mode == "seq-mean-token-sum-norm":
        return seq_sum.sum() / mask.shape[-1]
    raise ValueError(mode)


def verl_agg_v061(loss, mask, mode, loss_scale_factor=None):
    """verl v0.6.1: the seq-mean modes average over the rows with at least one real token."""
    loss, mask = loss.astype(np.float64), mask.astype(np.float64)
    count = mask.sum(-1)
    nonempty = (count > 0).astype(np.float64)
    if mode == "token-mean":
        return (loss * mask).sum() / (mask.sum() + 1e-8)
    if mode == "seq-mean-token-sum":
        return ((loss * mask).sum(-1) * nonempty).sum() / (nonempty.sum() + 1e-8)
    if mode == "seq-mean-token-mean":
        return ((loss * mask).sum(-1) / (count + 1e-8) * nonempty).sum() / (nonempty.sum() + 1e-8)
    if mode == "seq-mean-token-sum-norm":
        return (loss * mask).sum() / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    raise ValueError(mode)


def verl_agg_v070(loss, mask, mode, loss_scale_factor=None):
    """verl v0.7.0 (and main, January 2026) with batch_num_tokens / global_batch_size left None, dp_size 1:
    as v0.6.1 but the batch-level divisions have no epsilon."""
    loss, mask = loss.astype(np.float64), mask.astype(np.float64)
    count = mask.sum(-1)
    nonempty = (count > 0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if mode == "token-mean":
            return (loss * mask).sum() / mask.sum()
        if mode == "seq-mean-token-sum":
            return ((loss * mask).sum(-1) * nonempty).sum() / nonempty.sum()
        if mode == "seq-mean-token-mean":
            return ((loss * mask).sum(-1) / (count + 1e-8) * nonempty).sum() / nonempty.sum()
    if mode == "seq-mean-token-sum-norm":
        return (loss * mask).sum() / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    raise ValueError(mode)


# verl mode -> our (loss_agg, exclude_empty_rows), per behaviour (docs/algorithms.md, "verl's loss_agg_mode")
TO_OURS_V060 = {"token-mean": ("token-mean", False), "seq-mean-token-mean": ("seq-mean-token-mean", False),
                "seq-mean-token-sum": ("seq-mean-token-sum", False),
                "seq-mean-token-sum-norm": ("token-sum-norm", False)}
TO_OURS_V061 = {"token-mean": ("token-mean", False), "seq-mean-token-mean": ("seq-mean-token-mean", True),
                "seq-mean-token-sum": ("seq-mean-token-sum", True),
                "seq-mean-token-sum-norm": ("token-sum-norm", False)}
VERL_MODES = tuple(TO_OURS_V060)


def random_case(seed, b=8, t=9, n_empty=2):
    """float32 per-token losses (garbage where masked) and a right-padded mask with `n_empty` all-masked rows."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, b)
    lengths[rng.choice(b, n_empty, replace=False)] = 0
    mask = np.arange(t)[None, :] < lengths[:, None]
    loss = rng.normal(size=(b, t)).astype(np.float32)
    return np.where(mask, loss, 1e3).astype(np.float32), mask


def close(got, want):
    """Equal to 1e-6, relative or absolute (a float32 sum of signed terms can be near 0)."""
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def ours(loss, mask, mode, exclude_empty_rows=False, norm_length=None):
    kw = {"exclude_empty_rows": True} if exclude_empty_rows else {}  # only what is set
    return float(aggregate(jnp.asarray(loss), jnp.asarray(mask), mode, norm_length, **kw))


@pytest.mark.parametrize("verl_mode", VERL_MODES)
@pytest.mark.parametrize("seed", range(4))
def test_matches_verl_v060(verl_mode, seed):
    loss, mask = random_case(seed, n_empty=0)  # with an empty row verl <= 0.6.0 gives NaN in one mode
    mode, exclude = TO_OURS_V060[verl_mode]
    close(ours(loss, mask, mode, exclude), verl_agg_v060(loss, mask, verl_mode))
    loss, mask = random_case(seed, n_empty=3)
    want = verl_agg_v060(loss, mask, verl_mode)
    got = ours(loss, mask, mode, exclude)
    if verl_mode == "seq-mean-token-mean":
        assert np.isnan(want) and np.isfinite(got)  # verl's 0/0 row; here the row counts in B and adds 0
    else:
        close(got, want)


@pytest.mark.parametrize("verl_mode", VERL_MODES)
@pytest.mark.parametrize("seed", range(4))
def test_matches_verl_v061_and_v070(verl_mode, seed):
    loss, mask = random_case(seed, n_empty=3)
    mode, exclude = TO_OURS_V061[verl_mode]
    want = verl_agg_v061(loss, mask, verl_mode)
    close(verl_agg_v070(loss, mask, verl_mode), want)
    close(ours(loss, mask, mode, exclude), want)
    if verl_mode == "seq-mean-token-sum-norm":  # v0.7.0's loss_scale_factor is our norm_length
        close(ours(loss, mask, mode, exclude, norm_length=32.0),
              verl_agg_v070(loss, mask, verl_mode, loss_scale_factor=32))


@pytest.mark.parametrize("verl_mode", VERL_MODES)
def test_all_masked_batch(verl_mode):
    """0 here in every mode; verl v0.6.1 too (its epsilons); verl v0.7.0 divides 0 by 0 except in the norm mode."""
    loss, mask = random_case(0, b=4, t=5, n_empty=4)
    for table in (TO_OURS_V060, TO_OURS_V061):
        mode, exclude = table[verl_mode]
        assert ours(loss, mask, mode, exclude) == 0.0
    assert verl_agg_v061(loss, mask, verl_mode) == 0.0
    assert np.isnan(verl_agg_v070(loss, mask, verl_mode)) == (verl_mode != "seq-mean-token-sum-norm")


def test_same_names_are_not_verl():
    """The old claim (verl's loss_agg_mode = our loss_agg, same names) is false: this documents where."""
    loss, mask = random_case(5, b=8, n_empty=2)
    b = mask.shape[0]
    verl_norm = verl_agg_v061(loss, mask, "seq-mean-token-sum-norm")
    same_name = ours(loss, mask, "seq-mean-token-sum-norm")
    close(verl_norm, b * same_name)  # verl's value is B times ours
    assert abs(verl_norm - same_name) > 0.1 * abs(verl_norm)
    # verl >= 0.6.1 seq-mean modes drop empty rows; our default keeps them in B
    for mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        verl = verl_agg_v061(loss, mask, mode)
        close(ours(loss, mask, mode) * b / (b - 2), verl)
        assert abs(ours(loss, mask, mode) - verl) > 1e-3 * abs(verl)


# ----------------------------------------------------------------------------- the new options by hand


def test_new_mode_and_exclude_empty_rows_by_hand():
    mask = np.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0]], np.float32)
    loss = np.array([[1.0, 2.0, 3.0, 50.0, 50.0], [50.0] * 5, [4.0, 6.0, 50.0, 50.0, 50.0]], np.float32)
    expected = {  # (mode, exclude_empty_rows) -> value; B = 3 rows, 2 of them non-empty, T = 5
        ("token-sum-norm", False): (6 + 10) / 5,
        ("token-sum-norm", True): (6 + 10) / 5,
        ("token-mean", True): 16 / 5,
        ("seq-mean-token-mean", True): (6 / 3 + 10 / 2) / 2,
        ("seq-mean-token-sum", True): (6 + 10) / 2,
        ("seq-mean-token-sum-norm", True): (6 + 10) / (2 * 5),
        ("seq-mean-token-mean", False): (6 / 3 + 10 / 2) / 3,
        ("seq-mean-token-sum", False): (6 + 10) / 3,
        ("seq-mean-token-sum-norm", False): (6 + 10) / (3 * 5),
    }
    for (mode, exclude), value in expected.items():
        np.testing.assert_allclose(ours(loss, mask, mode, exclude), value, rtol=1e-6, err_msg=f"{mode} {exclude}")
    np.testing.assert_allclose(ours(loss, mask, "token-sum-norm", norm_length=8.0), 16 / 8, rtol=1e-6)
    assert NORM_MODES == ("seq-mean-token-sum-norm", "token-sum-norm")
    assert set(NORM_MODES) <= set(LOSS_AGG_MODES)
    with pytest.raises(ValueError, match="exclude_empty_rows"):
        token_weights(jnp.asarray(mask), "seq-mean-token-sum", None, 1)


# ----------------------------------------------------------------------------- accumulation stays exact

NEW_OPTIONS = [("token-sum-norm", False), ("seq-mean-token-mean", True), ("seq-mean-token-sum", True),
               ("seq-mean-token-sum-norm", True)]


@pytest.mark.parametrize("mode,exclude", NEW_OPTIONS)
def test_micro_batches_sum_to_the_full_batch(mode, exclude):
    b, t, n_micro = 8, 6, 4
    rng = np.random.default_rng(3)
    mask = (rng.random((b, t)) < 0.7)
    mask[[0, 4, 1]] = False  # micro-batch 0 (strided rows 0 and 4) is all empty, micro-batch 1 half empty
    x = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)
    params = {"a": jnp.asarray(rng.normal(size=(t,)), jnp.float32)}
    batch = {"x": x, "weights": token_weights(jnp.asarray(mask), mode, 10.0, exclude)}

    def loss_fn(p, mb, rng_):
        return jnp.sum(mb["weights"] * jnp.tanh(mb["x"] * p["a"]) ** 2), {}

    g1, m1 = accumulate(loss_fn, params, batch, jax.random.key(0), 1)
    g4, m4 = accumulate(loss_fn, params, batch, jax.random.key(0), n_micro)
    np.testing.assert_allclose(g4["a"], g1["a"], atol=1e-6)
    np.testing.assert_allclose(m4["loss"], m1["loss"], atol=1e-6)
    per_tok = np.asarray(jnp.tanh(x * params["a"]) ** 2)
    close(m1["loss"], ours(per_tok, mask, mode, exclude, 10.0))
    # the same mode normalised per micro-batch (each micro-batch's own counts, averaged) is not the same loss
    parts = split_micro({"l": per_tok, "m": mask}, n_micro)
    local = np.mean([ours(np.asarray(parts["l"][i]), np.asarray(parts["m"][i]), mode, exclude, 10.0)
                     for i in range(n_micro)])
    assert abs(local - float(m1["loss"])) > 1e-3


# ----------------------------------------------------------------------------- the configs and steps


def test_configs_carry_the_option_to_their_weights():
    mask = jnp.asarray(random_case(2, n_empty=3)[1])
    for cfg in (PolicyLossConfig(loss_agg="seq-mean-token-sum", exclude_empty_rows=True),
                SFTConfig(loss_agg="seq-mean-token-sum", exclude_empty_rows=True),
                DPOConfig(loss_agg="seq-mean-token-sum", exclude_empty_rows=True),
                PolicyLossConfig(loss_agg="token-sum-norm", norm_length=12.0),
                SFTConfig(loss_agg="token-sum-norm", norm_length=12.0),
                DPOConfig(loss_agg="token-sum-norm", norm_length=12.0)):
        np.testing.assert_array_equal(cfg.token_weights(mask),
                                      token_weights(mask, cfg.loss_agg, cfg.norm_length, cfg.exclude_empty_rows))
    assert float(jnp.sum(PolicyLossConfig(loss_agg="seq-mean-token-sum", exclude_empty_rows=True).token_weights(
        mask))) != float(jnp.sum(PolicyLossConfig(loss_agg="seq-mean-token-sum").token_weights(mask)))
    for make in (PolicyLossConfig, SFTConfig, DPOConfig):
        with pytest.raises(ValueError, match="exclude_empty_rows"):
            make(exclude_empty_rows="yes")
    with pytest.raises(ValueError, match="norm_length is only used"):
        SFTConfig(loss_agg="token-mean", norm_length=12.0)


TINY = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def tiny():
    module, params, _ = create_model(TINY, jax.random.key(0), ShardingEnv(make_mesh({"data": 1},
                                                                                     devices=jax.devices()[:1])))
    rng = np.random.default_rng(0)
    b, p, n = 4, 3, 5
    lengths = np.array([3, 0, 5, 0])  # two completions without a token
    cmask = np.arange(n)[None, :] < lengths[:, None]
    batch = {"prompt_tokens": rng.integers(2, 32, (b, p)).astype(np.int32), "prompt_mask": np.ones((b, p), bool),
             "completion_tokens": np.where(cmask, rng.integers(2, 32, (b, n)), 0).astype(np.int32),
             "completion_mask": cmask}
    return module, jax.device_get(params), batch


def _step_metrics(make_step, params, batch):
    state = TrainState.create(jax.tree.map(jnp.copy, params), OptimizerConfig(name="sgd", learning_rate=0.0,
                                                                                max_grad_norm=None))
    _, metrics = jax.jit(make_step)(state, batch, jax.random.key(1))
    return jax.device_get(metrics)


def test_sft_and_grpo_steps_use_the_option(tiny):
    """The steps build their weights from the config: with exclude_empty_rows the loss divides by the 2
    non-empty rows, not the 4 rows."""
    module, params, batch = tiny
    n_tok = batch["completion_mask"].sum()
    sft = make_sft_step(module, TINY, SFTConfig(loss_agg="seq-mean-token-sum", exclude_empty_rows=True))
    m = _step_metrics(sft, params, batch)
    np.testing.assert_allclose(m["loss"], m["nll_token_mean"] * n_tok / 2, rtol=1e-5)
    # GRPO on-policy (ratio 1, no KL/entropy): the per-token loss is -A, so the loss is -sum_i A_i n_i / 2
    adv_b = np.array([0.5, 0.0, -2.0, 0.0], np.float32)
    cfg = grpo.GRPOConfig(group_size=2, loss=PolicyLossConfig(kl_coef=0.0, loss_agg="seq-mean-token-sum",
                                                              exclude_empty_rows=True))
    gb = dict(batch, advantages=np.where(batch["completion_mask"], adv_b[:, None], 0.0).astype(np.float32))
    m = _step_metrics(grpo.make_grpo_step(module, TINY, cfg), params, gb)
    np.testing.assert_allclose(m["loss"], -(0.5 * 3 - 2.0 * 5) / 2, rtol=1e-5)
