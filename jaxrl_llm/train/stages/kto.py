"""KTO on unpaired examples (kind "kto"): prompt, completion, desirable / undesirable (`algos/kto.py`).

    c.kto = kto_stage(steps=200, batch_size=64, learning_rate=1e-4, beta=0.1)
    c.kto.data.source = "jsonl"; c.kto.data.path = "unpaired.jsonl"      # or "task" (default), "pairs"

Data (`data.source`), tokenized once at the start and read in shuffled batches by a resumable iterator:
  "task"   pairs generated from the task (train/pref_data.py: the gold answer vs a near miss), each pair
           giving a desirable and an undesirable example (`data.num_pairs` pairs; held out: `data.eval_pairs`
           pairs of the test split);
  "jsonl"  a file of {"prompt", "completion", "label": true/false} records (TRL's unpaired preference format;
           text, or chat messages); held out: `data.eval_path` (the same format) or `data.eval_examples`
           examples (at most a tenth) held out of `data.path`;
  "pairs"  a preference-pair file as the dpo kind reads ({"prompt", "chosen", "rejected"}), each pair giving
           a desirable and an undesirable example (TRL's `unpair_preference_dataset`); held out as the dpo kind:
           `data.eval_path` or `data.eval_pairs` pairs.
Rows are shuffled, so the KL rows of a batch (each prompt with the previous row's completion) mismatch.

The reference is the frozen copy of the params the stage starts from (the base under LoRA; kept in the
checkpoint as "ref_params"); its log-probs of each batch's completions and KL rows are computed just before
the step. Evaluation: held-out task accuracy (greedy) and, on the held-out examples, the mean implicit
reward beta * log-ratio of desirable and undesirable ones ("eval/rewards/desirable", ".../undesirable",
"eval/reward_margin"); with paired held-out data (task, pairs) also the preference accuracy: the fraction of
pairs whose desirable completion has the higher reward ("eval/pref_accuracy", as the dpo kind).
"""

from __future__ import annotations

import ml_collections as mc
import numpy as np

from jaxrl_llm.algos import kto
from jaxrl_llm.algos.logprobs import completion_logprobs
from jaxrl_llm.data.loaders import encode_unpaired, load_unpaired, unpair
from jaxrl_llm.errors import ConfigError
from jaxrl_llm.sharding import multihost
from jaxrl_llm.train.build import make_evaluator, prompt_iterator
from jaxrl_llm.train.config import from_dataclass, optimizer_config, optimizer_from, to_dataclass
from jaxrl_llm.train.pref_data import check_pair_task, stage_pairs, task_pairs
from jaxrl_llm.train.stage import Stage, StageKind
from jaxrl_llm.train.stages.preference import EVAL_CHUNK, _PairStage, _chunks, in_env
from jaxrl_llm.train.validation import choice, enough_rows, integer, supervised_batches, unread

SOURCES = ("task", "jsonl", "pairs")


def kto_data() -> mc.ConfigDict:
    """Where a kto stage gets examples (see the module docstring)."""
    return mc.ConfigDict(dict(source="task", path="", eval_path="", num_pairs=20000, eval_pairs=256,
                              eval_examples=256))


def kto_stage(steps: int = 200, batch_size: int = 32, learning_rate: float = 1e-6, max_prompt_len: int = 16,
              max_response_len: int = 16, **algo_kw) -> mc.ConfigDict:
    """A KTO stage; `algo_kw` sets `kto.KTOConfig` fields (beta, desirable_weight, undesirable_weight, ...)."""
    return mc.ConfigDict(dict(
        kind="kto", steps=steps, batch_size=batch_size, max_prompt_len=max_prompt_len,
        max_response_len=max_response_len, num_micro_batches=1, algo=from_dataclass(kto.KTOConfig(**algo_kw)),
        data=kto_data(), optimizer=optimizer_config(learning_rate)))


def kto_algo(s: mc.ConfigDict, where: str) -> kto.KTOConfig:
    return to_dataclass(kto.KTOConfig, s.algo, f"{where}.algo")


