"""Each prompt's forward once for its samples (`logprobs.completion_logprobs(prompt_group=g)`, the GRPO
learner's `share_prompt_forward`): the same log-probs, entropies, gradients and update as one forward per row."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.algos import grpo
from jaxrl_llm.algos.logprobs import completion_logprobs
from jaxrl_llm.algos.policy_loss import PolicyLossConfig
from jaxrl_llm.algos.train_state import (OptimizerConfig, TrainState, make_epoch_runner, map_micro, merge_micro,
                                         prompt_unit, split_micro)
from jaxrl_llm.models import CausalLM, ModelConfig, create_model, lora
from jaxrl_llm.sharding import ShardingEnv, make_mesh
from jaxrl_llm.train.stages.grpo import GRPOLearner, shared_prompt_unit

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, qkv_bias=True)
G, PROMPTS, P, N = 4, 3, 5, 6


def _env(axes):
    n = int(np.prod(list(axes.values())))
    return ShardingEnv(make_mesh(axes, devices=jax.devices()[:n]))


def _batch(seed=0, prompts=PROMPTS):
    """Prompt-major rows: prompt i (left-padded by i tokens) owns rows i*G .. i*G+G-1; ragged completions,
    one row's context mask longer than its trained mask (an observation)."""
    rng = np.random.default_rng(seed)
    pt = rng.integers(2, CFG.vocab_size, (prompts, P))
    pm = np.arange(P)[None, :] >= (np.arange(prompts) % (P - 1))[:, None]
    pt = np.where(pm, pt, 0)
    b = prompts * G
    lengths = rng.integers(1, N + 1, b)
    cm = np.arange(N)[None, :] < lengths[:, None]
    ctx = cm.copy()
    ctx[1] = True
    return {"prompt_tokens": jnp.asarray(np.repeat(pt, G, 0), jnp.int32),
            "prompt_mask": jnp.asarray(np.repeat(pm, G, 0)),
            "completion_tokens": jnp.asarray(rng.integers(2, CFG.vocab_size, (b, N)), jnp.int32),
            "completion_mask": jnp.asarray(cm), "completion_context_mask": jnp.asarray(ctx)}


def _logprobs(module, params, cfg, batch, group, **kw):
    return completion_logprobs(module, params, cfg, batch["prompt_tokens"], batch["prompt_mask"],
                               batch["completion_tokens"], batch["completion_mask"],
                               context_mask=batch.get("completion_context_mask"), prompt_group=group, chunk=4, **kw)


