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
| token-sum-norm | sum_{i,t} m l / L_const | verl "seq-mean-token-sum-norm" (L_const = its loss_scale_factor) |

G is the number of sequences in the batch. By default rows with an empty
mask count in G but add nothing (they never produce NaN); with
`exclude_empty_rows=True` the three seq-mean modes count only rows with at
least one real token (verl >= 0.6.1). token-mean and token-sum-norm have no
row count, so the option does not change them. docs/algorithms.md maps each
verl `loss_agg_mode` and version onto these settings.

One deliberate exception, off by default: `micro_batch_token_weights`
computes a mode's weights from one micro-batch's mask, scaled by the
micro-batch's share of the rows. With "token-mean" this is TRL's
loss_type="bnpo" (each micro-batch divided by its own token count, then
averaged over the accumulation steps). It is NOT exact: the loss and
gradient depend on how the rows are split into micro-batches
(`GRPOConfig.loss_agg_per_micro_batch`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                  "token-sum-norm")
# modes that divide by a constant length (`norm_length`, default the padded length T)
NORM_MODES = ("seq-mean-token-sum-norm", "token-sum-norm")


def check_loss_agg(mode: str) -> str:
    if mode not in LOSS_AGG_MODES:
        import difflib
        near = difflib.get_close_matches(mode, LOSS_AGG_MODES, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"loss_agg={mode!r} is not a known aggregation mode.{hint} Choose one of {LOSS_AGG_MODES}")
    return mode


def check_exclude_empty_rows(value: object, where: str) -> None:
    """`where.exclude_empty_rows` must be a Python bool: it picks a branch when the weights are traced."""
    if not isinstance(value, bool):
        raise ValueError(f"{where}.exclude_empty_rows={value!r} must be True or False (True: the seq-mean modes "
                         "count only rows with at least one real token, as verl >= 0.6.1)")


def _row_count(m_bt: jax.Array, exclude_empty_rows: bool) -> jax.Array | int:
    """G of the seq-mean modes: every row, or the rows with a real token (at least 1, so never 0/0)."""
    if not exclude_empty_rows:
        return m_bt.shape[0]
    return jnp.maximum(jnp.sum(jnp.any(m_bt > 0, axis=-1).astype(jnp.float32)), 1.0)


def token_weights(mask_bt: jax.Array, mode: str, norm_length: float | None = None,
                  exclude_empty_rows: bool = False) -> jax.Array:
    """float32 [B, T] weights w with loss = sum(w * loss_bt), for the whole batch given.

    `norm_length` is the constant L_const of the modes in `NORM_MODES`
    (default: T, the padded generation length). `exclude_empty_rows`
    makes G of the seq-mean modes the number of rows with at least one
    real token instead of B.
    """
    check_loss_agg(mode)
    check_exclude_empty_rows(exclude_empty_rows, "token_weights")
    m = mask_bt.astype(jnp.float32)
    if mode == "token-mean":
        return m / jnp.maximum(jnp.sum(m), 1.0)
    length = float(m.shape[1] if norm_length is None else norm_length)
    if mode == "token-sum-norm":
        return m / length
    n_seq = _row_count(m, exclude_empty_rows)
    if mode == "seq-mean-token-mean":
        return m / jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0) / n_seq
    if mode == "seq-mean-token-sum":
        return m / n_seq
    return m / (n_seq * length)


def micro_batch_token_weights(mask_bt: jax.Array, row_share_b: jax.Array, mode: str,
                              norm_length: float | None = None, exclude_empty_rows: bool = False) -> jax.Array:
    """Weights of `mode` computed from this micro-batch's own mask, times its rows' share of the minibatch.

    Not exact under accumulation (see the module docstring). `row_share_b` [b]: each row's share of the
    minibatch (1/B), so sum(row_share_b) = b/B and equal micro-batches are averaged. Summed over the
    micro-batches of a minibatch, "token-mean" gives TRL's "bnpo":
    1/M sum_m sum(m_m * l_m) / sum(m_m) (micro-batch m's token count, at least 1).
    """
    share = jnp.sum(jnp.asarray(row_share_b, jnp.float32))
    return token_weights(mask_bt, mode, norm_length, exclude_empty_rows) * share


def sequence_weights(mask_bt: jax.Array) -> jax.Array:
    """float32 [B] weights 1/G for sequence-level losses (GSPO, DPO, reward models)."""
    return jnp.full((mask_bt.shape[0],), 1.0 / mask_bt.shape[0], jnp.float32)


def token_mean_weights(mask_bt: jax.Array) -> jax.Array:
    """Weights of a plain masked mean over all tokens: for metrics (clip fraction, KL, entropy)."""
    return token_weights(mask_bt, "token-mean")


def aggregate(loss_bt: jax.Array, mask_bt: jax.Array, mode: str, norm_length: float | None = None,
              exclude_empty_rows: bool = False) -> jax.Array:
    """Convenience for a batch that is not split: sum(token_weights * loss)."""
    return jnp.sum(token_weights(mask_bt, mode, norm_length, exclude_empty_rows) * loss_bt)
