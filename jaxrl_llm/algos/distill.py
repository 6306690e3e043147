"""Token-level distillation from a frozen teacher that sees a longer prompt (lesson / context distillation).

The TEACHER is a frozen snapshot of the policy whose prompt carries extra
context (lessons in its system prompt); the STUDENT is the trained policy and
sees the plain prompt. Both score the same completion tokens y_1..y_N, and
the student is pulled towards the teacher's next-token distribution at every
completion position t (p_s = pi_student(. | x_s, y_<t), p_t = pi_teacher(. |
x_t, y_<t), sums over the whole vocabulary, exact):

    reverse_kl  (on the student's own samples, on-policy distillation)
        d_t = sum_v p_s(v) (log p_s(v) - log p_t(v))
    forward_kl  (on the teacher's samples)
        d_t = sum_v p_t(v) (log p_t(v) - log p_s(v))
    nll         (SFT on the teacher's samples; no teacher forward)
        d_t = -log p_s(y_t)

    loss = sum_{i,t} w_{i,t} d_{i,t}

with w = `DistillConfig.token_weights(completion_mask)` computed on the whole
batch before it is split into micro-batches ("token-mean": the mean over all
completion tokens of the batch), so accumulation and data parallelism give the
un-accumulated gradient. The teacher is under `stop_gradient`: only the
student is trained.

Each model runs one forward over its own prompt + the completion
(`return_hidden=True`); the LM heads then run on the N positions that predict
completion tokens, `logprob_chunk` positions at a time inside a `lax.scan`
whose body is rematerialised (`jax.checkpoint`), so a float32 [B, T, V] block
of logits never exists whole (one [B, chunk, V] block per model at a time).

Batch (dict of [B, ...] arrays): student_prompt_tokens / student_prompt_mask
[B, Ps] and teacher_prompt_tokens / teacher_prompt_mask [B, Pt], left-padded
(Pt may differ from Ps); completion_tokens / completion_mask [B, N],
right-padded. "nll" reads no teacher entries.

    step = make_distill_step(module, model_cfg, DistillConfig("reverse_kl"), num_micro_batches=4)
    update = jit_update(step, state, batch, env, aux_example=teacher_params)
    state, metrics = update(state, batch, jax.random.fold_in(key, i), teacher_params)

`teacher_params` is a full params tree of the same module (under LoRA: the
trained adapters merged with the frozen base, or the base alone); it is read,
never donated.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxrl_llm.algos.aggregation import token_mean_weights, token_weights
from jaxrl_llm.algos.logprobs import _pad_to_multiple
from jaxrl_llm.algos.preference import check_batch_keys
from jaxrl_llm.algos.train_state import Metrics, TrainState, accumulate, apply_gradients, dropout_rngs
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.layers import matmul_weights
from jaxrl_llm.models.transformer import unembedding
from jaxrl_llm.sharding.rules import constrain

DIVERGENCES = ("reverse_kl", "forward_kl", "nll")
DISTILL_LOSS_AGG = ("token-mean", "seq-mean-token-mean")

STUDENT_KEYS = ("student_prompt_tokens", "student_prompt_mask", "completion_tokens", "completion_mask")
TEACHER_KEYS = ("teacher_prompt_tokens", "teacher_prompt_mask")


def _near(value: object, choices: tuple[str, ...]) -> str:
    m = difflib.get_close_matches(str(value), choices, n=1)
    return f" (did you mean {m[0]!r}?)" if m else ""


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Distillation loss knobs.

    divergence: "reverse_kl" (default; KL(student || teacher), on the
        student's samples), "forward_kl" (KL(teacher || student), on the
        teacher's samples) or "nll" (-log p_student of the completion tokens;
        the teacher is not run).
    logprob_chunk: positions per LM-head chunk (memory vs speed; not numerics).
    loss_agg: "token-mean" (default; mean over all completion tokens of the
        global batch) or "seq-mean-token-mean" (each row's token mean, then
        the mean over rows).
    """

    divergence: str = "reverse_kl"
    logprob_chunk: int = 128
    loss_agg: str = "token-mean"

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"distill.divergence={self.divergence!r}{_near(self.divergence, DIVERGENCES)}; "
                             f"expected one of {', '.join(DIVERGENCES)}")
        if self.loss_agg not in DISTILL_LOSS_AGG:
            raise ValueError(f"distill.loss_agg={self.loss_agg!r}{_near(self.loss_agg, DISTILL_LOSS_AGG)}; "
                             f"expected one of {', '.join(DISTILL_LOSS_AGG)}")
        if isinstance(self.logprob_chunk, bool) or not isinstance(self.logprob_chunk, int) \
                or self.logprob_chunk < 1:
            raise ValueError(f"distill.logprob_chunk={self.logprob_chunk!r}: must be an integer >= 1")

    @property
    def needs_teacher(self) -> bool:
        return self.divergence != "nll"

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return STUDENT_KEYS + (TEACHER_KEYS if self.needs_teacher else ())

    def token_weights(self, mask_bt: jax.Array) -> jax.Array:
        """float32 [B, N] loss weights of this config's aggregation; call it on the whole batch."""
        return token_weights(mask_bt, self.loss_agg)


