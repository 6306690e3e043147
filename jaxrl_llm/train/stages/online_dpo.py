"""Online DPO (Guo et al. 2024, "Direct language model alignment from online AI feedback", arXiv 2402.04792):
DPO on pairs sampled from the current policy each iteration and ranked by the stage's reward.

One iteration:
  prompts -> rollout (samples_per_prompt >= 2 completions per prompt, the current policy) -> rewards
     (train.experience.collect, as GRPO: the task's in-jit / host reward, or a trained reward model's with
     reward.source="reward_model", as PPO)
  -> scores = rewards - missing_eos_penalty x (the completion emitted no EOS)   (TRL's missing_eos_penalty)
  -> one pair per prompt: chosen = its best-scored completion, rejected = its worst (the first of equal ones)
     (`select_pairs`)
  -> reference log-probs of the pairs (the frozen policy the stage starts from; `dpo.make_reference_logps_fn`)
  -> one `dpo.make_dpo_step` update on the prompts_per_iter pairs (its loss types, beta, ...: `algo`)

Ties. A prompt whose completions all score the same carries no preference: its pair stays in the batch
(static shapes) with zero chosen and rejected masks, i.e. a per-pair weight of 0. Its log-ratios are then
the constant 0, so it adds nothing to the gradient (nor to the NLL term of nll_coef, a mean over the chosen
tokens of the batch). The DPO step weighs every pair 1/B (B = prompts_per_iter), so with K untied pairs the
gradient is K/B times the mean over the untied pairs, as with DAPO's dynamic sampling, which zeroes the masks
of zero-variance groups (train.experience). Tied pairs are counted (`pairs/tied`, `pairs/tied_fraction`).
When every pair of an iteration ties, the update is skipped (parameters, optimiser state and step counter
unchanged, `pairs/all_tied` = 1, counted in the stage summary as `all_tied_iterations`). TRL's
OnlineDPOTrainer (trl/experimental/online_dpo) keeps tied pairs instead: with its two completions per prompt
it takes `first >= second`, so on a tie the first sampled completion is "chosen" and the pair is trained on as
if it were preferred.

Metrics: the DPO step's rewards/chosen, rewards/rejected, rewards/margins (beta x log-ratios to the
reference), rewards/accuracies (the preference accuracy on the sampled pairs, before the update),
logps/chosen, logps/rejected (every rewards/* and logps/* metric), pref_loss and loss, as means over the
untied pairs (the step's 1/B sums, in which a tied row adds 0 to rewards and log-probs and the constant loss
at zero log-ratio, rescaled; 0 when all tie); scores/chosen, scores/rejected, scores/margin (the ranking
scores of the untied pairs); pairs/tied, pairs/tied_fraction, pairs/all_tied; the rollout's reward/mean,
accuracy, response lengths and truncated_fraction (no EOS); the held-out task accuracy (eval/accuracy,
greedy) every eval.every iterations.

The DPO log-probs are the policy's at temperature 1 (as `make_dpo_step` computes them, and TRL's), whatever the
sampling temperature. Loss types: those of `preference.dpo_loss` on precomputed reference log-probs (sigmoid, ipo,
hinge, robust); the others are refused, as are overlap, env, lessons and process_reward sections (not
supported by this kind). Checkpoints hold params, opt_state, step and ref_params; the meta the prompt position,
the reward watch and the summary's counters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mc

from jaxrl_llm.algos import dpo
from jaxrl_llm.algos.preference import DPO_LOSS_TYPES, dpo_loss
from jaxrl_llm.algos.train_state import jit_update
from jaxrl_llm.errors import ConfigError
from jaxrl_llm.train.config import from_dataclass, optimizer_config, optimizer_from
from jaxrl_llm.train.stage import StageKind
from jaxrl_llm.train.stages.preference import in_env, dpo_algo, load_reward_params
from jaxrl_llm.train.stages.rl import RLStage, check_rl_section, reward_section, sampling_section
from jaxrl_llm.train.validation import choice, integer, number, unread

UNSUPPORTED = ("overlap", "env", "lessons", "process_reward")
# make_dpo_step's metrics that are 1/B-weighted sums to which a tied (zero-mask) row adds exactly 0: its implicit
# rewards and log-probs (rewards/chosen, rewards/accuracies, logps/chosen, ...): rescaled to untied means
PAIR_MEAN_PREFIXES = ("rewards/", "logps/")


def online_dpo_stage(loss_type: str = "sigmoid", iterations: int = 100, prompts_per_iter: int = 32,
                     samples_per_prompt: int = 2, learning_rate: float = 1e-6, max_new_tokens: int = 16,
                     missing_eos_penalty: float = 0.0, **algo_kw) -> mc.ConfigDict:
    """An online DPO stage: `samples_per_prompt` completions of each prompt per iteration, the best and worst
    by the reward as a pair; `loss_type` and `algo_kw` set `dpo.DPOConfig` fields (beta, label_smoothing, ...).
    missing_eos_penalty (>= 0; 0 = off): subtracted from the score of a completion without EOS (TRL's)."""
    return mc.ConfigDict(dict(
        kind="online_dpo", iterations=iterations, prompts_per_iter=prompts_per_iter,
        samples_per_prompt=samples_per_prompt, max_prompt_len=16, num_micro_batches=1,
        missing_eos_penalty=missing_eos_penalty, sampling=sampling_section(max_new_tokens),
        algo=from_dataclass(dpo.DPOConfig(loss_type=loss_type, **algo_kw)),
        optimizer=optimizer_config(learning_rate), reward=reward_section(source="task"), reward_model_stage=""))


def online_dpo_algo(s: mc.ConfigDict, where: str) -> dpo.DPOConfig:
    """The stage's DPOConfig (`preference.dpo_algo`'s checks), a loss type of `preference.dpo_loss` (those on
    precomputed reference log-probs)."""
    algo = dpo_algo(s, where)
    if algo.loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(f"{where}.algo.loss_type={algo.loss_type!r} is not supported by kind 'online_dpo' (it "
                          f"trains on reference log-probs precomputed from the frozen starting policy); use one of "
                          f"{DPO_LOSS_TYPES}")
    return algo


def check_reward_source(cfg: mc.ConfigDict, name: str) -> None:
    """reward.source 'task' or 'reward_model' (then reward_model_stage names an earlier reward_model stage)."""
    s, where = cfg[name], f"config.{name}"
    choice(s.reward.source, f"{where}.reward.source", ("task", "reward_model"),
           means="a reward source ('task': the task's reward; 'reward_model': a trained reward model's)")
    if s.reward.source == "task":
        unread(s, "reward_model_stage", where, "", "with reward.source='task'")
        return
    stages = tuple(cfg.stages)
    before = stages[:stages.index(name)] if name in stages else ()
    if s.reward_model_stage not in before or cfg[s.reward_model_stage].kind != "reward_model":
        earlier = [n for n in before if cfg[n].kind == "reward_model"]
        raise ConfigError(f"{where}.reward_model_stage={s.reward_model_stage!r} must name a reward_model stage "
                          f"that runs before {name!r} (reward.source='reward_model'); earlier reward_model stages: "
                          f"{earlier or 'none'}")


def pair_scores(rewards: jax.Array, finished: jax.Array, missing_eos_penalty: float) -> jax.Array:
    """The scores pairs are ranked by: `rewards` [B*n] minus `missing_eos_penalty` where a completion emitted no
    EOS (`finished` False: cut at sampling.max_new_tokens), as TRL's missing_eos_penalty."""
    rewards = rewards.astype(jnp.float32)
    if not missing_eos_penalty:
        return rewards
    return rewards - missing_eos_penalty * (~finished).astype(jnp.float32)


def select_pairs(rollout_batch: dict, scores: jax.Array, n: int) -> tuple[dict, jax.Array, dict]:
    """(pair batch [B], untied weight [B] float32 0/1, metrics) from a rollout of n completions per prompt
    (rows prompt-major) and their scores [B*n]: chosen = the first best-scored completion of each prompt,
    rejected = the first worst; a prompt whose scores all tie gets zero chosen / rejected masks (weight 0)."""
    s = scores.reshape(-1, n).astype(jnp.float32)
    b = s.shape[0]
    best, worst = jnp.argmax(s, axis=-1), jnp.argmin(s, axis=-1)  # argmax / argmin: the first such index
    s_best, s_worst = jnp.max(s, axis=-1), jnp.min(s, axis=-1)
    untied = s_best > s_worst
    w = untied.astype(jnp.float32)
    base = jnp.arange(b) * n
    rows = lambda x, idx: x[base + idx]  # noqa: E731
    keep = lambda mask: mask * untied[:, None].astype(mask.dtype)  # noqa: E731
    pairs = {"prompt_tokens": rows(rollout_batch["prompt_tokens"], 0),
             "prompt_mask": rows(rollout_batch["prompt_mask"], 0),
             "chosen_tokens": rows(rollout_batch["completion_tokens"], best),
             "chosen_mask": keep(rows(rollout_batch["completion_mask"], best)),
             "rejected_tokens": rows(rollout_batch["completion_tokens"], worst),
             "rejected_mask": keep(rows(rollout_batch["completion_mask"], worst))}
    k = jnp.sum(w)
    mean = lambda x: jnp.sum(w * x) / jnp.maximum(k, 1.0)  # noqa: E731
    metrics = {"pairs/tied": b - k, "pairs/tied_fraction": 1.0 - k / b, "pairs/all_tied": (k == 0).astype(jnp.float32),
               "scores/chosen": mean(s_best), "scores/rejected": mean(s_worst), "scores/margin": mean(s_best - s_worst)}
    return pairs, w, metrics


def make_online_dpo_step(module: Any, model_cfg, cfg: dpo.DPOConfig, num_micro_batches: int = 1):
    """`step(state, batch, rng)` on a pair batch with "pair_weight" [B] (0: a tied pair, its masks zeroed):
    `dpo.make_dpo_step`'s update, skipped (state unchanged, zero metrics) when every weight is 0; the
    PAIR_MEAN_PREFIXES metrics, pref_loss and loss as means over the weighted pairs (see the module docstring)."""
    inner = dpo.make_dpo_step(module, model_cfg, cfg, num_micro_batches)

    def step(state, batch, rng):
        w = batch["pair_weight"]
        pairs = {k: v for k, v in batch.items() if k != "pair_weight"}
        b, k = w.shape[0], jnp.sum(w)
        shapes = jax.eval_shape(inner, state, pairs, rng)[1]
        skip = lambda st: (st, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes))  # noqa: E731
        state, metrics = jax.lax.cond(k > 0, lambda st: inner(st, pairs, rng), skip, state)
        scale = b / jnp.maximum(k, 1.0)
        z = jnp.zeros((1,), jnp.float32)  # the loss of a tied row: log-ratios 0 (and lengths 1 for IPO's average)
        tied_loss = dpo_loss(z, z, z, z, beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                             **({"chosen_lengths_b": z + 1, "rejected_lengths_b": z + 1}
                                if cfg.loss_type == "ipo" and cfg.ipo_length_normalize else {}))[0][0]
        metrics = dict(metrics)
        for key in metrics:
            if key.startswith(PAIR_MEAN_PREFIXES):
                metrics[key] = metrics[key] * scale
        pref = jnp.where(k > 0, (metrics["pref_loss"] - tied_loss * (b - k) / b) * scale, 0.0)
        metrics["loss"] = metrics["loss"] - metrics["pref_loss"] + pref
        metrics["pref_loss"] = pref
        return state, metrics

    return step


