"""Reward-model training on chosen/rejected pairs with the Bradley–Terry loss.

    loss = 1/B sum_i -log sig(r(x_i, y_c,i) - r(x_i, y_r,i) - m_i)
           + center_rewards_coef * 1/B sum_i (r_c,i + r_r,i)^2

r is a `ScalarHeadModel(per_token=False)` (models.reward_model) on prompt +
response, read at the last real token. The optional per-pair margin m (Llama
2) is used when the batch has a "margin" array [B]. The centring term
(Eisenstein et al. 2023; TRL's `center_rewards_coefficient`) keeps rewards
near zero; off by default as in TRL.

Batch: prompt_tokens / prompt_mask [B, P] left-padded, chosen_tokens /
chosen_mask [B, Nc] and rejected_tokens / rejected_mask [B, Nr] right-padded,
optional margin [B]. Chosen and rejected run in one forward (concatenated
along the batch). Pairs are weighted 1/B over the whole batch before
micro-batching, so accumulation is exact.

Metrics: loss, bt_loss, accuracy (fraction with r_c > r_r),
rewards/chosen, rewards/rejected, rewards/margins, rewards/mean.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxrl_llm.algos.aggregation import sequence_weights
from jaxrl_llm.algos.preference import PAIR_KEYS, bradley_terry_loss, check_batch_keys, concat_pairs, pad_pairs
from jaxrl_llm.algos.train_state import Metrics, TrainState, accumulate, apply_gradients, dropout_rngs
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.transformer import ScalarHeadModel


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
    """center_rewards_coef: weight of the mean squared (r_c + r_r) term (TRL: None = 0; its docs suggest 0.01)."""

    center_rewards_coef: float = 0.0

    def __post_init__(self):
        if not self.center_rewards_coef >= 0:
            raise ValueError(f"reward_model.center_rewards_coef={self.center_rewards_coef} must be >= 0")


def _check_module(module: Any) -> None:
    if not isinstance(module, ScalarHeadModel) or module.per_token:
        raise ValueError(f"reward-model training needs ScalarHeadModel(cfg, per_token=False) "
                         f"(models.reward_model(cfg)), got {type(module).__name__}"
                         + (" with per_token=True" if isinstance(module, ScalarHeadModel) else ""))


def sequence_rewards(module: Any, params: Any, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                     completion_tokens: jax.Array, completion_mask: jax.Array) -> jax.Array:
    """float32 [B] rewards of prompt + completion, read at the last real token."""
    tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1).astype(jnp.int32)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(jnp.bool_)
    return module.apply({"params": params}, tokens, None, mask, rngs=dropout_rngs()).astype(jnp.float32)


def pair_rewards(module: Any, params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(r_chosen [B], r_rejected [B]) from one forward over the 2B concatenated rows."""
    batch = pad_pairs(batch)
    b = batch["prompt_tokens"].shape[0]
    r = sequence_rewards(module, params, *concat_pairs(batch))
    return r[:b], r[b:]


def make_reward_model_step(module: Any, model_cfg: ModelConfig, cfg: RewardModelConfig = RewardModelConfig(),
                           num_micro_batches: int = 1
                           ) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, Metrics]]:
    """`step(state, batch, rng) -> (state, metrics)` for a reward model; jit it with `jit_update`.

    `model_cfg` is the module's config (kept for the common signature of the steps).
    """
    _check_module(module)
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches={num_micro_batches} must be >= 1")
    del model_cfg

    def loss_fn(params, mb, rng):
        del rng
        r_c, r_r = pair_rewards(module, params, mb)
        w = mb["seq_w"]
        bt = jnp.sum(w * bradley_terry_loss(r_c, r_r, mb.get("margin")))
        loss = bt + cfg.center_rewards_coef * jnp.sum(w * (r_c + r_r) ** 2) if cfg.center_rewards_coef else bt
        metrics = {
            "bt_loss": bt,
            "accuracy": jnp.sum(w * (r_c > r_r)),
            "rewards/chosen": jnp.sum(w * r_c),
            "rewards/rejected": jnp.sum(w * r_r),
            "rewards/margins": jnp.sum(w * (r_c - r_r)),
            "rewards/mean": jnp.sum(w * (r_c + r_r)) / 2.0,
        }
        return loss, metrics

    def step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, Metrics]:
        check_batch_keys(batch, PAIR_KEYS, "reward-model step")
        keys = PAIR_KEYS + (("margin",) if "margin" in batch else ())
        if "margin" in batch and batch["margin"].shape != batch["chosen_mask"].shape[:1]:
            raise ValueError(f"reward-model step: margin has shape {batch['margin'].shape}; expected "
                             f"{batch['chosen_mask'].shape[:1]} (one margin per pair)")
        batch = pad_pairs({k: batch[k] for k in keys})
        batch["seq_w"] = sequence_weights(batch["chosen_mask"])
        grads, metrics = accumulate(loss_fn, state.params, batch, rng, num_micro_batches, frozen=state.frozen)
        return apply_gradients(state, grads, metrics)

    return step
