"""Lesson (context) distillation: the chunked per-token divergences against full logits, zero for an identical
teacher, masking, learning, exact accumulation (scan and per-device paths), LoRA, config errors, and
`jit_update`'s non-donated aux argument.

Compiling even the tiny model's step takes seconds on CPU, so each compiled function is cached and reused."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_llm.algos.distill import DistillConfig, distill_token_divergence, make_distill_step
from jaxrl_llm.algos.train_state import TrainState, jit_update
from jaxrl_llm.models import CausalLM, ModelConfig, create_model, init_fn_for
from jaxrl_llm.models import lora
from jaxrl_llm.sharding import ShardingEnv, make_mesh
from jaxrl_llm.sharding.params import param_shardings

V = 64
CFG = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
B, PS, PT, N = 4, 5, 9, 7
SGD = optax.sgd(1.0)  # the update is -grad: updates compare gradients


def _env(axes):
    n = int(np.prod(list(axes.values())))
    return ShardingEnv(make_mesh(axes, devices=jax.devices()[:n]))


@pytest.fixture(scope="module")
def lm():
    """The student's params and a different teacher (another init): their distributions differ markedly."""
    env = _env({"data": 1})
    module, params, _ = create_model(CFG, jax.random.key(0), env)
    _, teacher, _ = create_model(CFG, jax.random.key(1), env)
    return module, jax.device_get(params), jax.device_get(teacher)


def _left_padded(rng, b, p, min_len=1):
    lengths = rng.integers(min_len, p + 1, b)
    mask = np.arange(p)[None, :] >= (p - lengths)[:, None]
    return np.where(mask, rng.integers(1, V, (b, p)), 0).astype(np.int32), mask


def make_batch(seed=0, same_prompt=False):
    """Student prompt [B, PS]; the teacher's [B, PT] is a "lesson" prefix before the same prompt (or the
    student's own prompt with `same_prompt`); completions right-padded, every row with >= 2 tokens."""
    rng = np.random.default_rng(seed)
    sp, sm = _left_padded(rng, B, PS)
    if same_prompt:
        tp, tm = sp.copy(), sm.copy()
    else:
        lesson = rng.integers(1, V, (B, PT - PS)).astype(np.int32)
        tp, tm = np.concatenate([lesson, sp], 1), np.concatenate([np.ones((B, PT - PS), bool), sm], 1)
        # left-pad the teacher's prompt properly: move the student's padding to the front
        order = np.argsort(tm, axis=1, kind="stable")
        tp, tm = np.take_along_axis(tp, order, 1), np.take_along_axis(tm, order, 1)
    lengths = rng.integers(2, N + 1, B)
    cm = np.arange(N)[None, :] < lengths[:, None]
    ct = np.where(cm, rng.integers(1, V, (B, N)), 0).astype(np.int32)
    return {"student_prompt_tokens": sp, "student_prompt_mask": sm, "teacher_prompt_tokens": tp,
            "teacher_prompt_mask": tm, "completion_tokens": ct, "completion_mask": cm}


_JITTED = {}


def divergence(module, params, teacher, batch, kind, chunk=128):
    key = (kind, chunk)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(lambda p, t, b: distill_token_divergence(module, p, t, CFG, b, kind, chunk))
    return jax.device_get(_JITTED[key](params, teacher, batch))


# ----------------------------------------------------------------------------- the per-token divergence


def test_identical_teacher_gives_zero_and_a_lesson_prompt_does_not(lm):
    module, params, _ = lm
    same, lesson = make_batch(same_prompt=True), make_batch()
    m = lesson["completion_mask"]
    for kind in ("reverse_kl", "forward_kl"):
        zero = divergence(module, params, params, same, kind)
        assert np.max(np.abs(zero["divergence"])) < 1e-6, kind
        np.testing.assert_allclose(zero["teacher_logp"], zero["student_logp"], atol=1e-6)
        d = divergence(module, params, params, lesson, kind)["divergence"]
        assert np.all(d[m] > 1e-6) and np.mean(d[m]) > 1e-4, (kind, d)
        assert np.all(d[~m] == 0.0)


def _reference(module, params, prompt, pmask, batch):
    """log_softmax of the full [B, P + N, V] logits at the positions predicting the completion, float64."""
    tokens = np.concatenate([prompt, batch["completion_tokens"]], 1)
    mask = np.concatenate([pmask, batch["completion_mask"]], 1)
    logits = module.apply({"params": params}, jnp.asarray(tokens), None, jnp.asarray(mask))[0]
    lp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1), np.float64)
    return lp[:, prompt.shape[1] - 1:prompt.shape[1] - 1 + N]


