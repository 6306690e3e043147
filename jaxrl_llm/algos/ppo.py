"""PPO for language models (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022) as one update step.

    cfg = ppo.PPOConfig(kl=KLControllerConfig(kind="adaptive", init_coef=0.05, target=6.0))
    params = {"policy": copy_of_sft, "value": ppo.init_value_from_reward(rm_params)}     # copies: steps donate
    stats = jax.jit(ppo.make_rollout_fn(policy_module, value_module, model_cfg, cfg))   # old log-probs, values
    ref = jax.jit(ppo.make_logprob_fn(policy_module, model_cfg, cfg.temperature))        # reference log-probs
    step = ppo.make_ppo_step(policy_module, value_module, model_cfg, cfg)
    update = jit_update(make_epoch_runner(step, cfg.num_minibatches, cfg.epochs), state, batch, env)

    # per rollout batch (host loop):
    ro = sampler(ppo.policy_params(cfg, state.params), prompts, prompt_mask, key)
    batch = {prompt_tokens, prompt_mask, completion_tokens: ro.tokens, completion_mask: ro.mask}
    batch |= stats(state.params, batch)                                      # old_logprobs, old_values
    t = ppo.compute_targets(cfg, scores, batch["old_logprobs"], ref(ref_params, batch), batch["old_values"],
                            batch["completion_mask"], kl_coef, finished_b=ro.finished)
    state, metrics = update(state, batch | {"advantages": t["advantages"], "returns": t["returns"]}, rng)
    kl_coef = ppo.update_kl_coef(cfg, kl_coef, t["kl"], n_steps=num_rows)

Batch (rows as the sampler returns them): prompt_tokens [B, P] left-padded,
prompt_mask [B, P], completion_tokens [B, N], completion_mask [B, N],
old_logprobs [B, N], old_values [B, N], advantages [B, N], returns [B, N],
optional sampler_logprobs [B, N] (mismatch metrics, TIS), and ref_logprobs
[B, N]: optional (the metric kl_ref), required when `cfg.loss.kl_coef > 0`
(a KL term in the loss as well as in the reward).

Value positions: the value of completion position n is read from the hidden
state that predicts completion token n (sequence position P - 1 + n), the
same positions as the log-probs: V_n estimates the return of the state
before token n is chosen (TRL and verl slice `[:, P-1:-1]` likewise).

Parameters: {"policy": CausalLM params, "value": ScalarHeadModel(per_token=True)
params} for separate models, or one `PolicyValueModel` tree when
`shared_backbone`. One optimiser over the whole tree (a single TrainState);
`separate_optimizers` gives the value model its own learning rate.
See docs/algorithms.md, section "PPO for language models", for every knob,
the implementation details and the peers' defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxrl_llm.algos import advantages as adv_lib
from jaxrl_llm.algos.aggregation import token_mean_weights
from jaxrl_llm.algos.kl import KL_ESTIMATORS, KLControllerConfig, kl_coef_update, kl_estimate, kl_penalty_rewards
from jaxrl_llm.algos.logprobs import (CONTEXT_KEY, completion_logprobs, logprobs_from_hidden, rollout_forward_fn,
                                      sequence)
from jaxrl_llm.algos.policy_loss import PolicyLossConfig, policy_loss, value_loss
from jaxrl_llm.algos.preference import check_choice
from jaxrl_llm.algos.train_state import (OptimizerConfig, TrainState, accumulate, apply_gradients, dropout_rngs,
                                        make_optimizer)
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.transformer import PolicyValueModel, ScalarHeadModel, unembedding

REQUIRED_KEYS = ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask", "old_logprobs",
                 "old_values", "advantages", "returns")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO-for-LMs hyper-parameters (defaults follow TRL's PPOTrainer; docs/algorithms.md, "PPOConfig").

    gamma, lam: GAE discount and lambda.
    kl: the KL-in-reward coefficient and its controller (fixed / adaptive).
    reward_kl_estimator, reward_kl_clamp: the per-token KL folded into the reward.
    loss: the clipped policy loss; its `loss_agg` also weights the value loss.
    vf_coef, value_clip: loss = policy + vf_coef * value loss clipped around old values.
    whiten_advantages: advantages whitened over the whole rollout batch.
    whiten_rewards: token rewards scaled by their std (mean kept) before GAE (TRL).
    shared_backbone: one PolicyValueModel instead of separate policy and value models.
    missing_eos_penalty: the score of a completion with no EOS is replaced by this value.
    temperature: logits are divided by the sampling temperature in the training forward.

    "N+ implementation details" (Huang et al. 2024, arXiv 2403.17031) taken here:
    score on the EOS token, k1 KL per token, fixed score for no-EOS completions,
    temperature in training, value at the positions that predict the tokens,
    rollout-batch advantage whitening, value clipping. Left to OptimizerConfig:
    Adam eps 1e-5, LR annealing, grad clipping. Left to the caller: reward-model
    score normalisation. Not done: per-minibatch advantage normalisation,
    approx-KL early stopping.
    """

    gamma: float = 1.0
    lam: float = 0.95
    kl: KLControllerConfig = KLControllerConfig()
    reward_kl_estimator: str = "k1"
    reward_kl_clamp: float | None = None
    loss: PolicyLossConfig = PolicyLossConfig(loss_agg="token-mean")
    vf_coef: float = 0.1
    value_clip: float | None = 0.2
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    shared_backbone: bool = False
    missing_eos_penalty: float | None = None
    temperature: float = 1.0
    logprob_chunk: int = 128
    num_micro_batches: int = 1
    num_minibatches: int = 1
    epochs: int = 4

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"PPOConfig.{field}={getattr(self, field)!r}: {why}")
        for f in ("gamma", "lam"):
            if not 0.0 <= getattr(self, f) <= 1.0:
                bad(f, "must be in [0, 1]")
        if not isinstance(self.kl, KLControllerConfig):
            bad("kl", "must be a KLControllerConfig(kind='fixed'|'adaptive', init_coef, target, horizon)")
        if not isinstance(self.loss, PolicyLossConfig):
            bad("loss", "must be a PolicyLossConfig")
        check_choice("PPOConfig.reward_kl_estimator", self.reward_kl_estimator, KL_ESTIMATORS)
        if self.reward_kl_clamp is not None and not self.reward_kl_clamp > 0:
            bad("reward_kl_clamp", "must be None (off) or > 0")
        if not self.vf_coef >= 0:
            bad("vf_coef", "must be >= 0")
        if self.value_clip is not None and not self.value_clip > 0:
            bad("value_clip", "must be None (plain squared error) or > 0")
        if not self.temperature > 0:
            bad("temperature", "must be > 0 (use 1.0 when sampling greedily)")
        for f in ("num_micro_batches", "num_minibatches", "epochs", "logprob_chunk"):
            if not (isinstance(getattr(self, f), int) and getattr(self, f) >= 1):
                bad(f, "must be an int >= 1")

    def replace(self, **kw) -> "PPOConfig":
        return dataclasses.replace(self, **kw)

    @property
    def needs_reference(self) -> bool:
        """The reference policy's log-probs are needed: a KL in the reward (a fixed coefficient > 0, or an
        adaptive one, which may grow from 0) or in the loss."""
        return self.kl.init_coef > 0 or self.kl.kind == "adaptive" or self.loss.kl_coef > 0

    @property
    def needs_old_logprobs(self) -> bool:
        """Always: the rollout policy's log-probs and values come from one forward before the updates."""
        return True


