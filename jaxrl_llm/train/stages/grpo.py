"""RL stage for the GRPO family: sample groups, score them, compute advantages, update.

One iteration:
  prompts -> rollout (group_size completions per prompt) -> rewards   (train.experience.collect)
  -> old / reference log-probs when the variant needs them (algo.needs_old_logprobs / needs_reference)
  -> advantages on the whole batch (grpo.compute_advantages)
  -> update: epochs x minibatches of the GRPO step (one jitted scan, state donated)   (GRPOLearner)

`GRPOLearner` is the model side of an iteration; bench/ours_grpo.py times the same object.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections as mc

from jaxrl_llm.algos import grpo
from jaxrl_llm.algos.train_state import TrainState, jit_update, make_epoch_runner, prompt_unit
from jaxrl_llm.train.config import (ConfigError, from_dataclass, nearest, optimizer_config, optimizer_from,
                                    to_dataclass)
from jaxrl_llm.train.experience import Experience, step_metrics
from jaxrl_llm.train.stage import StageKind
from jaxrl_llm.train.stages.episodes import env_section
from jaxrl_llm.train.stages.process_reward import (ProcessRewards, add_memory_terms, check_process_reward,
                                                   process_reward_section)
from jaxrl_llm.train.stages.rl import (RLStage, check_divisible_rows, check_loss, check_rl_section,
                                       optional_temperature, overlap_section, resolve_temperature, reward_section,
                                       sampling_section, with_norm_length)
from jaxrl_llm.train.stages.overlap import memory_terms as overlap_memory
from jaxrl_llm.train.stages.overlap import with_off_policy_correction
from jaxrl_llm.train.validation import choice, integer, number, unread


def grpo_stage(variant: str = "grpo", iterations: int = 200, prompts_per_iter: int = 32, group_size: int = 8,
               learning_rate: float = 1e-6, max_new_tokens: int = 16, **variant_kw) -> mc.ConfigDict:
    """An RL stage of the GRPO family; `variant` picks the paper's settings (grpo.VARIANTS).

    The algorithm's temperature is the sampler's (`sampling.temperature`; `algo.temperature` stays unset).
    Dr. GRPO's `algo.loss.norm_length` stays unset too: the stage uses `sampling.max_new_tokens`, whatever
    it is set to later (an explicit value wins)."""
    if variant not in grpo.VARIANTS:
        raise ConfigError(f"grpo_stage(variant={variant!r}){nearest(variant, grpo.VARIANTS)}")
    if variant == "dr_grpo":
        algo = grpo.dr_grpo(max_new_tokens, group_size=group_size, **variant_kw)
        algo = algo.replace(loss=dataclasses.replace(algo.loss, norm_length=None))
    else:
        algo = grpo.VARIANTS[variant](group_size=group_size, **variant_kw)
    return mc.ConfigDict(dict(
        kind="grpo", variant=variant, iterations=iterations, prompts_per_iter=prompts_per_iter,
        max_prompt_len=16, sampling=sampling_section(max_new_tokens),
        algo=optional_temperature(from_dataclass(algo)),
        optimizer=optimizer_config(learning_rate), reward=reward_section(),
        process_reward=process_reward_section(), lessons="", overlap=overlap_section(),
        env=env_section()))


def algo_config(s: mc.ConfigDict, where: str) -> grpo.GRPOConfig:
    """The stage's GRPOConfig: its `algo` section with the sampler's temperature and, for the *-norm loss
    aggregations, `norm_length` = sampling.max_new_tokens unless set."""
    data, temperature = resolve_temperature(s.algo, s, where)
    algo = to_dataclass(grpo.GRPOConfig, data, f"{where}.algo")
    check_algo(algo, f"{where}.algo")
    return algo.replace(temperature=temperature, loss=with_off_policy_correction(with_norm_length(algo.loss, s), s))


def check_algo(algo: grpo.GRPOConfig, where: str) -> None:
    """What GRPOConfig's own checks leave: ranges, and keys its estimator does not read (`where` =
    "config.<stage>.algo")."""
    d, est = grpo.GRPOConfig(), algo.advantage_estimator
    integer(algo.group_size, f"{where}.group_size", 1, means="completions per prompt", example=8)
    number(algo.reward_kl_coef, f"{where}.reward_kl_coef", 0.0, means="KL folded into the rewards", example=0.0)
    number(algo.gamma, f"{where}.gamma", 0.0, 1.0, means="discount of reinforce_pp's returns", example=1.0)
    number(algo.std_eps, f"{where}.std_eps", 0.0, means="added to the std", example=1e-6)
    integer(algo.std_ddof, f"{where}.std_ddof", 0, 1, means="0: population std, 1: unbiased", example=1)
    if est != "reinforce_pp":
        unread(algo, "gamma", where, d.gamma, f"by advantage_estimator={est!r} (only by 'reinforce_pp')")
    if algo.reward_kl_coef == 0:
        unread(algo, "reward_kl_estimator", where, d.reward_kl_estimator, "with reward_kl_coef=0.0")
    if est == "rloo" or (est == "reinforce_pp" and algo.scale_rewards not in ("group", "batch")):
        unread(algo, "scale_rewards", where, d.scale_rewards, f"by advantage_estimator={est!r} (only by "
               "'group_norm'; reinforce_pp always whitens over the batch)")
    if est == "rloo" and algo.normalize_advantages:
        pass  # std_eps, std_ddof: the batch whitening of the leave-one-out advantages
    elif est != "group_norm" or algo.scale_rewards == "none":
        for key in ("std_eps", "std_ddof"):
            unread(algo, key, where, getattr(d, key),
                   f"by advantage_estimator={est!r} with scale_rewards={algo.scale_rewards!r} (no std division)")
    if est != "rloo":
        unread(algo, "normalize_advantages", where, d.normalize_advantages,
               f"by advantage_estimator={est!r} (only by 'rloo')")
    if est != "reinforce_pp":
        unread(algo, "returns_reset_at_masked", where, d.returns_reset_at_masked,
               f"by advantage_estimator={est!r} (only by 'reinforce_pp')")
    else:
        unread(algo, "singleton_groups", where, d.singleton_groups,
               "by advantage_estimator='reinforce_pp' (it has no groups)")
    if algo.group_size == 1 and algo.filter_zero_std_groups:
        raise ConfigError(f"{where}.filter_zero_std_groups=True with {where}.group_size=1: a group of one has no "
                          "reward variance, so every completion would be filtered out; set filter_zero_std_groups="
                          "False or group_size >= 2")
    check_loss(algo.loss, f"{where}.loss")


def shared_prompt_unit(algo: grpo.GRPOConfig, rows: int | None, env) -> int:
    """How many of a prompt's samples share one forward of it in the log-prob forwards and the update: the
    largest divisor of group_size whose units of rows every minibatch, data-parallel device and micro-batch
    holds whole (`train_state.prompt_unit`); 1 (every row its own forward) with share_prompt_forward=False or
    `rows` unknown. The rollout's rows are prompt-major (`train.experience`)."""
    if not algo.share_prompt_forward or not rows:
        return 1
    devices = env.mesh.size if env is not None else 1
    return prompt_unit(algo.group_size, rows, algo.num_minibatches * algo.num_micro_batches * devices)


