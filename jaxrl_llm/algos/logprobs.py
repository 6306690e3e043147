"""Token log-probs and entropy from hidden states, chunked so [B, T, V] float32 logits never exist.

The LM head is applied to `chunk` positions at a time inside a `lax.scan`
whose body is rematerialised (`jax.checkpoint`): forward and backward hold
one [B, chunk, V] block of logits at a time. When the positions fit in one
chunk the body is not rematerialised: the backward would hold that block
either way, so recomputing it (one more [B*T, E] x [E, V] matmul, a quarter
of the head's forward+backward) would buy no memory. Each block's backward is
written by hand (`_head_block`: onehot - p for the log-prob, -p (log p + H) for
the entropy), one elementwise pass over its logits between the two matmuls.
Logits are divided by the sampling temperature, so the result is the
distribution the sampler's `raw_logprobs` come from.

Sequences are split as the sampler returns them: a left-padded prompt
[B, P] followed by a completion [B, N]. Log-probs are computed for the
completion tokens only (the target of position P - 1 + n is completion
token n), so the head never runs over the prompt.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxrl_llm.algos.train_state import dropout_rngs, map_micro
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.layers import matmul_weights
from jaxrl_llm.models.transformer import KVCache, positions_from_mask, unembedding, unstack_layers
from jaxrl_llm.sharding.rules import constrain


# The batch entries a forward over (prompt, completion) rows reads.
SEQUENCE_KEYS = ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask")
# Optional: the completion tokens attended when they differ from the trained ones (observations).
CONTEXT_KEY = "completion_context_mask"


def sequence(batch: dict) -> tuple[jax.Array, jax.Array, int, int]:
    """(tokens [B, P + N] int32, attention mask [B, P + N] bool, P, N) of a batch's prompt + completion rows:
    the attention mask is the prompt's and the completion's context mask (`CONTEXT_KEY`) when the batch has
    one, else its completion mask."""
    tokens = jnp.concatenate([batch["prompt_tokens"], batch["completion_tokens"]], axis=1).astype(jnp.int32)
    mask = jnp.concatenate([batch["prompt_mask"], batch.get(CONTEXT_KEY, batch["completion_mask"])],
                           axis=1).astype(jnp.bool_)
    return tokens, mask, batch["prompt_tokens"].shape[1], batch["completion_tokens"].shape[1]


def _pad_to_multiple(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    n = x.shape[axis]
    extra = (-n) % multiple
    if not extra:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad)


def logprobs_from_hidden(hidden_btE: jax.Array, w_EV: jax.Array, targets_bt: jax.Array, *,
                         temperature: float = 1.0, chunk: int = 128,
                         with_entropy: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """log softmax(hidden @ W / temperature)[target] and the entropy of that distribution.

    hidden_btE: [B, T, E] final hidden states (compute dtype) at the positions that predict `targets_bt`.
    w_EV: [E, V] output matrix (`models.unembedding(params, cfg)`).
    Returns float32 [B, T] log-probs and (if `with_entropy`) float32 [B, T] entropies.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0 (greedy sampling still trains at 1.0)")
    b, t, _ = hidden_btE.shape
    c = max(1, min(chunk, t))
    h = _pad_to_multiple(hidden_btE, 1, c)
    y = _pad_to_multiple(targets_bt, 1, c)
    n_chunks = h.shape[1] // c
    # [n_chunks, B, c, E] so the scan walks over sequence chunks.
    h = jnp.moveaxis(h.reshape(b, n_chunks, c, h.shape[-1]), 1, 0)
    y = jnp.moveaxis(y.reshape(b, n_chunks, c), 1, 0)
    w = w_EV.astype(hidden_btE.dtype)
    inv_t = 1.0 / temperature

    def one(h_bcE, y_bc):
        return _head_block(h_bcE, w, y_bc, inv_t, with_entropy)

    # Several chunks: rematerialise each in the backward, so only one block of logits is live at a time.
    # One chunk: its block is live in the backward anyway (recomputed or kept), so keep it.
    block = jax.checkpoint(one) if n_chunks > 1 else one

    def body(_, xs):
        return None, block(*xs)

    _, (logp, ent) = jax.lax.scan(body, None, (h, y))
    logp = jnp.moveaxis(logp, 0, 1).reshape(b, -1)[:, :t]
    if not with_entropy:
        return logp, None
    return logp, jnp.moveaxis(ent, 0, 1).reshape(b, -1)[:, :t]


