"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv 2402.01306) on unpaired examples.

Each example is a prompt x, a completion y and a label: desirable or undesirable. With the summed log-ratio
r = log pi(y|x) - log ref(y|x) and the reference point z0 (detached, shared by the batch):

    desirable    loss = desirable_weight   * (1 - sig(beta (r - z0)))
    undesirable  loss = undesirable_weight * (1 - sig(beta (z0 - r)))
    z0 = max(0, mean_i (log pi(y'_i|x_i) - log ref(y'_i|x_i)))

where y'_i is a MISMATCHED completion: the batch's completions shifted by one row (row i gets row i-1's, as
TRL's `KTOTrainer` builds its KL batch: `[completions[-1]] + completions[:-1]`), so z0 estimates
KL(pi || ref) on the batch's prompts. The batch loss is the mean over ALL rows of the weighted per-row
losses (TRL's `losses.nanmean()` over the desirable and undesirable rows together); the implicit reward of
a row is beta * r. Log-probs are summed over completion tokens (TRL, the paper), temperature 1.

Batch (dict of [B, ...] arrays): prompt_tokens / prompt_mask [B, P] left-padded, completion_tokens /
completion_mask [B, N] right-padded, label [B] (bool: True = desirable), and the precomputed reference
log-probs ref_logps [B] (of the completions) and ref_kl_logps [B] (of the shifted ones) from
`make_reference_logps_fn`. The step computes the policy's KL-row log-probs itself, without gradients, over
the WHOLE batch before it is split into micro-batches, so z0 (and so accumulation) is exact.

    ref_fn = jax.jit(make_reference_logps_fn(module, model_cfg))
    batch = {**batch, **ref_fn(ref_params, batch)}
    state, metrics = update(state, batch, rng)      # update = jit_update(make_kto_step(...), ...)

Metrics (TRL's names): kl (z0), rewards/chosen and rewards/rejected (mean beta * r over the desirable /
undesirable rows; 0 when the batch has none), rewards/margins (their difference), logps/chosen,
logps/rejected (mean summed log-probs), desirable_fraction.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxrl_llm.algos.aggregation import sequence_weights
from jaxrl_llm.algos.logprobs import completion_logprobs, rollout_forward_fn
from jaxrl_llm.algos.preference import check_batch_keys
from jaxrl_llm.algos.train_state import Metrics, TrainState, accumulate, apply_gradients
from jaxrl_llm.models.config import ModelConfig

ROW_KEYS = ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask")
KTO_KEYS = ROW_KEYS + ("label",)
REF_KEYS = ("ref_logps", "ref_kl_logps")


@dataclasses.dataclass(frozen=True)
class KTOConfig:
    """KTO knobs (defaults: TRL's KTOConfig and the paper).

    beta: the log-ratio scale (TRL 0.1).
    desirable_weight / undesirable_weight: lambda_D / lambda_U, the weights of desirable and undesirable
        rows (TRL 1.0 / 1.0; the paper suggests lambda_D n_D / (lambda_U n_U) in [1, 4/3]).
    logprob_chunk: positions per LM-head chunk (memory vs speed; not numerics).
    """

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    logprob_chunk: int = 128

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"kto.beta={self.beta} must be > 0")
        for name in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, name) > 0:
                raise ValueError(f"kto.{name}={getattr(self, name)} must be > 0")
        if isinstance(self.logprob_chunk, bool) or not isinstance(self.logprob_chunk, int) \
                or self.logprob_chunk < 1:
            raise ValueError(f"kto.logprob_chunk={self.logprob_chunk!r}: must be an integer >= 1")


def kl_rows(batch: dict) -> dict:
    """The mismatched rows z0 is estimated on: each prompt with the previous row's completion (row i gets
    row i-1's; row 0 the last row's), as TRL's KL batch."""
    return {"prompt_tokens": batch["prompt_tokens"], "prompt_mask": batch["prompt_mask"],
            "completion_tokens": jnp.roll(batch["completion_tokens"], 1, axis=0),
            "completion_mask": jnp.roll(batch["completion_mask"], 1, axis=0)}


def kto_reference_point(kl_logps_b: jax.Array, ref_kl_logps_b: jax.Array) -> jax.Array:
    """z0 = max(0, mean(policy - reference summed log-probs of the mismatched rows)), detached."""
    diff = jnp.asarray(kl_logps_b, jnp.float32) - jnp.asarray(ref_kl_logps_b, jnp.float32)
    return jax.lax.stop_gradient(jnp.maximum(jnp.mean(diff), 0.0))


