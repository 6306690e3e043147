"""Preference and likelihood losses on per-sequence log-probs: DPO family, SimPO, ORPO, Bradley–Terry, SFT NLL.

Pure functions of arrays; each returns per-sequence losses [B] that the
update steps (`dpo.py`, `reward_model.py`, `sft.py`) reduce with weights
computed on the whole batch (`aggregation.sequence_weights`), so gradient
accumulation is exact. Implicit rewards are returned with `stop_gradient`
(they are metrics, as in TRL).

Notation: for a pair sharing prompt x with chosen y_c and rejected y_r,
pc = log pi(y_c|x), pr = log pi(y_r|x) (policy), rc, rr the same under the
frozen reference, and

    h = (pc - rc) - (pr - rr)

Whether the log-probs are sums over tokens or per-token averages is the
caller's explicit choice: `dpo_loss` takes sums and length-normalises only
when given the lengths; `simpo_loss` and `orpo_loss` take averages by
definition.

Also here: the layout of a preference batch (chosen/rejected completions
sharing one prompt) and its checks, used by the DPO and reward-model steps.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
_SMOOTHED = ("sigmoid", "robust")
# ORPO: log-probs closer to 0 than this are clamped, so the odds p / (1 - p) stay finite at p = 1.
ORPO_MAX_LOGP = -1e-7


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """Raises a ValueError naming the knob, the bad value, the nearest valid one and all choices."""
    if value not in choices:
        near = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"{name}={value!r} is not supported.{hint} Choose one of {tuple(choices)}")
    return value


def check_label_smoothing(label_smoothing: float, loss_type: str) -> None:
    if label_smoothing and loss_type not in _SMOOTHED:
        raise ValueError(f"label_smoothing={label_smoothing} only applies to loss_type in {_SMOOTHED}, "
                         f"not {loss_type!r}; set it to 0.0")
    upper_ok = label_smoothing < 0.5 if loss_type == "robust" else label_smoothing <= 0.5
    if not (0.0 <= label_smoothing and upper_ok):
        bound = "[0, 0.5)" if loss_type == "robust" else "[0, 0.5]"
        raise ValueError(f"label_smoothing={label_smoothing} must be in {bound} for loss_type={loss_type!r} "
                         "(it is the assumed probability that a preference label is flipped)")


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def dpo_loss(policy_chosen_logps_b: jax.Array, policy_rejected_logps_b: jax.Array,
             ref_chosen_logps_b: jax.Array, ref_rejected_logps_b: jax.Array, *, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths_b: jax.Array | None = None,
             rejected_lengths_b: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """DPO-family losses [B] and implicit rewards beta * (policy - ref) [B] of chosen and rejected.

    The four log-probs are per-sequence SUMS over completion tokens. Passing
    `chosen_lengths_b` and `rejected_lengths_b` (number of completion tokens)
    divides all four by their length first (per-token averages; TRL does this
    for IPO); the rewards are then computed from the averages too.

    loss_type:
      sigmoid  DPO, Rafailov et al. 2023, Eq. 7; with label_smoothing ls the
               conservative cDPO (Mitchell 2023):
               -(1 - ls) log sig(beta h) - ls log sig(-beta h)
      ipo      Azar et al. 2023, Eq. 17 (beta is their tau): (h - 1/(2 beta))^2
      hinge    SLiC-style (Zhao et al. 2023): relu(1 - beta h)
      robust   rDPO (Chowdhury et al. 2024, "Provably robust DPO"), unbiased
               under preference labels flipped with rate ls < 1/2:
               ((1 - ls)(-log sig(beta h)) + ls log sig(-beta h)) / (1 - 2 ls)
    """
    check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    if not beta > 0:
        raise ValueError(f"beta={beta} must be > 0")
    check_label_smoothing(label_smoothing, loss_type)
    pc, pr, rc, rr = map(_f32, (policy_chosen_logps_b, policy_rejected_logps_b, ref_chosen_logps_b,
                               ref_rejected_logps_b))
    if (chosen_lengths_b is None) != (rejected_lengths_b is None):
        raise ValueError("pass both chosen_lengths_b and rejected_lengths_b (length-normalised) or neither (sums)")
    if chosen_lengths_b is not None:
        lc = jnp.maximum(_f32(chosen_lengths_b), 1.0)
        lr = jnp.maximum(_f32(rejected_lengths_b), 1.0)
        pc, rc, pr, rr = pc / lc, rc / lc, pr / lr, rr / lr
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    h = chosen_ratio - rejected_ratio
    ls = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1.0 - ls) * jax.nn.log_sigmoid(beta * h) - ls * jax.nn.log_sigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * h)
    else:  # robust
        losses = (-(1.0 - ls) * jax.nn.log_sigmoid(beta * h) + ls * jax.nn.log_sigmoid(-beta * h)) / (1.0 - 2.0 * ls)
    return (losses, jax.lax.stop_gradient(beta * chosen_ratio), jax.lax.stop_gradient(beta * rejected_ratio))


def simpo_loss(chosen_avg_logps_b: jax.Array, rejected_avg_logps_b: jax.Array, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SimPO (Meng et al. 2024, Eq. 6): reference-free, length-normalised, with a target margin.

        loss = -(1 - ls) log sig(beta (ac - ar) - gamma) - ls log sig(-(beta (ac - ar) - gamma))

    with ac, ar the per-token AVERAGE log-probs. `gamma` is the margin in
    reward units, as in the paper's Eq. 6 and TRL's `simpo_gamma`; the official
    SimPO code takes `gamma_beta_ratio` = gamma / beta instead (the defaults
    beta 2.0, gamma 0.5 are a ratio of 0.25). Rewards are beta * average log-prob.
    """
    if not beta > 0:
        raise ValueError(f"beta={beta} must be > 0")
    check_label_smoothing(label_smoothing, "sigmoid")
    ac, ar = _f32(chosen_avg_logps_b), _f32(rejected_avg_logps_b)
    z = beta * (ac - ar) - gamma
    ls = label_smoothing
    losses = -(1.0 - ls) * jax.nn.log_sigmoid(z) - ls * jax.nn.log_sigmoid(-z)
    return losses, jax.lax.stop_gradient(beta * ac), jax.lax.stop_gradient(beta * ar)