def test_chunked_divergence_equals_full_logits(lm):
    module, params, teacher = lm
    batch = make_batch(seed=1)
    lps = _reference(module, params, batch["student_prompt_tokens"], batch["student_prompt_mask"], batch)
    lpt = _reference(module, teacher, batch["teacher_prompt_tokens"], batch["teacher_prompt_mask"], batch)
    m = batch["completion_mask"].astype(np.float64)
    y = batch["completion_tokens"][..., None]
    want = {"reverse_kl": np.sum(np.exp(lps) * (lps - lpt), -1) * m,
            "forward_kl": np.sum(np.exp(lpt) * (lpt - lps), -1) * m,
            "nll": -np.take_along_axis(lps, y, -1)[..., 0] * m}
    s_logp = np.take_along_axis(lps, y, -1)[..., 0] * m
    t_logp = np.take_along_axis(lpt, y, -1)[..., 0] * m
    for kind in ("reverse_kl", "forward_kl", "nll"):
        got = divergence(module, params, teacher, batch, kind, chunk=3)  # 3 does not divide N = 7
        assert got["divergence"].shape == (B, N) and got["divergence"].dtype == np.float32
        np.testing.assert_allclose(got["divergence"], want[kind], atol=1e-5, err_msg=kind)
        np.testing.assert_allclose(got["student_logp"], s_logp, atol=1e-5, err_msg=kind)
        if kind != "nll":
            np.testing.assert_allclose(got["teacher_logp"], t_logp, atol=1e-5, err_msg=kind)
    assert np.mean(want["reverse_kl"][m > 0]) > 1e-2  # the two models really differ


def test_masked_positions_do_not_matter(lm):
    module, params, teacher = lm
    batch = make_batch(seed=2)
    assert not batch["completion_mask"].all() and not batch["teacher_prompt_mask"].all()
    other = dict(batch)
    rng = np.random.default_rng(9)
    for toks, mask in (("completion_tokens", "completion_mask"), ("teacher_prompt_tokens", "teacher_prompt_mask"),
                       ("student_prompt_tokens", "student_prompt_mask")):
        other[toks] = np.where(batch[mask], batch[toks], rng.integers(1, V, batch[toks].shape)).astype(np.int32)
    assert any(np.any(other[k] != batch[k]) for k in ("completion_tokens", "teacher_prompt_tokens"))
    for kind in ("reverse_kl", "forward_kl"):
        a = divergence(module, params, teacher, batch, kind)
        b = divergence(module, params, teacher, other, kind)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=f"{kind} {k}")


# ----------------------------------------------------------------------------- the update step

_COMPILED = {}


def _state(params, tx, frozen=None, env=None):
    params = jax.device_put(jax.device_get(params))  # a private copy: the state is donated
    if env is not None:
        params = jax.device_put(params, param_shardings(init_fn_for(CausalLM(CFG)), env)[1])
    return TrainState.create(params, tx, frozen=frozen)


def run(module, params, teacher, batch, cfg, tx, num_micro=1, steps=1, env=None, tx_name="sgd"):
    """`steps` updates on a fixed batch from a private copy of `params`; (final params on the host, metrics)."""
    state = _state(params, tx, env=env)
    key = (cfg, tx_name, num_micro, None if env is None else tuple(env.mesh.shape.items()))
    if key not in _COMPILED:
        _COMPILED[key] = jit_update(make_distill_step(module, CFG, cfg, num_micro), state, batch, env,
                                    aux_example=teacher)
    update = _COMPILED[key]
    history = []
    for i in range(steps):
        state, metrics = update(state, batch, jax.random.key(i), teacher)
        history.append(jax.device_get(metrics))
    return jax.device_get(state.params), history


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "nll"])
def test_steps_decrease_the_loss(lm, kind):
    module, params, teacher = lm
    batch = make_batch(seed=3)
    _, hist = run(module, params, teacher, batch, DistillConfig(kind), optax.adam(1e-2), steps=20, tx_name="adam")
    losses = [float(h["loss"]) for h in hist]
    assert all(np.isfinite(losses)) and not any(h["skipped"] for h in hist)
    np.testing.assert_allclose(hist[0]["distill/divergence"], losses[0], rtol=1e-6)  # token-mean: the same
    assert hist[0]["num_tokens"] == batch["completion_mask"].sum()
    if kind == "nll":
        assert losses[-1] < 0.8 * losses[0], losses
        np.testing.assert_allclose(hist[0]["distill/student_logp"], -losses[0], rtol=1e-6)
    else:
        assert losses[-1] < 0.5 * losses[0], losses
        assert "distill/teacher_logp" in hist[0] and "distill/student_logp" in hist[0]