def _head_stats(h_bcE, w_EV, y_bc, inv_t, with_entropy):
    """(logits z [B, c, V] float32, log-probs of the targets, log-sum-exp, entropy or zeros) of one block:
    one exponential per logit, read in two passes (the row maximum, then the sums of exp(z - max) and of
    exp(z - max) * z, which give the log-sum-exp and the entropy together). The sums over the vocabulary are
    products with a vector of ones: a matmul accumulates in vector lanes and threads, where XLA:CPU runs a
    float sum-reduction in order on one thread (it may not reassociate the additions)."""
    z = jnp.einsum("bce,ev->bcv", h_bcE, w_EV, preferred_element_type=jnp.float32) * inv_t
    z = constrain(z, ("batch", "length", "vocab"))
    ones = jnp.ones(z.shape[-1:], jnp.float32)
    m = jnp.max(z, axis=-1, keepdims=True)
    # one-hot contraction instead of a gather: stays local when the vocab is sharded
    picked = jnp.where(jnp.arange(z.shape[-1]) == y_bc[..., None], z, 0.0) @ ones
    e = jnp.exp(z - m)
    s = e @ ones
    lse = m[..., 0] + jnp.log(s)
    ent = lse - ((e * z) @ ones) / s if with_entropy else jnp.zeros_like(lse)
    return z, picked - lse, lse, ent


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _head_block(h_bcE, w_EV, y_bc, inv_t, with_entropy):
    """(log-probs, entropies) [B, c] of one block of positions, with a hand-written backward: the gradient of
    log p_y is onehot(y) - p and that of the entropy H is -p * (log p + H), so the backward is one elementwise
    pass over the block's logits (one exponential) and the two matmuls; automatic differentiation of the
    same forward reads and writes the [B, c, V] block several times more."""
    _, logp, _, ent = _head_stats(h_bcE, w_EV, y_bc, inv_t, with_entropy)
    return logp, ent


def _head_block_fwd(h_bcE, w_EV, y_bc, inv_t, with_entropy):
    z, logp, lse, ent = _head_stats(h_bcE, w_EV, y_bc, inv_t, with_entropy)
    return (logp, ent), (h_bcE, w_EV, y_bc, z, lse, ent)


def _head_block_bwd(inv_t, with_entropy, res, cotangents):
    h, w, y, z, lse, ent = res
    g_logp, g_ent = cotangents
    log_p = z - lse[..., None]
    p = jnp.exp(log_p)
    dz = jnp.where(jnp.arange(z.shape[-1]) == y[..., None], g_logp[..., None], 0.0) - g_logp[..., None] * p
    if with_entropy:
        dz = dz - (g_ent[..., None] * p) * (log_p + ent[..., None])
    dz = constrain((dz * inv_t).astype(h.dtype), ("batch", "length", "vocab"))
    dh = jnp.einsum("bcv,ev->bce", dz, w, preferred_element_type=jnp.float32).astype(h.dtype)
    dw = jnp.einsum("bce,bcv->ev", h, dz, preferred_element_type=jnp.float32).astype(w.dtype)
    return dh, dw, None


_head_block.defvjp(_head_block_fwd, _head_block_bwd)