def log_odds(avg_logp_b: jax.Array) -> jax.Array:
    """log(p / (1 - p)) for p = exp(avg_logp), stable as p -> 1 and as p -> 0.

    log(1 - p) is log(-expm1(x)) for x > -log 2 (where 1 - exp(x) loses
    digits; TRL's log1p(-exp(x)) is -inf in float32 for x > -3e-8) and
    log1p(-exp(x)) below. x is clamped to <= ORPO_MAX_LOGP, so p = 1 gives a
    large finite value and finite gradients. Both branches see only inputs in
    their own range, so the unused branch cannot put NaN into the gradient.
    """
    x = jnp.minimum(_f32(avg_logp_b), ORPO_MAX_LOGP)
    near_one = x > -math.log(2.0)
    xa = jnp.where(near_one, x, -math.log(2.0))
    xb = jnp.where(near_one, -math.log(2.0), x)
    log1mp = jnp.where(near_one, jnp.log(-jnp.expm1(xa)), jnp.log1p(-jnp.exp(xb)))
    return x - log1mp


def orpo_loss(chosen_avg_logps_b: jax.Array, rejected_avg_logps_b: jax.Array, chosen_nll_b: jax.Array,
              lambda_: float = 0.1) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """ORPO (Hong et al. 2024, L_SFT + lambda L_OR): NLL of the chosen response plus the odds-ratio loss.

        loss = nll_c - lambda * log sig(log odds(ac) - log odds(ar))

    with ac, ar the per-token AVERAGE log-probs (as in the paper's odds and in
    TRL) and `chosen_nll_b` the chosen response's NLL term per sequence (the
    step passes the share of a token-aggregated NLL, see dpo.py). Returns
    (losses, rewards lambda * ac, lambda * ar (as TRL), log odds ratio).
    """
    if lambda_ < 0:
        raise ValueError(f"orpo lambda={lambda_} must be >= 0")
    ratio = log_odds(chosen_avg_logps_b) - log_odds(rejected_avg_logps_b)
    losses = _f32(chosen_nll_b) - lambda_ * jax.nn.log_sigmoid(ratio)
    return (losses, jax.lax.stop_gradient(lambda_ * _f32(chosen_avg_logps_b)),
            jax.lax.stop_gradient(lambda_ * _f32(rejected_avg_logps_b)), jax.lax.stop_gradient(ratio))


