"""Preference stages: the DPO family (kind "dpo") and Bradley-Terry reward models (kind "reward_model").

Both train on (prompt, chosen, rejected) pairs (train/pref_data.py: generated from the task, or a file),
tokenized once at the start (`loaders.encode_preferences`) and read in shuffled batches of row indices by
a resumable `PromptIterator`.

DPOStage: `dpo.make_dpo_step` with `DPOConfig.loss_type` sigmoid | ipo | hinge | robust | simpo | orpo.
  The reference is the frozen copy of the params the stage starts from (kept in the checkpoint as
  "ref_params"); its summed log-probs are computed per batch, just before the step, with
  `make_reference_logps_fn`. SimPO and ORPO have no reference: no copy, no reference forward.
  TDPO (tdpo1 / tdpo2) needs both models' full distributions at every completion position: the step
  gets the reference params as its 4th argument (`jit_update(..., aux_example=...)`) and runs both heads
  chunked over positions; no log-probs are precomputed. Its held-out preference accuracy uses the same
  beta * log-ratio reward as DPO (the SeqKL of the official rewards is a training metric, seq_kl/*).
  Evaluation: held-out task accuracy (`eval.Evaluator`, greedy) and preference accuracy on held-out
  pairs: the fraction whose implicit reward (beta * log-ratio to the reference; average log-prob for
  SimPO/ORPO) is higher for the chosen response ("eval/pref_accuracy", "eval/pref_margin"), and the mean
  held-out log-probs of chosen and rejected, summed and per token ("eval/logps/chosen", ..._per_token) and
  their implicit rewards ("eval/rewards/chosen", "eval/rewards/rejected").

RewardModelStage: `reward_model.make_reward_model_step` on a `ScalarHeadModel(per_token=False)` whose
  backbone is a copy of the policy's and whose head starts at zero. Evaluation: the fraction of held-out
  pairs it ranks right, logged as "eval/accuracy" (so the run summary's accuracy_before/after of this
  stage are pair accuracies) with the mean reward margin "eval/margin".
  Its params are a ScalarHeadModel tree, not a policy: they are saved in this stage's checkpoints as
  "reward_params", and the stage hands the policy it was given, unchanged, to the next stage. A later PPO
  stage reads them by name (`ppo_stage(...)` with reward_model_stage="<name>" and value_init="reward_model"
  and/or reward.source="reward_model") through `load_reward_params`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import ml_collections as mc

from jaxrl_llm.algos import dpo
from jaxrl_llm.algos.aggregation import NORM_MODES
from jaxrl_llm.algos.reward_model import RewardModelConfig, make_reward_model_step, pair_rewards
from jaxrl_llm.algos.train_state import TrainState, jit_update
from jaxrl_llm.data.loaders import encode_preferences
from jaxrl_llm.errors import ConfigError, DataError
from jaxrl_llm.models import init_fn_for, reward_model
from jaxrl_llm.sharding import multihost
from jaxrl_llm.sharding.params import param_shardings
from jaxrl_llm.train.build import Components, jnp_tree_copy, make_evaluator, prompt_iterator
from jaxrl_llm.train.checkpoint import Checkpointer, abstract_like
from jaxrl_llm.train.config import from_dataclass, optimizer_config, optimizer_from, to_dataclass
from jaxrl_llm.train.pref_data import check_pair_task, stage_pairs
from jaxrl_llm.train.stage import Stage, StageKind
from jaxrl_llm.train.validation import choice, enough_rows, integer, record_warning, supervised_batches, unread

EVAL_CHUNK = 256  # held-out pairs per forward (the last chunk is padded: one compile)


def preference_data() -> mc.ConfigDict:
    """Where DPO and reward-model stages get pairs: generated from the task (train split; held-out pairs from
    its test split), or a preference file (source="jsonl", path; eval_path, or `eval_pairs` held out of it)."""
    return mc.ConfigDict(dict(source="task", path="", eval_path="", num_pairs=20000, eval_pairs=256))


def dpo_stage(loss_type: str = "sigmoid", steps: int = 200, batch_size: int = 32, learning_rate: float = 1e-6,
              max_prompt_len: int = 16, max_response_len: int = 16, **algo_kw) -> mc.ConfigDict:
    """A DPO-family stage: `loss_type` sigmoid | ipo | hinge | robust | simpo | orpo | tdpo1 | tdpo2; `algo_kw`
    sets other `dpo.DPOConfig` fields (beta, label_smoothing, simpo_gamma, orpo_lambda, tdpo_alpha, ...).

    Recommended for pairs whose chosen and rejected share most tokens (near misses, same-format answers):
    nll_coef=1.0 (RPO, TRL rpo_alpha). The default 0.0 is plain DPO as in the paper and TRL; on such pairs it
    pushes both responses down and greedy task accuracy collapses (docs/algorithms.md, "Why DPO collapsed
    task accuracy, and the remedy")."""
    return mc.ConfigDict(dict(
        kind="dpo", steps=steps, batch_size=batch_size, max_prompt_len=max_prompt_len,
        max_response_len=max_response_len, num_micro_batches=1,
        algo=from_dataclass(dpo.DPOConfig(loss_type=loss_type, **algo_kw)),
        data=preference_data(), optimizer=optimizer_config(learning_rate)))


def reward_model_stage(steps: int = 200, batch_size: int = 32, learning_rate: float = 1e-5,
                       max_prompt_len: int = 16, max_response_len: int = 16, **algo_kw) -> mc.ConfigDict:
    """A Bradley-Terry reward-model stage. Its params are a ScalarHeadModel tree, not a policy: the next
    stage gets the policy this stage started from; a PPO stage reads them by stage name."""
    return mc.ConfigDict(dict(
        kind="reward_model", steps=steps, batch_size=batch_size, max_prompt_len=max_prompt_len,
        max_response_len=max_response_len, num_micro_batches=1,
        algo=from_dataclass(RewardModelConfig(**algo_kw)),
        data=preference_data(), optimizer=optimizer_config(learning_rate)))


def dpo_algo(s: mc.ConfigDict, where: str) -> dpo.DPOConfig:
    """The stage's DPOConfig; a key its loss_type does not read must keep its default."""
    algo, w, d = to_dataclass(dpo.DPOConfig, s.algo, f"{where}.algo"), f"{where}.algo", dpo.DPOConfig()
    lt = algo.loss_type
    if lt == "orpo":
        unread(algo, "beta", w, d.beta, "by loss_type='orpo' (orpo_lambda weighs its odds-ratio term)")
    else:
        unread(algo, "orpo_lambda", w, d.orpo_lambda, f"by loss_type={lt!r} (only by 'orpo')")
    if lt != "tdpo2":
        unread(algo, "tdpo_alpha", w, d.tdpo_alpha, f"by loss_type={lt!r} (only by 'tdpo2')")
    if lt != "simpo":
        unread(algo, "simpo_gamma", w, d.simpo_gamma, f"by loss_type={lt!r} (only by 'simpo')")
    if lt != "orpo" and algo.nll_coef == 0:  # loss_agg, norm_length, exclude_empty_rows aggregate the NLL term
        for key in ("loss_agg", "norm_length", "exclude_empty_rows"):
            unread(algo, key, w, getattr(d, key), "with nll_coef=0.0 (they aggregate the NLL term, which is off)")
    elif algo.loss_agg not in NORM_MODES:
        unread(algo, "norm_length", w, None, f"by loss_agg={algo.loss_agg!r} (only by {NORM_MODES})")
    return algo


def reward_model_algo(s: mc.ConfigDict, where: str) -> RewardModelConfig:
    return to_dataclass(RewardModelConfig, s.algo, f"{where}.algo")


def scalar_head_params(policy_params: Any, comp: Components, shardings: Any) -> Any:
    """A ScalarHeadModel tree (reward or value model) from a CausalLM tree: a copy of its backbone and a zero
    head, placed on `shardings` (those of the ScalarHeadModel on the run's mesh). Under LoRA the backbone is
    not copied (it stays frozen and is never donated: the policy's base is shared) and the adapter leaves of
    `shardings` are left out (fresh adapters are added by `Stage.make_state`)."""
    from jaxrl_llm.models.lora import strip_adapters
    dt = comp.model_cfg.jnp_param_dtype
    score = {"kernel": jnp.zeros((comp.model_cfg.hidden_size, 1), dt), "bias": jnp.zeros((1,), dt)}
    if comp.model_cfg.lora is not None:
        return jax.device_put({"model": strip_adapters(policy_params["model"]), "score": score},
                              strip_adapters(shardings))
    return jax.device_put({"model": jnp_tree_copy(policy_params["model"]), "score": score}, shardings)


def in_env(comp: Components, fn):
    """jit(fn) traced inside the mesh environment, so activations are placed by their logical axes."""
    def traced(*args):
        with comp.env.activate():
            return fn(*args)
    return jax.jit(traced)


def _chunks(comp: Components, arrays: dict[str, np.ndarray], size: int):
    """(chunk, valid rows) over the rows of `arrays` (held whole by every process), placed on the mesh; the
    last chunk is padded with its first row."""
    n = len(arrays["prompt_tokens"])
    for start in range(0, n, size):
        idx = np.arange(start, start + size)
        valid = min(size, n - start)
        idx[valid:] = start
        yield {k: multihost.replicated_rows(comp.env, v[idx]) for k, v in arrays.items()}, valid


def check_pair_data_keys(s: mc.ConfigDict, where: str) -> None:
    """The `data` section of a preference stage: the keys its source reads, in range; no other key set."""
    d, dw, default = s.data, f"{where}.data", preference_data()
    choice(d.source, f"{dw}.source", ("task", "jsonl"),
           means="a preference data source ('task': pairs generated from the task; 'jsonl': a file)")
    integer(d.eval_pairs, f"{dw}.eval_pairs", 0, means="held-out pairs; 0 = none", example=256)
    if d.source == "task":
        for key in ("path", "eval_path"):
            unread(d, key, dw, "", "with data.source='task' (set data.source='jsonl' to train on a file)")
        integer(d.num_pairs, f"{dw}.num_pairs", int(s.batch_size),
                means=f"pairs generated from the task, at least one batch of {where}.batch_size", example=20000)
        return
    if not d.path:
        raise ConfigError(f"{dw}.source='jsonl' needs {dw}.path (a .jsonl/.json/.parquet file of {{prompt, chosen, "
                          f"rejected}} records): --set {dw[len('config.'):]}.path=/path/to/pairs.jsonl")
    unread(d, "num_pairs", dw, default.num_pairs, "with data.source='jsonl' (every pair of data.path is used)")
    if d.eval_path:
        unread(d, "eval_pairs", dw, default.eval_pairs, "with data.eval_path (its pairs are the held-out set)")


class _PairStage(Stage):
    """What both preference stages share: the pairs, their batches, the optimiser config."""

    resolve_algo = staticmethod(lambda s, where: None)

    @classmethod
    def check_config(cls, cfg: mc.ConfigDict, name: str) -> None:
        """Every key of a dpo / reward_model section (see `train.validation`)."""
        s, where = cfg[name], f"config.{name}"
        supervised_batches(s, where, "training steps", "pairs", 32)
        cls.resolve_algo(s, where)
        check_pair_data_keys(s, where)
        optimizer_from(s.optimizer, f"{where}.optimizer")

    @classmethod
    def check_data(cls, cfg: mc.ConfigDict, name: str, task) -> None:
        """Generated pairs need a task that makes them; a preference file is read (DataError with file:line,
        pairs whose chosen and rejected responses are the same included) and must fill a batch."""
        s, where = cfg[name], f"config.{name}"
        if s.data.source == "task":
            if task is not None:
                check_pair_task(task, where)
            return
        train, _ = stage_pairs(s.data, task, int(cfg.seed), where)
        enough_rows(len(train), f"{where}.data.path={s.data.path!r} (after holding out data.eval_pairs)",
                    int(s.batch_size), f"{where}.batch_size")

    def __init__(self, *a, with_data: bool = True, **kw):
        super().__init__(*a, **kw)
        s = self.section
        self.total_steps = int(s.steps)
        self.where = f"config.{self.name}"
        self.opt_cfg = optimizer_from(s.optimizer, f"{self.where}.optimizer")
        self.update = None
        self.arrays = self.eval_arrays = self.iterator = None
        if not with_data:
            return
        train, held_out = stage_pairs(s.data, self.comp.task, self.cfg.seed, self.where)
        encode = lambda pairs: encode_preferences(self.comp.tokenizer, pairs, int(s.max_prompt_len),  # noqa: E731
                                                  int(s.max_response_len))
        self.arrays, stats = encode(train)
        self.summary.update({"pairs/train": len(self.arrays["prompt_tokens"]), "pairs/held_out": len(held_out),
                             "pairs/prompts_truncated": stats.prompts_truncated,
                             "pairs/responses_truncated": stats.responses_truncated})
        self._check_truncated_pairs(train, stats)
        if held_out:
            self.eval_arrays, _ = encode(held_out)
        self.iterator = prompt_iterator(self.comp, np.arange(len(self.arrays["prompt_tokens"])), int(s.batch_size),
                                        self.cfg.seed + self.index)

    def _check_truncated_pairs(self, pairs, stats) -> None:
        """Pairs whose chosen and rejected tokens are the same after max_response_len cut them carry no
        preference: all of them is an error, some a warning (in the summary's warnings)."""
        a = self.arrays
        same = np.flatnonzero(np.all(a["chosen_tokens"] == a["rejected_tokens"], axis=1)
                              & np.all(a["chosen_mask"] == a["rejected_mask"], axis=1))
        if not len(same):
            return
        self.summary["pairs/identical_after_truncation"] = int(len(same))
        first = pairs[stats.kept[same[0]]]
        key = f"{self.where}.max_response_len"
        origin = first.where or "a generated pair"
        text = (f"{len(same)} of {len(a['chosen_tokens'])} training pairs (the first: {origin}) have the same chosen "
                f"and rejected tokens once {key}={self.section.max_response_len} cuts them: they carry no preference")
        if len(same) == len(a["chosen_tokens"]):
            raise DataError(f"{text}; raise {key[len('config.'):]} so the responses differ within it")
        record_warning(self, "pairs_identical_after_truncation", 0, f"{text}; raise {key[len('config.'):]}")

    def _batch(self) -> dict:
        """The next global batch of pairs (this process reads its rows)."""
        idx = np.asarray(next(self.iterator))
        return multihost.to_global_tree(self.comp.env, {k: v[idx] for k, v in self.arrays.items()},
                                        int(self.section.batch_size))

    def _train(self, i: int, batch: dict, *aux) -> dict:
        """One update; `aux`: the step's optional read-only 4th argument (TDPO's reference params)."""
        if self.update is None:
            self.update = jit_update(self.step_fn, self.state, batch, self.comp.env,
                                     aux_example=aux[0] if aux else None)
        self.state, metrics = self.update(self.state, batch, jax.random.fold_in(self.key, i), *aux)
        return metrics



class DPOStage(_PairStage):
    kind = "dpo"
    resolve_algo = staticmethod(dpo_algo)

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        s, comp = self.section, self.comp
        self.algo = dpo_algo(s, self.where)
        self.step_fn = dpo.make_dpo_step(comp.module, comp.model_cfg, self.algo, int(s.num_micro_batches))
        chunk = self.algo.logprob_chunk
        self.ref_fn = (in_env(comp, dpo.make_reference_logps_fn(comp.module, comp.model_cfg, chunk,
                                                                    int(s.num_micro_batches)))
                       if self.algo.needs_reference and not self.algo.reference_in_step else None)

        def sums(params, batch):  # summed log-probs [B] of chosen and rejected
            lc, lr = dpo.pair_logprobs(comp.module, params, comp.model_cfg, batch, chunk)
            return lc.sum(-1), lr.sum(-1)
        self.sums_fn = in_env(comp, sums)
        self.evaluator = make_evaluator(comp, s.max_prompt_len) if self.cfg.eval.every > 0 else None
        self.ref = None

    def init(self, params) -> None:
        self.state = self.make_state(params, self.opt_cfg)
        self.ref = self.reference_copy(params, self.algo.needs_reference)
        self._eval_ref = None

    def step(self, i: int) -> dict:
        batch = self._batch()
        if self.algo.reference_in_step:  # TDPO: the step runs the reference itself (full distributions)
            return self._train(i, batch, self.reference_params())
        if self.algo.needs_reference:
            batch.update(self.ref_fn(self.reference_params(), batch))
        return self._train(i, batch)

    def restore(self, tree: dict, meta: dict) -> None:
        super().restore(tree, meta)
        self._eval_ref = None

    def _held_out_sums(self, params) -> tuple[np.ndarray, np.ndarray]:
        c, r = [], []
        for chunk, valid in _chunks(self.comp, self.eval_arrays, EVAL_CHUNK):
            sc, sr = self.sums_fn(params, chunk)
            c.append(multihost.to_host(sc)[:valid])
            r.append(multihost.to_host(sr)[:valid])
        return np.concatenate(c), np.concatenate(r)

    def _implicit_rewards(self, c: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rewards dpo.py's metrics use: beta * (policy - reference) log-probs; averages for SimPO/ORPO."""
        a = self.algo
        len_c = np.maximum(self.eval_arrays["chosen_mask"].sum(-1), 1)
        len_r = np.maximum(self.eval_arrays["rejected_mask"].sum(-1), 1)
        if not a.needs_reference:
            scale = a.beta if a.loss_type == "simpo" else 1.0
            return scale * c / len_c, scale * r / len_r
        if self._eval_ref is None:  # the reference is frozen: its held-out log-probs once per run (or resume)
            self._eval_ref = self._held_out_sums(self.reference_params())
        ref_c, ref_r = self._eval_ref
        if a.loss_type == "ipo" and a.ipo_length_normalize:
            c, r, ref_c, ref_r = c / len_c, r / len_r, ref_c / len_c, ref_r / len_r
        return a.beta * (c - ref_c), a.beta * (r - ref_r)

    def evaluate(self) -> dict:
        out = super().evaluate()
        if self.eval_arrays is not None:
            sum_c, sum_r = self._held_out_sums(self.model_params())
            rc, rr = self._implicit_rewards(sum_c, sum_r)
            acc = float(np.mean(rc > rr))
            out.update({"eval/pref_accuracy": acc, "eval/pref_margin": float(np.mean(rc - rr))})
            out.update(held_out_logps(sum_c, sum_r, self.eval_arrays, rc, rr))
            self.summary.setdefault("pref_accuracy_before", acc)
            self.summary["pref_accuracy_after"] = acc
        return out


def held_out_logps(sum_c: np.ndarray, sum_r: np.ndarray, arrays: dict, rc: np.ndarray, rr: np.ndarray) -> dict:
    """Held-out means of the policy's summed and per-token log-probs of chosen and rejected, and of the implicit
    rewards (TRL's eval_logps/*, eval_rewards/*): chosen falling with rejected is likelihood displacement."""
    len_c = np.maximum(arrays["chosen_mask"].sum(-1), 1)
    len_r = np.maximum(arrays["rejected_mask"].sum(-1), 1)
    return {"eval/logps/chosen": float(np.mean(sum_c)), "eval/logps/rejected": float(np.mean(sum_r)),
            "eval/logps/chosen_per_token": float(np.mean(sum_c / len_c)),
            "eval/logps/rejected_per_token": float(np.mean(sum_r / len_r)),
            "eval/rewards/chosen": float(np.mean(rc)), "eval/rewards/rejected": float(np.mean(rr))}


class RewardModelStage(_PairStage):
    kind = "reward_model"
    resolve_algo = staticmethod(reward_model_algo)

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        s, comp = self.section, self.comp
        self.module = reward_model(comp.model_cfg)
        _, self.shardings = param_shardings(init_fn_for(self.module), comp.env)
        self.algo = reward_model_algo(s, self.where)
        self.step_fn = make_reward_model_step(self.module, comp.model_cfg, self.algo, int(s.num_micro_batches))
        self.eval_fn = in_env(comp, lambda p, b: pair_rewards(self.module, p, b))

    def init(self, params) -> None:
        self.state = head_state(self, params)

    def run_stage(self, prev_params, checkpointer) -> Any:
        """Trains (or resumes) the reward model; returns `prev_params`: the next stage continues the policy."""
        super().run_stage(prev_params, checkpointer)
        return prev_params

    def step(self, i: int) -> dict:
        return self._train(i, self._batch())

    def tree(self) -> dict:  # its params are a reward model, not a policy: saved under their own name
        return {"reward_params": self.state.params, "opt_state": self.state.opt_state, "step": self.state.step}

    def restore(self, tree: dict, meta: dict) -> None:
        super().restore({"params": tree["reward_params"], "opt_state": tree["opt_state"], "step": tree["step"]},
                        meta)

    def evaluate(self) -> dict:
        if self.eval_arrays is None:
            return {}
        rc, rr = [], []
        for chunk, valid in _chunks(self.comp, self.eval_arrays, EVAL_CHUNK):
            c, r = self.eval_fn(self.model_params(), chunk)
            rc.append(multihost.to_host(c)[:valid])
            rr.append(multihost.to_host(r)[:valid])
        rc, rr = np.concatenate(rc), np.concatenate(rr)
        return {"eval/accuracy": float(np.mean(rc > rr)), "eval/margin": float(np.mean(rc - rr))}


def head_state(stage: Stage, params) -> TrainState:
    """The TrainState of a scalar-head stage (reward model, PRM) starting from the policy `params`: the backbone
    copied and a fresh head (`scalar_head_params`), all trained; under LoRA fresh adapters of the stage's module
    and the head are trained on the policy's frozen base."""
    tree = scalar_head_params(params, stage.comp, stage.shardings)
    if stage.lora is None:
        return TrainState.create(tree, stage.opt_cfg)
    from jaxrl_llm.models.lora import init_adapters
    return stage.make_state(tree, stage.opt_cfg, adapters=init_adapters(stage.module, stage.adapter_key(),
                                                                        stage.comp.env))


def load_reward_params(comp: Components, run, stage_name: str, stages: tuple[str, ...], policy_params) -> Any:
    """The final params of the finished reward_model stage `stage_name` of this run (a ScalarHeadModel tree,
    placed like the policy's backbone). `policy_params` only give the structure to restore into."""
    index = stages.index(stage_name)
    rm = RewardModelStage(comp, run, stage_name, index, stages[:index], with_data=False)
    rm.init(policy_params)
    return final_head_params(rm, run, "reward_params", "reward model")


def final_head_params(stage: Stage, run, key: str, what: str) -> Any:
    """The params under `key` in the final checkpoint of `stage` (a scalar-head stage built without its data
    and `init` with the policy's params, which give the structure): a reward model or a PRM. Under LoRA the
    checkpoint holds the adapters and the head; they are merged onto the base the stage rebuilt."""
    directory = run.checkpoint_dir(stage.name)
    with Checkpointer(directory, max_to_keep=None, async_save=False) as ck:
        step = ck.latest_step()
        if step is None:
            raise ValueError(f"{what} stage {stage.name!r} has no checkpoint in {directory}; it must run (and "
                             "finish) before the stage that reads it")
        tree, meta = ck.restore(step, abstract_like(stage.tree()))
    if not meta.get("done"):
        raise ValueError(f"{what} stage {stage.name!r} did not finish (latest checkpoint {directory}/{step} is not "
                         "final)")
    if stage.lora is None:
        return tree[key]
    stage.restore(tree, meta)
    return stage.params()  # the adapters merged: a model of the base's shape


def dpo_memory(cfg, s, z) -> dict[str, int]:
    a = dpo_algo(s, "algo")
    p, n, num_micro = int(s.max_prompt_len), int(s.max_response_len), int(s.num_micro_batches)
    rows = 2 * int(s.batch_size)  # chosen and rejected rows in one forward
    policy = z.params("policy")
    micro = z.rows(rows // num_micro)
    trained = z.trained("policy")  # all of it, or LoRA's adapters
    t = {"params": policy, "input_params": z.copy("policy"), "reference": z.copy("policy") if a.needs_reference else 0,
         "optimizer": z.optimizer(s.optimizer, trained), "gradients": z.gradients(trained, num_micro),
         "activations": z.activations(micro, p + n), "logprob_chunks": z.head(micro, n, a.logprob_chunk, False)}
    if a.reference_in_step:  # TDPO: the reference's no-grad forward and its head inside the step, per micro-batch
        t["activations"] += z.forward_work(micro, p + n, p + n)
        t["logprob_chunks"] = z.head(micro, n, a.logprob_chunk, True) + z.logits(micro, min(a.logprob_chunk, n), 1)
    elif a.needs_reference:  # over the step's micro-batches of pairs in turn (dpo.make_reference_logps_fn)
        t.update(z.score_terms(rows // num_micro, p + n, n, a.logprob_chunk))
    return t | z.eval_terms(cfg, s)


def reward_model_memory(cfg, s, z) -> dict[str, int]:
    p, n, num_micro = int(s.max_prompt_len), int(s.max_response_len), int(s.num_micro_batches)
    trained = z.trained("reward")  # all of it, or LoRA's adapters and the head
    rm = z.params("reward") if z.lora is None else trained  # under LoRA the backbone is the policy's, shared
    micro = z.rows(2 * int(s.batch_size) // num_micro)
    return {"params": rm, "input_params": z.params("policy"), "optimizer": z.optimizer(s.optimizer, trained),
            "gradients": z.gradients(trained, num_micro), "activations": z.activations(micro, p + n)}


DPO_KIND = StageKind("dpo", DPOStage, dpo_stage, dpo_memory, update_rows=lambda s: int(s.batch_size),
                     micro_batch_key="num_micro_batches", logprob_chunk_key="algo.logprob_chunk", algo=dpo_algo)
REWARD_MODEL_KIND = StageKind("reward_model", RewardModelStage, reward_model_stage, reward_model_memory,
                              update_rows=lambda s: int(s.batch_size), micro_batch_key="num_micro_batches",
                              algo=reward_model_algo)
