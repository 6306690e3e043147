"""SFT, DPO-family and reward-model update steps: exact accumulation, sharded == single device, learning, masking.

Compiling a step of even the tiny model takes seconds on CPU, so every compiled update is cached by
(step config, optimiser, mesh, batch shapes) and reused across tests, the learning rate lives in the
optimiser state (optax.inject_hyperparams) so that one compiled SGD step serves every test, and XLA's
backend optimisation level is lowered (compile time halves; numerics are the same math).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl_llm.algos.dpo import DPOConfig, make_dpo_step, make_reference_logps_fn
from jaxrl_llm.algos.reward_model import RewardModelConfig, make_reward_model_step, pair_rewards
from jaxrl_llm.algos.sft import SFTConfig, make_sft_step
from jaxrl_llm.algos.train_state import TrainState, jit_update
from jaxrl_llm.models import ModelConfig, create_model, init_fn_for, reward_model, value_model
from jaxrl_llm.sharding import ShardingEnv, make_mesh
from jaxrl_llm.sharding.params import param_shardings

V = 64
CFG = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
SGD = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)  # plain SGD: the update is -lr * grad, unclipped
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _env(axes):
    n = int(np.prod(list(axes.values())))
    return ShardingEnv(make_mesh(axes, devices=jax.devices()[:n]))


@pytest.fixture(scope="module")
def lm():
    """The policy and a reference that differs from it (so DPO's log-ratios are not all zero)."""
    module, params, _ = create_model(CFG, jax.random.key(0), _env({"data": 1}))
    rng = np.random.default_rng(7)
    params = jax.device_get(params)
    ref_params = jax.tree.map(lambda x: (x + 0.02 * rng.standard_normal(x.shape)).astype(x.dtype), params)
    return module, params, ref_params


@pytest.fixture(scope="module")
def rm(lm):
    """A reward model on the policy's body with a random (not zero) head: body gradients from the first step."""
    module = reward_model(CFG)
    head = {"kernel": 0.2 * np.random.default_rng(1).standard_normal((CFG.hidden_size, 1)).astype(np.float32),
            "bias": np.zeros((1,), np.float32)}
    return module, {"model": lm[1]["model"], "score": head}


# ----------------------------------------------------------------------------- batches


def _left_padded(rng, b, p, max_len=None):
    lengths = rng.integers(1, (max_len or p) + 1, b)
    mask = np.arange(p)[None, :] >= (p - lengths)[:, None]
    return np.where(mask, rng.integers(1, V, (b, p)), 0).astype(np.int32), mask


def _right_padded(rng, b, n, low=1, max_len=None):
    lengths = rng.integers(low, (max_len or n) + 1, b)
    mask = np.arange(n)[None, :] < lengths[:, None]
    return np.where(mask, rng.integers(1, V, (b, n)), 0).astype(np.int32), mask


def sft_batch(seed=0, max_prompt=None, max_completion=None, b=8, p=5, n=7):
    rng = np.random.default_rng(seed)
    pt, pm = _left_padded(rng, b, p, max_prompt)
    ct, cm = _right_padded(rng, b, n, max_len=max_completion)
    return {"prompt_tokens": pt, "prompt_mask": pm, "completion_tokens": ct, "completion_mask": cm}


def pair_batch(seed=1, b=8, p=5, nc=6, nr=4):
    """Chosen and rejected of different padded lengths (the step pads them to one)."""
    rng = np.random.default_rng(seed)
    pt, pm = _left_padded(rng, b, p)
    ct, cm = _right_padded(rng, b, nc)
    rt, rm_ = _right_padded(rng, b, nr)
    return {"prompt_tokens": pt, "prompt_mask": pm, "chosen_tokens": ct, "chosen_mask": cm,
            "rejected_tokens": rt, "rejected_mask": rm_}


def rm_batch(seed=2):
    return {**pair_batch(seed), "margin": np.linspace(0.0, 1.0, 8).astype(np.float32)}


def rule_pairs(seed, b=8, p=5, nc=6, nr=4):
    """A learnable preference: chosen responses contain token 5, rejected ones token 6; the rest is noise."""
    rng = np.random.default_rng(seed)
    out = {"prompt_tokens": rng.integers(10, V, (b, p)).astype(np.int32), "prompt_mask": np.ones((b, p), bool),
           "margin": np.zeros(b, np.float32)}
    for side, n, marker in (("chosen", nc, 5), ("rejected", nr, 6)):
        _, mask = _right_padded(rng, b, n, low=2)
        toks = np.where(mask, rng.integers(10, V, (b, n)), 0)
        toks[np.arange(b), rng.integers(0, mask.sum(-1))] = marker
        out[f"{side}_tokens"], out[f"{side}_mask"] = toks.astype(np.int32), mask
    return out


_JITTED = {}


def _cached_jit(name, fn):
    if name not in _JITTED:
        _JITTED[name] = jax.jit(fn)
    return _JITTED[name]


def with_ref(module, ref_params, batch):
    ref_fn = _cached_jit(("ref", id(module)), make_reference_logps_fn(module, CFG))
    return {**batch, **ref_fn(ref_params, batch)}


# ----------------------------------------------------------------------------- running compiled steps

MAKERS = {"sft": make_sft_step, "dpo": make_dpo_step, "rm": make_reward_model_step}
_COMPILED = {}


def _on_mesh(tree, env):
    """Replicates on the mesh the leaves TrainState.create left on one device (step, optimiser counters)."""
    devices = set(env.mesh.devices.flat)
    rep = NamedSharding(env.mesh, P())
    return jax.tree.map(lambda x: x if x.sharding.device_set == devices else jax.device_put(x, rep), tree)


def run(family, cfg, num_micro, module, params, batches, lr=1.0, env=None, steps=1):
    """`steps` SGD updates from a private copy of `params` (the state is donated); `batches` is a batch
    or `i -> batch`. With `env`, parameters are placed on its mesh as the module's logical axes ask.
    Returns (final params on the host, metrics of every step)."""
    get_batch = lambda i: jax.device_get(batches(i) if callable(batches) else batches)  # noqa: E731 (host arrays)
    params = jax.device_put(jax.device_get(params))  # a private copy: the state is donated
    if env is not None:
        params = jax.device_put(params, param_shardings(init_fn_for(module), env)[1])
    state = TrainState.create(params, SGD)
    state = state.replace(opt_state=state.opt_state._replace(hyperparams={"learning_rate": jnp.float32(lr)}))
    if env is not None:
        state = _on_mesh(state, env)
    batch0 = get_batch(0)
    key = (family, cfg, num_micro, id(module), None if env is None else tuple(env.mesh.shape.items()),
           tuple(sorted((k, np.shape(v)) for k, v in batch0.items())))
    if key not in _COMPILED:
        update = jit_update(MAKERS[family](module, CFG, cfg, num_micro), state, batch0, env)
        jitted = getattr(update, "jitted", update)  # the jax.jit inside jit_update's placing wrapper
        _COMPILED[key] = jitted.lower(state, batch0, jax.random.key(0)).compile(compiler_options=FAST_COMPILE)
    compiled = _COMPILED[key]
    history = []
    for i in range(steps):
        args = jax.device_put((state, get_batch(i), jax.random.key(i)), compiled.input_shardings[0])
        state, metrics = compiled(*args)
        history.append(jax.device_get(metrics))
    return jax.device_get(state.params), history


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def assert_same_update(before, p1, p2, tol):
    """p1 == p2 within tol (relative to the largest update when that is above 1), and the update itself is
    far larger than tol, so this can fail."""
    update = _max_diff(p1, before)
    assert update > 1e3 * tol, "the update is too small for the comparison to mean anything"
    assert _max_diff(p1, p2) < tol * max(1.0, update), (_max_diff(p1, p2), update)


# ----------------------------------------------------------------------------- (1) exact accumulation

SFT_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("mode", SFT_MODES)
def test_sft_accumulation_is_exact(lm, mode):
    module, params, _ = lm
    p1, m1 = run("sft", SFTConfig(loss_agg=mode), 1, module, params, sft_batch())
    p4, m4 = run("sft", SFTConfig(loss_agg=mode), 4, module, params, sft_batch())
    assert_same_update(params, p1, p4, 1e-6)
    for k in ("loss", "nll_token_mean", "entropy", "num_tokens"):
        np.testing.assert_allclose(m1[0][k], m4[0][k], rtol=1e-6, err_msg=k)
    assert m1[0]["num_tokens"] == sft_batch()["completion_mask"].sum()


def test_sft_modes_give_different_updates(lm):
    # guards the test above: its tolerance is far below the differences between modes
    module, params, _ = lm
    pa, _ = run("sft", SFTConfig("token-mean"), 1, module, params, sft_batch())
    pb, _ = run("sft", SFTConfig("seq-mean-token-mean"), 1, module, params, sft_batch())
    assert _max_diff(pa, pb) > 1e-3


DPO_CFGS = {"sigmoid": DPOConfig(),
            "ipo-normalised+nll": DPOConfig(loss_type="ipo", ipo_length_normalize=True, nll_coef=0.5),
            "orpo": DPOConfig(loss_type="orpo", loss_agg="seq-mean-token-mean")}


@pytest.mark.parametrize("name", list(DPO_CFGS))
def test_dpo_accumulation_is_exact(lm, name):
    module, params, ref_params = lm
    batch = with_ref(module, ref_params, pair_batch())
    p1, m1 = run("dpo", DPO_CFGS[name], 1, module, params, batch)
    p4, m4 = run("dpo", DPO_CFGS[name], 4, module, params, batch)
    assert_same_update(params, p1, p4, 1e-6)
    for k in m1[0]:
        if k not in ("grad_norm", "update_norm"):
            np.testing.assert_allclose(m1[0][k], m4[0][k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_dpo_reference_micro_batches_equal_the_whole_batch(lm):
    """The stage's reference forward runs the step's micro-batches of pairs: same sums, row order kept."""
    module, _, ref_params = lm
    batch = pair_batch(seed=3)
    whole = jax.jit(make_reference_logps_fn(module, CFG))(ref_params, batch)
    micro = jax.jit(make_reference_logps_fn(module, CFG, num_micro=4))(ref_params, batch)
    for k in ("ref_chosen_logps", "ref_rejected_logps"):
        assert micro[k].shape == (8,)
        assert np.ptp(np.asarray(whole[k])) > 0.1, k  # distinct rows, so a reordering would show
        np.testing.assert_allclose(micro[k], whole[k], rtol=1e-5, atol=1e-5, err_msg=k)


RM_CFG = RewardModelConfig(center_rewards_coef=0.01)


def test_reward_model_accumulation_is_exact(rm):
    module, params = rm
    p1, m1 = run("rm", RM_CFG, 1, module, params, rm_batch())
    p4, m4 = run("rm", RM_CFG, 4, module, params, rm_batch())
    assert_same_update(params, p1, p4, 1e-6)
    for k in ("loss", "bt_loss", "accuracy", "rewards/margins", "rewards/mean"):
        np.testing.assert_allclose(m1[0][k], m4[0][k], rtol=1e-6, atol=1e-7, err_msg=k)


# ----------------------------------------------------------------------------- (2) sharded == single device

# Every family on a mesh with all three axes; SFT also on pure fsdp x tensor and pure data parallelism.
MESHES = {"sft": [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 4, "tensor": 2}, {"data": 8}],
          "dpo": [{"data": 2, "fsdp": 2, "tensor": 2}],
          "rm": [{"data": 2, "fsdp": 2, "tensor": 2}]}


@pytest.mark.parametrize("family", ["sft", "dpo", "rm"])
def test_sharded_update_equals_single_device(lm, rm, family):
    if family == "rm":
        (module, params), cfg, batch = rm, RM_CFG, rm_batch()
    else:
        module, params, ref_params = lm
        cfg, batch = (SFTConfig(), sft_batch()) if family == "sft" else \
            (DPOConfig(), with_ref(module, ref_params, pair_batch()))
    single, m_single = run(family, cfg, 1, module, params, batch)
    for axes in MESHES[family]:
        sharded, m_sharded = run(family, cfg, 2, module, params, batch, env=_env(axes))
        assert_same_update(params, single, sharded, 2e-5)
        np.testing.assert_allclose(m_single[0]["loss"], m_sharded[0]["loss"], rtol=1e-5, err_msg=str(axes))


# ----------------------------------------------------------------------------- (3) each learns its objective


def test_sft_loss_drops(lm):
    module, params, _ = lm
    _, hist = run("sft", SFTConfig(), 4, module, params, sft_batch(), lr=LR_SFT, steps=15)
    first, last = float(hist[0]["loss"]), float(hist[-1]["loss"])
    assert first > 3.5  # ~log(64) from a random init
    assert last < 0.75 * first, (first, last)


def test_dpo_raises_the_margin(lm):
    module, params, _ = lm
    batch = with_ref(module, params, pair_batch())  # reference = the initial policy
    _, hist = run("dpo", DPOConfig(), 4, module, params, batch, lr=LR_DPO, steps=10)
    assert abs(float(hist[0]["rewards/margins"])) < 1e-5
    assert float(hist[0]["loss"]) == pytest.approx(np.log(2.0), abs=1e-5)
    assert float(hist[-1]["rewards/margins"]) > 0.3, hist[-1]
    assert float(hist[-1]["loss"]) < 0.6
    assert float(hist[-1]["rewards/accuracies"]) == 1.0


def test_reward_model_ranks_held_out_pairs(rm):
    module, params = rm
    params = {**params, "score": jax.tree.map(np.zeros_like, params["score"])}  # every reward starts at 0
    held_out = rule_pairs(seed=10_000, b=64)
    score = _cached_jit(("score", id(module)), lambda p, b: pair_rewards(module, p, b))
    trained, hist = run("rm", RM_CFG, 4, module, params, lambda i: rule_pairs(seed=i), lr=LR_RM, steps=30)
    assert float(hist[0]["accuracy"]) == 0.0  # ties are not wins
    r_c, r_r = score(trained, held_out)
    accuracy = float(np.mean(np.asarray(r_c) > np.asarray(r_r)))
    assert accuracy >= 0.9, (accuracy, hist[-1]["accuracy"])


LR_SFT, LR_DPO, LR_RM = 1.0, 1.0, 0.1


# ----------------------------------------------------------------------------- (4) prompt tokens are not trained on


def _full_logprobs(module, params, prompt, pmask, comp, cmask):
    """float64 log p(token_j+1 | tokens_<=j) for every position j of prompt + completion, from full logits."""
    tokens = np.concatenate([prompt, comp], 1)
    mask = np.concatenate([pmask, cmask], 1)
    apply = _cached_jit(("apply", id(module)), lambda p, t, m: module.apply({"params": p}, t, None, m)[0])
    logits = np.asarray(apply(params, tokens, mask), np.float64)[:, :-1]
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.sum(np.exp(logits - top), -1)) + top[..., 0]
    picked = np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
    return picked - lse, mask[:, 1:]


def _sft_loss(module, params, batch):
    """The step's loss in seq-mean-token-sum (sum of token NLLs / B), before an update with lr 0."""
    _, hist = run("sft", SFTConfig(loss_agg="seq-mean-token-sum"), 1, module, params, batch, lr=0.0)
    return float(hist[0]["loss"])


def test_sft_loss_counts_completion_tokens_only(lm):
    module, params, _ = lm
    batch = sft_batch(seed=5)
    b, p = batch["prompt_tokens"].shape
    logp, valid = _full_logprobs(module, params, batch["prompt_tokens"], batch["prompt_mask"],
                                 batch["completion_tokens"], batch["completion_mask"])
    completion_only = -np.sum(logp[:, p - 1:] * batch["completion_mask"]) / b
    everything = -np.sum(logp * valid * np.concatenate([batch["prompt_mask"][:, :-1], np.ones_like(
        batch["completion_mask"])], 1)) / b
    assert everything - completion_only > 1.0  # the two readings differ by far more than the tolerance
    assert _sft_loss(module, params, batch) == pytest.approx(completion_only, rel=1e-5)


def test_moving_a_token_into_the_prompt_removes_its_term(lm):
    """The same token sequences split one token later: the loss loses exactly that token's NLL.

    Were prompt positions trained on, both splits would cover the same targets and give the same loss.
    """
    module, params, _ = lm
    a = sft_batch(seed=6, max_prompt=4, max_completion=6)  # room to move one token, same shapes
    b, p = a["prompt_tokens"].shape
    moved = {
        "prompt_tokens": np.concatenate([a["prompt_tokens"][:, 1:], a["completion_tokens"][:, :1]], 1),
        "prompt_mask": np.concatenate([a["prompt_mask"][:, 1:], a["completion_mask"][:, :1]], 1),
        "completion_tokens": np.pad(a["completion_tokens"][:, 1:], ((0, 0), (0, 1))),
        "completion_mask": np.pad(a["completion_mask"][:, 1:], ((0, 0), (0, 1))),
    }
    assert a["completion_mask"][:, 0].all() and not a["prompt_mask"][:, 0].any()
    logp, _ = _full_logprobs(module, params, a["prompt_tokens"], a["prompt_mask"], a["completion_tokens"],
                             a["completion_mask"])
    first_token_nll = -np.sum(logp[:, p - 1]) / b
    assert first_token_nll > 1.0
    diff = _sft_loss(module, params, a) - _sft_loss(module, params, moved)
    assert diff == pytest.approx(first_token_nll, rel=1e-4)


def test_dpo_loss_matches_separate_forwards(lm):
    """The concatenated, padded forward gives the DPO loss of per-response full-logit log-probs."""
    module, params, ref_params = lm
    batch = with_ref(module, ref_params, pair_batch(seed=8))
    p = batch["prompt_tokens"].shape[1]

    def summed(prm, side):
        logp, _ = _full_logprobs(module, prm, batch["prompt_tokens"], batch["prompt_mask"],
                                 batch[f"{side}_tokens"], batch[f"{side}_mask"])
        return np.sum(logp[:, p - 1:] * batch[f"{side}_mask"], -1)

    pc, pr = summed(params, "chosen"), summed(params, "rejected")
    rc, rr = summed(ref_params, "chosen"), summed(ref_params, "rejected")
    np.testing.assert_allclose(batch["ref_chosen_logps"], rc, rtol=1e-5)
    np.testing.assert_allclose(batch["ref_rejected_logps"], rr, rtol=1e-5)
    h = (pc - rc) - (pr - rr)
    _, hist = run("dpo", DPOConfig(), 1, module, params, batch, lr=0.0)
    assert float(hist[0]["loss"]) == pytest.approx(np.mean(np.log1p(np.exp(-0.1 * h))), rel=1e-5)
    assert float(hist[0]["logps/chosen"]) == pytest.approx(np.mean(pc), rel=1e-5)
    assert float(hist[0]["rewards/margins"]) == pytest.approx(np.mean(0.1 * h), rel=1e-4, abs=1e-6)
    assert float(hist[0]["rewards/accuracies"]) == pytest.approx(np.mean(h > 0))


# ----------------------------------------------------------------------------- errors a user can make


def test_config_and_batch_errors(lm):
    module, params, _ = lm
    with pytest.raises(ValueError, match=r"loss_agg='token_mean' is not a known aggregation mode. Did you mean"):
        SFTConfig(loss_agg="token_mean")
    with pytest.raises(ValueError, match=r"dpo.loss_type='simpo_' is not supported. Did you mean 'simpo'"):
        DPOConfig(loss_type="simpo_")
    with pytest.raises(ValueError, match=r"ipo_length_normalize=True only applies to loss_type='ipo'"):
        DPOConfig(ipo_length_normalize=True)
    with pytest.raises(ValueError, match=r"label_smoothing=0.2 only applies"):
        DPOConfig(loss_type="hinge", label_smoothing=0.2)
    with pytest.raises(ValueError, match=r"center_rewards_coef=-1"):
        RewardModelConfig(center_rewards_coef=-1)
    with pytest.raises(ValueError, match=r"needs ScalarHeadModel\(cfg, per_token=False\).*per_token=True"):
        make_reward_model_step(value_model(CFG), CFG)
    state = TrainState.create(params, SGD)
    with pytest.raises(KeyError, match=r"missing \['ref_chosen_logps', 'ref_rejected_logps'\].*make_reference_logps"):
        make_dpo_step(module, CFG, DPOConfig())(state, pair_batch(), jax.random.key(0))
    with pytest.raises(KeyError, match=r"sft step: batch is missing \['completion_mask'\]"):
        make_sft_step(module, CFG)(state, {k: v for k, v in sft_batch().items() if k != "completion_mask"},
                                   jax.random.key(0))
    with pytest.raises(ValueError, match=r"margin has shape \(3,\); expected \(8,\)"):
        make_reward_model_step(reward_model(CFG), CFG)(state, {**pair_batch(), "margin": np.zeros(3)},
                                                       jax.random.key(0))
