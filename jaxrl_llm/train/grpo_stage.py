"""RL stage for the GRPO family: sample groups, score them, compute advantages, update.

One iteration:
  prompts (PromptIterator, this process's shard) -> left-padded tokens
  -> sampler: n = group_size completions per prompt (KV cache, jitted)
  -> rewards: inside jit when the task has one (arithmetic), else the task's
     host reward through HostRewardRunner (batched, time-limited)
  -> old / reference log-probs when the variant needs them (jitted forwards)
  -> advantages on the whole batch (grpo.compute_advantages)
  -> update: epochs x minibatches of the GRPO step (one jitted scan, state donated)

The training forward divides logits by the sampling temperature, so the
sampler's raw log-probs and the trainer's agree (their difference is logged
as mismatch_kl / mismatch_abs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_llm.algos import grpo
from jaxrl_llm.algos.train_state import OptimizerConfig, TrainState, jit_update, make_epoch_runner
from jaxrl_llm.rewards.runner import HostRewardRunner
from jaxrl_llm.train.build import (Evaluator, global_prompt_batch, jnp_tree_copy, log_rollout_samples,
                                   prompt_iterator, rollout_rewards, stage_sampler)
from jaxrl_llm.train.config import to_dataclass
from jaxrl_llm.train.stage import Stage


class GRPOStage(Stage):
    kind = "grpo"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        s, comp = self.section, self.comp
        self.total_steps = int(s.iterations)
        sc = s.sampling
        temperature = float(sc.temperature) if sc.temperature > 0 else 1.0
        self.algo = to_dataclass(grpo.GRPOConfig, s.algo, f"config.{self.name}.algo").replace(temperature=temperature)
        self.group = self.algo.group_size
        n_train = max(int(s.get("num_train_examples", 0)) or 0, int(s.prompts_per_iter) * 64)
        self.examples = comp.task.examples("train", n_train, self.cfg.seed)
        self.prompts = int(s.prompts_per_iter)  # the global batch of prompts, split over processes
        self.iterator = prompt_iterator(comp, self.examples, self.prompts, self.cfg.seed + self.index)
        self.sampling, self.sampler = stage_sampler(comp, sc, self.group)
        self.in_jit = bool(s.reward.in_jit) and hasattr(comp.task, "jax_reward")
        if self.in_jit:
            self.jax_reward = jax.jit(comp.task.jax_reward(comp.tokenizer, comp.model_cfg.vocab_size, comp.eos_ids))
            self.runner = None
        else:
            self.runner = HostRewardRunner(comp.task, timeout_s=float(s.reward.timeout_s),
                                           on_error=s.reward.on_error, error_score=float(s.reward.error_score))
        lc = self.algo.loss
        self.need_ref = lc.kl_coef > 0 or (self.algo.advantage_estimator == "reinforce_pp"
                                            and self.algo.reward_kl_coef > 0)
        # One update per rollout is on-policy: the step uses stop_gradient(new log-probs) as the old ones (ratio
        # exactly 1), so no separate forward. Several updates, or the KL folded into REINFORCE++ rewards, need them.
        self.need_old = (self.algo.epochs * self.algo.num_minibatches > 1
                         or (self.algo.advantage_estimator == "reinforce_pp" and self.algo.reward_kl_coef > 0))
        self.logp_fn = jax.jit(grpo.make_logprob_fn(
            comp.module, comp.model_cfg, temperature, self.algo.logprob_chunk,
            num_micro=self.algo.num_minibatches * self.algo.num_micro_batches))
        self.opt_cfg = to_dataclass(OptimizerConfig, s.optimizer, f"config.{self.name}.optimizer")
        self.step_fn = make_epoch_runner(grpo.make_grpo_step(comp.module, comp.model_cfg, self.algo),
                                         self.algo.num_minibatches, self.algo.epochs)
        self.update = None
        self.evaluator = Evaluator(comp, s.max_prompt_len) if self.cfg.eval.every > 0 else None
        self.ref = None

    def init(self, params) -> None:
        self.state = TrainState.create(jnp_tree_copy(params), self.opt_cfg)
        self.ref = jnp_tree_copy(params) if self.need_ref else None

    def step(self, i: int) -> dict:
        s = self.section
        examples = next(self.iterator)
        pt, pm, n_trunc = global_prompt_batch(self.comp, examples, s.max_prompt_len, self.prompts)
        key = jax.random.fold_in(self.key, i)
        ro = self.sampler(self.state.params, pt, pm, jax.random.fold_in(key, 0))
        rewards, correct, extra = rollout_rewards(self.comp, ro, examples, self.group,
                                                  self.jax_reward if self.in_jit else None, self.runner,
                                                  self.sampling.max_new_tokens)
        mask = ro.mask
        if self.algo.filter_zero_std_groups:  # DAPO dynamic sampling: groups without signal leave the batch
            keep = grpo.nonzero_std_groups(rewards, self.group)
            mask = mask * keep[:, None].astype(mask.dtype)
        batch = {"prompt_tokens": ro.prompt_tokens, "prompt_mask": ro.prompt_mask,
                 "completion_tokens": ro.tokens, "completion_mask": mask, "sampler_logprobs": ro.raw_logprobs}
        if self.need_old:
            batch["old_logprobs"] = self.logp_fn(self.state.params, batch)
        if self.need_ref:
            batch["ref_logprobs"] = self.logp_fn(self.ref, batch)
        batch["advantages"] = grpo.compute_advantages(
            self.algo, rewards, mask, old_logprobs_bn=batch.get("old_logprobs"),
            ref_logprobs_bn=batch.get("ref_logprobs"))
        if self.update is None:
            self.update = jit_update(self.step_fn, self.state, batch, self.comp.env)
        self.state, stacked = self.update(self.state, batch, jax.random.fold_in(key, 1))
        metrics = {k: (jnp.max(v) if k.endswith("_max") else jnp.mean(v)) for k, v in stacked.items()}
        lengths = ro.lengths.astype(jnp.float32)
        metrics.update({
            "reward/mean": jnp.mean(rewards), "reward/std": jnp.std(rewards),
            "accuracy": jnp.mean(correct.astype(jnp.float32)),
            "response_length": jnp.mean(lengths), "response_length_max": jnp.max(lengths),
            "truncated_fraction": 1.0 - jnp.mean(ro.finished.astype(jnp.float32)),
            "response_tokens": jnp.sum(lengths), "decode_steps": ro.num_steps,
            "prompts_truncated": n_trunc,
        })
        if self.algo.filter_zero_std_groups:
            metrics["groups_kept_fraction"] = jnp.mean(keep.astype(jnp.float32))
        metrics.update(extra)
        if self.cfg.log.samples_every > 0 and (i + 1) % self.cfg.log.samples_every == 0:
            log_rollout_samples(self.comp, self.run, self.name, i + 1, ro, examples, self.group, rewards)
        return metrics

    def params(self):
        return self.state.params

    def tree(self) -> dict:
        tree = {"params": self.state.params, "opt_state": self.state.opt_state, "step": self.state.step}
        if self.ref is not None:
            tree["ref_params"] = self.ref
        return tree

    def meta(self) -> dict:
        return {"iterator": self.iterator.state()}

    def restore(self, tree: dict, meta: dict) -> None:
        self.state = self.state.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"])
        if "ref_params" in tree:
            self.ref = tree["ref_params"]
        self.iterator.restore(meta["iterator"])

    def evaluate(self) -> dict:
        return self.evaluator(self.state.params) if self.evaluator else {}

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
