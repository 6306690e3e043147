"""PPO stage: sample, score, KL-shaped token rewards, GAE, then epochs x minibatches of the clipped PPO step.

One iteration:
  prompts (PromptIterator) -> left-padded tokens
  -> sampler (the policy's params): `samples_per_prompt` completions per prompt
  -> scores: the task's reward (inside jit when the task has one, else on the host, as GRPOStage), or
     a trained reward model's (reward.source="reward_model")
  -> old log-probs and values (`ppo.make_rollout_fn`: one jitted forward per model, one in all when the
     backbone is shared) and reference log-probs (the frozen stage-start policy)
  -> `ppo.compute_targets`: r_t = -kl_coef * kl_t on every token + the score on the last one, GAE,
     whitened advantages
  -> update: epochs x minibatches of `ppo.make_ppo_step` (one jitted scan, state donated)
  -> kl_coef <- `ppo.update_kl_coef` (fixed, or adaptive towards a target KL)

Models (`algo.shared_backbone`):
  False (default): a separate value model `ScalarHeadModel(per_token=True)`. value_init="policy": a copy
    of the policy's backbone with a zero head (V = 0 at the start); value_init="reward_model": the final
    params of the reward_model stage named by `reward_model_stage` (`ppo.init_value_from_reward`: the head
    that scored the last token now reads every position). The two models have their own optimisers
    (`optimizer`, `value_optimizer`: `ppo.separate_optimizers`).
  True: one `PolicyValueModel` (the policy's tree plus a "score" head: zeros, or the reward model's head
    with value_init="reward_model"), one optimiser (`optimizer`).

Checkpoints hold "params" (the policy's CausalLM tree, so every tool that reads a stage's "params" gets a
policy), "value_params" (the value model, or the shared model's "score" head), "opt_state", "step" and
"ref_params"; the meta holds the data position and the KL coefficient. The stage hands the policy to the
next one. Metrics: the PPO step's (loss parts, clip fractions, value loss, explained variance, entropy,
grad/update norms), the targets' (kl, kl_coef, non_score_reward, rlhf_reward, score_mean), rewards,
accuracy, response lengths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_llm.algos import ppo
from jaxrl_llm.algos.logprobs import rollout_forward_fn
from jaxrl_llm.algos.reward_model import sequence_rewards
from jaxrl_llm.algos.train_state import OptimizerConfig, TrainState, jit_update, make_epoch_runner
from jaxrl_llm.models import PolicyValueModel, init_fn_for, reward_model, value_model
from jaxrl_llm.rewards.runner import HostRewardRunner
from jaxrl_llm.sharding.params import param_shardings
from jaxrl_llm.train.build import (Evaluator, global_prompt_batch, jnp_tree_copy, log_rollout_samples,
                                   prompt_iterator, rollout_rewards, stage_sampler)
from jaxrl_llm.train.config import to_dataclass
from jaxrl_llm.train.pref_stage import load_reward_params, scalar_head_params
from jaxrl_llm.train.stage import Stage


class PPOStage(Stage):
    kind = "ppo"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        s, comp = self.section, self.comp
        where = f"config.{self.name}"
        self.total_steps = int(s.iterations)
        sc = s.sampling
        temperature = float(sc.temperature) if sc.temperature > 0 else 1.0
        self.algo = to_dataclass(ppo.PPOConfig, s.algo, f"{where}.algo").replace(temperature=temperature)
        self.n = int(s.samples_per_prompt)
        self.examples = comp.task.examples("train", int(s.prompts_per_iter) * 64, self.cfg.seed)
        self.prompts = int(s.prompts_per_iter)  # the global batch of prompts, split over processes
        self.iterator = prompt_iterator(comp, self.examples, self.prompts, self.cfg.seed + self.index)
        self.sampling, self.sampler = stage_sampler(comp, sc, self.n)
        self._check_reward_model_options(where)
        self.in_jit = bool(s.reward.in_jit) and hasattr(comp.task, "jax_reward")
        if self.in_jit:
            self.jax_reward = jax.jit(comp.task.jax_reward(comp.tokenizer, comp.model_cfg.vocab_size, comp.eos_ids))
            self.runner = None
        else:
            self.runner = HostRewardRunner(comp.task, timeout_s=float(s.reward.timeout_s),
                                           on_error=s.reward.on_error, error_score=float(s.reward.error_score))
        if s.reward.source == "reward_model":
            rm = reward_model(comp.model_cfg)
            self.rm_fn = jax.jit(rollout_forward_fn(
                lambda p, mb: sequence_rewards(rm, p, mb["prompt_tokens"], mb["prompt_mask"], mb["completion_tokens"],
                                               mb["completion_mask"]),
                comp.model_cfg, ppo.score_micro_batches(self.algo)))
        a = self.algo
        if a.shared_backbone:
            self.policy_module, self.value_module = PolicyValueModel(comp.model_cfg), None
            self.opt = to_dataclass(OptimizerConfig, s.optimizer, f"{where}.optimizer")
        else:
            self.policy_module, self.value_module = comp.module, value_model(comp.model_cfg)
            self.opt = ppo.separate_optimizers(
                to_dataclass(OptimizerConfig, s.optimizer, f"{where}.optimizer"),
                to_dataclass(OptimizerConfig, s.value_optimizer, f"{where}.value_optimizer"))
        # placement of the value model (separate) or of the whole PolicyValueModel (shared)
        _, self.model_shardings = param_shardings(init_fn_for(self.value_module or self.policy_module), comp.env)
        self.need_ref = a.kl.init_coef > 0 or a.kl.kind == "adaptive" or a.loss.kl_coef > 0
        self.rollout_fn = jax.jit(ppo.make_rollout_fn(self.policy_module, self.value_module, comp.model_cfg, a))
        self.ref_fn = jax.jit(ppo.make_logprob_fn(comp.module, comp.model_cfg, temperature, a.logprob_chunk,
                                                  num_micro=ppo.score_micro_batches(a)))
        self.targets_fn = jax.jit(lambda *args: ppo.compute_targets(a, *args))
        self.step_fn = make_epoch_runner(ppo.make_ppo_step(self.policy_module, self.value_module, comp.model_cfg, a),
                                         a.num_minibatches, a.epochs)
        self.update = None
        self.evaluator = Evaluator(comp, s.max_prompt_len) if self.cfg.eval.every > 0 else None

    def _check_reward_model_options(self, where: str) -> None:
        s = self.section
        if s.value_init not in ("policy", "reward_model"):
            raise ValueError(f"{where}.value_init={s.value_init!r}; expected 'policy' or 'reward_model'")
        if s.reward.source not in ("task", "reward_model"):
            raise ValueError(f"{where}.reward.source={s.reward.source!r}; expected 'task' or 'reward_model'")
        if "reward_model" not in (s.value_init, s.reward.source):
            return
        rm = s.reward_model_stage
        if rm not in self.stages_before or self.cfg[rm].kind != "reward_model":
            earlier = [n for n in self.stages_before if self.cfg[n].kind == "reward_model"]
            raise ValueError(f"{where}.reward_model_stage={rm!r} must name a reward_model stage that runs before "
                             f"{self.name!r} (value_init / reward.source = 'reward_model'); earlier reward_model "
                             f"stages: {earlier or 'none'}")

    # ------------------------------------------------------------------ state

    def init(self, params) -> None:
        s, comp = self.section, self.comp
        self.kl_coef = jnp.asarray(self.algo.kl.init_coef, jnp.float32)
        self.ref = jnp_tree_copy(params) if self.need_ref else None
        # run is None when a tool (cli eval) only needs the state's structure: the policy-shaped head will do
        rm = (load_reward_params(comp, self.run, s.reward_model_stage, self.stages_before, params)
              if self.run is not None and "reward_model" in (s.value_init, s.reward.source) else None)
        self.rm_params = rm if s.reward.source == "reward_model" else None
        from_rm = s.value_init == "reward_model" and rm is not None
        if self.algo.shared_backbone:  # the value head on the policy's backbone: zeros, or the reward model's head
            score = rm["score"] if from_rm else None
            tree = jax.device_put(ppo.shared_params_from_policy(jnp_tree_copy(params), comp.model_cfg, score),
                                  self.model_shardings)
        else:
            value = (ppo.init_value_from_reward(rm) if from_rm
                     else scalar_head_params(params, comp, self.model_shardings))
            tree = {"policy": jnp_tree_copy(params), "value": value}
        self.state = TrainState.create(tree, self.opt)

    def policy(self):
        return ppo.policy_params(self.algo, self.state.params)

    def params(self):
        return self.policy()

    def tree(self) -> dict:
        p = self.state.params
        value = p["score"] if self.algo.shared_backbone else p["value"]
        tree = {"params": self.policy(), "value_params": value, "opt_state": self.state.opt_state,
                "step": self.state.step}
        if self.ref is not None:
            tree["ref_params"] = self.ref
        return tree

    def meta(self) -> dict:
        return {"iterator": self.iterator.state(), "kl_coef": float(self.kl_coef)}

    def restore(self, tree: dict, meta: dict) -> None:
        if self.algo.shared_backbone:
            params = {**tree["params"], "score": tree["value_params"]}
        else:
            params = {"policy": tree["params"], "value": tree["value_params"]}
        self.state = self.state.replace(params=params, opt_state=tree["opt_state"], step=tree["step"])
        if "ref_params" in tree:
            self.ref = tree["ref_params"]
        self.kl_coef = jnp.asarray(meta["kl_coef"], jnp.float32)
        self.iterator.restore(meta["iterator"])

    # ------------------------------------------------------------------ one iteration

    def _rewards(self, ro, examples, batch):
        """(scores [B], correct [B], extra host metrics): the task's reward (or the reward model's score)."""
        scores, correct, extra = rollout_rewards(self.comp, ro, examples, self.n,
                                                 self.jax_reward if self.in_jit else None, self.runner,
                                                 self.sampling.max_new_tokens)
        if self.rm_params is not None:
            extra["reward/task_mean"] = jnp.mean(scores)
            scores = self.rm_fn(self.rm_params, batch)
        return scores, correct, extra

    def step(self, i: int) -> dict:
        s = self.section
        examples = next(self.iterator)
        pt, pm, n_trunc = global_prompt_batch(self.comp, examples, s.max_prompt_len, self.prompts)
        key = jax.random.fold_in(self.key, i)
        ro = self.sampler(self.policy(), pt, pm, jax.random.fold_in(key, 0))
        batch = {"prompt_tokens": ro.prompt_tokens, "prompt_mask": ro.prompt_mask,
                 "completion_tokens": ro.tokens, "completion_mask": ro.mask, "sampler_logprobs": ro.raw_logprobs}
        scores, correct, extra = self._rewards(ro, examples, batch)
        batch.update(self.rollout_fn(self.state.params, batch))
        batch["ref_logprobs"] = self.ref_fn(self.ref, batch) if self.ref is not None else batch["old_logprobs"]
        t = self.targets_fn(scores, batch["old_logprobs"], batch["ref_logprobs"], batch["old_values"],
                            batch["completion_mask"], self.kl_coef, ro.finished)
        batch.update(advantages=t["advantages"], returns=t["returns"])
        if self.update is None:
            self.update = jit_update(self.step_fn, self.state, batch, self.comp.env)
        self.state, stacked = self.update(self.state, batch, jax.random.fold_in(key, 1))
        self.kl_coef = ppo.update_kl_coef(self.algo, self.kl_coef, t["kl"], n_steps=scores.shape[0])
        metrics = {k: (jnp.max(v) if k.endswith("_max") else jnp.mean(v)) for k, v in stacked.items()}
        lengths = ro.lengths.astype(jnp.float32)
        metrics.update({k: t[k] for k in ("kl", "kl_token_mean", "kl_coef", "non_score_reward", "rlhf_reward",
                                          "score_mean", "missing_eos_frac")})
        metrics.update({
            "reward/mean": jnp.mean(scores), "reward/std": jnp.std(scores),
            "accuracy": jnp.mean(correct.astype(jnp.float32)),
            "response_length": jnp.mean(lengths), "response_length_max": jnp.max(lengths),
            "truncated_fraction": 1.0 - jnp.mean(ro.finished.astype(jnp.float32)),
            "response_tokens": jnp.sum(lengths), "decode_steps": ro.num_steps, "prompts_truncated": n_trunc,
        })
        metrics.update(extra)
        if self.cfg.log.samples_every > 0 and (i + 1) % self.cfg.log.samples_every == 0:
            log_rollout_samples(self.comp, self.run, self.name, i + 1, ro, examples, self.n, scores)
        return metrics

    def evaluate(self) -> dict:
        return self.evaluator(self.policy()) if self.evaluator else {}

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
