"""PPO for LMs: targets vs numpy, exact accumulation and sharding, learning, KL controller, shared backbone."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_llm.algos import ppo
from jaxrl_llm.algos.kl import KLControllerConfig
from jaxrl_llm.algos.logprobs import completion_logprobs
from jaxrl_llm.algos.policy_loss import PolicyLossConfig
from jaxrl_llm.algos.train_state import OptimizerConfig, TrainState, jit_update, make_epoch_runner
from jaxrl_llm.models import CausalLM, ModelConfig, ScalarHeadModel, create_model, init_fn_for
from jaxrl_llm.models.transformer import PolicyValueModel
from jaxrl_llm.rollout import SamplingConfig, make_sampler
from jaxrl_llm.sharding import ShardingEnv, make_mesh
from jaxrl_llm.sharding.params import param_shardings

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, qkv_bias=True)
SGD = OptimizerConfig(name="sgd", learning_rate=0.5, max_grad_norm=None)
KL_COEF = 0.05


def _env(axes):
    n = int(np.prod(list(axes.values())))
    return ShardingEnv(make_mesh(axes, devices=jax.devices()[:n]))


@pytest.fixture(scope="module")
def setup():
    """Policy, a value model with a non-zero head, the shared tree, and a sampled batch with targets."""
    env = _env({"data": 1})
    policy, pol_params, _ = create_model(CFG, jax.random.key(0), env)
    value = ScalarHeadModel(CFG, zero_init_head=False)
    _, val_params, _ = create_model(CFG, jax.random.key(7), env, module=value)
    shared = PolicyValueModel(CFG)
    shared_params = ppo.shared_params_from_policy(pol_params, CFG, score=val_params["score"])
    prompts = jnp.asarray([[0, 5, 6], [7, 8, 9], [0, 0, 10], [11, 12, 13]], jnp.int32)
    sc = SamplingConfig(max_new_tokens=6, temperature=1.0, n_samples=4, eos_token_ids=(1,), pad_token_id=0)
    ro = make_sampler(policy, CFG, sc)(pol_params, prompts, prompts > 0, jax.random.key(1))
    assert int(np.asarray(ro.mask).sum(1).min()) >= 1
    base = {"prompt_tokens": ro.prompt_tokens, "prompt_mask": ro.prompt_mask, "completion_tokens": ro.tokens,
            "completion_mask": ro.mask, "sampler_logprobs": ro.raw_logprobs}
    scores = jnp.asarray(np.random.default_rng(0).normal(size=16), jnp.float32)
    noise = jnp.asarray(np.random.default_rng(1).normal(scale=0.05, size=ro.mask.shape), jnp.float32)
    models = {"separate": (policy, value, {"policy": pol_params, "value": val_params}),
              "shared": (shared, None, shared_params)}
    batches = {}
    for name, (pm, vm, params) in models.items():
        cfg = ppo.PPOConfig(shared_backbone=name == "shared")
        b = dict(base, **jax.jit(ppo.make_rollout_fn(pm, vm, CFG, cfg))(params, base))
        b["ref_logprobs"] = (b["old_logprobs"] - 0.01 + noise) * ro.mask
        t = ppo.compute_targets(cfg, scores, b["old_logprobs"], b["ref_logprobs"], b["old_values"],
                                b["completion_mask"], KL_COEF, finished_b=ro.finished)
        batches[name] = dict(b, advantages=t["advantages"], returns=t["returns"])
    return models, batches, pol_params


_SINGLE: dict = {}  # single-device SGD results, shared by the accumulation and sharding tests
ACC_CFG = ppo.PPOConfig(loss=PolicyLossConfig(loss_agg="seq-mean-token-mean", entropy_coef=0.01, kl_coef=0.01))


def _single(models, batches, name, cfg):
    if (name, cfg) not in _SINGLE:
        _SINGLE[(name, cfg)] = _run(models, batches, name, cfg)
    return _SINGLE[(name, cfg)]


def _run(models, batches, name, cfg, env=None, params=None, opt=SGD):
    pm, vm, p = models[name]
    p = p if params is None else params
    cfg = cfg.replace(shared_backbone=name == "shared")
    state = TrainState.create(jax.tree.map(jnp.copy, p), opt)  # the step donates its state
    step = jit_update(ppo.make_ppo_step(pm, vm, CFG, cfg), state, batches[name], env)
    new, metrics = step(state, batches[name], jax.random.key(2))
    return jax.device_get(new.params), jax.device_get(metrics)


# ------------------------------------------------------------------ targets vs numpy


def _np_targets(scores, old, ref, values, mask, coef, finished, penalty, gamma, lam, whiten_adv, whiten_rew):
    mask = mask.astype(bool)
    s = np.where(finished, scores, penalty) if penalty is not None else scores.copy()
    kl = np.where(mask, old - ref, 0.0)
    r = -coef * kl
    for i in range(len(r)):
        idx = np.nonzero(mask[i])[0]
        if len(idx):
            r[i, idx[-1]] += s[i]

    def whiten(x, shift):
        v = x[mask]
        mean, var = v.mean(), v.var(ddof=1)
        out = (x - mean) / np.sqrt(var + 1e-8) + (0.0 if shift else mean)
        return np.where(mask, out, 0.0)

    if whiten_rew:
        r = whiten(r, shift=False)
    adv = np.zeros_like(r)
    for i in range(len(r)):
        next_v = next_a = 0.0
        for t in reversed(range(r.shape[1])):
            if mask[i, t]:
                delta = r[i, t] + gamma * next_v - values[i, t]
                adv[i, t] = next_a = delta + gamma * lam * next_a
                next_v = values[i, t]
    ret = np.where(mask, adv + values, 0.0)
    if whiten_adv:
        adv = whiten(adv, shift=True)
    return adv, ret, r, kl.sum(1).mean(), s


@pytest.mark.parametrize("gamma,lam,whiten_rew,whiten_adv,penalty",
                         [(1.0, 0.95, False, True, -1.0), (0.9, 0.8, True, True, None), (1.0, 1.0, False, False, 0.5)])
def test_compute_targets_matches_numpy(gamma, lam, whiten_rew, whiten_adv, penalty):
    rng = np.random.default_rng(3)
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0],
                     [0, 0, 0, 0, 0, 0]], np.float32)  # full, right-padded, gapped, one token, empty
    old, ref, values = (rng.normal(size=mask.shape).astype(np.float32) for _ in range(3))
    values[mask == 0] = 123.0  # garbage at masked positions must be ignored
    scores = rng.normal(size=5).astype(np.float32)
    finished = np.array([True, False, True, False, True])
    cfg = ppo.PPOConfig(gamma=gamma, lam=lam, whiten_rewards=whiten_rew, whiten_advantages=whiten_adv,
                        missing_eos_penalty=penalty)
    out = jax.jit(lambda *a: ppo.compute_targets(cfg, *a))(scores, old, ref, values, mask, 0.1, finished)
    adv, ret, r, kl, s = _np_targets(scores, old, ref, values, mask, 0.1, finished, penalty, gamma, lam,
                                     whiten_adv, whiten_rew)
    np.testing.assert_allclose(out["token_rewards"], r, atol=1e-5)
    np.testing.assert_allclose(out["returns"], ret, atol=1e-5)
    np.testing.assert_allclose(out["advantages"], adv, atol=1e-5)
    np.testing.assert_allclose(out["scores"], s, atol=1e-6)
    np.testing.assert_allclose(out["kl"], kl, atol=1e-6)
    np.testing.assert_allclose(out["missing_eos_frac"], 0.4, atol=1e-6)
    assert all(np.isfinite(np.asarray(v)).all() for v in out.values())


def test_missing_eos_penalty_needs_finished():
    cfg = ppo.PPOConfig(missing_eos_penalty=-1.0)
    z = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="missing_eos_penalty=-1.0 needs finished_b"):
        ppo.compute_targets(cfg, jnp.zeros(2), z, z, z, z + 1, 0.1)


# ------------------------------------------------------------------ exactness of the step


@pytest.mark.parametrize("name", ["separate", "shared"])
def test_accumulation_1_vs_4_micro_batches(setup, name):
    models, batches, _ = setup
    p1, m1 = _single(models, batches, name, ACC_CFG)
    p4, m4 = _run(models, batches, name, ACC_CFG.replace(num_micro_batches=4))
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-6), p4, p1)
    for k in ("loss", "loss_policy", "loss_value", "pg_loss", "vf_loss", "vf_clipfrac", "value_mean", "kl_ref",
              "entropy", "vf_explained_var", "returns_mean", "ratio_max", "mismatch_abs"):
        np.testing.assert_allclose(m4[k], m1[k], rtol=1e-6, atol=1e-6, err_msg=k)  # float32 sums in another order
    np.testing.assert_allclose(m1["loss"], m1["loss_policy"] + m1["loss_value"], atol=1e-7)
    assert float(m1["update_norm"]) > 0 and float(m1["vf_loss"]) > 0
    if name == "separate":  # both models receive gradient
        assert float(np.abs(p1["value"]["score"]["kernel"] - models[name][2]["value"]["score"]["kernel"]).max()) > 0


@pytest.mark.parametrize("name", ["separate", "shared"])
def test_score_forwards_in_micro_batches(setup, name):
    """Old log-probs and values (make_rollout_fn) and reference log-probs over the update's micro-batches
    (num_minibatches x num_micro_batches of strided rows) give every row its own values back in place."""
    models, batches, _ = setup
    pm, vm, params = models[name]
    b = batches[name]
    cfg = ppo.PPOConfig(shared_backbone=name == "shared", num_minibatches=2, num_micro_batches=4)
    assert ppo.score_micro_batches(cfg) == 8
    out = jax.jit(ppo.make_rollout_fn(pm, vm, CFG, cfg))(params, b)
    np.testing.assert_allclose(out["old_logprobs"], b["old_logprobs"], atol=1e-6)
    np.testing.assert_allclose(out["old_values"], b["old_values"], atol=1e-6)
    policy_params = params["policy"] if name == "separate" else params
    whole = jax.jit(ppo.make_logprob_fn(pm, CFG))(policy_params, b)
    parts = jax.jit(ppo.make_logprob_fn(pm, CFG, num_micro=4))(policy_params, b)
    np.testing.assert_allclose(parts, whole, atol=1e-6)


@pytest.mark.parametrize("name,axes", [("separate", {"data": 8}), ("separate", {"data": 1, "fsdp": 4, "tensor": 2}),
                                       ("shared", {"data": 2, "fsdp": 2, "tensor": 2})])
def test_sharded_update_equals_single_device(setup, name, axes):
    models, batches, _ = setup
    cfg = ACC_CFG
    ref_p, ref_m = _single(models, batches, name, cfg)
    env = _env(axes)
    pm, vm, params = models[name]
    if name == "separate":
        shardings = {"policy": param_shardings(init_fn_for(CausalLM(CFG)), env)[1],
                     "value": param_shardings(init_fn_for(vm), env)[1]}
    else:
        shardings = param_shardings(init_fn_for(pm), env)[1]
    p, m = _run(models, batches, name, cfg, env=env, params=jax.device_put(params, shardings))
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=2e-6), p, ref_p)
    for k in ("loss", "pg_loss", "vf_loss", "kl_ref", "entropy", "vf_explained_var"):
        np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-6, atol=1e-6, err_msg=k)


# ------------------------------------------------------------------ learning


def test_ppo_improves_on_a_fixed_batch(setup):
    """Epochs x minibatches on one rollout batch: surrogate and value loss fall; A > 0 rows gain log-prob."""
    models, batches, pol_params = setup
    policy = models["separate"][0]
    value = ScalarHeadModel(CFG)  # default: zero-initialised head
    _, val_params, _ = create_model(CFG, jax.random.key(9), _env({"data": 1}), module=value)
    cfg = ppo.PPOConfig(num_minibatches=2, epochs=4)
    b = dict(batches["separate"])
    params = {"policy": pol_params, "value": val_params}
    b.update(jax.jit(ppo.make_rollout_fn(policy, value, CFG, cfg))(params, b))
    assert float(jnp.abs(b["old_values"]).max()) == 0.0
    scores = jnp.asarray(np.random.default_rng(0).normal(size=16), jnp.float32)
    t = ppo.compute_targets(cfg, scores, b["old_logprobs"], b["ref_logprobs"], b["old_values"],
                            b["completion_mask"], 0.0)
    b.update(advantages=t["advantages"], returns=t["returns"])
    state = TrainState.create(jax.tree.map(jnp.copy, params), OptimizerConfig(learning_rate=3e-3, eps=1e-5))
    step = ppo.make_ppo_step(policy, value, CFG, cfg)
    run = jit_update(make_epoch_runner(step, cfg.num_minibatches, cfg.epochs), state, b)
    new, metrics = run(state, b, jax.random.key(3))
    pg, vf = np.asarray(metrics["pg_loss"]), np.asarray(metrics["vf_loss"])
    assert pg.shape == (8,) and pg[-2:].mean() < pg[:2].mean()
    assert vf[-2:].mean() < vf[:2].mean()
    assert float(np.asarray(metrics["skipped"]).sum()) == 0
    logp_fn = jax.jit(ppo.make_logprob_fn(policy, CFG))
    gain = np.asarray((logp_fn(new.params["policy"], b) - b["old_logprobs"]).sum(-1))
    m = np.asarray(b["completion_mask"], np.float32)
    seq_adv = np.asarray(b["advantages"]).sum(-1) / m.sum(-1)
    assert gain[seq_adv > 0].mean() > 0 > gain[seq_adv < 0].mean()


# ------------------------------------------------------------------ KL controller


def test_kl_controller_direction():
    adaptive = ppo.PPOConfig(kl=KLControllerConfig(kind="adaptive", init_coef=0.1, target=1.0, horizon=100))
    up = ppo.update_kl_coef(adaptive, 0.1, observed_kl=2.0, n_steps=16)
    down = ppo.update_kl_coef(adaptive, 0.1, observed_kl=0.5, n_steps=16)
    np.testing.assert_allclose(up, 0.1 * (1 + 0.2 * 16 / 100), rtol=1e-6)  # error clipped at +0.2
    np.testing.assert_allclose(down, 0.1 * (1 - 0.2 * 16 / 100), rtol=1e-6)  # -0.5 clipped at -0.2
    np.testing.assert_allclose(ppo.update_kl_coef(adaptive, 0.1, 1.0, 16), 0.1, rtol=1e-6)
    fixed = ppo.PPOConfig()
    assert float(ppo.update_kl_coef(fixed, 0.05, 100.0, 16)) == pytest.approx(0.05)
    # the observed KL comes from compute_targets: positive when the policy moved above the reference
    old = jnp.full((2, 3), -1.0)
    t = ppo.compute_targets(adaptive, jnp.zeros(2), old, old - 1.0, jnp.zeros((2, 3)), jnp.ones((2, 3)), 0.1)
    np.testing.assert_allclose(t["kl"], 3.0, rtol=1e-6)
    assert float(ppo.update_kl_coef(adaptive, 0.1, t["kl"], 2)) > 0.1


# ------------------------------------------------------------------ models and helpers


@pytest.mark.parametrize("tied", [True, False])
def test_policy_value_model_loads_a_causal_lm(tied):
    cfg = CFG.replace(tie_word_embeddings=tied)
    env = _env({"data": 1})
    lm, lm_params, _ = create_model(cfg, jax.random.key(4), env)
    pv = PolicyValueModel(cfg)
    shapes = jax.eval_shape(lambda: pv.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    expected = {**jax.tree.map(jnp.shape, lm_params), "score": {"kernel": (32, 1), "bias": (1,)}}
    import flax.linen as nn
    assert jax.tree.map(jnp.shape, nn.unbox(shapes)) == expected
    params = ppo.shared_params_from_policy(lm_params, cfg)
    tokens = jnp.asarray([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]], jnp.int32)
    mask = tokens > 0
    batch = {"prompt_tokens": tokens[:, :3], "prompt_mask": mask[:, :3], "completion_tokens": tokens[:, 3:],
             "completion_mask": mask[:, 3:]}

    @jax.jit
    def both(params, lm_params):
        hidden, values = pv.apply({"params": params}, tokens, None, mask)
        logits = pv.apply({"params": params}, hidden, method=PolicyValueModel.logits)
        ref, _ = lm.apply({"params": lm_params}, tokens, None, mask)
        return (logits, values, ref, ppo.make_logprob_fn(pv, cfg)(params, batch),
                ppo.make_logprob_fn(lm, cfg)(lm_params, batch))

    logits, values, ref, logp_shared, logp_lm = both(params, lm_params)
    np.testing.assert_allclose(logits, ref, atol=1e-6)
    assert values.dtype == jnp.float32 and float(jnp.abs(values).max()) == 0.0
    # completion log-probs agree; the policy tree comes back out for the sampler
    np.testing.assert_allclose(logp_shared, logp_lm, atol=1e-6)
    shared_cfg = ppo.PPOConfig(shared_backbone=True)
    assert jax.tree.structure(ppo.policy_params(shared_cfg, params)) == jax.tree.structure(lm_params)


def test_value_positions_and_reward_init(setup):
    models, batches, _ = setup
    policy, value, params = models["separate"]
    b = batches["separate"]
    p = b["prompt_tokens"].shape[1]
    tokens = jnp.concatenate([b["prompt_tokens"], b["completion_tokens"]], 1)
    mask = jnp.concatenate([b["prompt_mask"], b["completion_mask"]], 1)
    full = jax.jit(value.apply)({"params": params["value"]}, tokens, None, mask)
    n = b["completion_tokens"].shape[1]
    expect = full[:, p - 1:p - 1 + n] * b["completion_mask"]
    np.testing.assert_allclose(jax.jit(ppo.make_value_fn(value, CFG))(params["value"], b), expect, atol=1e-6)
    np.testing.assert_allclose(b["old_values"], expect, atol=1e-6)
    logp, _ = jax.jit(lambda p, b: completion_logprobs(
        policy, p, CFG, b["prompt_tokens"], b["prompt_mask"], b["completion_tokens"], b["completion_mask"],
        with_entropy=False))(params["policy"], b)
    np.testing.assert_allclose(b["old_logprobs"], logp, atol=1e-6)
    # a reward model's tree initialises the value model (a copy, never aliased)
    v0 = ppo.init_value_from_reward(params["value"])
    assert v0["score"]["kernel"] is not params["value"]["score"]["kernel"]
    np.testing.assert_array_equal(v0["score"]["kernel"], params["value"]["score"]["kernel"])
    with pytest.raises(ValueError, match="expected a ScalarHeadModel params tree"):
        ppo.init_value_from_reward(params["policy"])


def test_separate_optimizers_use_their_own_learning_rates(setup):
    params = setup[0]["separate"][2]
    tx = ppo.separate_optimizers(OptimizerConfig(name="sgd", learning_rate=0.0, max_grad_norm=None),
                                 OptimizerConfig(name="sgd", learning_rate=0.5, max_grad_norm=1.0))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    assert float(optax.tree.norm(updates["policy"])) == 0.0
    np.testing.assert_allclose(optax.tree.norm(updates["value"]), 0.5, rtol=1e-5)  # clipped to norm 1 per model


# ------------------------------------------------------------------ validation


def test_config_validation_messages(setup):
    for kw, msg in [({"gamma": 1.5}, "PPOConfig.gamma=1.5"), ({"lam": -0.1}, "PPOConfig.lam=-0.1"),
                    ({"reward_kl_estimator": "k4"}, "PPOConfig.reward_kl_estimator='k4'"),
                    ({"reward_kl_clamp": 0.0}, "PPOConfig.reward_kl_clamp=0.0"),
                    ({"vf_coef": -1.0}, "PPOConfig.vf_coef=-1.0"), ({"value_clip": 0.0}, "PPOConfig.value_clip=0.0"),
                    ({"temperature": 0.0}, "PPOConfig.temperature=0.0"), ({"epochs": 0}, "PPOConfig.epochs=0"),
                    ({"num_micro_batches": 0}, "PPOConfig.num_micro_batches=0"),
                    ({"kl": 0.05}, "PPOConfig.kl=0.05: must be a KLControllerConfig")]:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(".", r"\.")):
            ppo.PPOConfig(**kw)
    cfg = ppo.PPOConfig()
    assert cfg.loss.loss_agg == "token-mean" and cfg.loss.clip_eps_low == 0.2 and cfg.vf_coef == 0.1
    models, batches, _ = setup
    policy, value, _ = models["separate"]
    with pytest.raises(ValueError, match="per_token=True"):
        ppo.make_ppo_step(policy, ScalarHeadModel(CFG, per_token=False), CFG, cfg)
    with pytest.raises(ValueError, match="shared_backbone=True needs policy_module=PolicyValueModel"):
        ppo.make_ppo_step(policy, None, CFG, cfg.replace(shared_backbone=True))
    step = ppo.make_ppo_step(policy, value, CFG, cfg)
    bad = {k: v for k, v in batches["separate"].items() if k != "returns"}
    with pytest.raises(ValueError, match=r"PPO batch is missing \['returns'\]"):
        step(None, bad, jax.random.key(0))
