"""The GRPO family as one update step whose variant is data: GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++, CISPO,
SAPO.

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
| cispo | group mean/std | group | token-mean | IS weight sg(min(rho, 1.2)) | none | token |
| sapo | group mean/std | group | seq-mean-token-mean | none: sigmoid gate, tau 1.0 / 1.05 | none | token |
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxrl_llm.algos import advantages as adv_lib
from jaxrl_llm.algos.advantages import nonzero_std_groups  # noqa: F401  (DAPO's filter, re-exported here)
from jaxrl_llm.algos.aggregation import micro_batch_token_weights, token_mean_weights
from jaxrl_llm.algos.kl import KL_ESTIMATORS, kl_estimate, kl_penalty_rewards
from jaxrl_llm.algos.logprobs import CONTEXT_KEY, completion_logprobs, rollout_forward_fn
from jaxrl_llm.algos.policy_loss import PolicyLossConfig, policy_loss
from jaxrl_llm.algos.preference import check_choice
from jaxrl_llm.algos.train_state import TrainState, accumulate, apply_gradients
from jaxrl_llm.models.config import ModelConfig

ADVANTAGE_ESTIMATORS = ("group_norm", "rloo", "reinforce_pp")
CONVENTIONS = ("none", "trl", "verl")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """One GRPO-family variant. Use the named constructors (grpo, dr_grpo, dapo, gspo, rloo, reinforce_pp).

    `convention="trl"` / `"verl"` gives every field that still holds our default (and that this configuration
    reads) that peer's default (`convention_settings`); an explicitly different value wins. The resolved
    values are the fields themselves: `replace(convention="none", field=ours)` keeps one of our defaults.
    """

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
    singleton_groups: str = "error"       # a group of one: error | zero (TRL) | raw (verl: baseline 0, std 1)
    normalize_advantages: bool = False    # rloo: whiten the advantages over the batch (TRL's RLOO option)
    returns_reset_at_masked: bool = False  # reinforce_pp: a masked position cuts the running return (verl)
    loss_agg_per_micro_batch: bool = False  # weights from each micro-batch's mask (TRL "bnpo"): NOT exact
    share_prompt_forward: bool = True     # each prompt's forward once for its samples (GRPOLearner)
    convention: str = "none"              # none | trl | verl: that peer's defaults (convention_changes)

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"GRPOConfig.{field}={getattr(self, field)!r}: {why}")
        check_choice("GRPOConfig.convention", self.convention, CONVENTIONS)
        for field, value in convention_changes(self).items():
            object.__setattr__(self, field, value)
        check_choice("GRPOConfig.advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        check_choice("GRPOConfig.scale_rewards", self.scale_rewards, ("group", "batch", "none"))
        check_choice("GRPOConfig.singleton_groups", self.singleton_groups, adv_lib.SINGLETON_GROUPS)
        for f in ("normalize_advantages", "returns_reset_at_masked", "loss_agg_per_micro_batch",
                  "share_prompt_forward"):
            if not isinstance(getattr(self, f), bool):
                bad(f, "must be True or False")
        if self.group_size < 1 or (self.group_size < 2 and self.advantage_estimator != "reinforce_pp"
                                   and self.singleton_groups == "error"):
            bad("group_size", "group baselines need at least 2 completions per prompt (or singleton_groups="
                "'zero' / 'raw' for groups of one)")
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


# ------------------------------------------------------------------ peers' conventions


def convention_settings(cfg: GRPOConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(GRPOConfig fields, PolicyLossConfig fields) that `cfg.convention` gives a peer's default value.

    Only defaults that differ from ours and that this configuration reads (so that a preset never sets
    a key the stage checks would call unread). Checked against TRL v1.9.0 (trl/trainer/grpo_trainer.py,
    grpo_config.py, rloo_trainer.py) and verl main of 29 January 2026 (v0.7.0 + 125 commits; core_algos.py,
    trainer/config/actor/actor.yaml); docs/algorithms.md "Peer conventions" has the table.
    """
    est, lc = cfg.advantage_estimator, cfg.loss
    top: dict[str, Any] = {}
    loss: dict[str, Any] = {"kl_coef": 0.0}  # TRL GRPOTrainer beta=0.0; verl use_kl_loss=False
    if est != "reinforce_pp":
        top["singleton_groups"] = {"trl": "zero", "verl": "raw"}.get(cfg.convention)
    if cfg.convention == "trl":
        if (est == "group_norm" and cfg.scale_rewards != "none") or (est == "rloo" and cfg.normalize_advantages):
            top["std_eps"] = 1e-4
        if est == "rloo":  # RLOOTrainer: beta=0.05 on the summed k1 KL in the reward; sequence-level loss
            top["reward_kl_coef"] = 0.05
            loss["loss_agg"] = "seq-mean-token-sum"
        elif lc.loss_fn != "sapo":  # loss_type="dapo" (the default; "cispo" too); SAPO is loss_type="sapo"
            loss["loss_agg"] = "token-mean"
    elif cfg.convention == "verl":
        loss["exclude_empty_rows"] = True  # agg_loss >= 0.6.1: the seq-mean modes count non-empty rows
        if est == "reinforce_pp":
            top["returns_reset_at_masked"] = True
        if lc.ratio_level == "sequence":  # compute_policy_loss_gspo: seq-mean-token-mean, no dual clip
            loss["seq_log_ratio_clamp"] = 10.0
        elif lc.loss_fn != "sapo":  # actor loss_agg_mode=token-mean (SAPO forces seq-mean-token-mean)
            loss["loss_agg"] = "token-mean"
            if lc.loss_fn == "clip":
                loss["dual_clip"] = 3.0  # clip_ratio_c
    else:
        return {}, {}
    return {k: v for k, v in top.items() if v is not None}, loss