def check_kto_data_keys(s: mc.ConfigDict, where: str) -> None:
    """The `data` section: the keys its source reads, in range; no other key set."""
    d, dw, default = s.data, f"{where}.data", kto_data()
    choice(d.source, f"{dw}.source", SOURCES, means="a kto data source ('task': generated pairs, unpaired; "
           "'jsonl': a file of {prompt, completion, label}; 'pairs': a preference-pair file, unpaired)")
    integer(d.eval_pairs, f"{dw}.eval_pairs", 0, means="held-out pairs; 0 = none", example=256)
    integer(d.eval_examples, f"{dw}.eval_examples", 0, means="held-out examples; 0 = none", example=256)
    if d.source != "task" and not d.path:
        what = "{prompt, completion, label} records" if d.source == "jsonl" else "{prompt, chosen, rejected} pairs"
        raise ConfigError(f"{dw}.source={d.source!r} needs {dw}.path (a .jsonl/.json/.parquet file of {what}): "
                          f"--set {dw[len('config.'):]}.path=/path/to/file.jsonl")
    if d.source != "jsonl":
        unread(d, "eval_examples", dw, default.eval_examples, f"with data.source={d.source!r} (held-out pairs: "
               "data.eval_pairs)")
    else:
        unread(d, "eval_pairs", dw, default.eval_pairs, "with data.source='jsonl' (held-out examples: "
               "data.eval_examples)")
    if d.source == "task":
        for key in ("path", "eval_path"):
            unread(d, key, dw, "", "with data.source='task' (set data.source='jsonl' or 'pairs' to train on a file)")
        integer(d.num_pairs, f"{dw}.num_pairs", 1, means="pairs generated from the task, two examples each",
                example=20000)
        return
    unread(d, "num_pairs", dw, default.num_pairs, f"with data.source={d.source!r} (every record of data.path is "
           "used)")
    if d.eval_path:
        key = "eval_examples" if d.source == "jsonl" else "eval_pairs"
        unread(d, key, dw, default[key], "with data.eval_path (its records are the held-out set)")


def stage_examples(data: mc.ConfigDict, task, seed: int, where: str) -> tuple[list, list, bool]:
    """(training examples, held-out examples, whether the held-out ones are pairs: desirable then undesirable
    of the same prompt at rows 2k and 2k + 1)."""
    if data.source == "task":
        check_pair_task(task, where)
        held = task_pairs(task, "test", int(data.eval_pairs), seed) if data.eval_pairs > 0 else []
        return unpair(task_pairs(task, "train", int(data.num_pairs), seed)), unpair(held), True
    if data.source == "pairs":
        section = mc.ConfigDict(dict(source="jsonl", path=data.path, eval_path=data.eval_path,
                                     eval_pairs=data.eval_pairs))
        train, held = stage_pairs(section, task, seed, where)
        return unpair(train), unpair(held), True
    examples = load_unpaired(data.path)
    if data.eval_path:
        return examples, load_unpaired(data.eval_path), False
    order = np.random.default_rng(seed).permutation(len(examples))
    n_eval = min(int(data.eval_examples), len(examples) // 10)
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]], False


