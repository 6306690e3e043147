"""Process reward models (PRMs): a score for every step of a solution, not only for the whole.

Steps. A completion is a sequence of steps written one after another, each ended by a separator ("\\n",
"; ", ...); the last step ends at the completion's last real token (its EOS when it has one). A step's
END TOKEN is where everything about it is read:

    table = step_end_table(tokenizer, "\\n", vocab_size)       # np.bool_ [V]: tokens whose text has the separator
    ends = step_end_mask(completion_tokens, completion_mask, table)   # bool [B, N], jittable

`ends[b, t]` is True at every real token whose text contains the separator (merged BPE tokens such as
";\\n" or "; " count) and at the row's last real token. A completion that ends with a separator and then an
EOS has one more, empty, step read at the EOS: join steps without a trailing separator (the data loader
does). `step_index(ends)` numbers the step each token belongs to; `step_sums` sums per-token values over
each step.

Explicit PRM (Lightman et al. 2023, "Let's Verify Step by Step"; Math-Shepherd, Wang et al. 2023, arXiv
2312.08935). The model is the backbone plus a scalar head on every position (`models.process_reward_model`,
a `ScalarHeadModel(per_token=True)`); its output z at a step's end token is the logit that the step is good
(sigmoid(z): the probability). With labels y in [0, 1] (hard 0/1, or Math-Shepherd's soft fraction of
continuations that reach the right answer), the loss is the binary cross-entropy over every labelled step
of the whole batch:

    loss = sum_{b,t} w_{b,t} (softplus(z_{b,t}) - y_{b,t} z_{b,t}),    w = step_mask / sum(step_mask)

w is computed on the whole batch before it is split into micro-batches (`aggregation.token_mean_weights`),
so gradient accumulation is exact. `PRMConfig.hard_labels` trains on 1[y >= 0.5] (Math-Shepherd's "hard
estimation") instead.

Batch: prompt_tokens / prompt_mask [B, P] left-padded; completion_tokens / completion_mask [B, N]
right-padded; step_labels float32 [B, N] (the label at each labelled step's end token, 0 elsewhere);
step_mask bool [B, N] (the end tokens that carry a label: a step cut by truncation carries none).

Metrics: loss, accuracy (fraction of labelled steps with 1[sigmoid(z) > 0.5] == 1[y >= 0.5]), prob/mean,
prob/good_steps and prob/bad_steps (mean predicted probability on steps labelled >= 0.5 / < 0.5),
label/mean, num_steps.

Scoring for search: `step_scores(...)` -> (probabilities at step ends, ends); `aggregate_steps(scores, ends,
how)` -> one score per row: "min" (Lightman et al.), "prod", "mean" or "last". A row with no step (an empty
completion) scores 0 whatever `how`: it never outranks a scored solution.

Implicit PRM (PRIME, Cui et al. 2025, arXiv 2502.01456, Eq. 3-5). A causal LM pi_phi trained on OUTCOME
labels only, against a frozen reference pi_ref: the per-token reward is

    r_t = beta (log pi_phi(y_t | y_<t) - log pi_ref(y_t | y_<t)),     outcome reward r = sum_t r_t

trained with BCE(sigmoid(r), outcome label) per sequence (weights 1/B over the whole batch). A step's
reward is the sum of r_t over its tokens (`implicit_step_rewards`). The reference log-probs are
precomputed and carried in the batch as per-token "ref_logps" [B, N] (`make_implicit_reference_fn`), as
DPO carries its reference sums; log-probs are computed chunked (`logprobs.completion_logprobs`), never as
[B, T, V] float32 logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.algos.aggregation import sequence_weights, token_mean_weights
from jaxrl_llm.algos.logprobs import SEQUENCE_KEYS, completion_logprobs, rollout_forward_fn
from jaxrl_llm.algos.preference import check_batch_keys, check_choice
from jaxrl_llm.algos.train_state import Metrics, TrainState, accumulate, apply_gradients, dropout_rngs
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.transformer import ScalarHeadModel

PRM_KEYS = SEQUENCE_KEYS + ("step_labels", "step_mask")
IMPLICIT_KEYS = SEQUENCE_KEYS + ("outcome", "ref_logps")
AGGREGATIONS = ("min", "prod", "mean", "last")


# ----------------------------------------------------------------------------- steps


def separator_core(separator: str) -> str:
    """What a token's text must contain to end a step: the separator without its surrounding whitespace
    ("; " -> ";", so a tokenizer that writes ";" and " " as two tokens still ends the step at ";"); a
    separator of whitespace only, its line breaks (" \\n" -> "\\n"), or itself. The rule of
    `tasks.base.split_on_separator`, so the steps the PRM reads are the steps the task splits."""
    if not isinstance(separator, str) or not separator:
        raise ValueError(f"step separator {separator!r} must be a non-empty string (e.g. '\\n' or '; ')")
    return separator.strip() or separator.strip(" \t") or separator


def step_end_table(tokenizer, separator: str | Sequence[str], vocab_size: int) -> np.ndarray:
    """np.bool_ [vocab_size]: True for the ids whose decoded text contains `separator`'s core
    (`separator_core`; several separators: any of them). Ids the tokenizer does not have (a model vocabulary
    padded past it) are False. Raises ValueError when no token contains the separator."""
    seps = (separator,) if isinstance(separator, str) else tuple(separator)
    cores = [separator_core(s) for s in seps]
    n = min(len(tokenizer), int(vocab_size))
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    table = np.zeros((int(vocab_size),), np.bool_)
    table[:n] = [any(c in t for c in cores) for t in texts]
    if not table.any():
        raise ValueError(f"no token of the tokenizer's {n} contains the step separator {seps!r} (core {cores!r}); "
                         "choose a separator the tokenizer writes as (part of) a token, e.g. '\\n'")
    return table


def step_end_mask(completion_tokens: jax.Array, completion_mask: jax.Array, table: Any) -> jax.Array:
    """bool [B, N]: the end token of every step (jittable). A real token ends a step when `table[token]`
    (`step_end_table`), and the last real token of each row ends its last step. Works for any padding."""
    m = jnp.asarray(completion_mask).astype(jnp.bool_)
    sep = jnp.asarray(table)[jnp.asarray(completion_tokens).astype(jnp.int32)] & m
    pos = jnp.arange(m.shape[-1])
    last = jnp.max(jnp.where(m, pos, -1), axis=-1, keepdims=True)
    return sep | (pos == last)


def step_index(ends: jax.Array) -> jax.Array:
    """int32 [B, N]: the 0-based step each position belongs to (a step's end token belongs to it)."""
    e = ends.astype(jnp.int32)
    return jnp.cumsum(e, axis=-1) - e


def step_sums(values: jax.Array, ends: jax.Array) -> jax.Array:
    """float32 [B, N]: at each step's end token, the sum of `values` over that step's tokens (from the token
    after the previous end through this end); 0 elsewhere. Mask `values` first."""
    v = values.astype(jnp.float32)
    cs = jnp.cumsum(v, axis=-1)
    pos = jnp.arange(v.shape[-1])
    prev = jax.lax.cummax(jnp.where(ends, pos, -1), axis=v.ndim - 1)  # the last end at or before t
    prev = jnp.concatenate([jnp.full_like(prev[..., :1], -1), prev[..., :-1]], axis=-1)  # strictly before t
    before = jnp.where(prev >= 0, jnp.take_along_axis(cs, jnp.maximum(prev, 0), axis=-1), 0.0)
    return jnp.where(ends, cs - before, 0.0)


def aggregate_steps(scores: jax.Array, ends: jax.Array, how: str) -> jax.Array:
    """float32 [B]: the rows' step scores (probabilities at `ends`) combined over steps: "min" (the weakest
    step), "prod" (all steps good), "mean", or "last" (the final step's). A row with no step scores 0."""
    check_choice("aggregate_steps how", how, AGGREGATIONS)
    s, e = scores.astype(jnp.float32), ends.astype(jnp.bool_)
    count = jnp.sum(e, axis=-1)
    if how == "min":
        out = jnp.min(jnp.where(e, s, jnp.inf), axis=-1)
    elif how == "prod":
        out = jnp.prod(jnp.where(e, s, 1.0), axis=-1)
    elif how == "mean":
        out = jnp.sum(jnp.where(e, s, 0.0), axis=-1) / jnp.maximum(count, 1)
    else:
        last = jnp.max(jnp.where(e, jnp.arange(s.shape[-1]), 0), axis=-1)
        out = jnp.take_along_axis(s, last[:, None], axis=-1)[:, 0]
    return jnp.where(count > 0, out, 0.0)


# ----------------------------------------------------------------------------- explicit PRM


@dataclasses.dataclass(frozen=True)
class PRMConfig:
    """hard_labels: train on 1[label >= 0.5] instead of the label itself (soft labels, e.g. Math-Shepherd's
    fraction of continuations that reach the answer, are used as given by default)."""

    hard_labels: bool = False

    def __post_init__(self):
        if not isinstance(self.hard_labels, bool):
            raise ValueError(f"prm.hard_labels={self.hard_labels!r} must be True or False")


def check_prm_module(module: Any) -> None:
    if not isinstance(module, ScalarHeadModel) or not module.per_token:
        raise ValueError(f"a process reward model needs ScalarHeadModel(cfg, per_token=True) "
                         f"(models.process_reward_model(cfg)), got {type(module).__name__}"
                         + (" with per_token=False" if isinstance(module, ScalarHeadModel) else ""))


def step_logits(module: Any, params: Any, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                completion_tokens: jax.Array, completion_mask: jax.Array) -> jax.Array:
    """float32 [B, N]: the head's logit at every completion position (one forward over prompt + completion)."""
    p = prompt_tokens.shape[1]
    tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1).astype(jnp.int32)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(jnp.bool_)
    values = module.apply({"params": params}, tokens, None, mask, rngs=dropout_rngs())
    return values[:, p:].astype(jnp.float32)