def convention_changes(cfg: GRPOConfig) -> dict[str, Any]:
    """The GRPOConfig fields `cfg.convention` changes: each setting of `convention_settings` whose field
    still holds our library default (GRPOConfig's, and for `loss` the fields of GRPOConfig().loss); a
    field set to any other value keeps it. {} for convention="none"."""
    top, loss = convention_settings(cfg)
    if not top and not loss:
        return {}
    defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    out = {k: v for k, v in top.items() if getattr(cfg, k) == defaults[k]}
    lc, ld = cfg.loss, defaults["loss"]
    new = {k: v for k, v in loss.items() if getattr(lc, k) == getattr(ld, k)}
    kl_coef = new.get("kl_coef", lc.kl_coef)
    if cfg.convention == "verl" and kl_coef > 0 and lc.kl_estimator == "k3" and lc.kl_clamp == ld.kl_clamp:
        new["kl_clamp"] = 10.0  # low_var_kl: k3 clamped to [-10, 10]
    if new:
        out["loss"] = dataclasses.replace(lc, **new)
    return out


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


def cispo(group_size: int = 8, clip_eps_high: float = 0.2, **kw) -> GRPOConfig:
    """CISPO (MiniMax-M1, arXiv 2506.13585): -sg(min(rho, 1 + eps_high)) A logp, no lower bound, token-mean,
    no KL (verl's example: clip_ratio_low=10, clip_ratio_high=0.2; TRL's epsilon_high=5.0 is clip_eps_high=4.0)."""
    return GRPOConfig(group_size=group_size, loss=PolicyLossConfig(
        loss_fn="cispo", clip_eps_low=1.0, clip_eps_high=clip_eps_high, loss_agg="token-mean"), **kw)


def sapo(group_size: int = 8, tau_pos: float = 1.0, tau_neg: float = 1.05, **kw) -> GRPOConfig:
    """SAPO (arXiv 2511.20347): sigmoid gate of the token ratio, temperatures 1.0 / 1.05 for A > 0 / A <= 0
    (paper, verl, TRL), per-sequence token mean, no KL."""
    return GRPOConfig(group_size=group_size, loss=PolicyLossConfig(
        loss_fn="sapo", sapo_tau_pos=tau_pos, sapo_tau_neg=tau_neg, loss_agg="seq-mean-token-mean"), **kw)


