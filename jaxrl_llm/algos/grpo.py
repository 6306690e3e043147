"""The GRPO family as one update step whose variant is data: GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++.

    cfg = grpo.dapo(group_size=16)                    # or grpo.grpo(), grpo.dr_grpo(max_len), grpo.gspo(), ...
    adv = grpo.compute_advantages(cfg, rewards_b, completion_mask)         # on the whole rollout batch
    step = grpo.make_grpo_step(module, model_cfg, cfg)                     # (state, batch, rng) -> (state, metrics)
    update = jit_update(make_epoch_runner(step, cfg.num_minibatches, cfg.epochs), state, batch, env)

A batch is a dict of arrays, rows laid out as the sampler returns them
(prompt i owns rows i*G .. i*G+G-1):

    prompt_tokens [B, P] (left-padded), prompt_mask [B, P],
    completion_tokens [B, N], completion_mask [B, N],
    advantages [B, N]                      (compute_advantages),
    old_logprobs [B, N]      optional      policy log-probs at rollout time (recompute_logprobs);
                                           absent = on-policy (old = stop_grad(new), one inner epoch)
    ref_logprobs [B, N]      when kl_coef > 0 (reference_logprobs)
    sampler_logprobs [B, N]  optional      the sampler's raw_logprobs: mismatch metrics and TIS

What each variant sets (see docs/algorithms.md for sources and peers' defaults):

| variant | advantage | std | loss_agg | clip (low, high) | KL | ratio |
|---|---|---|---|---|---|---|
| grpo | group mean/std | group | seq-mean-token-mean | 0.2, 0.2 | k3, beta 0.04 | token |
| dr_grpo | group mean, no std | - | seq-mean-token-sum-norm (max len) | 0.2, 0.2 | none | token |
| dapo | group mean/std | group | token-mean | 0.2, 0.28 | none | token |
| gspo | group mean/std | group | seq-mean-token-mean | 3e-4, 4e-4 | none | sequence |
| rloo | leave-one-out | - | seq-mean-token-mean | 0.2, 0.2 | none | token |
| reinforce_pp | global whitened returns, k1 KL in reward | batch | token-mean | 0.2, 0.2 | in reward | token |
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxrl_llm.algos import advantages as adv_lib
from jaxrl_llm.algos.advantages import nonzero_std_groups  # noqa: F401  (DAPO's filter, re-exported here)
from jaxrl_llm.algos.aggregation import token_mean_weights
from jaxrl_llm.algos.kl import KL_ESTIMATORS, kl_estimate, kl_penalty_rewards
from jaxrl_llm.algos.logprobs import CONTEXT_KEY, completion_logprobs, rollout_forward_fn
from jaxrl_llm.algos.policy_loss import PolicyLossConfig, policy_loss
from jaxrl_llm.algos.preference import check_choice
from jaxrl_llm.algos.train_state import TrainState, accumulate, apply_gradients
from jaxrl_llm.models.config import ModelConfig

ADVANTAGE_ESTIMATORS = ("group_norm", "rloo", "reinforce_pp")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """One GRPO-family variant. Use the named constructors (grpo, dr_grpo, dapo, gspo, rloo, reinforce_pp)."""

    group_size: int = 8
    advantage_estimator: str = "group_norm"
    scale_rewards: str = "group"          # group | batch | none  (group_norm only)
    std_eps: float = 1e-6
    std_ddof: int = 1
    reward_kl_coef: float = 0.0           # KL penalty folded into the rewards (see compute_advantages)
    reward_kl_estimator: str = "k1"
    gamma: float = 1.0
    loss: PolicyLossConfig = PolicyLossConfig(kl_coef=0.04)
    temperature: float = 1.0              # logits / temperature in the training forward, as in sampling
    logprob_chunk: int = 128
    num_micro_batches: int = 1
    num_minibatches: int = 1
    epochs: int = 1
    filter_zero_std_groups: bool = False  # DAPO dynamic sampling (the rollout loop drops/refills groups)

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"GRPOConfig.{field}={getattr(self, field)!r}: {why}")
        check_choice("GRPOConfig.advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        check_choice("GRPOConfig.scale_rewards", self.scale_rewards, ("group", "batch", "none"))
        if self.group_size < 2 and self.advantage_estimator != "reinforce_pp":
            bad("group_size", "group baselines need at least 2 completions per prompt")
        check_choice("GRPOConfig.reward_kl_estimator", self.reward_kl_estimator, KL_ESTIMATORS)
        if self.temperature <= 0:
            bad("temperature", "must be > 0 (use 1.0 when sampling greedily)")
        for f in ("num_micro_batches", "num_minibatches", "epochs", "logprob_chunk"):
            if getattr(self, f) < 1:
                bad(f, "must be >= 1")

    def replace(self, **kw) -> "GRPOConfig":
        return dataclasses.replace(self, **kw)

    @property
    def needs_reference(self) -> bool:
        """The reference policy's log-probs are needed: a KL term in the loss or folded into the rewards."""
        return self.loss.kl_coef > 0 or self.reward_kl_coef > 0

    @property
    def needs_old_logprobs(self) -> bool:
        """The rollout policy's log-probs need their own forward: several updates per rollout (the ratio is
        then not 1), or a KL folded into the rewards (it compares the rollout policy with the reference).
        One update per rollout otherwise uses stop_gradient(new log-probs) as the old ones."""
        return self.epochs * self.num_minibatches > 1 or self.reward_kl_coef > 0