def step_scores(module: Any, params: Any, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                completion_tokens: jax.Array, completion_mask: jax.Array,
                end_table: Any) -> tuple[jax.Array, jax.Array]:
    """(scores float32 [B, N]: sigmoid of the PRM's logit at each step end, 0 elsewhere; ends bool [B, N]).
    Jittable; `end_table` is `step_end_table(...)` (a host or device array)."""
    ends = step_end_mask(completion_tokens, completion_mask, end_table)
    z = step_logits(module, params, prompt_tokens, prompt_mask, completion_tokens, completion_mask)
    return jnp.where(ends, jax.nn.sigmoid(z), 0.0), ends


def bce_with_logits(z: jax.Array, y: jax.Array) -> jax.Array:
    """Elementwise -y log sigmoid(z) - (1 - y) log(1 - sigmoid(z)) = softplus(z) - y z, stable for any z."""
    return jnp.logaddexp(0.0, z) - y * z


def make_prm_step(module: Any, model_cfg: ModelConfig, cfg: PRMConfig = PRMConfig(), num_micro_batches: int = 1
                  ) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, Metrics]]:
    """`step(state, batch, rng) -> (state, metrics)` for a PRM (see the module docstring); jit it with
    `jit_update`. `model_cfg` is kept for the common signature of the steps."""
    check_prm_module(module)
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches={num_micro_batches} must be >= 1")
    del model_cfg

    def loss_fn(params, mb, rng):
        del rng
        z = step_logits(module, params, mb["prompt_tokens"], mb["prompt_mask"], mb["completion_tokens"],
                        mb["completion_mask"])
        y, w = mb["step_labels"], mb["w"]
        prob = jax.nn.sigmoid(z)
        metrics = {
            "accuracy": jnp.sum(w * ((prob > 0.5) == (mb["raw_labels"] >= 0.5))),
            "prob/mean": jnp.sum(w * prob),
            "prob/good_steps": jnp.sum(mb["w_good"] * prob),
            "prob/bad_steps": jnp.sum(mb["w_bad"] * prob),
            "label/mean": jnp.sum(w * mb["raw_labels"]),
            "num_steps": jnp.sum(mb["step_mask"].astype(jnp.float32)),
        }
        return jnp.sum(w * bce_with_logits(z, y)), metrics

    def step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, Metrics]:
        check_batch_keys(batch, PRM_KEYS, "prm step")
        if batch["step_labels"].shape != batch["completion_mask"].shape:
            raise ValueError(f"prm step: step_labels has shape {batch['step_labels'].shape}; expected "
                             f"{batch['completion_mask'].shape} (a label at each step's end token)")
        batch = {k: batch[k] for k in PRM_KEYS}
        m = batch["step_mask"].astype(jnp.bool_)
        raw = jnp.where(m, batch["step_labels"].astype(jnp.float32), 0.0)
        good = m & (raw >= 0.5)
        batch.update(raw_labels=raw, step_labels=jnp.where(good, 1.0, 0.0) if cfg.hard_labels else raw,
                     w=token_mean_weights(m), w_good=token_mean_weights(good), w_bad=token_mean_weights(m & ~good))
        grads, metrics = accumulate(loss_fn, state.params, batch, rng, num_micro_batches, frozen=state.frozen)
        return apply_gradients(state, grads, metrics)

    return step


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the classes 1[labels >= 0.5] (ties count 1/2: the
    Mann-Whitney U statistic); nan when one class is absent."""
    s, y = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel() >= 0.5
    pos, neg = s[y], np.sort(s[~y])
    if not len(pos) or not len(neg):
        return float("nan")
    below, upto = np.searchsorted(neg, pos, "left"), np.searchsorted(neg, pos, "right")
    return float(np.mean(below + 0.5 * (upto - below)) / len(neg))


# ----------------------------------------------------------------------------- implicit PRM (PRIME)


@dataclasses.dataclass(frozen=True)
class ImplicitPRMConfig:
    """beta: scale of the log-ratio reward (PRIME: 0.05). logprob_chunk: positions per LM-head chunk."""

    beta: float = 0.05
    logprob_chunk: int = 128

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"implicit_prm.beta={self.beta} must be > 0")
        if self.logprob_chunk < 1:
            raise ValueError(f"implicit_prm.logprob_chunk={self.logprob_chunk} must be >= 1")


def implicit_token_rewards(logp_bn: jax.Array, ref_logp_bn: jax.Array, mask_bn: jax.Array,
                           beta: float) -> jax.Array:
    """float32 [B, N]: r_t = beta (log pi_phi - log pi_ref) on real tokens, 0 elsewhere."""
    return jnp.where(mask_bn.astype(jnp.bool_), beta * (logp_bn - ref_logp_bn), 0.0).astype(jnp.float32)


def implicit_prm_loss(token_rewards_bn: jax.Array, outcome_b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(per-sequence BCE [B] of sigmoid(sum_t r_t) against the outcome labels in [0, 1], outcome rewards [B])."""
    r = jnp.sum(token_rewards_bn, axis=-1)
    return bce_with_logits(r, outcome_b.astype(jnp.float32)), r