# ------------------------------------------------------------------ rollout-time targets


def compute_targets(cfg: PPOConfig, scores_b: jax.Array, old_logprobs_bn: jax.Array, ref_logprobs_bn: jax.Array,
                    old_values_bn: jax.Array, completion_mask_bn: jax.Array, kl_coef: jax.Array | float,
                    finished_b: jax.Array | None = None,
                    process_rewards_bn: jax.Array | None = None) -> dict[str, jax.Array]:
    """Advantages and value targets for one rollout batch (call once, before the epochs; jittable).

    score_i <- missing_eos_penalty where not finished_b (when set);
    r_t = -kl_coef * kl(old_t, ref_t) on every real token, + score_i on the last real token
    (`kl.kl_penalty_rewards`), + process_rewards_bn[t] when given (dense per-step rewards at the steps'
    end tokens, `algos.process_rewards.step_token_rewards`; masked positions ignored);
    optionally r <- r / std(r) (mean kept, `whiten_rewards`);
    (A, R) = GAE(r, V_old, gamma, lam) with R = A + V_old; A whitened over every real token
    of the batch (`whiten_advantages`); R is not whitened.

    Returns float32 arrays advantages, returns, token_rewards, kl_bn [B, N], scores [B] (after
    the EOS penalty), and scalars kl (mean over rows of the summed per-token KL: the
    `observed_kl` of `update_kl_coef`), kl_token_mean, non_score_reward (mean summed
    -kl_coef * kl), rlhf_reward (score + non_score_reward), score_mean, missing_eos_frac, kl_coef.
    """
    m = jnp.asarray(completion_mask_bn).astype(bool)
    mf = m.astype(jnp.float32)
    scores = jnp.asarray(scores_b, jnp.float32)
    out: dict[str, jax.Array] = {}
    if cfg.missing_eos_penalty is not None:
        if finished_b is None:
            raise ValueError(f"compute_targets: PPOConfig.missing_eos_penalty={cfg.missing_eos_penalty} needs "
                             "finished_b (bool [B], the completion emitted an EOS: the sampler's `finished`)")
        finished = jnp.asarray(finished_b).astype(bool)
        scores = jnp.where(finished, scores, jnp.float32(cfg.missing_eos_penalty))
    if finished_b is not None:
        out["missing_eos_frac"] = jnp.mean(1.0 - jnp.asarray(finished_b).astype(jnp.float32))
    coef = jnp.asarray(kl_coef, jnp.float32)
    old = jnp.where(m, jnp.asarray(old_logprobs_bn, jnp.float32), 0.0)
    ref = jnp.where(m, jnp.asarray(ref_logprobs_bn, jnp.float32), 0.0)
    kl_bn = jnp.where(m, kl_estimate(old, ref, cfg.reward_kl_estimator, cfg.reward_kl_clamp), 0.0)
    token_rewards = kl_penalty_rewards(scores, old, ref, m, coef, kind=cfg.reward_kl_estimator,
                                       clamp=cfg.reward_kl_clamp)
    if process_rewards_bn is not None:
        token_rewards = token_rewards + jnp.where(m, jnp.asarray(process_rewards_bn, jnp.float32), 0.0)
    if cfg.whiten_rewards:
        token_rewards = adv_lib.whiten(token_rewards, m, shift_mean=False)
    advantages, returns = adv_lib.gae(token_rewards, old_values_bn, m, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        advantages = adv_lib.whiten(advantages, m, shift_mean=True)
    kl_seq = jnp.sum(kl_bn, axis=-1)
    out.update(advantages=advantages, returns=returns, token_rewards=token_rewards, kl_bn=kl_bn, scores=scores,
               kl=jnp.mean(kl_seq), kl_token_mean=jnp.sum(kl_bn) / jnp.maximum(jnp.sum(mf), 1.0),
               non_score_reward=jnp.mean(-coef * kl_seq), rlhf_reward=jnp.mean(scores - coef * kl_seq),
               score_mean=jnp.mean(scores), kl_coef=coef)
    return out


def update_kl_coef(cfg: PPOConfig, coef: jax.Array | float, observed_kl: jax.Array | float,
                   n_steps: jax.Array | int) -> jax.Array:
    """The KL-in-reward coefficient after one rollout batch: `kl.kl_coef_update` with `cfg.kl`.

    observed_kl: `compute_targets(...)["kl"]` (per-sequence KL averaged over rows);
    n_steps: rows (sequences) in the batch. "fixed" returns `coef`.
    """
    return kl_coef_update(coef, observed_kl, n_steps, cfg.kl)


# ------------------------------------------------------------------ forwards


def _check_value_module(module: Any) -> None:
    if isinstance(module, PolicyValueModel):
        return
    if not isinstance(module, ScalarHeadModel) or not module.per_token:
        raise ValueError("the PPO value model must be ScalarHeadModel(cfg, per_token=True) (models.value_model(cfg)) "
                         f"or a PolicyValueModel; got {type(module).__name__}"
                         + (" with per_token=False" if isinstance(module, ScalarHeadModel) else ""))


def shared_forward(module: PolicyValueModel, params: Any, model_cfg: ModelConfig, batch: dict, *,
                   temperature: float = 1.0, chunk: int = 128, with_entropy: bool = False):
    """One PolicyValueModel forward: (log-probs, entropies or None, values), each [B, N], 0 where masked."""
    tokens, mask, p, n = sequence(batch)
    hidden, values = module.apply({"params": params}, tokens, None, mask, rngs=dropout_rngs())
    logp, ent = logprobs_from_hidden(hidden[:, p - 1:p - 1 + n], unembedding(params, model_cfg),
                                     batch["completion_tokens"], temperature=temperature, chunk=chunk,
                                     with_entropy=with_entropy)
    m = batch["completion_mask"].astype(jnp.float32)
    return logp * m, (ent * m if ent is not None else None), values[:, p - 1:p - 1 + n] * m


def completion_values(value_module: Any, params: Any, batch: dict) -> jax.Array:
    """float32 [B, N] values at the positions that predict the completion tokens; 0 where masked."""
    _check_value_module(value_module)
    tokens, mask, p, n = sequence(batch)
    out = value_module.apply({"params": params}, tokens, None, mask, rngs=dropout_rngs())
    values = out[1] if isinstance(value_module, PolicyValueModel) else out
    return values[:, p - 1:p - 1 + n] * batch["completion_mask"].astype(jnp.float32)


def _policy_logprobs(module: Any, params: Any, model_cfg: ModelConfig, batch: dict, *, temperature: float,
                     chunk: int, with_entropy: bool):
    if isinstance(module, PolicyValueModel):
        logp, ent, _ = shared_forward(module, params, model_cfg, batch, temperature=temperature, chunk=chunk,
                                      with_entropy=with_entropy)
        return logp, ent
    return completion_logprobs(module, params, model_cfg, batch["prompt_tokens"], batch["prompt_mask"],
                               batch["completion_tokens"], batch["completion_mask"], temperature=temperature,
                               chunk=chunk, with_entropy=with_entropy, context_mask=batch.get(CONTEXT_KEY))


def score_micro_batches(cfg: PPOConfig) -> int:
    """Micro-batches of the forwards without gradients over a rollout batch (old log-probs, values, reference,
    reward model): as many as the update has in all, so none holds more rows than one update micro-batch."""
    return cfg.num_minibatches * cfg.num_micro_batches


def make_logprob_fn(module: Any, model_cfg: ModelConfig, temperature: float = 1.0, chunk: int = 128,
                    num_micro: int = 1) -> Callable:
    """`(params, batch) -> log-probs [B, N]` under a CausalLM or PolicyValueModel tree (reference, old policy),
    over `num_micro` micro-batches of rows in turn (`map_micro`)."""
    return rollout_forward_fn(
        lambda params, mb: _policy_logprobs(module, params, model_cfg, mb, temperature=temperature, chunk=chunk,
                                            with_entropy=False)[0],
        model_cfg, num_micro)


def make_value_fn(value_module: Any, model_cfg: ModelConfig) -> Callable:
    """`(params, batch) -> values [B, N]` of a ScalarHeadModel(per_token=True) or PolicyValueModel tree."""
    _check_value_module(value_module)
    del model_cfg  # kept for the common signature of the helpers

    def fn(params, batch):
        return completion_values(value_module, params, batch)
    return fn


def make_rollout_fn(policy_module: Any, value_module: Any, model_cfg: ModelConfig, cfg: PPOConfig) -> Callable:
    """`(ppo_params, batch) -> {"old_logprobs", "old_values"}` for a rollout batch (one forward when shared),
    over `score_micro_batches(cfg)` micro-batches of rows in turn."""
    def one(params, batch):
        if cfg.shared_backbone:
            logp, _, values = shared_forward(policy_module, params, model_cfg, batch, temperature=cfg.temperature,
                                             chunk=cfg.logprob_chunk)
        else:
            logp = _policy_logprobs(policy_module, params["policy"], model_cfg, batch, temperature=cfg.temperature,
                                    chunk=cfg.logprob_chunk, with_entropy=False)[0]
            values = completion_values(value_module, params["value"], batch)
        return {"old_logprobs": logp, "old_values": values}

    return rollout_forward_fn(one, model_cfg, score_micro_batches(cfg))


# ------------------------------------------------------------------ parameters and optimisers


def policy_params(cfg: PPOConfig, params: Any) -> Any:
    """The CausalLM tree inside the PPO params (for the sampler, or to save the policy)."""
    if cfg.shared_backbone:
        return {k: v for k, v in params.items() if k != "score"}
    return params["policy"]


def _check_scalar_head_tree(params: Any, who: str) -> None:
    score = params.get("score") if isinstance(params, dict) else None
    if score is None or "model" not in params or jnp.shape(score.get("kernel"))[-1:] != (1,):
        keys = list(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"{who}: expected a ScalarHeadModel params tree with 'model' and 'score' "
                         f"(score kernel [E, 1]); got keys {keys}")


def init_value_from_reward(reward_params: Any) -> Any:
    """Value-model params initialised from a trained reward model (a copy; ScalarHeadModel trees match).

    The reward model reads its head at the last token; as a per-token value
    model the same head is read at every position (OpenRLHF's and TRL's
    examples start the critic this way). A copy, because update steps
    donate the state: the reward model used for scoring must not be aliased.
    """
    _check_scalar_head_tree(reward_params, "init_value_from_reward")
    return jax.tree.map(jnp.copy, reward_params)


def shared_params_from_policy(policy_tree: Any, model_cfg: ModelConfig, score: Any | None = None) -> Any:
    """A PolicyValueModel tree from a CausalLM tree plus a value head: zeros, or `score` (e.g. a reward
    model's "score" entry). Created on the default device: `device_put` it onto a mesh afterwards."""
    if "score" in policy_tree:
        raise ValueError("shared_params_from_policy: the tree already has a 'score' entry")
    if score is None:
        dt = model_cfg.jnp_param_dtype
        score = {"kernel": jnp.zeros((model_cfg.hidden_size, 1), dt), "bias": jnp.zeros((1,), dt)}
    return {**policy_tree, "score": jax.tree.map(jnp.copy, score)}


def separate_optimizers(policy: OptimizerConfig, value: OptimizerConfig) -> optax.GradientTransformation:
    """One optimiser per model of a {"policy", "value"} tree (own learning rate and grad clipping, as
    verl's and OpenRLHF's separate actor/critic optimisers). Pass it to `TrainState.create`."""
    return optax.multi_transform({"policy": make_optimizer(policy), "value": make_optimizer(value)},
                                 {"policy": "policy", "value": "value"})


# ------------------------------------------------------------------ the update step


def make_ppo_step(policy_module: Any, value_module: Any, model_cfg: ModelConfig, cfg: PPOConfig) -> Callable:
    """Pure `(state, batch, rng) -> (state, metrics)`: one optimiser step on one minibatch.

    loss = policy_loss + vf_coef * value_loss, both weighted by
    `cfg.loss.token_weights(mask)` of the whole minibatch (so
    accumulation and sharding are exact). One forward per model per
    micro-batch (one in all when `shared_backbone`; `value_module` may then
    be None). Metrics: everything `policy_loss` and `value_loss` report,
    loss_policy + loss_value = loss, vf_explained_var (1 - Var(R - V) / Var(R)
    over the minibatch's real tokens, at the current values), returns_mean,
    advantage_mean, response_length, and `apply_gradients`' norms.
    """
    lc = cfg.loss
    if cfg.shared_backbone:
        if not isinstance(policy_module, PolicyValueModel):
            raise ValueError("PPOConfig.shared_backbone=True needs policy_module=PolicyValueModel(cfg); got "
                             f"{type(policy_module).__name__}")
    else:
        if isinstance(policy_module, PolicyValueModel):
            raise ValueError("policy_module is a PolicyValueModel: set PPOConfig.shared_backbone=True")
        _check_value_module(value_module)

    def forward(params, mb):
        if cfg.shared_backbone:
            return shared_forward(policy_module, params, model_cfg, mb, temperature=cfg.temperature,
                                  chunk=cfg.logprob_chunk, with_entropy=True)
        logp, ent = _policy_logprobs(policy_module, params["policy"], model_cfg, mb, temperature=cfg.temperature,
                                     chunk=cfg.logprob_chunk, with_entropy=True)
        return logp, ent, completion_values(value_module, params["value"], mb)

    def loss_fn(params, mb, rng):
        del rng  # LoRA's dropout gets its key from `accumulate` (dropout_rngs)
        logp, ent, values = forward(params, mb)
        mask = mb["completion_mask"].astype(bool)
        p_loss, metrics = policy_loss(lc, logp, mb["old_logprobs"], mb["advantages"], mb["weights"],
                                      mb["metric_weights"], ref_logp_bt=mb.get("ref_logprobs"), entropy_bt=ent,
                                      sampler_logp_bt=mb.get("sampler_logprobs"), mask_bt=mask)
        v_loss, v_metrics = value_loss(values, mb["old_values"], mb["returns"], mb["weights"], mb["metric_weights"],
                                       clip_range=cfg.value_clip)
        metrics.update(v_metrics)
        metrics["loss_policy"] = p_loss
        metrics["loss_value"] = cfg.vf_coef * v_loss
        # weighted moments for the explained variance; summed over micro-batches, combined in `step`
        mw = mb["metric_weights"]
        ret = jnp.where(mask, mb["returns"], 0.0)
        res = jnp.where(mask, ret - jax.lax.stop_gradient(values), 0.0)
        metrics.update(_ev_r=jnp.sum(mw * ret), _ev_r2=jnp.sum(mw * ret ** 2), _ev_d=jnp.sum(mw * res),
                       _ev_d2=jnp.sum(mw * res ** 2))
        return p_loss + cfg.vf_coef * v_loss, metrics

    def step(state: TrainState, batch: dict, rng: jax.Array):
        missing = [k for k in REQUIRED_KEYS if k not in batch]
        if lc.kl_coef > 0 and "ref_logprobs" not in batch:
            missing.append("ref_logprobs (PolicyLossConfig.kl_coef > 0)")
        if missing:
            raise ValueError(f"PPO batch is missing {missing}; see jaxrl_llm/algos/ppo.py for the batch layout "
                             "(old_logprobs/old_values from make_rollout_fn, advantages/returns from compute_targets)")
        mask = batch["completion_mask"]
        batch = dict(batch, weights=lc.token_weights(mask),
                     metric_weights=token_mean_weights(mask))
        grads, metrics = accumulate(loss_fn, state.params, batch, rng, cfg.num_micro_batches, frozen=state.frozen)
        r, r2, d, d2 = (metrics.pop(k) for k in ("_ev_r", "_ev_r2", "_ev_d", "_ev_d2"))
        var_r, var_d = r2 - r ** 2, d2 - d ** 2
        metrics["vf_explained_var"] = jnp.where(var_r > 1e-8, 1.0 - var_d / jnp.maximum(var_r, 1e-8), 0.0)
        metrics["returns_mean"] = r
        metrics["advantage_mean"] = jnp.sum(batch["advantages"] * batch["metric_weights"])
        metrics["response_length"] = jnp.mean(jnp.sum(mask.astype(jnp.float32), axis=-1))
        return apply_gradients(state, grads, metrics)

    return step