class GRPOLearner:
    """The model side of a GRPO-family iteration: old / reference log-probs, advantages, the update.

    old_logprobs: force (True) or skip (False) the old-policy forward; None: as the algorithm needs it
    (several updates per rollout, or a KL folded into the rewards). One update per rollout is on-policy:
    the step uses stop_gradient(new log-probs) as the old ones (ratio exactly 1).
    """

    def __init__(self, module: Any, model_cfg, algo: grpo.GRPOConfig, env, old_logprobs: bool | None = None,
                 rows: int | None = None):
        self.algo, self.env = algo, env
        self.need_old = algo.needs_old_logprobs if old_logprobs is None else bool(old_logprobs)
        parts = algo.num_minibatches * algo.num_micro_batches
        self.prompt_unit = shared_prompt_unit(algo, rows, env)
        self.logp_fn = jax.jit(grpo.make_logprob_fn(module, model_cfg, algo.temperature, algo.logprob_chunk,
                                                    num_micro=parts, prompt_unit=self.prompt_unit))
        self.step_fn = make_epoch_runner(grpo.make_grpo_step(module, model_cfg, algo, self.prompt_unit),
                                         algo.num_minibatches, algo.epochs, unit=self.prompt_unit)
        self.update = None

    def __call__(self, state: TrainState, ref_params, exp: Experience, key: jax.Array,
                 on_phase: Callable[[str, Any], None] | None = None,
                 extra_advantages: jax.Array | None = None) -> tuple[TrainState, dict]:
        """(new state, metrics of the update) from one scored rollout; `ref_params` when algo.needs_reference.
        `extra_advantages` [B, N] (e.g. coef x process advantages) are added to the outcome advantages."""
        phase = on_phase or (lambda name, value: None)
        batch = self.update_batch(state, ref_params, exp, phase, extra_advantages)
        if self.update is None:
            self.update = jit_update(self.step_fn, state, batch, self.env)
        state, stacked = self.update(state, batch, key)
        metrics = step_metrics(stacked)
        phase("update", (state.params, metrics))
        return state, metrics

    def update_batch(self, state: TrainState, ref_params, exp: Experience,
                     phase: Callable[[str, Any], None] = lambda name, value: None,
                     extra_advantages: jax.Array | None = None) -> dict:
        """The update's batch from a scored rollout: old / reference log-probs as the algorithm needs them and
        the advantages. Pure in its array arguments: `train.vectorised` calls it under `jax.vmap`, then
        `self.step_fn` on the result."""
        batch = dict(exp.batch)
        if self.need_old:
            batch["old_logprobs"] = self.logp_fn(state.model_params(), batch)
        phase("old", batch.get("old_logprobs"))
        if self.algo.needs_reference:
            batch["ref_logprobs"] = self.logp_fn(ref_params, batch)
        phase("reference", batch.get("ref_logprobs"))
        batch["advantages"] = grpo.compute_advantages(
            self.algo, exp.rewards, batch["completion_mask"], old_logprobs_bn=batch.get("old_logprobs"),
            ref_logprobs_bn=batch.get("ref_logprobs"))
        if extra_advantages is not None:
            batch["advantages"] = batch["advantages"] + extra_advantages
        return batch