VARIANTS: dict[str, Callable[..., GRPOConfig]] = {
    "grpo": grpo, "dr_grpo": dr_grpo, "dapo": dapo, "gspo": gspo, "rloo": rloo, "reinforce_pp": reinforce_pp,
    "cispo": cispo, "sapo": sapo}


# ------------------------------------------------------------------ advantages


def compute_advantages(cfg: GRPOConfig, rewards_b: jax.Array, completion_mask_bn: jax.Array, *,
                       old_logprobs_bn: jax.Array | None = None,
                       ref_logprobs_bn: jax.Array | None = None,
                       group_ids: jax.Array | None = None) -> jax.Array:
    """Token advantages [B, N] for the whole rollout batch (never per micro-batch).

    With reward_kl_coef > 0 the KL of the rollout policy to the reference (`reward_kl_estimator` per token,
    needs old_logprobs_bn and ref_logprobs_bn) is folded into the rewards before the baseline:
    reinforce_pp per token (`kl.kl_penalty_rewards`); group_norm and rloo per sequence,
    r_i - reward_kl_coef * sum_t kl_t (TRL's RLOO: `rewards - beta * kl.sum(-1)` with k1).

    A non-finite (NaN) reward marks an unscored completion: its advantage is exactly 0 on every token and
    it is left out of every statistic (group mean / std, leave-one-out baseline, batch std, REINFORCE++'s
    whitening), as TRL does. `group_ids` [B] (group_norm and rloo): rows with equal ids form a group, of
    any size and in any order (verl's `index`), instead of contiguous runs of group_size rows.
    """
    mask = completion_mask_bn
    if group_ids is not None and cfg.advantage_estimator == "reinforce_pp":
        raise ValueError("compute_advantages: group_ids given with advantage_estimator='reinforce_pp', which has "
                         "no groups (it whitens over the batch); drop group_ids or use 'group_norm' / 'rloo'")
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
                                     eps=cfg.std_eps, std_ddof=cfg.std_ddof, group_ids=group_ids,
                                     singleton=cfg.singleton_groups)
        return adv_lib.broadcast_to_tokens(a, mask)
    if cfg.advantage_estimator == "rloo":
        a = adv_lib.rloo_advantages(rewards_b, cfg.group_size, group_ids=group_ids, singleton=cfg.singleton_groups,
                                    normalize=cfg.normalize_advantages, eps=cfg.std_eps, std_ddof=cfg.std_ddof)
        return adv_lib.broadcast_to_tokens(a, mask)
    rewards_b = jnp.asarray(rewards_b, jnp.float32)
    scored = jnp.isfinite(rewards_b)  # unscored rows: out of the whitening, advantage 0
    rewards_b = jnp.where(scored, rewards_b, 0.0)
    mask = jnp.asarray(mask).astype(bool) & scored[:, None]
    if cfg.reward_kl_coef > 0:
        token_rewards = kl_penalty_rewards(rewards_b, old_logprobs_bn, ref_logprobs_bn, mask, cfg.reward_kl_coef,
                                           kind=cfg.reward_kl_estimator)
    else:
        token_rewards = kl_penalty_rewards(rewards_b, jnp.zeros(mask.shape), jnp.zeros(mask.shape), mask, 0.0)
    return adv_lib.reinforce_pp_advantages(token_rewards, mask, gamma=cfg.gamma,
                                           reset_at_masked=cfg.returns_reset_at_masked)


# ------------------------------------------------------------------ the update step


def policy_logprobs(module: Any, params: Any, model_cfg: ModelConfig, batch: dict, *, temperature: float,
                    chunk: int, with_entropy: bool = False, prompt_group: int = 1):
    """Log-probs (and entropies) [B, N] of the batch's completions under `params` (`prompt_group`: see
    `logprobs.completion_logprobs`)."""
    return completion_logprobs(module, params, model_cfg, batch["prompt_tokens"], batch["prompt_mask"],
                               batch["completion_tokens"], batch["completion_mask"],
                               temperature=temperature, chunk=chunk, with_entropy=with_entropy,
                               context_mask=batch.get(CONTEXT_KEY), prompt_group=prompt_group)