class OnlineDPOStage(RLStage):
    kind = "online_dpo"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        s, comp = self.section, self.comp
        where = f"config.{self.name}"
        self.opt_cfg = optimizer_from(s.optimizer, f"{where}.optimizer")
        self.eos_penalty = float(s.missing_eos_penalty)
        num_micro, a = int(s.num_micro_batches), self.algo
        self.step_fn = make_online_dpo_step(comp.module, comp.model_cfg, a, num_micro)
        self.ref_fn = in_env(comp, dpo.make_reference_logps_fn(comp.module, comp.model_cfg, a.logprob_chunk,
                                                                num_micro))
        self.pairs_fn = jax.jit(lambda batch, scores: select_pairs(batch, scores, self.n))
        self.update = None
        self.rm_fn = self.rm_params = None
        if s.reward.source == "reward_model":
            from jaxrl_llm.algos.logprobs import rollout_forward_fn
            from jaxrl_llm.algos.reward_model import sequence_rewards
            from jaxrl_llm.models import reward_model
            rm = reward_model(comp.model_cfg)
            self.rm_fn = jax.jit(rollout_forward_fn(
                lambda p, mb: sequence_rewards(rm, p, mb["prompt_tokens"], mb["prompt_mask"], mb["completion_tokens"],
                                               mb["completion_mask"]), comp.model_cfg, num_micro))

    @classmethod
    def check_config(cls, cfg: mc.ConfigDict, name: str) -> None:
        """Every key of an online_dpo section (see `train.validation`)."""
        s, where = cfg[name], f"config.{name}"
        for key in UNSUPPORTED:
            if s.get(key) is not None:
                raise ConfigError(f"{where}.{key}: not supported by kind 'online_dpo' (sampling and the update "
                                  f"alternate on the same devices, single-turn); remove the {key} section")
        n = integer(s.samples_per_prompt, f"{where}.samples_per_prompt", 2,
                    means="completions per prompt (the best and the worst make its pair)", example=2)
        integer(s.num_micro_batches, f"{where}.num_micro_batches", 1, example=1)
        if int(s.prompts_per_iter) % int(s.num_micro_batches):
            raise ConfigError(f"{where}.prompts_per_iter={s.prompts_per_iter} pairs are not divisible by "
                              f"{where}.num_micro_batches={s.num_micro_batches}; make them divisible")
        number(s.missing_eos_penalty, f"{where}.missing_eos_penalty", 0.0,
               means="subtracted from the score of a completion without EOS; 0 = off", example=1.0)
        online_dpo_algo(s, where)
        check_rl_section(cfg, name, n, f"{where}.samples_per_prompt")
        check_reward_source(cfg, name)
        optimizer_from(s.optimizer, f"{where}.optimizer")

    def algo_config(self) -> dpo.DPOConfig:
        return online_dpo_algo(self.section, f"config.{self.name}")

    def samples_per_prompt(self) -> int:
        return int(self.section.samples_per_prompt)

    def init(self, params) -> None:
        self.state = self.make_state(params, self.opt_cfg)
        self.ref = self.reference_copy(params, True)
        if self.rm_fn is not None and self.run is not None:
            self.rm_params = load_reward_params(self.comp, self.run, self.section.reward_model_stage,
                                                self.stages_before, params)

    def step(self, i: int) -> dict:
        scorer = None
        if self.rm_params is not None:
            from jaxrl_llm.train.stages.ppo import RewardModelScores
            scorer = RewardModelScores(self.scorer, self.rm_fn, self.rm_params)
        exp = self.experience(i, self.model_params(), scorer=scorer)
        scores = pair_scores(exp.rewards, exp.rollout.finished, self.eos_penalty)
        pairs, weight, pair_metrics = self.pairs_fn(exp.batch, scores)
        pairs.update(self.ref_fn(self.reference_params(), pairs))
        pairs["pair_weight"] = weight
        if self.update is None:
            self.update = jit_update(self.step_fn, self.state, pairs, self.comp.env)
        self.state, metrics = self.update(self.state, pairs, self.update_key(i))
        if float(pair_metrics["pairs/all_tied"]):
            self.summary["all_tied_iterations"] = self.summary.get("all_tied_iterations", 0) + 1
        return self.iteration_metrics(i, exp, {**metrics, **pair_metrics})