class GRPOStage(RLStage):
    kind = "grpo"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.opt_cfg = optimizer_from(self.section.optimizer, f"config.{self.name}.optimizer")
        self.learner = GRPOLearner(self.comp.module, self.comp.model_cfg, self.algo, self.comp.env,
                                   rows=int(self.section.prompts_per_iter) * self.algo.group_size)
        self.ref = None
        p = self.section.get("process_reward")
        self.process = ProcessRewards(self, "grpo") if p is not None and p.source != "none" else None

    @classmethod
    def check_config(cls, cfg: mc.ConfigDict, name: str) -> None:
        """Every key of a grpo section (see `train.validation`)."""
        s, where = cfg[name], f"config.{name}"
        choice(s.variant, f"{where}.variant", grpo.VARIANTS, means="a GRPO variant")
        algo = algo_config(s, where)
        check_rl_section(cfg, name, algo.group_size, f"{where}.algo.group_size")
        check_divisible_rows(s, where, algo.group_size, f"{where}.algo.group_size", algo)
        optimizer_from(s.optimizer, f"{where}.optimizer")
        check_process_reward(cfg, name, "grpo", algo.group_size)

    def algo_config(self) -> grpo.GRPOConfig:
        return algo_config(self.section, f"config.{self.name}")

    def samples_per_prompt(self) -> int:
        return self.algo.group_size

    def init(self, params) -> None:
        self.state = self.make_state(params, self.opt_cfg)
        self.ref = self.reference_copy(params, self.algo.needs_reference)
        if self.process is not None:
            self.process.init(params)
        if self.pipeline is not None:
            self.pipeline.init(self.model_params())

    def step(self, i: int) -> dict:
        experience = self.experience if self.pipeline is None else self.pipeline.experience
        exp = experience(i, self.state.model_params(), keep_groups_with_signal=self.algo.filter_zero_std_groups)
        if self.process is None:
            self.state, metrics = self.learner(self.state, self.reference_params(), exp, self.update_key(i))
            return self.iteration_metrics(i, exp, metrics)
        dense, process_metrics = self.process(exp, jax.random.fold_in(self.update_key(i), 0x9E3))
        self.state, metrics = self.learner(self.state, self.reference_params(), exp, self.update_key(i),
                                           extra_advantages=dense)
        return self.iteration_metrics(i, exp, {**metrics, **process_metrics})

    def tree(self) -> dict:
        tree = super().tree()
        if self.pipeline is not None:
            tree["overlap"] = self.pipeline.tree()
        return tree if self.process is None else {**tree, **self.process.tree()}

    def restore(self, tree: dict, meta: dict) -> None:
        super().restore(tree, meta)
        if self.process is not None:
            self.process.restore(tree)
        if self.pipeline is not None:
            self.pipeline.restore(tree["overlap"], meta["overlap"])



def memory(cfg, s, z) -> dict[str, int]:
    a = algo_config(s, "algo")
    p, n = int(s.max_prompt_len), int(s.sampling.max_new_tokens)
    rows = int(s.prompts_per_iter) * a.group_size
    policy = z.params("policy")
    micro = z.rows(rows // a.num_minibatches // a.num_micro_batches)
    trained = z.trained("policy")  # all of it, or LoRA's adapters
    t = {"params": policy, "input_params": z.copy("policy"), "reference": z.copy("policy") if a.needs_reference else 0,
         "optimizer": z.optimizer(s.optimizer, trained), "gradients": z.gradients(trained, a.num_micro_batches),
         "activations": z.activations(micro, p + n), "logprob_chunks": z.head(micro, n, a.logprob_chunk, True)}
    t.update(z.rollout_terms(rows, int(s.prompts_per_iter), p, n, s.sampling))
    if a.needs_old_logprobs or a.needs_reference:  # over the update's micro-batches in turn (grpo.make_logprob_fn)
        t.update(z.score_terms(rows // a.num_minibatches // a.num_micro_batches, p + n, n, a.logprob_chunk))
    t.update(overlap_memory(s, z))
    return add_memory_terms(t, s, z, a.needs_reference and z.lora is None) | z.eval_terms(cfg, s)


def _update_rows(s) -> int:
    return int(s.prompts_per_iter) * int(s.algo.group_size) // int(s.algo.num_minibatches)


KIND = StageKind("grpo", GRPOStage, grpo_stage, memory, update_rows=_update_rows,
                 micro_batch_key="algo.num_micro_batches", logprob_chunk_key="algo.logprob_chunk", algo=algo_config)
