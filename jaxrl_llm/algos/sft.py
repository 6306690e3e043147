"""Supervised fine-tuning: masked NLL of the completion tokens given the prompt.

    loss = -sum_{i,t} w_{i,t} log pi(y_{i,t} | x_i, y_{i,<t})

with w = `SFTConfig.token_weights(completion_mask)` computed on
the whole batch before it is split into micro-batches, so accumulation and
data parallelism give exactly the un-accumulated step. The default
"token-mean" is the mean over all completion tokens of the batch (what TRL
gets with transformers' `num_items_in_batch`).

Batch (dict of arrays): prompt_tokens / prompt_mask [B, P] left-padded,
completion_tokens / completion_mask [B, N] right-padded. Only completion
tokens are trained on; to train on a whole text, pass a one-token prompt
(e.g. BOS) and the rest as the completion.

Sampling temperature does not apply here (no sampler produced the data), so
log-probs are always at temperature 1.

    step = make_sft_step(module, model_cfg, SFTConfig(), num_micro_batches=4)
    update = jit_update(step, state, batch, env)
    state, metrics = update(state, batch, jax.random.fold_in(key, i))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxrl_llm.algos.aggregation import (NORM_MODES, check_exclude_empty_rows, check_loss_agg, token_mean_weights,
                                         token_weights)
from jaxrl_llm.algos.logprobs import CONTEXT_KEY, completion_logprobs
from jaxrl_llm.algos.preference import check_batch_keys, sft_nll
from jaxrl_llm.algos.train_state import Metrics, TrainState, accumulate, apply_gradients
from jaxrl_llm.models.config import ModelConfig

SFT_KEYS = ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """SFT loss knobs.

    loss_agg: how token losses are averaged (see `aggregation`): "token-mean"
        (default), "seq-mean-token-mean", "seq-mean-token-sum",
        "seq-mean-token-sum-norm" (divide each sequence's sum by `norm_length`,
        default: the padded completion length N), "token-sum-norm" (the sum
        over the batch divided by `norm_length`; no division by B).
    exclude_empty_rows: the seq-mean modes count only rows with at least one
        completion token (default False: every row counts).
    logprob_chunk: positions per LM-head chunk (memory vs speed; not numerics).
    """

    loss_agg: str = "token-mean"
    norm_length: float | None = None
    logprob_chunk: int = 128
    exclude_empty_rows: bool = False

    def __post_init__(self):
        check_loss_agg(self.loss_agg)
        check_exclude_empty_rows(self.exclude_empty_rows, "sft")
        if self.norm_length is not None and not self.norm_length > 0:
            raise ValueError(f"sft.norm_length={self.norm_length} must be > 0 (or None for the padded length)")
        if self.norm_length is not None and self.loss_agg not in NORM_MODES:
            raise ValueError(f"sft.norm_length is only used by loss_agg in {NORM_MODES}, "
                             f"not {self.loss_agg!r}; remove it or change loss_agg")
        if self.logprob_chunk < 1:
            raise ValueError(f"sft.logprob_chunk={self.logprob_chunk} must be >= 1")

    def token_weights(self, mask_bt: jax.Array) -> jax.Array:
        """float32 [B, N] loss weights of this config's aggregation; call it on the whole batch."""
        return token_weights(mask_bt, self.loss_agg, self.norm_length, self.exclude_empty_rows)


def make_sft_step(module: Any, model_cfg: ModelConfig, cfg: SFTConfig = SFTConfig(),
                  num_micro_batches: int = 1) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, Metrics]]:
    """`step(state, batch, rng) -> (state, metrics)` for a CausalLM; jit it with `jit_update`.

    Metrics: loss (in `loss_agg`), nll_token_mean (token-mean NLL whatever the
    mode; exp of it is the perplexity), entropy (token mean), num_tokens, and
    the optimiser's grad_norm / update_norm / skipped.
    """
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches={num_micro_batches} must be >= 1")

    def loss_fn(params, mb, rng):
        del rng  # LoRA's dropout gets its key from `accumulate` (dropout_rngs)
        logp, ent = completion_logprobs(module, params, model_cfg, mb["prompt_tokens"], mb["prompt_mask"],
                                        mb["completion_tokens"], mb["completion_mask"],
                                        chunk=cfg.logprob_chunk, with_entropy=True,
                                        context_mask=mb.get(CONTEXT_KEY))
        metrics = {
            "nll_token_mean": sft_nll(logp, mb["token_mean_w"]),
            "entropy": jnp.sum(mb["token_mean_w"] * ent),
            "num_tokens": jnp.sum(mb["completion_mask"].astype(jnp.float32)),
        }
        return sft_nll(logp, mb["loss_w"]), metrics

    def step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, Metrics]:
        check_batch_keys(batch, SFT_KEYS, "sft step")
        mask = batch["completion_mask"]
        batch = {k: batch[k] for k in SFT_KEYS + ((CONTEXT_KEY,) if CONTEXT_KEY in batch else ())}
        batch["loss_w"] = cfg.token_weights(mask)
        batch["token_mean_w"] = token_mean_weights(mask)
        grads, metrics = accumulate(loss_fn, state.params, batch, rng, num_micro_batches, frozen=state.frozen)
        return apply_gradients(state, grads, metrics)

    return step