def bradley_terry_loss(chosen_rewards_b: jax.Array, rejected_rewards_b: jax.Array,
                       margin_b: jax.Array | None = None) -> jax.Array:
    """Reward-model loss -log sig(r_c - r_r - margin) [B] (InstructGPT, Ouyang et al. 2022, Eq. 1;
    the margin is Llama 2's, Touvron et al. 2023, Eq. 2: larger for more clearly preferred pairs)."""
    diff = _f32(chosen_rewards_b) - _f32(rejected_rewards_b)
    if margin_b is not None:
        diff = diff - _f32(margin_b)
    return -jax.nn.log_sigmoid(diff)


def sft_nll(logp_bt: jax.Array, weights_bt: jax.Array) -> jax.Array:
    """Weighted NLL -sum(w * logp): with w from `aggregation.token_weights` on the whole batch.

    Prompt tokens are excluded by construction: `completion_logprobs` returns
    log-probs of completion tokens only, and padding has weight 0.
    """
    return -jnp.sum(_f32(weights_bt) * _f32(logp_bt))


# ----------------------------------------------------------------------------- preference batches

PAIR_KEYS = ("prompt_tokens", "prompt_mask", "chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")


def check_batch_keys(batch: Mapping[str, Any], keys: Sequence[str], where: str, hint: str = "") -> None:
    """Fails with the missing keys, the present ones and the expected layout; checks equal batch sizes."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{where}: batch is missing {missing} (has {sorted(batch)}); expected {list(keys)}."
                       + (f" {hint}" if hint else ""))
    sizes = {k: batch[k].shape[0] for k in keys}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{where}: batch arrays have different leading (batch) sizes {sizes}")
    for a, b in (("prompt_tokens", "prompt_mask"), ("chosen_tokens", "chosen_mask"),
                 ("rejected_tokens", "rejected_mask"), ("completion_tokens", "completion_mask")):
        if a in batch and b in batch and batch[a].shape != batch[b].shape:
            raise ValueError(f"{where}: {a} {batch[a].shape} and {b} {batch[b].shape} must have the same shape")


def pad_pairs(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Right-pads chosen and rejected completions (tokens with 0, mask with 0) to one length N."""
    out = dict(batch)
    n = max(batch["chosen_tokens"].shape[1], batch["rejected_tokens"].shape[1])
    for side in ("chosen", "rejected"):
        extra = n - batch[f"{side}_tokens"].shape[1]
        if extra:
            out[f"{side}_tokens"] = jnp.pad(batch[f"{side}_tokens"], ((0, 0), (0, extra)))
            out[f"{side}_mask"] = jnp.pad(batch[f"{side}_mask"], ((0, 0), (0, extra)))
    return out


def concat_pairs(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """[2B] rows (chosen first, then rejected) for one forward pass, as TRL's `concatenated_forward`.

    Returns (prompt_tokens, prompt_mask, completion_tokens, completion_mask); call `pad_pairs` first.
    """
    twice = lambda x: jnp.concatenate([x, x], axis=0)  # noqa: E731
    return (twice(batch["prompt_tokens"]), twice(batch["prompt_mask"]),
            jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0),
            jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0))