def divergence_from_hidden(student_hidden: jax.Array, student_w: jax.Array, teacher_hidden: jax.Array | None,
                           teacher_w: jax.Array | None, targets_bt: jax.Array, divergence: str = "reverse_kl",
                           chunk: int = 128) -> dict[str, jax.Array]:
    """Per-token divergence between the two heads' distributions, `chunk` positions at a time.

    student_hidden / teacher_hidden: [B, T, E] final hidden states at the positions predicting `targets_bt`
    [B, T]; student_w / teacher_w: [E, V] output matrices (`unembedding`). The teacher inputs are used as given
    (the caller stops their gradient); they may be None for "nll".
    Returns float32 [B, T] arrays: "divergence", "student_logp" (log p_s of the target) and, with a teacher,
    "teacher_logp".
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r}; expected one of {', '.join(DIVERGENCES)}")
    with_teacher = divergence != "nll"
    if with_teacher and (teacher_hidden is None or teacher_w is None):
        raise ValueError(f"divergence={divergence!r} needs the teacher's hidden states and output matrix")
    b, t, _ = student_hidden.shape
    c = max(1, min(chunk, t))
    n_chunks = -(-t // c)

    def chunks(x):  # [B, T, ...] -> [n_chunks, B, c, ...]
        x = _pad_to_multiple(x, 1, c)
        return jnp.moveaxis(x.reshape(b, n_chunks, c, *x.shape[2:]), 1, 0)

    ws = student_w.astype(student_hidden.dtype)
    xs = (chunks(student_hidden), chunks(targets_bt))
    wt = None
    if with_teacher:
        wt = teacher_w.astype(teacher_hidden.dtype)
        xs = xs + (chunks(teacher_hidden),)

    def log_probs(h_bcE, w_EV):
        logits = jnp.einsum("bce,ev->bcv", h_bcE, w_EV, preferred_element_type=jnp.float32)
        return jax.nn.log_softmax(constrain(logits, ("batch", "length", "vocab")), axis=-1)

    @jax.checkpoint
    def one(hs_bcE, y_bc, ht_bcE=None):
        lps = log_probs(hs_bcE, ws)
        # one-hot contraction instead of a gather: stays local when the vocab is sharded
        hit = jnp.arange(lps.shape[-1]) == y_bc[..., None]
        s_logp = jnp.sum(jnp.where(hit, lps, 0.0), axis=-1)
        if not with_teacher:
            return -s_logp, s_logp, jnp.zeros_like(s_logp)
        lpt = log_probs(ht_bcE, wt)
        t_logp = jnp.sum(jnp.where(hit, lpt, 0.0), axis=-1)
        if divergence == "reverse_kl":
            div = jnp.sum(jnp.exp(lps) * (lps - lpt), axis=-1)
        else:
            div = jnp.sum(jnp.exp(lpt) * (lpt - lps), axis=-1)
        return div, s_logp, t_logp

    def body(_, x):
        return None, one(*x)

    _, outs = jax.lax.scan(body, None, xs)
    div, s_logp, t_logp = (jnp.moveaxis(o, 0, 1).reshape(b, -1)[:, :t] for o in outs)
    out = {"divergence": div, "student_logp": s_logp}
    if with_teacher:
        out["teacher_logp"] = t_logp
    return out


def _completion_hidden(module: Any, params: Any, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                       completion_tokens: jax.Array, completion_mask: jax.Array, rngs: dict) -> jax.Array:
    """[B, N, E] hidden states at the positions predicting the completion tokens (P - 1 ... P + N - 2)."""
    p, n = prompt_tokens.shape[1], completion_tokens.shape[1]
    tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1).astype(jnp.int32)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(jnp.bool_)
    hidden, _ = module.apply({"params": params}, tokens, None, mask, return_hidden=True, rngs=rngs)
    return hidden[:, p - 1:p - 1 + n]


def distill_token_divergence(module: Any, student_params: Any, teacher_params: Any, model_cfg: ModelConfig,
                             batch: dict, divergence: str = "reverse_kl",
                             chunk: int = 128) -> dict[str, jax.Array]:
    """Per-token divergence [B, N] of the student from the teacher on the batch's completion tokens.

    One forward of each model over its own prompt + the completion; the teacher's forward and head are under
    `stop_gradient` and run without dropout. `teacher_params` may be None for "nll".
    Returns float32 [B, N] arrays, 0 where `completion_mask` is 0: "divergence", "student_logp" and (KL
    divergences) "teacher_logp", the log-probs of the completion tokens.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r}{_near(divergence, DIVERGENCES)}; "
                         f"expected one of {', '.join(DIVERGENCES)}")
    y, cm = batch["completion_tokens"], batch["completion_mask"]
    hs = _completion_hidden(module, student_params, batch["student_prompt_tokens"], batch["student_prompt_mask"],
                            y, cm, dropout_rngs())
    ht = wt = None
    if divergence != "nll":
        if teacher_params is None:
            raise ValueError(f"divergence={divergence!r} needs teacher_params (only 'nll' runs without a teacher)")
        teacher_params = jax.lax.stop_gradient(teacher_params)
        ht = jax.lax.stop_gradient(_completion_hidden(module, teacher_params, batch["teacher_prompt_tokens"],
                                                      batch["teacher_prompt_mask"], y, cm, {}))
        wt = unembedding(teacher_params, model_cfg)
    out = divergence_from_hidden(hs, unembedding(student_params, model_cfg), ht, wt, y, divergence, chunk)
    m = cm.astype(jnp.float32)
    return {k: v * m for k, v in out.items()}


