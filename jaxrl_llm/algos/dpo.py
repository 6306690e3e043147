"""Offline preference optimisation from chosen/rejected pairs: DPO, IPO, hinge, robust DPO, SimPO, ORPO, TDPO.

One update step for the family; the loss formulas are in `preference.py`.
Chosen and rejected completions go through ONE forward pass, concatenated
along the batch (TRL's `concatenated_forward`). Per-pair losses are weighted
1/B with B the size of the whole batch (`aggregation.sequence_weights`,
computed before micro-batching), token-level NLL terms with
`aggregation.token_weights` over the whole batch: accumulation is exact.

Batch (dict of arrays):
  prompt_tokens, prompt_mask        [B, P]  left-padded, shared by both responses
  chosen_tokens, chosen_mask        [B, Nc] right-padded
  rejected_tokens, rejected_mask    [B, Nr] right-padded
  ref_chosen_logps, ref_rejected_logps  [B] summed reference log-probs
                                        (DPO-family losses only; not SimPO/ORPO)

Reference log-probs are PRECOMPUTED and carried in the batch (TRL's
`precompute_ref_log_probs`): the step stays `(state, batch, rng)` with only
the trained parameters in the state, and the frozen reference model never
takes part in differentiation. Compute them once per dataset, or per batch
just before the step, with `make_reference_logps_fn`:

    ref_fn = jax.jit(make_reference_logps_fn(module, model_cfg))
    batch = {**batch, **ref_fn(ref_params, batch)}
    state, metrics = update(state, batch, rng)      # update = jit_update(make_dpo_step(...), ...)

The log-probs are always summed over tokens, except where a loss is defined
on per-token averages: SimPO and ORPO (always), IPO when
`ipo_length_normalize=True` (TRL's IPO; the paper and OpenRLHF use sums).
Sampling temperature does not apply (offline data): temperature 1.

Metrics use TRL's names: rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (the
log-probs the loss saw: sums, or averages for SimPO/ORPO/normalised IPO),
logps/chosen_per_token and logps/rejected_per_token (the per-pair average
log-prob, averaged over pairs, whatever the loss), plus pref_loss, nll_loss
and, for ORPO, log_odds_ratio and log_odds_chosen.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxrl_llm.algos.aggregation import check_exclude_empty_rows, check_loss_agg, sequence_weights, token_weights
from jaxrl_llm.algos.logprobs import completion_logprobs, rollout_forward_fn
from jaxrl_llm.algos.preference import (DPO_LOSS_TYPES, PAIR_KEYS, check_batch_keys, check_choice,
                                        check_label_smoothing, concat_pairs, dpo_loss, orpo_loss, pad_pairs,
                                        simpo_loss)
from jaxrl_llm.algos.tdpo import TDPO_LOSS_TYPES, pair_token_kl, tdpo_loss
from jaxrl_llm.algos.train_state import Metrics, TrainState, accumulate, apply_gradients
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.layers import matmul_weights

LOSS_TYPES = DPO_LOSS_TYPES + ("simpo", "orpo") + TDPO_LOSS_TYPES
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Preference-optimisation knobs (defaults: DPO as in the paper and TRL).

    loss_type: sigmoid (DPO; cDPO with label_smoothing) | ipo | hinge | robust |
        simpo | orpo | tdpo1 | tdpo2. The first four need reference log-probs in the batch;
        tdpo1 / tdpo2 (token-level DPO, `tdpo.py`) need the reference params as the step's
        fourth argument (per-token KL over the whole vocabulary).
    beta: DPO's beta / IPO's tau / hinge's scale; SimPO's beta (the paper uses
        2.0-2.5: set it, the 0.1 default is DPO's).
    label_smoothing: cDPO / robust-DPO flip rate, and SimPO's smoothing.
    ipo_length_normalize: IPO on per-token average log-probs (TRL) instead of
        sums (Azar et al., OpenRLHF). Only read for loss_type="ipo".
    simpo_gamma: SimPO target margin gamma in reward units (= beta * the
        official code's gamma_beta_ratio).
    orpo_lambda: ORPO's lambda (TRL calls it beta).
    tdpo_alpha: TDPO2's alpha, the weight of the SeqKL difference (official default 0.5).
    nll_coef: adds nll_coef * NLL(chosen) to the DPO/IPO/hinge/robust/SimPO
        loss (RPO, Pang et al. 2024 = TRL rpo_alpha; CPO/TRL cpo_alpha;
        OpenRLHF nll_loss_coef). ORPO always has its NLL with weight 1.
    loss_agg / norm_length / exclude_empty_rows: aggregation of that NLL
        over tokens (default token-mean over the chosen tokens of the batch,
        as TRL; see `aggregation`).
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    ipo_length_normalize: bool = False
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    tdpo_alpha: float = 0.5
    nll_coef: float = 0.0
    loss_agg: str = "token-mean"
    norm_length: float | None = None
    logprob_chunk: int = 128
    exclude_empty_rows: bool = False

    def __post_init__(self):
        check_choice("dpo.loss_type", self.loss_type, LOSS_TYPES)
        if not self.beta > 0:
            raise ValueError(f"dpo.beta={self.beta} must be > 0")
        check_label_smoothing(self.label_smoothing, "sigmoid" if self.loss_type == "simpo" else self.loss_type)
        if self.ipo_length_normalize and self.loss_type != "ipo":
            raise ValueError(f"dpo.ipo_length_normalize=True only applies to loss_type='ipo', not "
                             f"{self.loss_type!r}; remove it")
        if self.orpo_lambda < 0 or self.nll_coef < 0:
            raise ValueError(f"dpo.orpo_lambda={self.orpo_lambda} and dpo.nll_coef={self.nll_coef} must be >= 0")
        if not self.tdpo_alpha > 0:
            raise ValueError(f"dpo.tdpo_alpha={self.tdpo_alpha} must be > 0 (the paper and its code use 0.5)")
        if self.nll_coef and self.loss_type == "orpo":
            raise ValueError("dpo.nll_coef does not apply to loss_type='orpo' (its NLL weight is 1; "
                             "orpo_lambda weighs the odds-ratio term)")
        check_loss_agg(self.loss_agg)
        if self.norm_length is not None and not self.norm_length > 0:
            raise ValueError(f"dpo.norm_length={self.norm_length} must be > 0")
        check_exclude_empty_rows(self.exclude_empty_rows, "dpo")
        if self.logprob_chunk < 1:
            raise ValueError(f"dpo.logprob_chunk={self.logprob_chunk} must be >= 1")

    @property
    def needs_reference(self) -> bool:
        return self.loss_type in DPO_LOSS_TYPES + TDPO_LOSS_TYPES

    @property
    def reference_in_step(self) -> bool:
        """TDPO: the step reads the reference params (its 4th argument), not precomputed log-probs."""
        return self.loss_type in TDPO_LOSS_TYPES

    def token_weights(self, mask_bt: jax.Array) -> jax.Array:
        """float32 [B, N] weights of the NLL term; call it on the chosen mask of the whole batch."""
        return token_weights(mask_bt, self.loss_agg, self.norm_length, self.exclude_empty_rows)


def pair_logprobs(module: Any, params: Any, model_cfg: ModelConfig, batch: dict,
                  chunk: int = 128) -> tuple[jax.Array, jax.Array]:
    """Per-token completion log-probs of chosen and rejected ([B, N] each, 0 on padding), one forward."""
    batch = pad_pairs(batch)
    b = batch["prompt_tokens"].shape[0]
    logp, _ = completion_logprobs(module, params, model_cfg, *concat_pairs(batch), chunk=chunk, with_entropy=False)
    return logp[:b], logp[b:]


def make_reference_logps_fn(module: Any, model_cfg: ModelConfig, chunk: int = 128,
                            num_micro: int = 1) -> Callable[[Any, dict], dict[str, jax.Array]]:
    """`(ref_params, batch) -> {"ref_chosen_logps", "ref_rejected_logps"}`: summed [B] log-probs (jit it),
    `num_micro` micro-batches of pairs at a time (the stage passes the step's micro-batch count, so the
    reference forward holds no more rows than a training micro-batch).

    On a multi-device mesh, trace it inside `env.activate()` (as `jit_update` does for the step) so the
    activations are placed by their logical axes.
    """
    def pair_sums(ref_params, mb):
        lc, lr = pair_logprobs(module, ref_params, model_cfg, mb, chunk)
        return {"ref_chosen_logps": jax.lax.stop_gradient(lc.sum(-1)),
                "ref_rejected_logps": jax.lax.stop_gradient(lr.sum(-1))}
    forward = rollout_forward_fn(pair_sums, model_cfg, num_micro, keys=PAIR_KEYS)

    def ref_logps(ref_params, batch):
        check_batch_keys(batch, PAIR_KEYS, "reference log-probs")
        return forward(ref_params, batch)
    return ref_logps


def _wsum(w_b: jax.Array, x_b: jax.Array) -> jax.Array:
    return jnp.sum(w_b * x_b.astype(jnp.float32))


def make_dpo_step(module: Any, model_cfg: ModelConfig, cfg: DPOConfig = DPOConfig(),
                  num_micro_batches: int = 1) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, Metrics]]:
    """`step(state, batch, rng) -> (state, metrics)` for a CausalLM policy; jit it with `jit_update`.

    TDPO (`cfg.reference_in_step`): `step(state, batch, rng, ref_params)`, jitted with
    `jit_update(step, state, batch, env, aux_example=ref_params)`; the batch needs no reference log-probs.
    Its extra metrics: seq_kl/chosen and seq_kl/rejected (mean over pairs of the summed per-token
    KL(ref || policy)); its rewards/* are the official beta (log-ratio + SeqKL).
    """
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches={num_micro_batches} must be >= 1")
    keys = PAIR_KEYS + (REF_KEYS if cfg.needs_reference and not cfg.reference_in_step else ())
    use_nll = cfg.loss_type == "orpo" or cfg.nll_coef > 0

    def loss_fn(params, mb, rng, ref=None):
        del rng
        if cfg.reference_in_step:  # TDPO: both models' next-token distributions, chunked over positions
            tok = pair_token_kl(module, params, ref, model_cfg, mb, cfg.logprob_chunk)
            logp_c, logp_r = tok["logp"]
        else:
            logp_c, logp_r = pair_logprobs(module, params, model_cfg, mb, cfg.logprob_chunk)
        sum_c, sum_r = logp_c.sum(-1), logp_r.sum(-1)
        len_c = jnp.maximum(mb["chosen_mask"].astype(jnp.float32).sum(-1), 1.0)
        len_r = jnp.maximum(mb["rejected_mask"].astype(jnp.float32).sum(-1), 1.0)
        w = mb["seq_w"]
        nll = -jnp.sum(mb["nll_w"] * logp_c)  # this micro-batch's share of the batch NLL of chosen tokens
        metrics = {}
        if cfg.reference_in_step:
            (ref_c, ref_r), (kl_c, kl_r) = ([x.sum(-1) for x in tok[k]] for k in ("ref_logp", "kl"))
            losses, r_c, r_r = tdpo_loss(sum_c - ref_c, sum_r - ref_r, kl_c, kl_r, beta=cfg.beta,
                                         alpha=cfg.tdpo_alpha, loss_type=cfg.loss_type)
            seen_c, seen_r = sum_c, sum_r
            metrics["seq_kl/chosen"], metrics["seq_kl/rejected"] = _wsum(w, kl_c), _wsum(w, kl_r)
        elif cfg.needs_reference:
            normalize = cfg.loss_type == "ipo" and cfg.ipo_length_normalize
            lens = (len_c, len_r) if normalize else (None, None)
            losses, r_c, r_r = dpo_loss(sum_c, sum_r, mb["ref_chosen_logps"], mb["ref_rejected_logps"],
                                        beta=cfg.beta, loss_type=cfg.loss_type,
                                        label_smoothing=cfg.label_smoothing,
                                        chosen_lengths_b=lens[0], rejected_lengths_b=lens[1])
            seen_c, seen_r = (sum_c / len_c, sum_r / len_r) if normalize else (sum_c, sum_r)
        elif cfg.loss_type == "simpo":
            seen_c, seen_r = sum_c / len_c, sum_r / len_r
            losses, r_c, r_r = simpo_loss(seen_c, seen_r, beta=cfg.beta, gamma=cfg.simpo_gamma,
                                          label_smoothing=cfg.label_smoothing)
        else:  # orpo: per-pair NLL term whose 1/B-weighted sum is the batch NLL
            seen_c, seen_r = sum_c / len_c, sum_r / len_r
            nll_b = -jnp.sum(mb["nll_w"] * logp_c, axis=-1) / w
            losses, r_c, r_r, ratio = orpo_loss(seen_c, seen_r, nll_b, cfg.orpo_lambda)
            metrics["log_odds_chosen"] = _wsum(w, ratio)  # TRL's names: mean log odds ratio ...
            metrics["log_odds_ratio"] = _wsum(w, jax.nn.log_sigmoid(ratio))  # ... and its mean log sigmoid
        loss = _wsum(w, losses)
        if cfg.loss_type == "orpo":
            metrics["pref_loss"] = loss - nll
        else:
            metrics["pref_loss"] = loss
            loss = loss + cfg.nll_coef * nll
        if use_nll:
            metrics["nll_loss"] = nll
        metrics.update({
            "rewards/chosen": _wsum(w, r_c),
            "rewards/rejected": _wsum(w, r_r),
            "rewards/accuracies": _wsum(w, r_c > r_r),
            "rewards/margins": _wsum(w, r_c - r_r),
            "logps/chosen": _wsum(w, seen_c),
            "logps/rejected": _wsum(w, seen_r),
            # per-token means whatever the loss saw: likelihood displacement shows as both falling
            "logps/chosen_per_token": _wsum(w, sum_c / len_c),
            "logps/rejected_per_token": _wsum(w, sum_r / len_r),
        })
        return loss, metrics

    def step(state: TrainState, batch: dict, rng: jax.Array, ref_params: Any = None) -> tuple[TrainState, Metrics]:
        hint = ("DPO-family losses need reference log-probs: add them with make_reference_logps_fn "
                "(or use loss_type='simpo'/'orpo', which have no reference).") if "ref_chosen_logps" in keys else ""
        if cfg.reference_in_step != (ref_params is not None):
            raise ValueError(f"dpo step (loss_type={cfg.loss_type!r}): " + (
                "needs the reference params as its 4th argument (jit_update(..., aux_example=ref_params))"
                if cfg.reference_in_step else "takes no reference params (only 'tdpo1'/'tdpo2' read them)"))
        check_batch_keys(batch, keys, f"dpo step (loss_type={cfg.loss_type!r})", hint)
        batch = pad_pairs({k: batch[k] for k in keys})
        batch["seq_w"] = sequence_weights(batch["chosen_mask"])
        batch["nll_w"] = cfg.token_weights(batch["chosen_mask"])
        fn = loss_fn
        if cfg.reference_in_step:  # cast once per step, read by every micro-batch (as distill's teacher)
            ref = matmul_weights(ref_params, model_cfg)
            fn = lambda p, mb, r: loss_fn(p, mb, r, ref)  # noqa: E731
        grads, metrics = accumulate(fn, state.params, batch, rng, num_micro_batches, frozen=state.frozen)
        return apply_gradients(state, grads, metrics)

    return step