def make_implicit_reference_fn(module: Any, model_cfg: ModelConfig, chunk: int = 128,
                               num_micro: int = 1) -> Callable[[Any, dict], dict[str, jax.Array]]:
    """`(ref_params, batch) -> {"ref_logps": float32 [B, N]}`, the reference's per-token completion log-probs
    (0 on padding), `num_micro` micro-batches at a time; jit it."""
    def forward(ref_params, mb):
        logp, _ = completion_logprobs(module, ref_params, model_cfg, mb["prompt_tokens"], mb["prompt_mask"],
                                      mb["completion_tokens"], mb["completion_mask"], chunk=chunk,
                                      with_entropy=False)
        return {"ref_logps": jax.lax.stop_gradient(logp)}
    return rollout_forward_fn(forward, model_cfg, num_micro)


def make_implicit_prm_step(module: Any, model_cfg: ModelConfig, cfg: ImplicitPRMConfig = ImplicitPRMConfig(),
                           num_micro_batches: int = 1
                           ) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, Metrics]]:
    """`step(state, batch, rng) -> (state, metrics)` for an implicit PRM (a CausalLM); the batch has the
    sequence keys, "outcome" [B] labels in [0, 1] and "ref_logps" [B, N] (`make_implicit_reference_fn`).
    Metrics: loss, accuracy (1[sigmoid(r) > 0.5] == 1[outcome >= 0.5]), reward/mean, prob/mean."""
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches={num_micro_batches} must be >= 1")

    def loss_fn(params, mb, rng):
        del rng
        logp, _ = completion_logprobs(module, params, model_cfg, mb["prompt_tokens"], mb["prompt_mask"],
                                      mb["completion_tokens"], mb["completion_mask"], chunk=cfg.logprob_chunk,
                                      with_entropy=False)
        rt = implicit_token_rewards(logp, mb["ref_logps"], mb["completion_mask"], cfg.beta)
        loss_b, r = implicit_prm_loss(rt, mb["outcome"])
        w, prob = mb["seq_w"], jax.nn.sigmoid(r)
        metrics = {"accuracy": jnp.sum(w * ((prob > 0.5) == (mb["outcome"] >= 0.5))),
                   "reward/mean": jnp.sum(w * jax.lax.stop_gradient(r)), "prob/mean": jnp.sum(w * prob)}
        return jnp.sum(w * loss_b), metrics

    def step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, Metrics]:
        check_batch_keys(batch, IMPLICIT_KEYS, "implicit prm step")
        batch = {k: batch[k] for k in IMPLICIT_KEYS}
        batch["seq_w"] = sequence_weights(batch["completion_mask"])
        grads, metrics = accumulate(loss_fn, state.params, batch, rng, num_micro_batches, frozen=state.frozen)
        return apply_gradients(state, grads, metrics)

    return step


def implicit_step_rewards(module: Any, params: Any, ref_params: Any, model_cfg: ModelConfig,
                          prompt_tokens: jax.Array, prompt_mask: jax.Array, completion_tokens: jax.Array,
                          completion_mask: jax.Array, end_table: Any, beta: float = 0.05,
                          chunk: int = 128) -> tuple[jax.Array, jax.Array]:
    """(step rewards float32 [B, N]: at each step's end token the sum of beta * log(pi_phi / pi_ref) over the
    step's tokens, 0 elsewhere; ends bool [B, N]). Jittable; `module` is the CausalLM of both param sets."""
    args = (prompt_tokens, prompt_mask, completion_tokens, completion_mask)
    logp, _ = completion_logprobs(module, params, model_cfg, *args, chunk=chunk, with_entropy=False)
    ref, _ = completion_logprobs(module, ref_params, model_cfg, *args, chunk=chunk, with_entropy=False)
    ends = step_end_mask(completion_tokens, completion_mask, end_table)
    return step_sums(implicit_token_rewards(logp, ref, completion_mask, beta), ends), ends