def test_micro_batches_and_data_parallel_equal_one_batch(lm):
    """num_micro_batches=2 through `accumulate`'s scan (no mesh) and its per-device shard_map path (pure data
    parallelism on 2 devices, the teacher replicated) give the single-batch update."""
    module, params, teacher = lm
    batch = make_batch(seed=4)
    cfg = DistillConfig("reverse_kl", logprob_chunk=4)
    p1, m1 = run(module, params, teacher, batch, cfg, SGD)
    update = _max_diff(p1, params)
    assert update > 1e-3
    env = _env({"data": 2})
    for env_, name in ((None, "scan"), (env, "shard_map")):
        p2, m2 = run(module, params, teacher, batch, cfg, SGD, num_micro=2, env=env_)
        assert _max_diff(p1, p2) < 1e-5 * max(1.0, update), name
        for k in ("loss", "distill/divergence", "distill/teacher_logp", "distill/student_logp", "num_tokens"):
            np.testing.assert_allclose(m1[0][k], m2[0][k], rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")
    # the seq-mean aggregation is a different loss (guards the tolerance above)
    p3, _ = run(module, params, teacher, batch, DistillConfig("reverse_kl", 4, "seq-mean-token-mean"), SGD)
    assert _max_diff(p1, p3) > 1e-4


def test_aux_is_not_donated_and_the_state_is(lm):
    module, params, teacher = lm
    batch = make_batch(seed=5)
    step = make_distill_step(module, CFG, DistillConfig("forward_kl"))
    teacher = jax.device_put(teacher)
    for env in (None, _env({"data": 1})):
        state = _state(params, SGD, env=env)
        update = jit_update(step, state, batch, env, aux_example=teacher)
        old = jax.tree.leaves(state.params)
        new, metrics = update(state, batch, jax.random.key(0), teacher)
        assert all(x.is_deleted() for x in old)  # the state is donated
        assert not any(x.is_deleted() for x in jax.tree.leaves(teacher))  # the teacher is not
        assert np.isfinite(metrics["loss"]) and metrics["distill/divergence"] > 0
        new, _ = update(new, batch, jax.random.key(1), teacher)  # and can be passed again
        assert int(new.step) == 2
    with pytest.raises(TypeError, match="aux"):
        update(new, batch, jax.random.key(2))


def test_lora_student_with_a_full_teacher(lm):
    """Under LoRA the loss applies adapters + frozen base; the teacher is a full tree (the merged snapshot).
    Fresh adapters leave the student equal to the teacher, so with the same prompt the divergence is zero."""
    _, params, _ = lm
    spec = lora.LoraConfig(rank=4, alpha=8.0)
    module = CausalLM(CFG.replace(lora=spec))
    env = _env({"data": 1})
    adapters = lora.init_adapters(module, jax.random.key(2), env)
    trainable, frozen = lora.prepare(jax.device_put(params), adapters, spec)
    teacher = jax.tree.map(jnp.copy, lora.merge_trees(trainable, frozen))
    trainable0 = jax.device_get(trainable)
    state = TrainState.create(trainable, optax.adam(1e-2), frozen=frozen)
    batch = make_batch(seed=6, same_prompt=True)
    update = jit_update(make_distill_step(module, CFG, DistillConfig("reverse_kl")), state, batch, env,
                        aux_example=teacher)
    state, m0 = update(state, batch, jax.random.key(0), teacher)
    assert abs(float(m0["loss"])) < 1e-6 and float(m0["grad_norm"]) < 1e-5
    lesson = make_batch(seed=6)
    losses = []
    for i in range(6):
        state, m = update(state, lesson, jax.random.key(i), teacher)
        losses.append(float(m["loss"]))
    assert losses[0] > 1e-4 and losses[-1] < losses[0], losses
    assert not any(x.is_deleted() for x in jax.tree.leaves(teacher))
    assert _max_diff(state.frozen, frozen) == 0.0 and _max_diff(state.params, trainable0) > 0.0


# ----------------------------------------------------------------------------- configuration


def test_config_errors():
    with pytest.raises(ValueError, match=r"distill.divergence='reverse-kl'.*did you mean 'reverse_kl'.*forward_kl"):
        DistillConfig("reverse-kl")
    with pytest.raises(ValueError, match="distill.loss_agg='seq-mean-token-sum'.*token-mean"):
        DistillConfig(loss_agg="seq-mean-token-sum")
    with pytest.raises(ValueError, match="distill.logprob_chunk=0"):
        DistillConfig(logprob_chunk=0)
    with pytest.raises(ValueError, match="num_micro_batches"):
        make_distill_step(None, CFG, DistillConfig(), 0)
    assert DistillConfig("nll").batch_keys == ("student_prompt_tokens", "student_prompt_mask", "completion_tokens",
                                               "completion_mask")


def test_missing_teacher_and_keys_are_errors(lm):
    module, params, teacher = lm
    step = make_distill_step(module, CFG, DistillConfig("reverse_kl"))
    state = _state(params, SGD)
    batch = make_batch()
    with pytest.raises(ValueError, match="needs teacher_params"):
        step(state, batch, jax.random.key(0))
    with pytest.raises(KeyError, match="teacher_prompt_tokens"):
        step(state, {k: v for k, v in batch.items() if k != "teacher_prompt_tokens"}, jax.random.key(0), teacher)


def test_gradient_reaches_the_student_only(lm):
    module, params, teacher = lm
    batch = make_batch(seed=7)

    def total(p, t):
        return jnp.sum(distill_token_divergence(module, p, t, CFG, batch, "reverse_kl", chunk=4)["divergence"])

    g_student, g_teacher = jax.jit(jax.grad(total, argnums=(0, 1)))(params, teacher)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_student)) > 1e-4
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_teacher))
