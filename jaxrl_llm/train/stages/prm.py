"""Process-reward-model stages (kind "prm"): a per-step scorer trained on labelled steps (algos/prm.py).

    c.prm = prm_stage(steps=300, batch_size=32, learning_rate=3e-4, max_prompt_len=12, max_response_len=32)
    c.prm.data.source = "task"           # or "jsonl" with data.path, or "shepherd"

Data (`data.source`):

* "jsonl": step-labelled solutions from a file (JSONL, JSON or Parquet), PRM800K flattened:
      {"prompt": "text" | [chat messages], "steps": ["step", ...], "labels": [1, 0, 0.5, ...], "separator": ";"}
  labels in [0, 1] (0/1, true/false, or soft); "separator" is optional (default: the stage's). Held-out rows
  from data.eval_path, or else data.eval_rows rows (at most a tenth of the file) held out after a shuffle
  with the run's seed. Every problem raises a DataError naming the file:line and the field.
* "task": the stage samples solutions from the policy it starts from (data.sampling; data.num_examples
  problems of the task's train split, data.eval_rows of its test split for evaluation), cuts them into
  steps with `task.split_steps` and labels each step with `task.grade_steps` (the StepGradedTask ability,
  e.g. chain_arithmetic): the ground truth.
* "shepherd": the same sampled solutions, each step labelled by Math-Shepherd's estimate
  (`search.shepherd.shepherd_labels`: data.shepherd_n continuations of each prefix by the same policy, the
  fraction that reaches a right answer by `task.is_correct`, or with data.shepherd_hard whether any does);
  the held-out rows keep the task's true grades, so evaluation measures the PRM against the ground truth.

The separator (data.separator; "" = the task's step_separator, else "\\n") joins the steps; the completion
is the joined steps + EOS, tokenized like a sampled completion after its prompt, and each step's label sits
at its end token (`algos.prm.step_end_mask`: the separator's tokens and the EOS). A completion longer than
max_response_len keeps its first tokens and the labels of the steps that end within them.

The params are a `ScalarHeadModel(per_token=True)` tree (`models.process_reward_model`) whose backbone is a
copy of the policy's and whose head starts at zero, saved in this stage's checkpoints as "prm_params". The
stage hands the policy it was given, unchanged, to the next stage; search and later stages read the PRM by
stage name with `load_prm_params`. LoRA: as the reward-model stage (adapters and head trained, the policy's
base shared). Evaluation: held-out step accuracy ("eval/accuracy", so the run summary's accuracy_before /
after are step accuracies), the ROC AUC of the step scores ("eval/auc") and the BCE ("eval/loss").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import ml_collections as mc
import numpy as np

from jaxrl_llm.algos.prm import PRMConfig, binary_auc, make_prm_step, separator_core, step_end_mask, step_end_table, \
    step_scores
from jaxrl_llm.data.iterator import tokenize_batch
from jaxrl_llm.errors import ConfigError, DataError
from jaxrl_llm.models import init_fn_for, process_reward_model
from jaxrl_llm.records import json_type, read_records
from jaxrl_llm.sharding import multihost
from jaxrl_llm.sharding.params import param_shardings
from jaxrl_llm.tasks.base import Example, Prompt
from jaxrl_llm.train.build import Components, encode_prompt_batch, prompt_iterator, stage_sampler
from jaxrl_llm.train.config import from_dataclass, optimizer_config, optimizer_from, to_dataclass
from jaxrl_llm.train.stage import Stage, StageKind
from jaxrl_llm.train.stages.preference import EVAL_CHUNK, _chunks, in_env, final_head_params, head_state
from jaxrl_llm.train.validation import choice, enough_rows, flag, integer, number, supervised_batches, unread

SOURCES = ("jsonl", "task", "shepherd")
SAMPLE_CHUNK = 64  # prompts per sampler call when the stage samples solutions (the last call is padded)


# ----------------------------------------------------------------------------- step-labelled records


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """A prompt, a solution as steps, one label in [0, 1] per step; `where`: the record it came from."""

    prompt: Prompt
    steps: tuple[str, ...]
    labels: tuple[float, ...]
    separator: str = ""  # "" = the stage's
    where: str = ""


def check_steps(steps: Sequence[str], separator: str, where: str) -> None:
    """A step must be non-empty and hold no separator (it would read as two steps)."""
    core = separator_core(separator)
    for i, step in enumerate(steps):
        if not step.strip():
            raise DataError(f"{where}: step {i} is empty; every step needs text (drop it and its label)")
        if core in step:
            raise DataError(f"{where}: step {i} ({step[:60]!r}) contains the step separator {separator!r}, so it "
                            "would read as several steps; split it into steps (with a label each) or choose "
                            "another separator")


def _label(value: Any, i: int, where: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0 or math.isnan(value):
        raise DataError(f"{where}: labels[{i}] is {value!r}; expected a number in [0, 1] (1 = a good step; PRM800K's "
                        "-1/0/+1 ratings: map -1 to 0 and +1 to 1, and choose for the neutral 0)")
    return float(value)


def load_step_labels(path: str) -> list[StepRecord]:
    """Step-labelled solutions from a file (module docstring), checked record by record."""
    out = []
    for where, r in read_records(path):
        prompt = r.get("prompt")
        if not isinstance(prompt, str) and not (isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt)):
            raise DataError(f"{where}: field 'prompt' is {json_type(prompt)}; expected a string or a list of "
                            '{"role": "...", "content": "..."} messages')
        steps, labels = r.get("steps"), r.get("labels")
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
            raise DataError(f"{where}: field 'steps' is {json_type(steps)}; expected a non-empty list of strings")
        if not isinstance(labels, list) or len(labels) != len(steps):
            n = f"{len(labels)} labels" if isinstance(labels, list) else json_type(labels)
            raise DataError(f"{where}: field 'labels' is {n} for {len(steps)} steps; expected one label per step")
        sep = r.get("separator", "")
        if not isinstance(sep, str):
            raise DataError(f"{where}: field 'separator' is {json_type(sep)}; expected a string (e.g. \"\\n\")")
        out.append(StepRecord(prompt, tuple(steps), tuple(_label(v, i, where) for i, v in enumerate(labels)),
                              sep, where))
    return out


@dataclasses.dataclass(frozen=True)
class StepStats:
    rows: int  # records encoded
    prompts_truncated: int
    steps_truncated: int  # labelled steps whose end fell past max_response_len
    rows_dropped: int  # records left with no labelled step


def encode_step_records(tokenizer, records: Sequence[StepRecord], separator: str, max_prompt_len: int,
                        max_response_len: int, vocab_size: int,
                        chat: bool | None = None) -> tuple[dict[str, np.ndarray], StepStats]:
    """The PRM batch layout (algos/prm.py) of `records`: prompts left-padded [R, max_prompt_len], completions
    (steps joined by their separator, then EOS) right-padded [R, max_response_len], labels at the steps' end
    tokens. Raises DataError when the tokens do not show one end per step."""
    from jaxrl_llm.tokenizer import tokenizer_info
    info = tokenizer_info(tokenizer)
    prompts = tokenize_batch(tokenizer, [Example(r.prompt, "") for r in records], max_prompt_len, chat=chat)
    seps = [r.separator or separator for r in records]
    for r, sep in zip(records, seps):
        check_steps(r.steps, sep, r.where or "a generated solution")
    ids = [row + [info.eos_ids[0]] for row in
           tokenizer([sep.join(r.steps) for r, sep in zip(records, seps)], add_special_tokens=False)["input_ids"]]
    width = max(len(x) for x in ids)
    ends = np.zeros((len(ids), width), bool)
    for sep in set(seps):  # one table (and one step_end_mask call) per separator
        rows = [i for i, s in enumerate(seps) if s == sep]
        toks = np.full((len(rows), width), info.pad_id, np.int32)
        mask = np.zeros((len(rows), width), bool)
        for j, i in enumerate(rows):
            toks[j, :len(ids[i])], mask[j, :len(ids[i])] = ids[i], True
        ends[rows] = np.asarray(step_end_mask(toks, mask, step_end_table(tokenizer, sep, vocab_size)))
    n, keep, cut = max_response_len, [], 0
    out = {"completion_tokens": np.full((len(ids), n), info.pad_id, np.int32),
           "completion_mask": np.zeros((len(ids), n), bool),
           "step_labels": np.zeros((len(ids), n), np.float32), "step_mask": np.zeros((len(ids), n), bool)}
    for i, r in enumerate(records):
        at = np.flatnonzero(ends[i])
        if len(at) != len(r.steps):
            raise DataError(f"{r.where or 'a generated solution'}: its {len(r.steps)} steps joined by {seps[i]!r} "
                            f"tokenize with {len(at)} step ends; every step must end in a token holding the separator "
                            "(or the EOS): check the steps for text the tokenizer merges with the separator")
        row = ids[i][:n]
        out["completion_tokens"][i, :len(row)], out["completion_mask"][i, :len(row)] = row, True
        inside = at < n
        cut += int((~inside).sum())
        out["step_labels"][i, at[inside]] = np.asarray(r.labels, np.float32)[inside]
        out["step_mask"][i, at[inside]] = True
        if inside.any():
            keep.append(i)
    out = {k: v[keep] for k, v in out.items()}
    out["prompt_tokens"], out["prompt_mask"] = prompts.tokens[keep], prompts.mask[keep]
    return out, StepStats(len(keep), prompts.num_truncated, cut, len(records) - len(keep))


# ----------------------------------------------------------------------------- config


def prm_data() -> mc.ConfigDict:
    """Where a PRM stage gets labelled steps (module docstring)."""
    return mc.ConfigDict(dict(source="jsonl", path="", eval_path="", eval_rows=64, separator="", num_examples=512,
                              samples_per_example=1, shepherd_n=8, shepherd_hard=False,
                              sampling=mc.ConfigDict(dict(max_new_tokens=32, temperature=1.0, top_k=0, top_p=1.0))))


def prm_stage(steps: int = 200, batch_size: int = 32, learning_rate: float = 1e-5, max_prompt_len: int = 16,
              max_response_len: int = 32, **algo_kw) -> mc.ConfigDict:
    """A process-reward-model stage; `algo_kw` sets `PRMConfig` fields (hard_labels). Its params are a PRM,
    not a policy: the next stage gets the policy this stage started from; search reads them by stage name."""
    return mc.ConfigDict(dict(
        kind="prm", steps=steps, batch_size=batch_size, max_prompt_len=max_prompt_len,
        max_response_len=max_response_len, num_micro_batches=1, algo=from_dataclass(PRMConfig(**algo_kw)),
        data=prm_data(), optimizer=optimizer_config(learning_rate)))


def prm_algo(s: mc.ConfigDict, where: str) -> PRMConfig:
    return to_dataclass(PRMConfig, s.algo, f"{where}.algo")


def check_prm_data_keys(s: mc.ConfigDict, where: str) -> None:
    d, dw, default = s.data, f"{where}.data", prm_data()
    choice(d.source, f"{dw}.source", SOURCES, means="a step-label source ('jsonl': a file; 'task': sampled "
           "solutions graded by the task; 'shepherd': sampled solutions labelled by Math-Shepherd rollouts)")
    integer(d.eval_rows, f"{dw}.eval_rows", 0, means="held-out solutions; 0 = none", example=64)
    if d.separator:
        separator_core(d.separator)
    if d.source == "jsonl":
        if not d.path:
            raise ConfigError(f"{dw}.source='jsonl' needs {dw}.path (a .jsonl/.json/.parquet file of {{prompt, "
                              f"steps, labels}} records): --set {dw[len('config.'):]}.path=/path/to/steps.jsonl")
        for key in ("num_examples", "samples_per_example", "shepherd_n", "shepherd_hard"):
            unread(d, key, dw, default[key], "with data.source='jsonl' (it reads the file's solutions)")
        if d.sampling.to_dict() != default.sampling.to_dict():
            raise ConfigError(f"{dw}.sampling is not read with data.source='jsonl' (nothing is sampled); leave it "
                              "at its defaults or set data.source='task' or 'shepherd'")
        if d.eval_path:
            unread(d, "eval_rows", dw, default.eval_rows, "with data.eval_path (its solutions are the held-out set)")
        return
    for key in ("path", "eval_path"):
        unread(d, key, dw, "", f"with data.source={d.source!r} (set data.source='jsonl' to train on a file)")
    integer(d.num_examples, f"{dw}.num_examples", 1, means="problems of the train split to sample solutions for",
            example=512)
    integer(d.samples_per_example, f"{dw}.samples_per_example", 1, means="solutions sampled per problem", example=1)
    sp = d.sampling
    integer(sp.max_new_tokens, f"{dw}.sampling.max_new_tokens", 1, means="tokens of a sampled solution", example=32)
    number(sp.temperature, f"{dw}.sampling.temperature", 0.0, means="0 = greedy", example=1.0)
    integer(sp.top_k, f"{dw}.sampling.top_k", 0, means="0 = off", example=0)
    number(sp.top_p, f"{dw}.sampling.top_p", 0.0, 1.0, lo_open=True, means="1.0 = off", example=1.0)
    if d.source == "shepherd":
        integer(d.shepherd_n, f"{dw}.shepherd_n", 1, means="continuations per step prefix", example=8)
        flag(d.shepherd_hard, f"{dw}.shepherd_hard")
    else:
        for key in ("shepherd_n", "shepherd_hard"):
            unread(d, key, dw, default[key], "with data.source='task' (only with 'shepherd')")


def _graded_task(task, where: str, source: str) -> None:
    need = ("split_steps", "step_separator") + (("grade_steps",) if source == "task" else ())
    missing = [a for a in need if not hasattr(task, a)]
    if missing:
        raise ConfigError(f"{where}.data.source={source!r}: task {getattr(task, 'name', type(task).__name__)!r} has "
                          f"no {', '.join(missing)} (the {'StepGradedTask' if source == 'task' else 'SteppedTask'} "
                          "ability, e.g. chain_arithmetic); give labelled steps in a file with data.source='jsonl'")


def stage_separator(s: mc.ConfigDict, task) -> str:
    """The stage's step separator: data.separator, else the task's step_separator, else "\\n"."""
    return s.data.separator or getattr(task, "step_separator", None) or "\n"


# ----------------------------------------------------------------------------- the stage


class PRMStage(Stage):
    kind = "prm"

    @classmethod
    def check_config(cls, cfg: mc.ConfigDict, name: str) -> None:
        s, where = cfg[name], f"config.{name}"
        supervised_batches(s, where, "training steps", "labelled solutions", 32)
        prm_algo(s, where)
        check_prm_data_keys(s, where)
        optimizer_from(s.optimizer, f"{where}.optimizer")

    @classmethod
    def check_data(cls, cfg: mc.ConfigDict, name: str, task) -> None:
        s, where = cfg[name], f"config.{name}"
        if s.data.source != "jsonl":
            if task is not None:
                _graded_task(task, where, s.data.source)
            return
        train, _ = cls._file_records(s, int(cfg.seed))
        enough_rows(len(train), f"{where}.data.path={s.data.path!r} (after holding out data.eval_rows)",
                    int(s.batch_size), f"{where}.batch_size")

    @staticmethod
    def _file_records(s: mc.ConfigDict, seed: int) -> tuple[list[StepRecord], list[StepRecord]]:
        records = load_step_labels(s.data.path)
        if s.data.eval_path:
            return records, load_step_labels(s.data.eval_path)
        order = np.random.default_rng(seed).permutation(len(records))
        n_eval = min(int(s.data.eval_rows), len(records) // 10)
        return [records[i] for i in order[n_eval:]], [records[i] for i in order[:n_eval]]

    def __init__(self, *a, with_data: bool = True, **kw):
        super().__init__(*a, **kw)
        s, comp = self.section, self.comp
        self.where = f"config.{self.name}"
        self.total_steps = int(s.steps)
        self.opt_cfg = optimizer_from(s.optimizer, f"{self.where}.optimizer")
        self.separator = stage_separator(s, comp.task)
        self.table = step_end_table(comp.tokenizer, self.separator, comp.model_cfg.vocab_size)
        self.module = process_reward_model(comp.model_cfg)
        _, self.shardings = param_shardings(init_fn_for(self.module), comp.env)
        self.step_fn = make_prm_step(self.module, comp.model_cfg, prm_algo(s, self.where), int(s.num_micro_batches))
        self.eval_fn = in_env(comp, lambda p, b: step_scores(self.module, p, b["prompt_tokens"], b["prompt_mask"],
                                                              b["completion_tokens"], b["completion_mask"],
                                                              self.table)[0])
        self.with_data, self.update = with_data, None
        self._finished = False  # set by run_stage: the stage's final checkpoint is there (no data needed)
        self.arrays = self.eval_arrays = self.iterator = None

    # --- data

    def _encode(self, records):
        s = self.section
        return encode_step_records(self.comp.tokenizer, records, self.separator, int(s.max_prompt_len),
                                   int(s.max_response_len), self.comp.model_cfg.vocab_size, self.comp.chat)

    def _sampled_records(self, params, split: str, num: int, labels: str) -> list[StepRecord]:
        """Solutions the policy `params` writes for `num` problems of `split`, cut into steps and labelled by
        the task's grades ("task") or Math-Shepherd rollouts ("shepherd"). Deterministic in the stage's key."""
        s, comp, task = self.section, self.comp, self.comp.task
        examples = task.examples(split, num, int(self.cfg.seed))
        k = int(s.data.samples_per_example)
        _, sampler = stage_sampler(comp, s.data.sampling, k)
        from jaxrl_llm.tokenizer import decode_completions
        texts = []
        for c, start in enumerate(range(0, len(examples), SAMPLE_CHUNK)):
            batch = examples[start:start + SAMPLE_CHUNK]
            batch = batch + [batch[0]] * (SAMPLE_CHUNK - len(batch))
            toks, mask, _ = encode_prompt_batch(comp, batch, int(s.max_prompt_len))
            key = jax.random.fold_in(jax.random.fold_in(self.key, 0x5EED if split == "train" else 0x7E57), c)
            ro = sampler(params, *(multihost.replicated_rows(comp.env, x) for x in (toks, mask)), key)
            texts += decode_completions(comp.tokenizer, multihost.to_host(ro.tokens), multihost.to_host(ro.mask),
                                        skip_special_tokens=True)[:len(examples[start:start + SAMPLE_CHUNK]) * k]
        sols = [(examples[j // k], task.split_steps(t)) for j, t in enumerate(texts)]
        sols = [(e, st) for e, st in sols if st and all(x.strip() and separator_core(self.separator) not in x
                                                        for x in st)]
        self.summary[f"solutions/{split}_unusable"] = len(texts) - len(sols)
        if labels == "task":
            grades = [[float(g) for g in task.grade_steps(self.separator.join(st), e)] for e, st in sols]
        else:
            _, shep = stage_sampler(comp, s.data.sampling, int(s.data.shepherd_n))
            from jaxrl_llm.search.shepherd import shepherd_labels
            grades = shepherd_labels(shep, params, comp.tokenizer, task, [e for e, _ in sols], [st for _, st in sols],
                                     int(s.data.shepherd_n), jax.random.fold_in(self.key, 0x5E9), SAMPLE_CHUNK,
                                     max_prompt_len=int(s.max_prompt_len), max_prefix_len=int(s.max_response_len),
                                     separator=self.separator, hard=bool(s.data.shepherd_hard), chat=comp.chat)
        return [StepRecord(e.prompt, tuple(st), tuple(g), where=f"{split} solution {i}")
                for i, ((e, st), g) in enumerate(zip(sols, grades))]

    def _make_data(self, params) -> None:
        s = self.section
        if s.data.source == "jsonl":
            train, held_out = self._file_records(s, int(self.cfg.seed))
        else:
            _graded_task(self.comp.task, self.where, s.data.source)
            train = self._sampled_records(params, "train", int(s.data.num_examples), s.data.source)
            held_out = (self._sampled_records(params, "test", int(s.data.eval_rows), "task")
                        if s.data.eval_rows > 0 else [])
        if not train:
            raise DataError(f"{self.where}.data: no usable solution to train on (source {s.data.source!r}; the "
                            "summary's solutions/train_unusable counts sampled solutions without steps)")
        self.arrays, stats = self._encode(train)
        enough_rows(stats.rows, f"{self.where}: labelled solutions", int(s.batch_size), f"{self.where}.batch_size")
        labelled = self.arrays["step_labels"][self.arrays["step_mask"]]
        self.summary.update({"solutions/train": stats.rows, "solutions/held_out": len(held_out),
                             "solutions/dropped": stats.rows_dropped, "steps/train": len(labelled),
                             "steps/truncated": stats.steps_truncated, "steps/label_mean": float(labelled.mean())})
        if held_out:
            eval_arrays, eval_stats = self._encode(held_out)
            # none usable (e.g. no sampled solution had a step): no held-out metrics, said in the summary
            self.summary["solutions/held_out_usable"] = eval_stats.rows
            self.eval_arrays = eval_arrays if eval_stats.rows else None
        self.iterator = prompt_iterator(self.comp, np.arange(stats.rows), int(s.batch_size), self.cfg.seed + self.index)

    # --- the Stage interface

    def run_stage(self, prev_params, checkpointer) -> Any:
        """Trains (or resumes) the PRM; returns `prev_params`: the next stage continues the policy. A finished
        stage is not sampled or read again."""
        latest = checkpointer.latest_step()
        self._finished = latest is not None and bool(checkpointer.read_meta(latest).get("done"))
        super().run_stage(prev_params, checkpointer)
        return prev_params

    def init(self, params) -> None:
        if self.with_data and self.arrays is None and not self._finished:
            self._make_data(params)
        self.state = head_state(self, params)

    def step(self, i: int) -> dict:
        idx = np.asarray(next(self.iterator))
        batch = multihost.to_global_tree(self.comp.env, {k: v[idx] for k, v in self.arrays.items()},
                                         int(self.section.batch_size))
        if self.update is None:
            from jaxrl_llm.algos.train_state import jit_update
            self.update = jit_update(self.step_fn, self.state, batch, self.comp.env)
        self.state, metrics = self.update(self.state, batch, jax.random.fold_in(self.key, i))
        return metrics

    def tree(self) -> dict:  # its params are a PRM, not a policy: saved under their own name
        return {"prm_params": self.state.params, "opt_state": self.state.opt_state, "step": self.state.step}

    def restore(self, tree: dict, meta: dict) -> None:
        super().restore({"params": tree["prm_params"], "opt_state": tree["opt_state"], "step": tree["step"]}, meta)

    def evaluate(self) -> dict:
        if self.eval_arrays is None:
            return {}
        scores = []
        for chunk, valid in _chunks(self.comp, self.eval_arrays, EVAL_CHUNK):
            scores.append(multihost.to_host(self.eval_fn(self.model_params(), chunk))[:valid])
        m = self.eval_arrays["step_mask"]
        p, y = np.concatenate(scores)[m].astype(np.float64), self.eval_arrays["step_labels"][m]
        pc = np.clip(p, 1e-7, 1 - 1e-7)
        out = {"eval/accuracy": float(np.mean((p > 0.5) == (y >= 0.5))), "eval/auc": binary_auc(p, y),
               "eval/loss": float(np.mean(-(y * np.log(pc) + (1 - y) * np.log(1 - pc))))}
        self.summary.setdefault("auc_before", out["eval/auc"])
        self.summary["auc_after"] = out["eval/auc"]
        return out


def load_prm_params(comp: Components, run, stage_name: str, stages: tuple[str, ...], policy_params) -> Any:
    """The final params of the finished prm stage `stage_name` of this run (a ScalarHeadModel(per_token=True)
    tree for `models.process_reward_model(comp.model_cfg)`, placed like the policy's backbone), for
    `algos.prm.step_scores` with the table of `stage_separator(config[stage_name], task)`. `policy_params`
    only give the structure to restore into."""
    index = stages.index(stage_name)
    st = PRMStage(comp, run, stage_name, index, stages[:index], with_data=False)
    st.init(policy_params)
    return final_head_params(st, run, "prm_params", "prm")


def prm_memory(cfg, s, z) -> dict[str, int]:
    p, n, num_micro = int(s.max_prompt_len), int(s.max_response_len), int(s.num_micro_batches)
    trained = z.trained("value")  # a per-token scalar head: the value model's arrays (LoRA: adapters and head)
    prm = z.params("value") if z.lora is None else trained  # under LoRA the backbone is the policy's, shared
    t = {"params": prm, "input_params": z.params("policy"), "optimizer": z.optimizer(s.optimizer, trained),
         "gradients": z.gradients(trained, num_micro),
         "activations": z.activations(z.rows(int(s.batch_size) // num_micro), p + n)}
    if s.data.source != "jsonl":  # the solutions (and Math-Shepherd's continuations) sampled before training
        k = int(s.data.shepherd_n) if s.data.source == "shepherd" else int(s.data.samples_per_example)
        width = p + (n if s.data.source == "shepherd" else 0)
        t.update(z.rollout_terms(SAMPLE_CHUNK * k, SAMPLE_CHUNK, width, int(s.data.sampling.max_new_tokens),
                                 s.data.sampling))
    return t


KIND = StageKind("prm", PRMStage, prm_stage, prm_memory, update_rows=lambda s: int(s.batch_size),
                 micro_batch_key="num_micro_batches", algo=prm_algo)