class KTOStage(Stage):
    kind = "kto"

    @classmethod
    def check_config(cls, cfg: mc.ConfigDict, name: str) -> None:
        s, where = cfg[name], f"config.{name}"
        supervised_batches(s, where, "training steps", "examples", 32)
        integer(s.batch_size, f"{where}.batch_size", 2, means="examples per step; the KL reference point needs "
                "mismatched prompt/completion rows of the batch", example=32)
        kto_algo(s, where)
        check_kto_data_keys(s, where)
        optimizer_from(s.optimizer, f"{where}.optimizer")

    @classmethod
    def check_data(cls, cfg: mc.ConfigDict, name: str, task) -> None:
        """A task must make pairs; a file is read (DataError with file:line) and must fill a batch."""
        s, where = cfg[name], f"config.{name}"
        if s.data.source == "task":
            if task is not None:
                check_pair_task(task, where)
            return
        train, _, _ = stage_examples(s.data, task, int(cfg.seed), where)
        enough_rows(len(train), f"{where}.data.path={s.data.path!r} (after holding out the evaluation set)",
                    int(s.batch_size), f"{where}.batch_size")

    _train = _PairStage._train
    _batch = _PairStage._batch

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        s, comp = self.section, self.comp
        self.total_steps = int(s.steps)
        self.where = f"config.{self.name}"
        self.opt_cfg = optimizer_from(s.optimizer, f"{self.where}.optimizer")
        self.algo = kto_algo(s, self.where)
        self.update = None
        train, held_out, self.paired_eval = stage_examples(s.data, comp.task, self.cfg.seed, self.where)
        encode = lambda rows: encode_unpaired(comp.tokenizer, rows, int(s.max_prompt_len),  # noqa: E731
                                              int(s.max_response_len))
        self.arrays, stats = encode(train)
        self.eval_arrays = encode(held_out)[0] if held_out else None
        self.summary.update({"examples/train": len(self.arrays["label"]),
                             "examples/desirable": int(self.arrays["label"].sum()),
                             "examples/held_out": len(held_out), "examples/prompts_truncated": stats.prompts_truncated,
                             "examples/responses_truncated": stats.responses_truncated})
        self.iterator = prompt_iterator(comp, np.arange(len(self.arrays["label"])), int(s.batch_size),
                                        self.cfg.seed + self.index)
        num_micro, chunk = int(s.num_micro_batches), self.algo.logprob_chunk
        self.step_fn = kto.make_kto_step(comp.module, comp.model_cfg, self.algo, num_micro)
        self.ref_fn = in_env(comp, kto.make_reference_logps_fn(comp.module, comp.model_cfg, chunk, num_micro))

        def sums(params, rows):
            logp, _ = completion_logprobs(comp.module, params, comp.model_cfg, rows["prompt_tokens"],
                                          rows["prompt_mask"], rows["completion_tokens"], rows["completion_mask"],
                                          chunk=chunk, with_entropy=False)
            return logp.sum(-1)
        self.sums_fn = in_env(comp, sums)
        self.evaluator = make_evaluator(comp, s.max_prompt_len) if self.cfg.eval.every > 0 else None

    def init(self, params) -> None:
        self.state = self.make_state(params, self.opt_cfg)
        self.ref = self.reference_copy(params, True)
        self._eval_ref = None

    def restore(self, tree: dict, meta: dict) -> None:
        super().restore(tree, meta)
        self._eval_ref = None

    def step(self, i: int) -> dict:
        batch = self._batch()
        batch.update(self.ref_fn(self.reference_params(), batch))
        return self._train(i, batch)

    def _held_out_sums(self, params) -> np.ndarray:
        rows = {k: v for k, v in self.eval_arrays.items() if k != "label"}
        out = [multihost.to_host(self.sums_fn(params, chunk))[:valid] for chunk, valid in
               _chunks(self.comp, rows, EVAL_CHUNK)]
        return np.concatenate(out)

    def evaluate(self) -> dict:
        out = super().evaluate()
        if self.eval_arrays is None:
            return out
        if self._eval_ref is None:  # the reference is frozen: its held-out log-probs once per run (or resume)
            self._eval_ref = self._held_out_sums(self.reference_params())
        r = self.algo.beta * (self._held_out_sums(self.model_params()) - self._eval_ref)
        good = self.eval_arrays["label"]
        mean = lambda x: float(np.mean(x)) if len(x) else 0.0  # noqa: E731
        out.update({"eval/rewards/desirable": mean(r[good]), "eval/rewards/undesirable": mean(r[~good]),
                    "eval/reward_margin": mean(r[good]) - mean(r[~good])})
        if self.paired_eval:
            acc = float(np.mean(r[0::2] > r[1::2]))
            out["eval/pref_accuracy"] = acc
            self.summary.setdefault("pref_accuracy_before", acc)
            self.summary["pref_accuracy_after"] = acc
        return out


def kto_memory(cfg, s, z) -> dict[str, int]:
    a = kto_algo(s, "algo")
    p, n, num_micro = int(s.max_prompt_len), int(s.max_response_len), int(s.num_micro_batches)
    rows = int(s.batch_size)
    micro = z.rows(rows // num_micro)
    trained = z.trained("policy")
    t = {"params": z.params("policy"), "input_params": z.copy("policy"), "reference": z.copy("policy"),
         "optimizer": z.optimizer(s.optimizer, trained), "gradients": z.gradients(trained, num_micro),
         "activations": z.activations(micro, p + n), "logprob_chunks": z.head(micro, n, a.logprob_chunk, False)}
    # the reference over completions and KL rows, then the policy over the KL rows: no-grad, in turn
    t.update(z.score_terms(2 * rows // num_micro, p + n, n, a.logprob_chunk))
    return t | z.eval_terms(cfg, s)


KIND = StageKind("kto", KTOStage, kto_stage, kto_memory, update_rows=lambda s: int(s.batch_size),
                 micro_batch_key="num_micro_batches", logprob_chunk_key="algo.logprob_chunk", algo=kto_algo)