def make_logprob_fn(module: Any, model_cfg: ModelConfig, temperature: float = 1.0, chunk: int = 128,
                    num_micro: int = 1, prompt_unit: int = 1) -> Callable:
    """`(params, batch) -> logprobs [B, N]`: old-policy recomputation and reference log-probs (jit it),
    `num_micro` micro-batches of rows at a time (`map_micro`; the stage passes the update's micro-batch
    count, num_minibatches x num_micro_batches, so no forward holds more rows than an update step).
    `prompt_unit` u > 1: every u consecutive rows share their prompt (`train_state.prompt_unit`); the
    micro-batches take whole units and each prompt's forward runs once for them."""
    return rollout_forward_fn(
        lambda params, mb: policy_logprobs(module, params, model_cfg, mb, temperature=temperature, chunk=chunk,
                                           prompt_group=prompt_unit)[0],
        model_cfg, num_micro, unit=prompt_unit)


def make_grpo_step(module: Any, model_cfg: ModelConfig, cfg: GRPOConfig, prompt_unit: int = 1) -> Callable:
    """Pure `(state, batch, rng) -> (state, metrics)`: one optimiser step on one minibatch.

    Aggregation weights come from the whole minibatch's mask before it is
    split into `cfg.num_micro_batches`, so accumulation is exact. With
    `cfg.loss_agg_per_micro_batch` (not exact) each micro-batch's weights
    come from its own mask instead (`aggregation.micro_batch_token_weights`).
    `prompt_unit` u > 1: every u consecutive rows of the minibatch share their prompt; micro-batches take
    whole units and each prompt's forward runs once for its u completions (`make_epoch_runner(unit=u)`
    keeps the units together).
    """
    lc = cfg.loss
    need_entropy = True  # reported every step; the extra reduction rides along the chunked head
    per_micro = cfg.loss_agg_per_micro_batch

    def loss_fn(params, mb, rng):
        logp, ent = policy_logprobs(module, params, model_cfg, mb, temperature=cfg.temperature,
                                    chunk=cfg.logprob_chunk, with_entropy=need_entropy, prompt_group=prompt_unit)
        old = mb.get("old_logprobs")
        old = jax.lax.stop_gradient(logp) if old is None else old
        weights = (micro_batch_token_weights(mb["completion_mask"], mb["row_share"], lc.loss_agg, lc.norm_length,
                                             lc.exclude_empty_rows) if per_micro else mb["weights"])
        loss, metrics = policy_loss(lc, logp, old, mb["advantages"], weights, mb["metric_weights"],
                                    ref_logp_bt=mb.get("ref_logprobs") if lc.kl_coef > 0 else None,
                                    entropy_bt=ent, sampler_logp_bt=mb.get("sampler_logprobs"),
                                    mask_bt=mb["completion_mask"])
        return loss, metrics

    def step(state: TrainState, batch: dict, rng: jax.Array):
        mask = batch["completion_mask"]
        if per_micro:  # each row's share of the minibatch: a micro-batch's weights sum to its rows' share
            batch = dict(batch, row_share=jnp.full(mask.shape[:1], 1.0 / mask.shape[0], jnp.float32),
                         metric_weights=token_mean_weights(mask))
        else:
            batch = dict(batch, weights=lc.token_weights(mask), metric_weights=token_mean_weights(mask))
        grads, metrics = accumulate(loss_fn, state.params, batch, rng, cfg.num_micro_batches, frozen=state.frozen,
                                    unit=prompt_unit)
        m = mask.astype(jnp.float32)
        metrics["response_length"] = jnp.mean(jnp.sum(m, axis=-1))
        metrics["advantage_mean"] = jnp.sum(batch["advantages"] * batch["metric_weights"])
        return apply_gradients(state, grads, metrics)

    return step