# ------------------------------------------------------------------ named variants


def grpo(group_size: int = 8, beta: float = 0.04, **kw) -> GRPOConfig:
    """DeepSeekMath GRPO (arXiv 2402.03300): group mean/std, per-sequence token mean, k3 KL in the loss."""
    return GRPOConfig(group_size=group_size, loss=PolicyLossConfig(kl_coef=beta, kl_estimator="k3"), **kw)


def dr_grpo(max_new_tokens: int, group_size: int = 8, **kw) -> GRPOConfig:
    """Dr. GRPO (arXiv 2503.20783): no std division, token sums divided by a constant (the max length)."""
    return GRPOConfig(group_size=group_size, scale_rewards="none",
                      loss=PolicyLossConfig(loss_agg="seq-mean-token-sum-norm", norm_length=float(max_new_tokens)),
                      **kw)


def dapo(group_size: int = 16, **kw) -> GRPOConfig:
    """DAPO (arXiv 2503.14476): clip-higher 0.2/0.28, token-level loss, no KL, dynamic sampling."""
    return GRPOConfig(group_size=group_size, filter_zero_std_groups=True,
                      loss=PolicyLossConfig(clip_eps_low=0.2, clip_eps_high=0.28, loss_agg="token-mean"), **kw)


def gspo(group_size: int = 8, **kw) -> GRPOConfig:
    """GSPO (arXiv 2507.18071): sequence-level ratio, clipped at 3e-4 / 4e-4, no KL."""
    return GRPOConfig(group_size=group_size, loss=PolicyLossConfig(
        clip_eps_low=3e-4, clip_eps_high=4e-4, ratio_level="sequence"), **kw)


def rloo(group_size: int = 8, **kw) -> GRPOConfig:
    """RLOO (Ahmadian et al. 2024): leave-one-out baseline, no std, no KL in the loss."""
    return GRPOConfig(group_size=group_size, advantage_estimator="rloo", loss=PolicyLossConfig(), **kw)


def reinforce_pp(group_size: int = 8, kl_coef: float = 0.01, **kw) -> GRPOConfig:
    """REINFORCE++ (arXiv 2501.03262): k1 KL folded into token rewards, globally whitened returns."""
    return GRPOConfig(group_size=group_size, advantage_estimator="reinforce_pp", reward_kl_coef=kl_coef,
                      scale_rewards="batch", loss=PolicyLossConfig(loss_agg="token-mean"), **kw)


VARIANTS: dict[str, Callable[..., GRPOConfig]] = {
    "grpo": grpo, "dr_grpo": dr_grpo, "dapo": dapo, "gspo": gspo, "rloo": rloo, "reinforce_pp": reinforce_pp}


# ------------------------------------------------------------------ advantages


