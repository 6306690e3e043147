"""The GRPO-family update step: exact accumulation, sharding, invariants, variants, learning."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.algos import grpo
from jaxrl_llm.algos.aggregation import LOSS_AGG_MODES
from jaxrl_llm.algos.policy_loss import PolicyLossConfig
from jaxrl_llm.algos.train_state import OptimizerConfig, TrainState, jit_update, make_epoch_runner
from jaxrl_llm.models import CausalLM, ModelConfig, create_model
from jaxrl_llm.rollout import SamplingConfig, make_sampler
from jaxrl_llm.sharding import ShardingEnv, make_mesh

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, qkv_bias=True)
G = 4
SGD = OptimizerConfig(name="sgd", learning_rate=0.5, max_grad_norm=None)


def _env(axes):
    n = int(np.prod(list(axes.values())))
    return ShardingEnv(make_mesh(axes, devices=jax.devices()[:n]))


@pytest.fixture(scope="module")
def setup():
    env = _env({"data": 1})
    module, params, _ = create_model(CFG, jax.random.key(0), env)
    prompts = jnp.asarray([[0, 5, 6], [7, 8, 9], [0, 0, 10], [11, 12, 13]], jnp.int32)
    pmask = prompts > 0
    sc = SamplingConfig(max_new_tokens=6, temperature=1.0, n_samples=G, eos_token_ids=(1,), pad_token_id=0)
    ro = make_sampler(module, CFG, sc)(params, prompts, pmask, jax.random.key(1))
    rewards = jnp.asarray(np.random.default_rng(0).normal(size=16), jnp.float32)
    batch = {"prompt_tokens": ro.prompt_tokens, "prompt_mask": ro.prompt_mask,
             "completion_tokens": ro.tokens, "completion_mask": ro.mask,
             "sampler_logprobs": ro.raw_logprobs}
    logp_fn = jax.jit(grpo.make_logprob_fn(module, CFG))
    batch["old_logprobs"] = logp_fn(params, batch)
    batch["ref_logprobs"] = batch["old_logprobs"] - 0.01  # a reference slightly off the policy
    assert int(np.asarray(ro.mask).sum(1).min()) >= 1
    return module, params, batch, rewards


def _run(module, params, batch, cfg, env=None, opt=SGD):
    state = TrainState.create(jax.tree.map(jnp.copy, params), opt)  # the step donates its state
    step = jit_update(grpo.make_grpo_step(module, CFG, cfg), state, batch, env)
    new, metrics = step(state, batch, jax.random.key(2))
    return jax.device_get(new.params), jax.device_get(metrics)


_SINGLE: dict = {}  # single-device SGD steps on the setup batch, shared by the tests that compare with one


def _single(module, params, batch, cfg):
    """`_run` on one device, computed once per GRPO config (the setup's batch with cfg's advantages)."""
    if cfg not in _SINGLE:
        _SINGLE[cfg] = _run(module, params, batch, cfg)
    return _SINGLE[cfg]


def _with_adv(cfg, batch, rewards):
    adv = grpo.compute_advantages(cfg, rewards, batch["completion_mask"], old_logprobs_bn=batch["old_logprobs"],
                                  ref_logprobs_bn=batch["ref_logprobs"])
    return dict(batch, advantages=adv)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_accumulation_1_vs_4_micro_batches(setup, mode):
    module, params, batch, rewards = setup
    cfg = grpo.grpo(G, beta=0.04).replace(loss=PolicyLossConfig(loss_agg=mode, kl_coef=0.04, entropy_coef=0.01))
    b = _with_adv(cfg, batch, rewards)
    p1, m1 = _run(module, params, b, cfg)
    p4, m4 = _run(module, params, b, cfg.replace(num_micro_batches=4))
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-6), p4, p1)
    for k in ("loss", "pg_loss", "kl_loss", "entropy", "clipfrac_low", "ratio_mean", "mismatch_abs"):
        np.testing.assert_allclose(m4[k], m1[k], rtol=1e-6, atol=1e-6, err_msg=k)  # float32 sums in another order
    np.testing.assert_allclose(m4["ratio_max"], m1["ratio_max"], atol=1e-6)
    assert float(m1["update_norm"]) > 0


def test_logprob_forward_in_micro_batches(setup):
    """The old/reference log-prob forward over micro-batches of rows in turn gives every row its own
    log-probs back in place (the rows are strided across micro-batches)."""
    module, params, batch, _ = setup
    whole = np.asarray(batch["old_logprobs"])
    for m in (2, 4, 16):
        parts = np.asarray(jax.jit(grpo.make_logprob_fn(module, CFG, num_micro=m))(params, batch))
        np.testing.assert_allclose(parts, whole, atol=1e-6, err_msg=f"num_micro={m}")
    with pytest.raises(ValueError, match="not divisible by num_micro_batches=3"):
        grpo.make_logprob_fn(module, CFG, num_micro=3)(params, batch)


@pytest.mark.parametrize("axes", [{"data": 8}, {"data": 1, "fsdp": 4, "tensor": 2}])
def test_sharded_update_equals_single_device(setup, axes):
    module, params, batch, rewards = setup
    cfg = grpo.grpo(G)
    b = _with_adv(cfg, batch, rewards)
    ref_p, ref_m = _single(module, params, b, cfg)
    env = _env(axes)
    from jaxrl_llm.sharding.params import param_shardings
    from jaxrl_llm.models import init_fn_for
    _, shardings = param_shardings(init_fn_for(CausalLM(CFG)), env)
    sharded = jax.device_put(params, shardings)
    p, m = _run(module, sharded, b, cfg, env=env)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=2e-6), p, ref_p)
    np.testing.assert_allclose(m["loss"], ref_m["loss"], atol=1e-6)


def test_bf16_matmuls_update_sharded_equals_single_device(setup):
    """model.matmul_dtype="bfloat16" (2-D bf16 matmuls with a custom backward) under fsdp x tensor
    sharding: the same step as on one device, and close to the float32 step."""
    _, params, batch, rewards = setup
    mcfg = CFG.replace(matmul_dtype="bfloat16")
    module = CausalLM(mcfg)
    cfg = grpo.grpo(G, beta=0.04).replace(num_micro_batches=2)
    b = _with_adv(cfg, batch, rewards)

    def run(env=None, p=params, m=module, c=mcfg):
        state = TrainState.create(jax.tree.map(jnp.copy, p), SGD)
        step = jit_update(grpo.make_grpo_step(m, c, cfg), state, b, env)
        new, metrics = step(state, b, jax.random.key(2))
        return jax.device_get(new.params), jax.device_get(metrics)

    ref_p, ref_m = run()
    env = _env({"data": 1, "fsdp": 4, "tensor": 2})
    from jaxrl_llm.models import init_fn_for
    from jaxrl_llm.sharding.params import param_shardings
    _, shardings = param_shardings(init_fn_for(module), env)
    p, m = run(env, jax.device_put(params, shardings))
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=2e-5), p, ref_p)
    np.testing.assert_allclose(m["loss"], ref_m["loss"], atol=1e-5)
    f32_p, _ = run(m=CausalLM(CFG), c=CFG)
    def max_diff(x, y):
        return max(float(np.abs(np.asarray(a) - np.asarray(c)).max()) for a, c in zip(jax.tree.leaves(x),
                                                                                       jax.tree.leaves(y)))
    moved, off = max_diff(ref_p, params), max_diff(ref_p, f32_p)
    assert 0 < off < 0.05 * moved  # bf16 products: close to, not equal to, the float32 step


def test_zero_gradient_when_group_rewards_are_equal(setup):
    module, params, batch, _ = setup
    cfg = grpo.grpo(G, beta=0.0)
    equal = jnp.repeat(jnp.asarray([1.0, -2.0, 0.5, 3.0]), G)
    b = _with_adv(cfg, batch, equal)
    assert float(jnp.abs(b["advantages"]).max()) == 0.0
    p, m = _run(module, params, b, cfg, opt=OptimizerConfig(learning_rate=1e-2, max_grad_norm=None))
    assert float(m["grad_norm"]) == 0.0 and float(m["update_norm"]) == 0.0
    jax.tree.map(lambda a, c: np.testing.assert_array_equal(a, c), p, jax.device_get(params))


@pytest.mark.parametrize("name", sorted(grpo.VARIANTS))
def test_every_variant_takes_a_finite_step(setup, name):
    module, params, batch, rewards = setup
    cfg = grpo.VARIANTS[name](6, group_size=G) if name == "dr_grpo" else grpo.VARIANTS[name](group_size=G)
    b = _with_adv(cfg, batch, rewards)
    _, m = _run(module, params, b, cfg, opt=OptimizerConfig(learning_rate=1e-3))
    assert all(np.isfinite(v).all() for v in m.values()), m
    assert float(m["skipped"]) == 0 and float(m["update_norm"]) > 0


def test_variant_settings_follow_the_papers():
    assert grpo.dapo().loss.clip_eps_high == 0.28 and grpo.dapo().loss.loss_agg == "token-mean"
    assert grpo.dapo().loss.kl_coef == 0.0 and grpo.dapo().filter_zero_std_groups
    assert grpo.dr_grpo(512).scale_rewards == "none" and grpo.dr_grpo(512).loss.norm_length == 512
    assert grpo.gspo().loss.ratio_level == "sequence" and grpo.gspo().loss.clip_eps_high == 4e-4
    assert grpo.grpo().loss.kl_coef == 0.04 and grpo.grpo().loss.loss_agg == "seq-mean-token-mean"
    with pytest.raises(ValueError, match="GRPOConfig.advantage_estimator='ppo'"):
        grpo.GRPOConfig(advantage_estimator="ppo")
    with pytest.raises(ValueError, match="GRPOConfig.group_size=1"):
        grpo.GRPOConfig(group_size=1)


def test_advantages_and_dynamic_sampling_filter():
    rewards = jnp.asarray([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    mask = jnp.ones((8, 3), bool)
    adv = grpo.compute_advantages(grpo.grpo(4), rewards, mask)
    std = np.std([1, 0, 1, 0], ddof=1)
    np.testing.assert_allclose(adv[:4, 0], (np.array([1, 0, 1, 0]) - 0.5) / (std + 1e-6), rtol=1e-6)
    assert float(jnp.abs(adv[4:]).max()) == 0.0
    np.testing.assert_array_equal(grpo.nonzero_std_groups(rewards, 4), [True] * 4 + [False] * 4)
    loo = grpo.compute_advantages(grpo.rloo(4), rewards, mask)
    np.testing.assert_allclose(loo[0, 0], 1.0 - 1.0 / 3, rtol=1e-6)


def test_policy_improves_on_a_fixed_batch(setup):
    """Several epochs on one batch: the surrogate falls and positive-advantage completions gain log-prob."""
    module, params, batch, rewards = setup
    cfg = grpo.grpo(G, beta=0.0).replace(num_minibatches=2, epochs=4)
    b = _with_adv(cfg, batch, rewards)
    state = TrainState.create(jax.tree.map(jnp.copy, params), OptimizerConfig(learning_rate=3e-3, max_grad_norm=1.0))
    run = jit_update(make_epoch_runner(grpo.make_grpo_step(module, CFG, cfg), 2, 4), state, b)
    new, metrics = run(state, b, jax.random.key(3))
    pg = np.asarray(metrics["pg_loss"])
    assert pg.shape == (8,) and pg[-2:].mean() < pg[:2].mean()
    logp_fn = jax.jit(grpo.make_logprob_fn(module, CFG))
    gain = np.asarray((logp_fn(new.params, b) - b["old_logprobs"]).sum(-1))
    seq_adv = np.asarray(b["advantages"][:, 0])
    assert gain[seq_adv > 0].mean() > 0 > gain[seq_adv < 0].mean()


def _computations(hlo: str) -> dict[str, str]:
    """Compiled HLO text -> {computation name: its body text}."""
    comps, name, lines = {}, None, []
    for line in hlo.splitlines():
        if name is None and line and not line[0].isspace() and line.rstrip().endswith("{"):
            name, lines = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%"), []
        elif name is not None and line == "}":
            comps[name] = "\n".join(lines)
            name = None
        elif name is not None:
            lines.append(line)
    return comps


@pytest.mark.parametrize("axes", [{"data": 4}, {"data": 8}])
def test_data_parallel_micro_batches_all_reduce_once(setup, axes):
    """Pure data parallelism with micro-batches: each device sums its own micro-batches' gradients and one
    all-reduce follows the micro-batch loop (none inside it); the step equals one device's."""
    module, params, batch, rewards = setup
    cfg = grpo.grpo(G).replace(num_micro_batches=2)
    b = _with_adv(cfg, batch, rewards)
    ref_p, ref_m = _single(module, params, b, cfg)
    env = _env(axes)
    state = TrainState.create(jax.tree.map(jnp.copy, params), SGD)
    step = jit_update(grpo.make_grpo_step(module, CFG, cfg), state, b, env)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, b, jax.random.key(2)))
    compiled = step.jitted.lower(*shapes).compile()
    comps = _computations(compiled.as_text())
    inside, todo = set(), [c for text in comps.values() for c in re.findall(r"body=%?([\w.\-]+)", text)]
    while todo:  # every computation a while body runs, transitively
        c = todo.pop()
        if c in comps and c not in inside:
            inside.add(c)
            todo += re.findall(r"(?:body|condition|calls|to_apply|branch_computations)=\{?%?([\w.\-]+)", comps[c])
    assert inside, "expected the micro-batch loop"
    assert any(" all-reduce(" in t for t in comps.values())
    assert not [c for c in inside if " all-reduce(" in comps[c]], "an all-reduce inside the micro-batch loop"
    # The program inspected above is the one that runs: its inputs placed as the update places them.
    new, m = compiled(*jax.device_put((state, b, jax.random.key(2)), compiled.input_shardings[0]))
    p, m = jax.device_get(new.params), jax.device_get(m)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=2e-6), p, ref_p)
    for k in ("loss", "grad_norm", "clip_frac"):
        if k in ref_m:
            np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-6, atol=1e-6, err_msg=k)
