"""Process rewards in RL: step scores of a process reward model as dense advantages (GRPO) or rewards (PPO).

A completion's steps end at the tokens `algos.prm.step_end_mask` marks (`ends`, bool [B, N]); a step's
reward sits at its end token (0 elsewhere): an explicit PRM's probability that the step is good
(`prm.step_scores`), or an implicit PRM's summed token rewards over the step (`prm.step_sums` of
`prm.implicit_token_rewards`). Rows are the sampler's: prompt i owns rows i*G .. i*G + G - 1.

GRPO with process supervision (DeepSeekMath, Shao et al. 2024, arXiv 2402.03300, section 4.1.3):

    r~_{i,j} = (r_{i,j} - mean(R)) / (std(R) + eps)      R: every step reward of the group's G completions
    A^process_{i,t} = sum over the steps j of row i whose end index(j) >= t of r~_{i,j}

`group_step_advantages`. The paper uses A^process alone; a stage combines it with the outcome advantage
of its own estimator, A = A^outcome + coef * A^process (PRIME's Eq. 5 adds its process and outcome returns
the same way, with coef 1).

PRIME (Cui et al. 2025, arXiv 2502.01456, section 3.3, Eq. 5) on an implicit PRM's token rewards
r_t = beta (log pi_phi(y_t | y_<t) - log pi_ref(y_t | y_<t)):

    b_i = 1/(G-1) sum_{j != i} mean_t r^j_t                  leave-one-out baseline of the row-mean rewards
    A^process_{i,t} = sum_{s >= t} gamma^(s-t) (r^i_s - b_i)

`prime_advantages`; PRIME adds the RLOO outcome advantage r_o(y^i) - 1/(G-1) sum_{j != i} r_o(y^j) (the
GRPO stage's `rloo` variant). verl's recipe (`recipe/prime/prime_core_algos.py`,
`compute_rloo_advantage_return`) writes the process term per token as r_t G/(G-1) - 1/(G-1) sum_j mean_t r^j,
which is r_t - b_i + (r_t - mean_t r^i)/(G-1): the paper's value plus a zero-mean-per-row term; it then
whitens the summed advantage over the batch and scales both parts by 5 (`reward_dpo_coef`,
`reward_gt_coef`) and divides the token rewards by the batch's largest absolute return (`prime_norm`).
Here: the paper's formula, no whitening, no extra normaliser.

PPO: `step_token_rewards` puts each step's reward at its end token; the stage adds coef times that to the
token rewards GAE consumes (`ppo.compute_targets(process_rewards_bn=...)`), the outcome score staying on the
last token.

Every function is jittable, computes in float32, ignores masked positions (0 there) and gives finite
results for rows without steps and for groups whose step rewards are all equal (advantage exactly 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_llm.algos.advantages import reinforce_pp_returns


def _check_rows(x_bn: jax.Array, group_size: int, min_size: int, who: str) -> None:
    if not isinstance(group_size, int) or group_size < min_size:
        raise ValueError(f"{who}: group_size={group_size!r} must be an int >= {min_size}")
    if x_bn.ndim != 2 or x_bn.shape[0] % group_size:
        raise ValueError(f"{who}: rewards of shape {x_bn.shape} do not split into groups of {group_size} rows "
                         "(expected [B, N] with B a multiple of group_size)")


def reverse_cumsum(x_bn: jax.Array) -> jax.Array:
    """out[b, t] = sum_{s >= t} x[b, s]."""
    return jnp.flip(jnp.cumsum(jnp.flip(x_bn, -1), axis=-1), -1)


def group_step_advantages(step_rewards_bn: jax.Array, ends_bn: jax.Array, mask_bn: jax.Array, group_size: int,
                          eps: float = 1e-6, std_ddof: int = 1) -> jax.Array:
    """DeepSeekMath's process-supervision advantages [B, N] (module docstring): each step reward normalised
    by the mean and std of all step rewards of its group, then summed over the steps ending at or after t.

    std_ddof=1: the unbiased std over the group's steps (as `group_advantages`; a group with one step divides
    by max(n - 1, 1)); eps is added to the std. A group whose step rewards are all equal, or that has none,
    gets exactly 0."""
    if std_ddof not in (0, 1):
        raise ValueError(f"group_step_advantages: std_ddof={std_ddof!r}; expected 0 or 1")
    m = jnp.asarray(mask_bn).astype(bool)
    e = jnp.asarray(ends_bn).astype(bool) & m
    _check_rows(e, group_size, 1, "group_step_advantages")
    b, n = e.shape
    r = jnp.where(e, jnp.asarray(step_rewards_bn, jnp.float32), 0.0).reshape(b // group_size, group_size * n)
    eg = e.reshape(r.shape)
    count = jnp.sum(eg, axis=-1, keepdims=True).astype(jnp.float32)
    mean = jnp.sum(r, axis=-1, keepdims=True) / jnp.maximum(count, 1.0)
    centred = jnp.where(eg, r - mean, 0.0)
    std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / jnp.maximum(count - std_ddof, 1.0))
    constant = (jnp.max(jnp.where(eg, r, -jnp.inf), axis=-1, keepdims=True)
                <= jnp.min(jnp.where(eg, r, jnp.inf), axis=-1, keepdims=True))  # one value, or no step
    normed = jnp.where(constant, 0.0, centred / (std + eps)).reshape(b, n)
    return jnp.where(m, reverse_cumsum(normed), 0.0)


def prime_advantages(token_rewards_bn: jax.Array, mask_bn: jax.Array, group_size: int,
                     gamma: float = 1.0) -> jax.Array:
    """PRIME's process advantages [B, N] (Eq. 5, module docstring): each real token's reward minus the
    leave-one-out mean of the other G - 1 rows' mean token rewards, then discounted returns-to-go over the
    row's real tokens (masked positions skipped, as `advantages.reinforce_pp_returns`). A row with no real
    token has mean reward 0 (it still counts in its group's baseline). Needs G >= 2."""
    m = jnp.asarray(mask_bn).astype(bool)
    _check_rows(m, group_size, 2, "prime_advantages")
    r = jnp.where(m, jnp.asarray(token_rewards_bn, jnp.float32), 0.0)
    row_mean = jnp.sum(r, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1).astype(jnp.float32)
    g = row_mean.reshape(-1, group_size)
    baseline = ((jnp.sum(g, axis=-1, keepdims=True) - g) / (group_size - 1)).reshape(-1)
    return reinforce_pp_returns(jnp.where(m, r - baseline[:, None], 0.0), m, gamma)


def step_token_rewards(step_rewards_bn: jax.Array, ends_bn: jax.Array, mask_bn: jax.Array) -> jax.Array:
    """float32 [B, N]: each step's reward at its end token, 0 elsewhere (PPO's dense per-step rewards)."""
    e = jnp.asarray(ends_bn).astype(bool) & jnp.asarray(mask_bn).astype(bool)
    return jnp.where(e, jnp.asarray(step_rewards_bn, jnp.float32), 0.0)


def step_metrics(step_rewards_bn: jax.Array, ends_bn: jax.Array, mask_bn: jax.Array,
                 good_above: float) -> dict[str, jax.Array]:
    """Scalars over every step of the batch: process/step_reward (mean step reward), process/good_steps
    (fraction of steps whose reward is > good_above: 0.5 for a PRM's probabilities, 0 for implicit rewards),
    process/steps (mean steps per completion)."""
    e = jnp.asarray(ends_bn).astype(bool) & jnp.asarray(mask_bn).astype(bool)
    r = jnp.where(e, jnp.asarray(step_rewards_bn, jnp.float32), 0.0)
    n = jnp.sum(e).astype(jnp.float32)
    return {"process/step_reward": jnp.sum(r) / jnp.maximum(n, 1.0),
            "process/good_steps": jnp.sum(e & (r > good_above)) / jnp.maximum(n, 1.0),
            "process/steps": n / e.shape[0]}