def completion_logprobs(module: Any, params: Any, cfg: ModelConfig, prompt_tokens: jax.Array,
                        prompt_mask: jax.Array, completion_tokens: jax.Array, completion_mask: jax.Array, *,
                        temperature: float = 1.0, chunk: int = 128, with_entropy: bool = True,
                        context_mask: jax.Array | None = None,
                        prompt_group: int = 1) -> tuple[jax.Array, jax.Array | None]:
    """Log-probs [B, N] (and entropies) of completion tokens given left-padded prompts.

    One forward over prompt + completion; the head runs only over the N
    positions that predict completion tokens. Positions where
    `completion_mask` is 0 get log-prob 0 and entropy 0. `context_mask` [B, N]: the completion
    tokens attended when they are more than the trained ones (observations); default completion_mask.
    `prompt_group` g > 1: rows i*g .. i*g+g-1 share one prompt (tokens and mask), as a group of samples
    does: each prompt's forward runs once and its g completions attend to its keys and values. The
    caller guarantees that layout (a GRPO rollout's rows are prompt-major: `train.experience`).
    """
    batch = {"prompt_tokens": prompt_tokens, "prompt_mask": prompt_mask, "completion_tokens": completion_tokens,
             "completion_mask": completion_mask}
    tokens, mask, p, n = sequence(batch if context_mask is None else {**batch, CONTEXT_KEY: context_mask})
    if prompt_group > 1:
        hidden = _shared_prompt_hidden(module, params, cfg, tokens, mask, p, prompt_group)
    else:
        hidden, _ = module.apply({"params": params}, tokens, None, mask, return_hidden=True, rngs=dropout_rngs())
        hidden = hidden[:, p - 1:p - 1 + n]
    logp, ent = logprobs_from_hidden(hidden, unembedding(params, cfg), completion_tokens,
                                     temperature=temperature, chunk=chunk, with_entropy=with_entropy)
    m = completion_mask.astype(jnp.float32)
    return logp * m, (ent * m if ent is not None else None)


def _shared_prompt_hidden(module: Any, params: Any, cfg: ModelConfig, tokens: jax.Array, mask: jax.Array,
                          p: int, g: int) -> jax.Array:
    """The hidden states [B, N, E] at the positions that predict the completion tokens, each group's prompt
    computed once: the B/g distinct prompts fill a KV cache of P + N slots (as the sampler's prefill), which
    is repeated to the B rows, then the completions run against it. Equal to the plain forward's up to float
    rounding; the gradient reaches each prompt's keys and values from its g completions."""
    b, t = tokens.shape
    if b % g:
        raise ValueError(f"prompt_group={g} does not divide the batch's {b} rows")
    n = t - p
    positions = positions_from_mask(mask)
    layers = unstack_layers(params)  # the cache path runs the layers one by one
    apply = functools.partial(module.apply, {"params": layers}, return_hidden=True, rngs=dropout_rngs())
    cache = KVCache.zeros(cfg, b // g, t)
    h_prompt, cache = apply(tokens[::g, :p], positions[::g, :p], mask[::g, :p], cache)
    h_compl, _ = apply(tokens[:, p:], positions[:, p:], mask[:, p:], cache.repeat(g))
    return jnp.concatenate([jnp.repeat(h_prompt[:, -1:], g, axis=0), h_compl[:, :n - 1]], axis=1)


def rollout_forward_fn(forward: Callable[[Any, dict], Any], model_cfg: ModelConfig, num_micro: int = 1,
                       keys: tuple[str, ...] = SEQUENCE_KEYS, unit: int = 1) -> Callable:
    """`(params, batch) -> forward(params, rows)` for a forward without gradients over a batch (old or
    reference log-probs, values; `keys`: the batch entries it reads, [B, ...] each, and `CONTEXT_KEY` when the
    batch has it): the matmul kernels cast
    once (`matmul_weights`), then `num_micro` strided micro-batches of those entries in turn (`map_micro`;
    `unit`: of units of that many consecutive rows), outputs [B, ...] in row order."""
    def fn(params, batch):
        params = matmul_weights(params, model_cfg)
        rows = {k: batch[k] for k in keys + ((CONTEXT_KEY,) if CONTEXT_KEY in batch else ())}
        return map_micro(lambda mb: forward(params, mb), rows, num_micro, unit)
    return fn
