"""PPO stage: sample, score, KL-shaped token rewards, GAE, then epochs x minibatches of the clipped PPO step.

One iteration:
  prompts -> rollout (`samples_per_prompt` completions per prompt, the policy's params) -> scores
     (train.experience.collect: the task's reward, or a trained reward model's with reward.source="reward_model")
  -> old log-probs and values (`ppo.make_rollout_fn`: one jitted forward per model, one in all when the
     backbone is shared) and reference log-probs (the frozen stage-start policy, when algo.needs_reference)
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
import ml_collections as mc

from jaxrl_llm.algos import ppo
from jaxrl_llm.algos.kl import KLControllerConfig
from jaxrl_llm.algos.logprobs import rollout_forward_fn
from jaxrl_llm.algos.reward_model import sequence_rewards
from jaxrl_llm.algos.train_state import TrainState, jit_update, make_epoch_runner
from jaxrl_llm.models import PolicyValueModel, init_fn_for, reward_model, value_model
from jaxrl_llm.models.lora import init_adapters, strip_adapters
from jaxrl_llm.sharding.params import param_shardings
from jaxrl_llm.train.build import jnp_tree_copy
from jaxrl_llm.train.config import ConfigError, from_dataclass, optimizer_config, optimizer_from, to_dataclass
from jaxrl_llm.train.experience import step_metrics
from jaxrl_llm.train.stage import StageKind
from jaxrl_llm.train.stages.episodes import env_section
from jaxrl_llm.train.stages.preference import load_reward_params, scalar_head_params
from jaxrl_llm.train.stages.process_reward import (ProcessRewards, add_memory_terms, check_process_reward,
                                                   process_reward_section)
from jaxrl_llm.train.stages.rl import (RLStage, check_divisible_rows, check_loss, check_rl_section,
                                       optional_temperature, overlap_section, resolve_temperature, reward_section,
                                       sampling_section, with_norm_length)
from jaxrl_llm.train.stages.overlap import memory_terms as overlap_memory
from jaxrl_llm.train.stages.overlap import with_off_policy_correction
from jaxrl_llm.train.validation import choice, integer, unread


def ppo_stage(iterations: int = 200, prompts_per_iter: int = 32, samples_per_prompt: int = 1,
              learning_rate: float = 1e-6, value_learning_rate: float = 1e-5, max_new_tokens: int = 16,
              kl_coef: float = 0.05, kl_target: float | None = None, **algo_kw) -> mc.ConfigDict:
    """A PPO stage. `kl_target` makes the KL-in-reward coefficient adaptive (Ziegler et al. 2019) with that
    target; `algo_kw` sets other `ppo.PPOConfig` fields (gamma, lam, vf_coef, epochs, ...). The algorithm's
    temperature is the sampler's (`sampling.temperature`).

    value_init: "policy" (the policy's backbone, zero head) or "reward_model" (the final params of the
    reward_model stage named by `reward_model_stage`); reward.source: "task" or "reward_model" (same stage)."""
    kl = (KLControllerConfig(kind="adaptive", init_coef=kl_coef, target=kl_target) if kl_target is not None
          else KLControllerConfig(kind="fixed", init_coef=kl_coef))
    return mc.ConfigDict(dict(
        kind="ppo", iterations=iterations, prompts_per_iter=prompts_per_iter,
        samples_per_prompt=samples_per_prompt, max_prompt_len=16, sampling=sampling_section(max_new_tokens),
        algo=optional_temperature(from_dataclass(ppo.PPOConfig(kl=kl, **algo_kw))),
        optimizer=optimizer_config(learning_rate),
        value_optimizer=optimizer_config(value_learning_rate),  # unused with algo.shared_backbone
        value_init="policy", reward_model_stage="", reward=reward_section(source="task"),
        process_reward=process_reward_section(), lessons="", overlap=overlap_section(),
        env=env_section()))


def algo_config(s: mc.ConfigDict, where: str) -> ppo.PPOConfig:
    """The stage's PPOConfig: its `algo` section with the sampler's temperature (and norm_length as GRPO's)."""
    data, temperature = resolve_temperature(s.algo, s, where)
    algo = to_dataclass(ppo.PPOConfig, data, f"{where}.algo")
    check_loss(algo.loss, f"{where}.algo.loss")
    if algo.kl.kind == "fixed":  # the adaptive controller's target and horizon
        d = KLControllerConfig()
        for key in ("target", "horizon"):
            unread(algo.kl, key, f"{where}.algo.kl", getattr(d, key), "by the fixed KL controller (kind='adaptive' "
                   "steers the coefficient towards `target`)")
    return algo.replace(temperature=temperature, loss=with_off_policy_correction(with_norm_length(algo.loss, s), s))


def check_reward_model_options(cfg: mc.ConfigDict, name: str) -> None:
    """value_init / reward.source, and the reward_model stage they name (one that runs before this one)."""
    s, where = cfg[name], f"config.{name}"
    stages_before = tuple(cfg.stages)[:tuple(cfg.stages).index(name)] if name in cfg.stages else ()
    choice(s.value_init, f"{where}.value_init", ("policy", "reward_model"),
           means="a value-model start ('policy': the policy's backbone, zero head; 'reward_model')")
    choice(s.reward.source, f"{where}.reward.source", ("task", "reward_model"), means="a reward source")
    if "reward_model" not in (s.value_init, s.reward.source):
        unread(s, "reward_model_stage", where, "", "with value_init='policy' and reward.source='task'")
        return
    rm = s.reward_model_stage
    if rm not in stages_before or cfg[rm].kind != "reward_model":
        earlier = [n for n in stages_before if cfg[n].kind == "reward_model"]
        raise ConfigError(f"{where}.reward_model_stage={rm!r} must name a reward_model stage that runs before "
                          f"{name!r} (value_init / reward.source = 'reward_model'); earlier reward_model "
                          f"stages: {earlier or 'none'}")


class RewardModelScores:
    """Scores a rollout with a trained reward model; the task's own reward is still computed for accuracy
    and logged as reward/task_mean."""

    def __init__(self, task_scorer, rm_fn, rm_params):
        self.task_scorer, self.rm_fn, self.rm_params = task_scorer, rm_fn, rm_params

    def __call__(self, ro, examples, n):
        scores, correct, extra = self.task_scorer(ro, examples, n)
        batch = {"prompt_tokens": ro.prompt_tokens, "prompt_mask": ro.prompt_mask, "completion_tokens": ro.tokens,
                 "completion_mask": ro.mask}
        return self.rm_fn(self.rm_params, batch), correct, {**extra, "reward/task_mean": jnp.mean(scores)}


class PPOStage(RLStage):
    kind = "ppo"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        s, comp = self.section, self.comp
        where = f"config.{self.name}"
        check_reward_model_options(self.cfg, self.name)
        a = self.algo
        if s.reward.source == "reward_model":
            rm = reward_model(comp.model_cfg)
            self.rm_fn = jax.jit(rollout_forward_fn(
                lambda p, mb: sequence_rewards(rm, p, mb["prompt_tokens"], mb["prompt_mask"], mb["completion_tokens"],
                                               mb["completion_mask"]),
                comp.model_cfg, ppo.score_micro_batches(a)))
        if a.shared_backbone:
            self.policy_module, self.value_module = PolicyValueModel(comp.model_cfg), None
            self.opt = optimizer_from(s.optimizer, f"{where}.optimizer")
        else:
            self.policy_module, self.value_module = comp.module, value_model(comp.model_cfg)
            self.opt = ppo.separate_optimizers(optimizer_from(s.optimizer, f"{where}.optimizer"),
                                               optimizer_from(s.value_optimizer, f"{where}.value_optimizer"))
        # placement of the value model (separate) or of the whole PolicyValueModel (shared)
        _, self.model_shardings = param_shardings(init_fn_for(self.value_module or self.policy_module), comp.env)
        self.rollout_fn = jax.jit(ppo.make_rollout_fn(self.policy_module, self.value_module, comp.model_cfg, a))
        self.ref_fn = jax.jit(ppo.make_logprob_fn(comp.module, comp.model_cfg, a.temperature, a.logprob_chunk,
                                                  num_micro=ppo.score_micro_batches(a)))
        self.targets_fn = jax.jit(lambda *args: ppo.compute_targets(a, *args))
        self.step_fn = make_epoch_runner(ppo.make_ppo_step(self.policy_module, self.value_module, comp.model_cfg, a),
                                         a.num_minibatches, a.epochs)
        self.update = None
        self.rm_params = None
        p = s.get("process_reward")
        self.process = ProcessRewards(self, "ppo") if p is not None and p.source != "none" else None

    def algo_config(self) -> ppo.PPOConfig:
        return algo_config(self.section, f"config.{self.name}")

    def samples_per_prompt(self) -> int:
        return int(self.section.samples_per_prompt)

    @classmethod
    def check_config(cls, cfg: mc.ConfigDict, name: str) -> None:
        """Every key of a ppo section (see `train.validation`)."""
        s, where = cfg[name], f"config.{name}"
        n = integer(s.samples_per_prompt, f"{where}.samples_per_prompt", 1, means="completions per prompt",
                    example=1)
        algo = algo_config(s, where)
        check_rl_section(cfg, name, n, f"{where}.samples_per_prompt")
        check_divisible_rows(s, where, n, f"{where}.samples_per_prompt", algo)
        check_reward_model_options(cfg, name)
        check_process_reward(cfg, name, "ppo", n)
        optimizer_from(s.optimizer, f"{where}.optimizer")
        if algo.shared_backbone:  # one model, one optimizer
            default = ppo_stage().value_optimizer
            for key in s.value_optimizer.keys():
                unread(s.value_optimizer, key, f"{where}.value_optimizer", default[key],
                       "with algo.shared_backbone=True (one model trained by `optimizer`)")
        else:
            optimizer_from(s.value_optimizer, f"{where}.value_optimizer")

    # ------------------------------------------------------------------ state

    def init(self, params) -> None:
        s, comp = self.section, self.comp
        self.kl_coef = jnp.asarray(self.algo.kl.init_coef, jnp.float32)
        lora = self.lora
        self.ref = self.reference_copy(params, self.algo.needs_reference)
        # run is None when a tool (cli eval) only needs the state's structure: the policy-shaped head will do
        rm = (load_reward_params(comp, self.run, s.reward_model_stage, self.stages_before, params)
              if self.run is not None and "reward_model" in (s.value_init, s.reward.source) else None)
        self.rm_params = rm if s.reward.source == "reward_model" else None
        from_rm = s.value_init == "reward_model" and rm is not None
        # Under LoRA (models/lora.py) nothing of the base is copied: the policy's base stays frozen and shared
        # (with value_init="policy" the value model's backbone too), both models get adapters of their own and
        # the value head trains with them.
        shardings = self.model_shardings if lora is None else strip_adapters(self.model_shardings)
        start = jnp_tree_copy(params) if lora is None else params
        if self.algo.shared_backbone:  # the value head on the policy's backbone: zeros, or the reward model's head
            score = rm["score"] if from_rm else None
            tree = jax.device_put(ppo.shared_params_from_policy(start, comp.model_cfg, score), shardings)
            adapters = None if lora is None else init_adapters(self.policy_module, self.adapter_key(0), comp.env)
        else:
            value = (ppo.init_value_from_reward(rm) if from_rm
                     else scalar_head_params(params, comp, self.model_shardings))
            tree = {"policy": start, "value": value}
            adapters = None if lora is None else {
                "policy": init_adapters(self.policy_module, self.adapter_key(0), comp.env),
                "value": init_adapters(self.value_module, self.adapter_key(1), comp.env)}
        if lora is None:
            self.state = TrainState.create(tree, self.opt)
        else:
            self.state = self.make_state(tree, self.opt, adapters=adapters)
        if self.process is not None:
            self.process.init(params)
        if self.pipeline is not None:
            self.pipeline.init(self.model_params())

    def policy(self):
        return ppo.policy_params(self.algo, self.state.params)

    def model_params(self):
        """The policy as the model applies it (under LoRA: its frozen base with its adapters)."""
        return ppo.policy_params(self.algo, self.state.model_params())

    def reference_params(self):
        if self.lora is not None:
            return ppo.policy_params(self.algo, self.state.frozen)
        return self.ref

    def params(self):
        return self.policy() if self.lora is None else super().params()

    def tree(self) -> dict:
        p = self.state.params
        value = p["score"] if self.algo.shared_backbone else p["value"]
        tree = {"params": self.policy(), "value_params": value, "opt_state": self.state.opt_state,
                "step": self.state.step}
        if self.ref is not None:
            tree["ref_params"] = self.ref
        if self.process is not None:
            tree.update(self.process.tree())
        if self.pipeline is not None:
            tree["overlap"] = self.pipeline.tree()
        return tree

    def meta(self) -> dict:
        return self.overlap_meta({"iterator": self.iterator.state(), "kl_coef": float(self.kl_coef),
                                  "reward_watch": self.watch.state()})

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
        self.watch.restore(meta.get("reward_watch"))
        if self.process is not None:
            self.process.restore(tree)
        if self.pipeline is not None:
            self.pipeline.restore(tree["overlap"], meta["overlap"])

    # ------------------------------------------------------------------ one iteration

    def step(self, i: int) -> dict:
        if self.pipeline is None:
            scorer = (self.scorer if self.rm_params is None
                      else RewardModelScores(self.scorer, self.rm_fn, self.rm_params))
            exp = self.experience(i, self.model_params(), scorer=scorer)
        else:  # the rollout of iteration i was sampled ahead, with a scorer of its own
            make = None if self.rm_params is None else (lambda s: RewardModelScores(s, self.rm_fn, self.rm_params))
            exp = self.pipeline.experience(i, self.model_params(), make_scorer=make)
        batch = dict(exp.batch)
        batch.update(self.rollout_fn(self.state.model_params(), batch))
        batch["ref_logprobs"] = (self.ref_fn(self.reference_params(), batch) if self.algo.needs_reference
                                 else batch["old_logprobs"])
        outcome, turn_rewards = exp.outcome()  # episodes: the last turn's reward, the earlier turns' (dense)
        args = (outcome, batch["old_logprobs"], batch["ref_logprobs"], batch["old_values"],
                batch["completion_mask"], self.kl_coef, exp.rollout.finished)
        process_metrics = {}
        if self.process is None:
            t = self.targets_fn(*args) if turn_rewards is None else self.targets_fn(*args, turn_rewards)
        else:  # per-step rewards at the steps' end tokens, added to the token rewards before GAE
            dense, process_metrics = self.process(exp, jax.random.fold_in(self.update_key(i), 0x9E3))
            t = self.targets_fn(*args, dense)
        batch.update(advantages=t["advantages"], returns=t["returns"])
        if self.update is None:
            self.update = jit_update(self.step_fn, self.state, batch, self.comp.env)
        self.state, stacked = self.update(self.state, batch, self.update_key(i))
        self.kl_coef = ppo.update_kl_coef(self.algo, self.kl_coef, t["kl"], n_steps=exp.rewards.shape[0])
        metrics = step_metrics(stacked)
        metrics.update({k: t[k] for k in ("kl", "kl_token_mean", "kl_coef", "non_score_reward", "rlhf_reward",
                                          "score_mean", "missing_eos_frac")})
        return self.iteration_metrics(i, exp, {**metrics, **process_metrics})


def memory(cfg, s, z) -> dict[str, int]:
    a = algo_config(s, "algo")
    p, n = int(s.max_prompt_len), int(s.sampling.max_new_tokens)
    rows = int(s.prompts_per_iter) * int(s.samples_per_prompt)
    policy = z.params("policy")
    if a.shared_backbone:
        held, value, trained = z.params("policy_value"), 0, z.trained("policy_value")
        opt = z.optimizer(s.optimizer, trained)
    else:
        # under LoRA with value_init="policy" the value model's backbone is the policy's frozen base (shared)
        shared_base = z.lora is not None and s.get("value_init", "policy") == "policy"
        value = z.trained("value") if shared_base else z.params("value")
        held, trained = policy, z.trained("policy") + z.trained("value")
        opt = z.optimizer(s.optimizer, z.trained("policy")) + z.optimizer(s.value_optimizer, z.trained("value"))
    uses_rm = s.get("reward", {}).get("source", "task") == "reward_model"
    micro = z.rows(rows // a.num_minibatches // a.num_micro_batches)
    backbones = 1 if a.shared_backbone else 2
    t = {"params": held, "input_params": z.copy("policy"), "reference": z.copy("policy") if a.needs_reference else 0,
         "value": value, "reward_model": z.params("reward") if uses_rm else 0, "optimizer": opt,
         "gradients": z.gradients(trained, a.num_micro_batches),
         "activations": backbones * z.activations(micro, p + n),
         "logprob_chunks": z.head(micro, n, a.logprob_chunk, True)}
    t.update(z.rollout_terms(rows, int(s.prompts_per_iter), p, n, s.sampling))
    # old log-probs, values, reference and reward-model scores run over the update's micro-batches in turn
    t.update(z.score_terms(rows // a.num_minibatches // a.num_micro_batches, p + n, n, a.logprob_chunk))
    t.update(overlap_memory(s, z))
    return add_memory_terms(t, s, z, a.needs_reference and z.lora is None) | z.eval_terms(cfg, s)


def _update_rows(s) -> int:
    return int(s.prompts_per_iter) * int(s.samples_per_prompt) // int(s.algo.num_minibatches)


KIND = StageKind("ppo", PPOStage, ppo_stage, memory, update_rows=_update_rows,
                 micro_batch_key="algo.num_micro_batches", logprob_chunk_key="algo.logprob_chunk", algo=algo_config)