def compute_advantages(cfg: GRPOConfig, rewards_b: jax.Array, completion_mask_bn: jax.Array, *,
                       old_logprobs_bn: jax.Array | None = None,
                       ref_logprobs_bn: jax.Array | None = None) -> jax.Array:
    """Token advantages [B, N] for the whole rollout batch (never per micro-batch).

    With reward_kl_coef > 0 the KL of the rollout policy to the reference (`reward_kl_estimator` per token,
    needs old_logprobs_bn and ref_logprobs_bn) is folded into the rewards before the baseline:
    reinforce_pp per token (`kl.kl_penalty_rewards`); group_norm and rloo per sequence,
    r_i - reward_kl_coef * sum_t kl_t (TRL's RLOO: `rewards - beta * kl.sum(-1)` with k1).
    """
    mask = completion_mask_bn
    if cfg.reward_kl_coef > 0 and (old_logprobs_bn is None or ref_logprobs_bn is None):
        raise ValueError(f"{cfg.advantage_estimator} with reward_kl_coef={cfg.reward_kl_coef} needs old_logprobs_bn "
                         "and ref_logprobs_bn (the KL folded into the rewards)")
    if cfg.reward_kl_coef > 0 and cfg.advantage_estimator != "reinforce_pp":
        m = jnp.asarray(mask).astype(bool)
        kl_bn = kl_estimate(jnp.where(m, old_logprobs_bn, 0.0), jnp.where(m, ref_logprobs_bn, 0.0),
                            cfg.reward_kl_estimator)
        rewards_b = jnp.asarray(rewards_b, jnp.float32) - cfg.reward_kl_coef * jnp.sum(jnp.where(m, kl_bn, 0.0), -1)
    if cfg.advantage_estimator == "group_norm":
        a = adv_lib.group_advantages(rewards_b, cfg.group_size, scale_by_std=cfg.scale_rewards != "none",
                                     std_over="batch" if cfg.scale_rewards == "batch" else "group",
                                     eps=cfg.std_eps, std_ddof=cfg.std_ddof)
        return adv_lib.broadcast_to_tokens(a, mask)
    if cfg.advantage_estimator == "rloo":
        return adv_lib.broadcast_to_tokens(adv_lib.rloo_advantages(rewards_b, cfg.group_size), mask)
    if cfg.reward_kl_coef > 0:
        token_rewards = kl_penalty_rewards(rewards_b, old_logprobs_bn, ref_logprobs_bn, mask, cfg.reward_kl_coef,
                                           kind=cfg.reward_kl_estimator)
    else:
        token_rewards = kl_penalty_rewards(rewards_b, jnp.zeros(mask.shape), jnp.zeros(mask.shape), mask, 0.0)
    return adv_lib.reinforce_pp_advantages(token_rewards, mask, gamma=cfg.gamma)


# ------------------------------------------------------------------ the update step


def policy_logprobs(module: Any, params: Any, model_cfg: ModelConfig, batch: dict, *, temperature: float,
                    chunk: int, with_entropy: bool = False):
    """Log-probs (and entropies) [B, N] of the batch's completions under `params`."""
    return completion_logprobs(module, params, model_cfg, batch["prompt_tokens"], batch["prompt_mask"],
                               batch["completion_tokens"], batch["completion_mask"],
                               temperature=temperature, chunk=chunk, with_entropy=with_entropy,
                               context_mask=batch.get(CONTEXT_KEY))


def make_logprob_fn(module: Any, model_cfg: ModelConfig, temperature: float = 1.0, chunk: int = 128,
                    num_micro: int = 1) -> Callable:
    """`(params, batch) -> logprobs [B, N]`: old-policy recomputation and reference log-probs (jit it),
    `num_micro` micro-batches of rows at a time (`map_micro`; the stage passes the update's micro-batch
    count, num_minibatches x num_micro_batches, so no forward holds more rows than an update step)."""
    return rollout_forward_fn(
        lambda params, mb: policy_logprobs(module, params, model_cfg, mb, temperature=temperature, chunk=chunk)[0],
        model_cfg, num_micro)


def make_grpo_step(module: Any, model_cfg: ModelConfig, cfg: GRPOConfig) -> Callable:
    """Pure `(state, batch, rng) -> (state, metrics)`: one optimiser step on one minibatch.

    Aggregation weights come from the whole minibatch's mask before it is
    split into `cfg.num_micro_batches`, so accumulation is exact.
    """
    lc = cfg.loss
    need_entropy = True  # reported every step; the extra reduction rides along the chunked head

    def loss_fn(params, mb, rng):
        logp, ent = policy_logprobs(module, params, model_cfg, mb, temperature=cfg.temperature,
                                    chunk=cfg.logprob_chunk, with_entropy=need_entropy)
        old = mb.get("old_logprobs")
        old = jax.lax.stop_gradient(logp) if old is None else old
        loss, metrics = policy_loss(lc, logp, old, mb["advantages"], mb["weights"], mb["metric_weights"],
                                    ref_logp_bt=mb.get("ref_logprobs") if lc.kl_coef > 0 else None,
                                    entropy_bt=ent, sampler_logp_bt=mb.get("sampler_logprobs"),
                                    mask_bt=mb["completion_mask"])
        return loss, metrics

    def step(state: TrainState, batch: dict, rng: jax.Array):
        mask = batch["completion_mask"]
        batch = dict(batch, weights=lc.token_weights(mask),
                     metric_weights=token_mean_weights(mask))
        grads, metrics = accumulate(loss_fn, state.params, batch, rng, cfg.num_micro_batches, frozen=state.frozen)
        m = mask.astype(jnp.float32)
        metrics["response_length"] = jnp.mean(jnp.sum(m, axis=-1))
        metrics["advantage_mean"] = jnp.sum(batch["advantages"] * batch["metric_weights"])
        return apply_gradients(state, grads, metrics)

    return step
