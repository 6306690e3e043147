"""algos.logprobs.logprobs_from_hidden rematerialises its head blocks only when there are several: one block
would be live in the backward either way, so recomputing it would only add a [B*T, E] x [E, V] matmul. Each
block's backward is written by hand (`logprobs._head_block`): its gradients are the full softmax's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.algos.logprobs import logprobs_from_hidden

B, T, E, V = 3, 8, 16, 40


def _inputs():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return (0.3 * jax.random.normal(k2, (E, V)), jax.random.normal(k1, (B, T, E)),
            jax.random.randint(k3, (B, T), 0, V))


def _loss(chunk):
    def f(w, h, y):
        lp, ent = logprobs_from_hidden(h, w, y, temperature=0.7, chunk=chunk)
        return jnp.sum(lp * jnp.linspace(0.5, 1.5, T)) + 0.1 * jnp.sum(ent)
    return f


def _remat_count(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name in ("checkpoint", "remat", "remat2")
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _remat_count(sub)
    return n


@pytest.mark.parametrize("chunk,remat", [(T, False), (64, False), (3, True)])
def test_remat_only_with_several_chunks(chunk, remat):
    w, h, y = _inputs()
    jaxpr = jax.make_jaxpr(jax.grad(_loss(chunk), argnums=(0, 1)))(w, h, y).jaxpr
    assert (_remat_count(jaxpr) > 0) == remat


def test_one_chunk_and_several_give_the_full_softmax_gradients():
    w, h, y = _inputs()

    def full(w, h, y):
        logits = jnp.einsum("bte,ev->btv", h, w) / 0.7
        lp = jax.nn.log_softmax(logits)
        ent = -jnp.sum(jnp.exp(lp) * lp, -1)
        picked = jnp.take_along_axis(lp, y[..., None], -1)[..., 0]
        return jnp.sum(picked * jnp.linspace(0.5, 1.5, T)) + 0.1 * jnp.sum(ent)

    ref = jax.grad(full, argnums=(0, 1))(w, h, y)
    for chunk in (T, 3):
        got = jax.grad(_loss(chunk), argnums=(0, 1))(w, h, y)
        for a, r in zip(got, ref):
            np.testing.assert_allclose(a, r, atol=2e-5, rtol=1e-5)


def _dots(jaxpr) -> int:
    """Matrix-matrix products (the row sums over the vocabulary are products with a vector of ones: not
    counted)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "dot_general" and min(v.aval.ndim for v in eqn.invars) >= 2
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _dots(sub)
    return n


def test_one_block_forward_and_backward_is_three_matmuls():
    """The forward's [B*T, E] x [E, V] product, then the gradients to the hidden states and the matrix: no
    other matmul (an automatic backward of the same forward has the same three, but more passes over the
    logits; this pins that the hand-written one adds no recompute)."""
    w, h, y = _inputs()
    assert _dots(jax.make_jaxpr(jax.grad(_loss(T), argnums=(0, 1)))(w, h, y).jaxpr) == 3


@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_hand_written_backward_matches_autodiff(with_entropy, dtype, tol):
    """Random cotangents on the log-probs and the entropies (each position its own), float32 and bf16 hidden
    states (the bf16 path casts the logits' cotangent to bf16 for its matmuls, as a bf16 backward would)."""
    w, h, y = _inputs()
    h = h.astype(dtype)
    ga, gb = jax.random.normal(jax.random.key(5), (2, B, T))

    def ours(w, h):
        lp, ent = logprobs_from_hidden(h, w, y, temperature=1.3, chunk=T, with_entropy=with_entropy)
        assert (ent is None) == (not with_entropy)
        return jnp.sum(lp * ga) + (jnp.sum(ent * gb) if with_entropy else 0.0)

    def auto(w, h):
        z = jnp.einsum("bte,ev->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32) / 1.3
        lp = jax.nn.log_softmax(z)
        picked = jnp.take_along_axis(lp, y[..., None], -1)[..., 0]
        return jnp.sum(picked * ga) + (jnp.sum(-jnp.sum(jnp.exp(lp) * lp, -1) * gb) if with_entropy else 0.0)

    got, ref = jax.grad(ours, argnums=(0, 1))(w, h), jax.grad(auto, argnums=(0, 1))(w, h)
    for a, r in zip(got, ref):
        assert a.dtype == r.dtype
        a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
        assert np.max(np.abs(a - r)) <= tol * np.max(np.abs(r)), (np.max(np.abs(a - r)), np.max(np.abs(r)))