def _loss_and_grad(module, params, cfg, batch, group):
    def loss(prm):
        lp, ent = _logprobs(module, prm, cfg, batch, group)
        w = jnp.linspace(-1.0, 1.0, lp.size).reshape(lp.shape)  # every row and position its own weight
        return jnp.sum(lp * w) + 0.3 * jnp.sum(ent * w), (lp, ent)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def _close_trees(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert np.allclose(x, y, rtol=rtol, atol=rtol * max(np.abs(y).max(), 1e-6)), np.abs(x - y).max()


@pytest.mark.parametrize("cfg", [CFG, CFG.replace(tie_word_embeddings=False, qk_norm=True, qkv_bias=False)],
                         ids=["tied", "untied-qknorm"])
def test_shared_prompt_forward_equals_one_forward_per_row(cfg):
    module, params, _ = create_model(cfg, jax.random.key(0), _env({"data": 1}))
    batch = _batch()
    (l1, (lp1, ent1)), g1 = _loss_and_grad(module, params, cfg, batch, 1)
    for group in (G, 2):  # the whole group, or half of it per forward
        (lg, (lpg, entg)), gg = _loss_and_grad(module, params, cfg, batch, group)
        np.testing.assert_allclose(lpg, lp1, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(entg, ent1, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lg, l1, rtol=1e-5)
        _close_trees(gg, g1, 1e-4)
    mask = np.asarray(batch["completion_mask"])
    assert np.all(np.asarray(lp1)[~mask] == 0) and np.all(np.asarray(lp1)[mask] < 0)


def test_a_prompt_group_that_does_not_divide_the_rows_is_refused():
    module, params, _ = create_model(CFG, jax.random.key(0), _env({"data": 1}))
    with pytest.raises(ValueError, match="prompt_group=5 does not divide the batch's 12 rows"):
        _logprobs(module, params, CFG, _batch(), 5)


def test_shared_prompt_forward_on_a_mesh():
    """Rows over `data`, parameters over `fsdp` and `tensor`: the shared forward gives the single device's
    log-probs."""
    module, params, _ = create_model(CFG, jax.random.key(0), _env({"data": 1}))
    batch = _batch(prompts=4)
    want = np.asarray(_logprobs(module, params, CFG, batch, 1)[0])
    env = _env({"data": 2, "fsdp": 2, "tensor": 2})
    module_m, params_m, _ = create_model(CFG, jax.random.key(0), env)

    @jax.jit
    def run(prm, b):
        with env.activate():
            return _logprobs(module_m, prm, CFG, b, G)[0]
    np.testing.assert_allclose(np.asarray(run(params_m, batch)), want, rtol=1e-5, atol=1e-5)


def test_shared_prompt_forward_with_lora_adapters():
    """Adapters (trained) on a frozen base: the same log-probs and adapter gradients; with LoRA dropout the
    shared forward draws its masks from the training forward's dropout key too (it runs and differs from
    the forward without dropout)."""
    env = _env({"data": 1})
    spec = lora.LoraConfig(rank=4, alpha=8.0)
    cfg = CFG.replace(lora=spec)
    module, base, _ = create_model(CFG, jax.random.key(0), env)
    adapters = lora.init_adapters(CausalLM(cfg), jax.random.key(1), env)
    # non-zero B matrices, so the adapters change the output
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(p) else x, adapters)
    module = CausalLM(cfg)
    batch = _batch()

    def grads(group):
        def loss(ad):
            return jnp.sum(_logprobs(module, lora.merge_trees(ad, base), cfg, batch, group)[0])
        return jax.jit(jax.value_and_grad(loss))(adapters)
    (l1, g1), (lg, gg) = grads(1), grads(G)
    np.testing.assert_allclose(lg, l1, rtol=1e-5)
    _close_trees(gg, g1, 1e-4)

    from jaxrl_llm.algos.train_state import _with_dropout  # what `accumulate` wraps a loss in
    dcfg = CFG.replace(lora=lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5))
    dmodule = CausalLM(dcfg)
    params = lora.merge_trees(adapters, base)
    dropped = np.asarray(_with_dropout(lambda prm, b, rng: _logprobs(dmodule, prm, dcfg, b, G)[0])(
        params, batch, jax.random.key(7)))
    plain = np.asarray(_logprobs(dmodule, params, dcfg, batch, G)[0])
    assert np.all(np.isfinite(dropped)) and not np.allclose(dropped, plain)


def test_units_of_rows_in_micro_batches_and_epochs():
    x = jnp.arange(24)
    micro = split_micro({"x": x}, 3, unit=4)["x"]
    assert np.asarray(micro).tolist() == [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 16, 17, 18, 19],
                                          [8, 9, 10, 11, 20, 21, 22, 23]]
    assert np.array_equal(merge_micro(micro, 4), x)
    assert np.array_equal(split_micro({"x": x}, 3)["x"][0], np.arange(0, 24, 3))  # unit 1: rows strided
    assert np.array_equal(map_micro(lambda b: b["x"] * 2, {"x": x}, 3, unit=4), x * 2)
    with pytest.raises(ValueError, match="not divisible by num_micro_batches=4 x unit=4"):
        split_micro({"x": x}, 4, unit=4)
    # prompt_unit: the largest divisor of the group whose units split evenly into the parts
    assert prompt_unit(8, 64, 4) == 8 and prompt_unit(8, 16, 4) == 4 and prompt_unit(8, 8, 8) == 1
    assert prompt_unit(6, 12, 4) == 3 and prompt_unit(1, 8, 2) == 1 and prompt_unit(4, 4, 8) == 1  # 4 rows, 8 parts

    def step_out(state, minibatch, rng):  # each update's rows leave the scan as its metric
        return state, {"rows": minibatch["x"]}
    run = jax.jit(make_epoch_runner(step_out, num_minibatches=3, epochs=2, unit=4))
    _, metrics = run(_state(), {"x": x}, jax.random.key(0))
    rows = np.asarray(metrics["rows"])  # [epochs x minibatches, 8]
    assert rows.shape == (6, 8)
    for epoch in (rows[:3], rows[3:]):
        assert sorted(epoch.ravel().tolist()) == list(range(24))
        units = epoch.reshape(-1, 4)
        assert np.all(units[:, 0] % 4 == 0) and np.all(np.diff(units, axis=1) == 1)  # whole units, in order
    assert not np.array_equal(rows[:3], rows[3:])  # each epoch its own permutation