def make_distill_step(module: Any, model_cfg: ModelConfig, cfg: DistillConfig = DistillConfig(),
                      num_micro_batches: int = 1
                      ) -> Callable[[TrainState, dict, jax.Array, Any], tuple[TrainState, Metrics]]:
    """`step(state, batch, rng, teacher_params) -> (state, metrics)` for a CausalLM; jit it with
    `jit_update(step, state, batch, env, aux_example=teacher_params)`.

    `teacher_params`: a full params tree of `module` (None for "nll"). Under LoRA (`state.frozen` set) the
    student applies `state.model_params()`, as every loss does.
    Metrics: loss (in `loss_agg`), distill/divergence (token mean whatever the mode), num_tokens,
    distill/student_logp (token mean of log p_s of the completion tokens), distill/teacher_logp (KL
    divergences), and the optimiser's grad_norm / update_norm / skipped.
    """
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches={num_micro_batches} must be >= 1")
    keys = cfg.batch_keys

    def loss_fn(params, mb, teacher):
        out = distill_token_divergence(module, params, teacher, model_cfg, mb, cfg.divergence, cfg.logprob_chunk)
        w = mb["token_mean_w"]
        metrics = {
            "distill/divergence": jnp.sum(w * out["divergence"]),
            "distill/student_logp": jnp.sum(w * out["student_logp"]),
            "num_tokens": jnp.sum(mb["completion_mask"].astype(jnp.float32)),
        }
        if "teacher_logp" in out:
            metrics["distill/teacher_logp"] = jnp.sum(w * out["teacher_logp"])
        return jnp.sum(mb["loss_w"] * out["divergence"]), metrics

    def step(state: TrainState, batch: dict, rng: jax.Array, teacher_params: Any = None
             ) -> tuple[TrainState, Metrics]:
        check_batch_keys(batch, keys, "distill step")
        for a, b in (("student_prompt_tokens", "student_prompt_mask"),
                     ("teacher_prompt_tokens", "teacher_prompt_mask")):
            if a in keys and batch[a].shape != batch[b].shape:
                raise ValueError(f"distill step: {a} {batch[a].shape} and {b} {batch[b].shape} must have the "
                                 "same shape")
        teacher = None
        if cfg.needs_teacher:
            if teacher_params is None:
                raise ValueError(f"distill step: divergence={cfg.divergence!r} needs teacher_params")
            # cast once per step, not once per micro-batch; read by every micro-batch's loss (replicated
            # like the trained parameters under `accumulate`'s per-device path)
            teacher = matmul_weights(teacher_params, model_cfg)
        mask = batch["completion_mask"]
        batch = {k: batch[k] for k in keys}
        batch["loss_w"] = cfg.token_weights(mask)
        batch["token_mean_w"] = token_mean_weights(mask)
        grads, metrics = accumulate(lambda p, mb, r: loss_fn(p, mb, teacher), state.params, batch, rng,
                                    num_micro_batches, frozen=state.frozen)
        return apply_gradients(state, grads, metrics)

    return step
