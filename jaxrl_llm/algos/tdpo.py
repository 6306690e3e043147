"""Token-level DPO (TDPO; Zeng et al. 2024, "Token-level Direct Preference Optimization", arXiv 2404.11999).

DPO plus the sequential KL divergence of the policy from the reference on each response. With
p_t = ref(. | x, y_<t) and q_t = policy(. | x, y_<t), summed over the whole vocabulary (exact):

    SeqKL(x, y) = sum_t KL(p_t || q_t) = sum_t sum_v p_t(v) (log p_t(v) - log q_t(v))

(a forward KL: reference first, as in the official code's `_tdpo_get_batch_logps`). With
u = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x)) (summed log-ratios, as DPO) and
dc, dr the SeqKL of the chosen and rejected responses:

    TDPO1   loss = -log sig(beta (u - (dr - dc)))
    TDPO2   loss = -log sig(beta (u - alpha (dr - sg(dc))))

sg = stop-gradient: TDPO2 does not differentiate through the chosen response's SeqKL. The official code
(github.com/Vance0124/Token-level-Direct-Preference-Optimization, `tdpo_loss`) writes exactly these, with the
defaults beta 0.1, alpha 0.5; its implicit rewards are beta (log-ratio + SeqKL) of each response.

The per-token KL needs both models' full distributions at each completion position: one forward of each
over prompt + completion, then both LM heads `logprob_chunk` positions at a time
(`distill.divergence_from_hidden`, forward_kl with the reference as the teacher), so a float32 [B, T, V]
block never exists whole. The reference runs under `stop_gradient` and without dropout.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxrl_llm.algos.distill import distill_token_divergence
from jaxrl_llm.algos.preference import concat_pairs, pad_pairs
from jaxrl_llm.models.config import ModelConfig

TDPO_LOSS_TYPES = ("tdpo1", "tdpo2")


def tdpo_loss(chosen_logratio_b: jax.Array, rejected_logratio_b: jax.Array, chosen_seq_kl_b: jax.Array,
              rejected_seq_kl_b: jax.Array, *, beta: float = 0.1, alpha: float = 0.5,
              loss_type: str = "tdpo2") -> tuple[jax.Array, jax.Array, jax.Array]:
    """TDPO1 / TDPO2 losses [B] and the official implicit rewards beta (log-ratio + SeqKL) [B] of each side.

    The log-ratios are summed log pi - log ref over each response's tokens; the SeqKLs sums of per-token
    KL(ref || policy). `alpha` is read by "tdpo2" only.
    """
    if loss_type not in TDPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {TDPO_LOSS_TYPES}")
    if not beta > 0:
        raise ValueError(f"beta={beta} must be > 0")
    lc, lr, dc, dr = (jnp.asarray(x, jnp.float32) for x in (chosen_logratio_b, rejected_logratio_b,
                                                            chosen_seq_kl_b, rejected_seq_kl_b))
    u = lc - lr
    if loss_type == "tdpo1":
        logits = u - (dr - dc)
    else:
        logits = u - alpha * (dr - jax.lax.stop_gradient(dc))
    losses = -jax.nn.log_sigmoid(beta * logits)
    return losses, jax.lax.stop_gradient(beta * (lc + dc)), jax.lax.stop_gradient(beta * (lr + dr))


def pair_token_kl(module: Any, params: Any, ref_params: Any, model_cfg: ModelConfig, batch: dict,
                  chunk: int = 128) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Per-token arrays of chosen and rejected ([B, N] each, 0 on padding), one forward of each model over the
    [2B] concatenated rows: "logp" (policy log-prob of the token), "ref_logp" and "kl" (KL(ref || policy) of
    the next-token distributions at that position). `ref_params` are read under stop_gradient."""
    batch = pad_pairs(batch)
    b = batch["prompt_tokens"].shape[0]
    pt, pm, ct, cm = concat_pairs(batch)
    rows = {"student_prompt_tokens": pt, "student_prompt_mask": pm, "teacher_prompt_tokens": pt,
            "teacher_prompt_mask": pm, "completion_tokens": ct, "completion_mask": cm}
    out = distill_token_divergence(module, params, ref_params, model_cfg, rows, "forward_kl", chunk)
    names = {"logp": "student_logp", "ref_logp": "teacher_logp", "kl": "divergence"}
    return {k: (out[v][:b], out[v][b:]) for k, v in names.items()}