def _state():
    """The smallest state `make_epoch_runner` accepts: it reads and sets `frozen` only."""
    from flax import struct

    @struct.dataclass
    class S:
        frozen: object = None
    return S()


def test_learner_shares_the_prompt_forward_with_the_same_update():
    """GRPOLearner with the stage's rows (unit = group_size: the old-policy and reference forwards and the
    update share each prompt's forward) against rows unknown (unit 1): the same old and reference log-probs,
    and one update over two micro-batches to the same parameters and loss."""
    env = _env({"data": 1})
    module, params, _ = create_model(CFG, jax.random.key(0), env)
    batch = _batch(prompts=4)
    rows = 4 * G
    algo = grpo.GRPOConfig(group_size=G, num_micro_batches=2, logprob_chunk=4, loss=PolicyLossConfig(kl_coef=0.1))
    assert shared_prompt_unit(algo, rows, env) == G and shared_prompt_unit(algo, None, env) == 1
    assert shared_prompt_unit(algo.replace(share_prompt_forward=False), rows, env) == 1
    assert shared_prompt_unit(algo, rows, _env({"data": 4})) == 2  # 16 rows in 2 x 4 parts: halves of groups
    rewards = jnp.asarray(np.random.default_rng(3).normal(size=rows), jnp.float32)
    out = {}
    for name, r in (("shared", rows), ("per_row", None)):
        learner = GRPOLearner(module, CFG, algo, env, old_logprobs=True, rows=r)
        assert learner.prompt_unit == (G if r else 1)
        state = TrainState.create(jax.tree.map(jnp.copy, params),
                                  OptimizerConfig(name="sgd", learning_rate=0.5, max_grad_norm=None))
        exp = SimpleNamespace(batch=dict(batch), rewards=rewards)
        ub = jax.device_get(learner.update_batch(state, params, exp))
        new, metrics = learner(state, params, exp, jax.random.key(5))
        out[name] = (ub, jax.device_get(new.params), metrics)
    (ub_s, p_s, m_s), (ub_r, p_r, m_r) = out["shared"], out["per_row"]
    for k in ("old_logprobs", "ref_logprobs", "advantages"):
        np.testing.assert_allclose(ub_s[k], ub_r[k], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(m_s["loss"]), float(m_r["loss"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m_s["grad_norm"]), float(m_r["grad_norm"]), rtol=1e-4)
    assert float(m_s["grad_norm"]) > 1e-3
    _close_trees(p_s, p_r, 1e-5)


def test_update_step_with_units_on_a_data_parallel_mesh():
    """`make_grpo_step(prompt_unit=4)` where each of 2 data-parallel devices sums its own micro-batches
    (`train_state._accumulate_per_device`: a device's rows are whole units): the single device's update with
    one forward per row."""
    from jaxrl_llm.algos.train_state import jit_update
    module, params, _ = create_model(CFG, jax.random.key(0), _env({"data": 1}))
    batch = _batch(prompts=4)
    rows = 4 * G
    rng = np.random.default_rng(4)
    adv = rng.normal(size=(rows, 1)) * np.asarray(batch["completion_mask"])
    batch = {**batch, "advantages": jnp.asarray(adv, jnp.float32),
             "old_logprobs": jnp.asarray(rng.normal(scale=0.1, size=(rows, N)) - 2.0, jnp.float32)}
    algo = grpo.GRPOConfig(group_size=G, num_micro_batches=2, logprob_chunk=4, loss=PolicyLossConfig(kl_coef=0.0))
    opt = OptimizerConfig(name="sgd", learning_rate=0.5, max_grad_norm=None)

    def run(env, unit, prm):
        state = TrainState.create(jax.tree.map(jnp.copy, prm), opt)
        step = jit_update(grpo.make_grpo_step(module, CFG, algo, prompt_unit=unit), state, batch, env)
        new, metrics = step(state, batch, jax.random.key(2))
        return jax.device_get(new.params), jax.device_get(metrics)

    want, m_want = run(_env({"data": 1}), 1, params)
    env = _env({"data": 2})
    _, params_m, _ = create_model(CFG, jax.random.key(0), env)
    got, m_got = run(env, G, params_m)
    np.testing.assert_allclose(float(m_got["loss"]), float(m_want["loss"]), rtol=1e-5, atol=1e-6)
    assert float(m_want["grad_norm"]) > 1e-3
    _close_trees(got, want, 1e-5)
