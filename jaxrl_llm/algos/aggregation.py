"""Loss aggregation modes as per-token weights with *global* normalisers.

Every token-level loss in this package is reduced as `sum(weights * loss)`,
where the weights are computed once from the mask of the whole (mini)batch,
before it is split into micro-batches or over devices. So gradient
accumulation and data parallelism give exactly the un-accumulated step: no
mode divides by a per-micro-batch token count (a pitfall several peers
shipped).

| mode | loss | used by |
|---|---|---|
| token-mean | sum_{i,t} m l / sum_{i,t} m | DAPO, TRL "dapo", verl default |
| seq-mean-token-mean | 1/G sum_i (sum_t m l / sum_t m) | GRPO paper, TRL "grpo" |
| seq-mean-token-sum | 1/G sum_i sum_t m l | verl "seq-mean-token-sum" |
| seq-mean-token-sum-norm | 1/G sum_i sum_t m l / L_const | Dr. GRPO (L_const = max generation length) |

(G is the number of sequences in the batch; rows with an empty mask count
in G but add nothing — they never produce NaN.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
NORM_MODES = ("seq-mean-token-sum-norm",)  # the modes that divide by a constant length (norm_length)


def check_loss_agg(mode: str) -> str:
    if mode not in LOSS_AGG_MODES:
        import difflib
        near = difflib.get_close_matches(mode, LOSS_AGG_MODES, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"loss_agg={mode!r} is not a known aggregation mode.{hint} Choose one of {LOSS_AGG_MODES}")
    return mode


def token_weights(mask_bt: jax.Array, mode: str, norm_length: float | None = None) -> jax.Array:
    """float32 [B, T] weights w with loss = sum(w * loss_bt), for the whole batch given.

    `norm_length` is the constant L_const of "seq-mean-token-sum-norm"
    (default: T, the padded generation length).
    """
    check_loss_agg(mode)
    m = mask_bt.astype(jnp.float32)
    n_seq = m.shape[0]
    if mode == "token-mean":
        return m / jnp.maximum(jnp.sum(m), 1.0)
    if mode == "seq-mean-token-mean":
        return m / jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0) / n_seq
    if mode == "seq-mean-token-sum":
        return m / n_seq
    length = float(m.shape[1] if norm_length is None else norm_length)
    return m / (n_seq * length)


def sequence_weights(mask_bt: jax.Array) -> jax.Array:
    """float32 [B] weights 1/G for sequence-level losses (GSPO, DPO, reward models)."""
    return jnp.full((mask_bt.shape[0],), 1.0 / mask_bt.shape[0], jnp.float32)


def token_mean_weights(mask_bt: jax.Array) -> jax.Array:
    """Weights of a plain masked mean over all tokens: for metrics (clip fraction, KL, entropy)."""
    return token_weights(mask_bt, "token-mean")


def aggregate(loss_bt: jax.Array, mask_bt: jax.Array, mode: str, norm_length: float | None = None) -> jax.Array:
    """Convenience for a batch that is not split: sum(token_weights * loss)."""
    return jnp.sum(token_weights(mask_bt, mode, norm_length) * loss_bt)