def memory(cfg, s, z) -> dict[str, int]:
    a = online_dpo_algo(s, "algo")
    p, n, num_micro = int(s.max_prompt_len), int(s.sampling.max_new_tokens), int(s.num_micro_batches)
    prompts = int(s.prompts_per_iter)
    pair_rows = 2 * prompts  # chosen and rejected rows in one forward
    micro = z.rows(pair_rows // num_micro)
    trained = z.trained("policy")  # all of it, or LoRA's adapters
    uses_rm = s.reward.source == "reward_model"
    t = {"params": z.params("policy"), "input_params": z.copy("policy"), "reference": z.copy("policy"),
         "reward_model": z.params("reward") if uses_rm else 0,
         "optimizer": z.optimizer(s.optimizer, trained), "gradients": z.gradients(trained, num_micro),
         "activations": z.activations(micro, p + n), "logprob_chunks": z.head(micro, n, a.logprob_chunk, False)}
    t.update(z.rollout_terms(prompts * int(s.samples_per_prompt), prompts, p, n, s.sampling))
    t.update(z.score_terms(pair_rows // num_micro, p + n, n, a.logprob_chunk))  # the reference forward
    return t | z.eval_terms(cfg, s)


KIND = StageKind("online_dpo", OnlineDPOStage, online_dpo_stage, memory, update_rows=lambda s: int(s.prompts_per_iter),
                 micro_batch_key="num_micro_batches", logprob_chunk_key="algo.logprob_chunk", algo=online_dpo_algo)
