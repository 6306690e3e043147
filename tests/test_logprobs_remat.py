"""algos.logprobs.logprobs_from_hidden rematerialises its head blocks only when there are several: one block
would be live in the backward either way, so recomputing it would only add a [B*T, E] x [E, V] matmul."""

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