def kto_loss(logps_b: jax.Array, ref_logps_b: jax.Array, label_b: jax.Array, z0: jax.Array, *,
             beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Per-row weighted KTO losses [B] (the batch loss is their mean) and implicit rewards beta * r [B]."""
    r = jnp.asarray(logps_b, jnp.float32) - jnp.asarray(ref_logps_b, jnp.float32)
    good = jnp.asarray(label_b).astype(jnp.bool_)
    losses = jnp.where(good, desirable_weight * (1.0 - jax.nn.sigmoid(beta * (r - z0))),
                       undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - r))))
    return losses, jax.lax.stop_gradient(beta * r)


def _sums_fn(module: Any, model_cfg: ModelConfig, chunk: int) -> Callable:
    def sums(params, rows):
        logp, _ = completion_logprobs(module, params, model_cfg, rows["prompt_tokens"], rows["prompt_mask"],
                                      rows["completion_tokens"], rows["completion_mask"], chunk=chunk,
                                      with_entropy=False)
        return jax.lax.stop_gradient(logp.sum(-1))
    return sums


def _both(batch: dict) -> dict:
    """The rows and their KL rows side by side ([B] each), for one no-grad forward per micro-batch."""
    kl = kl_rows(batch)
    return {**{k: batch[k] for k in ROW_KEYS}, **{f"kl_{k}": kl[k] for k in ROW_KEYS}}


def make_reference_logps_fn(module: Any, model_cfg: ModelConfig, chunk: int = 128,
                            num_micro: int = 1) -> Callable[[Any, dict], dict[str, jax.Array]]:
    """`(ref_params, batch) -> {"ref_logps", "ref_kl_logps"}`: the reference's summed [B] log-probs of the
    completions and of the shifted (KL) rows; `num_micro` micro-batches at a time (jit it)."""
    sums = _sums_fn(module, model_cfg, chunk)

    def both(params, mb):
        kl = {k: mb[f"kl_{k}"] for k in ROW_KEYS}
        return {"ref_logps": sums(params, mb), "ref_kl_logps": sums(params, kl)}
    forward = rollout_forward_fn(both, model_cfg, num_micro, keys=ROW_KEYS + tuple(f"kl_{k}" for k in ROW_KEYS))

    def ref_logps(ref_params, batch):
        check_batch_keys(batch, ROW_KEYS, "kto reference log-probs")
        return forward(ref_params, _both(batch))
    return ref_logps


def _wsum(w_b: jax.Array, x_b: jax.Array) -> jax.Array:
    return jnp.sum(w_b * x_b.astype(jnp.float32))


def make_kto_step(module: Any, model_cfg: ModelConfig, cfg: KTOConfig = KTOConfig(),
                  num_micro_batches: int = 1) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, Metrics]]:
    """`step(state, batch, rng) -> (state, metrics)` for a CausalLM policy; jit it with `jit_update`."""
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches={num_micro_batches} must be >= 1")
    keys = KTO_KEYS + REF_KEYS
    sums = _sums_fn(module, model_cfg, cfg.logprob_chunk)
    kl_forward = rollout_forward_fn(sums, model_cfg, num_micro_batches)

    def loss_fn(params, mb, rng):
        del rng
        logp, _ = completion_logprobs(module, params, model_cfg, mb["prompt_tokens"], mb["prompt_mask"],
                                      mb["completion_tokens"], mb["completion_mask"], chunk=cfg.logprob_chunk,
                                      with_entropy=False)
        logps = logp.sum(-1)
        losses, rewards = kto_loss(logps, mb["ref_logps"], mb["label"], mb["z0"], beta=cfg.beta,
                                   desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
        w, wd, wu = mb["seq_w"], mb["des_w"], mb["und_w"]
        r_c, r_u = _wsum(wd, rewards), _wsum(wu, rewards)
        metrics = {"kl": _wsum(w, mb["z0"]), "rewards/chosen": r_c, "rewards/rejected": r_u,
                   "rewards/margins": r_c - r_u, "logps/chosen": _wsum(wd, logps), "logps/rejected": _wsum(wu, logps),
                   "desirable_fraction": _wsum(w, mb["label"])}
        return _wsum(w, losses), metrics

    def step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, Metrics]:
        check_batch_keys(batch, keys, "kto step", "add the reference log-probs with kto.make_reference_logps_fn")
        batch = {k: batch[k] for k in keys}
        if batch["label"].shape[0] < 2:
            raise ValueError("kto step: the batch needs at least 2 rows (z0 is estimated on mismatched "
                             "prompt/completion pairs of the batch)")
        # z0 from the whole batch, before micro-batching, without gradients (TRL detaches it)
        kl_logps = kl_forward(state.model_params(), kl_rows(batch))
        z0 = kto_reference_point(kl_logps, batch["ref_kl_logps"])
        label = batch["label"].astype(jnp.float32)
        b = label.shape[0]
        batch["label"] = label
        batch["z0"] = jnp.full((b,), z0, jnp.float32)
        batch["seq_w"] = sequence_weights(batch["completion_mask"])
        batch["des_w"] = label / jnp.maximum(label.sum(), 1.0)
        batch["und_w"] = (1.0 - label) / jnp.maximum((1.0 - label).sum(), 1.0)
        grads, metrics = accumulate(loss_fn, state.params, batch, rng, num_micro_batches, frozen=state.frozen)
        return apply_gradients(state, grads, metrics)

    return step
