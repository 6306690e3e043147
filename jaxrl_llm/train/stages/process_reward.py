"""The `process_reward` section of grpo and ppo stages: a process reward model's step scores in the RL loss.

    c.rl.process_reward.update(source="prm", prm_stage="prm", coef=1.0)          # a trained PRM (kind "prm")
    c.rl.process_reward.update(source="implicit", estimator="prime", beta=0.05)  # PRIME: trained online

source:
  "none" (default): nothing changes; every other key must keep its default.
  "prm": the final params of the earlier prm stage `prm_stage` (`train.stages.prm.load_prm_params`); a
    step's reward is the PRM's probability that it is good, read at its end token.
  "implicit": an implicit PRM pi_phi (PRIME, arXiv 2502.01456) against a frozen pi_ref, both copies of the
    policy at the stage's start (as PRIME starts both from the SFT model); token reward
    r_t = beta (log pi_phi - log pi_ref), a step's reward the sum over its tokens. With online=True, after
    each iteration's rewards are computed, pi_phi takes `update_steps` optimiser steps (adamw at
    `learning_rate`) of `prm.make_implicit_prm_step` (BCE of sigmoid(sum_t r_t) against the verifier's
    correctness of each completion) on the iteration's rollouts: PRIME's Algorithm 1 (rewards from a forward
    of pi_phi, then its update). Its params, optimiser state and step are in the stage's checkpoints
    ("implicit_prm_params", "implicit_prm_opt_state", "implicit_prm_step"), so a resume is exact.

How the step rewards enter (`algos.process_rewards`):
  grpo: A = A_outcome (the variant's own) + coef * A_process; estimator "group_norm": DeepSeekMath's process
    supervision over the step rewards; "prime" (implicit only): PRIME's leave-one-out returns over the token
    rewards (with variant "rloo" and coef 1 this is PRIME's Eq. 5).
  ppo: coef * (each step's reward at its end token) is added to the token rewards GAE consumes.

Steps end at tokens holding the separator: `separator`, else (source "prm") the prm stage's, else the
task's `step_separator`, else "\\n". Metrics: process/step_reward, process/good_steps (probability > 0.5, or
implicit step reward > 0), process/steps, and with an online implicit PRM implicit_prm/loss,
implicit_prm/accuracy, implicit_prm/reward/mean, implicit_prm/grad_norm, ... (of its first update step of
the iteration: the PRM measured on rollouts it has not been trained on yet).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mc

from jaxrl_llm.algos import process_rewards as pr
from jaxrl_llm.algos.logprobs import completion_logprobs, rollout_forward_fn
from jaxrl_llm.algos.prm import (ImplicitPRMConfig, implicit_token_rewards, make_implicit_prm_step, separator_core,
                                 step_end_mask, step_end_table, step_logits, step_sums)
from jaxrl_llm.algos.train_state import OptimizerConfig, TrainState, jit_update
from jaxrl_llm.models import process_reward_model
from jaxrl_llm.train.build import jnp_tree_copy
from jaxrl_llm.train.config import ConfigError
from jaxrl_llm.train.validation import choice, flag, integer, number, unread

SOURCES = ("none", "prm", "implicit")
ESTIMATORS = ("group_norm", "prime")
_IMPLICIT_KEYS = ("beta", "learning_rate", "online", "update_steps")


def process_reward_section() -> mc.ConfigDict:
    """The `process_reward` section of an RL stage (module docstring); source="none" is off."""
    return mc.ConfigDict(dict(source="none", coef=1.0, prm_stage="", separator="", estimator="group_norm",
                              beta=0.05, learning_rate=1e-6, online=True, update_steps=1))


def check_process_reward(cfg: mc.ConfigDict, name: str, kind: str, group_size: int) -> None:
    """Every key of config.<name>.process_reward (kind "grpo" or "ppo"; group_size: completions per prompt)."""
    s = cfg[name]
    p, where, d = s.get("process_reward"), f"config.{name}.process_reward", process_reward_section()
    if p is None:
        return
    choice(p.source, f"{where}.source", SOURCES, means="a process-reward source ('none', 'prm': a trained "
           "process reward model, 'implicit': an implicit PRM trained online, PRIME)")
    if p.source == "none":
        for key in d:
            if key != "source":
                unread(p, key, where, d[key], "with source='none' (no process reward)")
        return
    number(p.coef, f"{where}.coef", 0.0, lo_open=True, means="weight of the process term", example=1.0)
    if p.separator:
        try:
            separator_core(p.separator)
        except ValueError as e:
            raise ConfigError(f"{where}.separator: {e}") from None
    if kind == "ppo":
        unread(p, "estimator", where, d.estimator, "by a ppo stage (its step rewards go into GAE's token rewards)")
    else:
        choice(p.estimator, f"{where}.estimator", ESTIMATORS, means="a process advantage estimator")
    if p.source == "prm":
        for key in _IMPLICIT_KEYS:
            unread(p, key, where, d[key], "with source='prm' (only with source='implicit')")
        if p.estimator == "prime":
            raise ConfigError(f"{where}.estimator='prime' needs token rewards (source='implicit'); a trained PRM "
                              "scores steps: use estimator='group_norm'")
        stages_before = tuple(cfg.stages)[:tuple(cfg.stages).index(name)] if name in cfg.stages else ()
        if p.prm_stage not in stages_before or cfg[p.prm_stage].kind != "prm":
            earlier = [n for n in stages_before if cfg[n].kind == "prm"]
            raise ConfigError(f"{where}.prm_stage={p.prm_stage!r} must name a prm stage that runs before {name!r} "
                              f"(source='prm'); earlier prm stages: {earlier or 'none'}")
        return
    unread(p, "prm_stage", where, d.prm_stage, "with source='implicit' (its PRM starts from the policy)")
    number(p.beta, f"{where}.beta", 0.0, lo_open=True, means="scale of the log-ratio reward (PRIME: 0.05)",
           example=0.05)
    if not flag(p.online, f"{where}.online"):
        raise ConfigError(f"{where}.online=False keeps the implicit PRM equal to its reference (both are the policy "
                          "at the stage's start), so every implicit reward would be 0; set online=True (PRIME "
                          "trains it online on the outcome labels)")
    number(p.learning_rate, f"{where}.learning_rate", 0.0, lo_open=True, means="the implicit PRM's learning rate",
           example=1e-6)
    integer(p.update_steps, f"{where}.update_steps", 1, means="implicit-PRM optimiser steps per iteration",
            example=1)
    if kind == "grpo" and p.estimator == "prime" and group_size < 2:
        raise ConfigError(f"{where}.estimator='prime' needs at least 2 completions per prompt (a leave-one-out "
                          f"baseline); the group size is {group_size}")
    if cfg.model.get("lora") is not None and int(cfg.model.lora.get("rank", 0)) > 0:
        raise ConfigError(f"{where}.source='implicit' is not supported with LoRA (config.model.lora.rank="
                          f"{cfg.model.lora.rank}): the implicit PRM is a full copy of the policy trained on its own")


def add_memory_terms(t: dict[str, int], s: mc.ConfigDict, z, reference_kept: bool) -> dict[str, int]:
    """`t` (an RL stage's memory terms, train.memory.TERMS) with what the section adds (Sizes `z`): a trained
    PRM is a frozen scalar-head model ("reward_model"); an implicit PRM is trained parameters and their
    optimizer moments, and its reference a copy of the policy unless the stage keeps one (`reference_kept`)."""
    p = s.get("process_reward")
    if p is None or p.source == "none":
        return t
    t = dict(t)
    if p.source == "prm":
        t["reward_model"] = t.get("reward_model", 0) + z.params("value")
        return t
    t["params"] += z.params("policy")
    t["optimizer"] += z.optimizer(mc.ConfigDict(dict(name="adamw")), z.trained("policy"))
    if not reference_kept:
        t["reference"] = t.get("reference", 0) + z.copy("policy")
    return t


def stage_separator(cfg: mc.ConfigDict, p: mc.ConfigDict, task) -> str:
    if p.separator:
        return p.separator
    if p.source == "prm":
        from jaxrl_llm.train.stages.prm import stage_separator as prm_separator
        return prm_separator(cfg[p.prm_stage], task)
    return getattr(task, "step_separator", None) or "\n"


class ProcessRewards:
    """What an RL stage (`stage`, built) needs for its process rewards: the PRM (loaded, or trained online),
    the step ends, the dense advantages (grpo) or token rewards (ppo), and the checkpoint entries."""

    def __init__(self, stage, kind: str):
        comp, p, algo = stage.comp, stage.section.process_reward, stage.algo
        self.stage, self.kind, self.p = stage, kind, p
        self.source, self.coef, self.group_size = p.source, float(p.coef), int(stage.n)
        mcfg, num_micro = comp.model_cfg, algo.num_minibatches * algo.num_micro_batches
        self.separator = stage_separator(stage.cfg, p, comp.task)
        try:
            self.table = jnp.asarray(step_end_table(comp.tokenizer, self.separator, mcfg.vocab_size))
        except ValueError as e:
            raise ConfigError(f"config.{stage.name}.process_reward.separator: {e}") from None
        self.ends_fn = jax.jit(lambda b: step_end_mask(b["completion_tokens"], b["completion_mask"], self.table))
        self.params = self.state = self.ref = self.update = None
        if self.source == "prm":
            module = process_reward_model(mcfg)
            self.score_fn = jax.jit(rollout_forward_fn(
                lambda prm, mb: jax.nn.sigmoid(step_logits(module, prm, mb["prompt_tokens"], mb["prompt_mask"],
                                                           mb["completion_tokens"], mb["completion_mask"])),
                mcfg, num_micro))
        else:
            self.beta = float(p.beta)
            self.logp_fn = jax.jit(rollout_forward_fn(
                lambda params, mb: completion_logprobs(comp.module, params, mcfg, mb["prompt_tokens"],
                                                       mb["prompt_mask"], mb["completion_tokens"],
                                                       mb["completion_mask"], chunk=algo.logprob_chunk)[0],
                mcfg, num_micro))
            self.step_fn = make_implicit_prm_step(comp.module, mcfg, ImplicitPRMConfig(self.beta, algo.logprob_chunk),
                                                  num_micro)
            self.opt = OptimizerConfig(learning_rate=float(p.learning_rate))
            self.implicit_fn = jax.jit(lambda logp, ref, mask, ends: (
                lambda tok: (tok, step_sums(tok, ends)))(implicit_token_rewards(logp, ref, mask, self.beta)))
        est = p.estimator if kind == "grpo" else None
        self.combine_fn = jax.jit(lambda tok, step, ends, mask: self._combine(est, tok, step, ends, mask))

    # ------------------------------------------------------------------ state

    def init(self, params) -> None:
        """At the stage's start (and before a resume): the trained PRM, or pi_phi and pi_ref from `params`."""
        st = self.stage
        if self.source == "prm":
            if st.run is not None:  # None: a tool only needs the stage's structure
                from jaxrl_llm.train.stages.prm import load_prm_params
                self.params = load_prm_params(st.comp, st.run, self.p.prm_stage, st.stages_before, params)
            return
        self.state = TrainState.create(jnp_tree_copy(params), self.opt)
        self.ref = st.ref if st.ref is not None else jnp_tree_copy(params)

    def tree(self) -> dict:
        if self.state is None:
            return {}
        return {"implicit_prm_params": self.state.params, "implicit_prm_opt_state": self.state.opt_state,
                "implicit_prm_step": self.state.step}

    def restore(self, tree: dict) -> None:
        if self.state is not None:
            self.state = self.state.replace(params=tree["implicit_prm_params"],
                                            opt_state=tree["implicit_prm_opt_state"], step=tree["implicit_prm_step"])
        if self.ref is not None and self.stage.ref is not None:
            self.ref = self.stage.ref  # the stage's restored reference (the same values)

    # ------------------------------------------------------------------ one iteration

    def _combine(self, est, tok, step, ends, mask):
        out = pr.step_metrics(step, ends, mask, 0.5 if self.source == "prm" else 0.0)
        if est is None:
            dense = self.coef * pr.step_token_rewards(step, ends, mask)
        elif est == "prime":
            dense = self.coef * pr.prime_advantages(tok, mask, self.group_size)
        else:
            dense = self.coef * pr.group_step_advantages(step, ends, mask, self.group_size)
        out["process/dense_abs_mean"] = jnp.sum(jnp.abs(dense)) / jnp.maximum(jnp.sum(mask), 1)
        return dense, out

    def __call__(self, exp, key: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
        """(coef x the process advantages [B, N] (grpo) or the per-step token rewards (ppo), metrics) of one
        scored rollout; an online implicit PRM is then updated on it."""
        batch = exp.batch
        mask = batch["completion_mask"]
        ends = self.ends_fn(batch)
        metrics: dict[str, Any] = {}
        if self.source == "prm":
            tok = None
            step = jnp.where(ends, self.score_fn(self.params, batch), 0.0)
        else:
            ref_logps = self.logp_fn(self.ref, batch)
            tok, step = self.implicit_fn(self.logp_fn(self.state.params, batch), ref_logps, mask, ends)
            ub = {k: batch[k] for k in ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask")}
            ub.update(outcome=exp.correct.astype(jnp.float32), ref_logps=ref_logps)
            if self.update is None:
                self.update = jit_update(self.step_fn, self.state, ub, self.stage.comp.env)
            for k in range(int(self.p.update_steps)):
                self.state, m = self.update(self.state, ub, jax.random.fold_in(key, k))
                if k == 0:
                    metrics.update({f"implicit_prm/{name}": v for name, v in m.items()})
        dense, out = self.combine_fn(tok if tok is not None else step, step, ends, mask)
        return dense, {**out, **metrics}
