"""SFT stage: masked NLL on (prompt, answer) pairs from the task or a JSONL file."""

from __future__ import annotations

import jax
import ml_collections as mc

from jaxrl_llm.algos import sft
from jaxrl_llm.algos.train_state import jit_update
from jaxrl_llm.data.loaders import load_prompt_answer
from jaxrl_llm.rollout.sampling import SamplingConfig
from jaxrl_llm.sharding import multihost
from jaxrl_llm.train.build import encode_answers, encode_prompt_batch, make_evaluator, prompt_iterator
from jaxrl_llm.train.config import ConfigError, keyed, optimizer_config, optimizer_from
from jaxrl_llm.train.stage import Stage, StageKind
from jaxrl_llm.train.stages.episodes import EpisodeRunner, check_env_section, env_for_task, env_section, has_env
from jaxrl_llm.train.validation import choice, enough_rows, integer, supervised_batches, unread


def sft_stage(steps: int = 200, batch_size: int = 64, learning_rate: float = 1e-3, **kw) -> mc.ConfigDict:
    """An SFT stage: `steps` steps of `batch_size` (prompt, answer) pairs; `kw` sets other section keys."""
    s = mc.ConfigDict(dict(kind="sft", steps=steps, batch_size=batch_size, max_prompt_len=16,
                           max_response_len=16, num_micro_batches=1, loss_agg="token-mean",
                           norm_length=mc.FieldReference(None, field_type=float),  # the *-norm modes' constant
                           exclude_empty_rows=False,
                           data=mc.ConfigDict(dict(source="task", path="", num_examples=20000)),
                           optimizer=optimizer_config(learning_rate), env=env_section()))
    s.update(kw)
    return s


def addition_warm_start() -> mc.ConfigDict:
    """The SFT warm start the tiny-model experiments share: 200 steps of 128 gold answers, lr 1e-3 with 30
    warm-up steps, prompts up to 12 tokens, answers up to 6."""
    s = sft_stage(steps=200, batch_size=128, learning_rate=1e-3, max_prompt_len=12, max_response_len=6)
    s.optimizer.warmup_steps = 30
    return s


def algo_config(s: mc.ConfigDict, where: str) -> sft.SFTConfig:
    """The stage's SFTConfig from its loss_agg / norm_length / exclude_empty_rows keys."""
    try:
        return sft.SFTConfig(loss_agg=s.loss_agg, norm_length=s.get("norm_length"),
                             exclude_empty_rows=s.get("exclude_empty_rows", False))
    except ValueError as e:
        raise ConfigError(keyed(str(e), ("loss_agg", "norm_length", "exclude_empty_rows"), where)) from None


def data_source(s: mc.ConfigDict, where: str) -> str:
    """The section's data.source, checked with the data keys it reads: "task" (data.num_examples of the
    task's train split) or "jsonl" (the file data.path)."""
    d, dw = s.data, f"{where}.data"
    choice(d.source, f"{dw}.source", ("task", "jsonl"), means="an SFT data source ('task' or 'jsonl')")
    if d.source == "jsonl":
        if not d.path:
            raise ConfigError(f"{dw}.source='jsonl' needs {dw}.path (a .jsonl/.json/.parquet file of {{prompt, "
                              f"answer}} records): --set {dw[len('config.'):]}.path=/path/to/file.jsonl")
        unread(d, "num_examples", dw, sft_stage().data.num_examples, "with data.source='jsonl' (every record "
               "of data.path is used)")
    else:
        unread(d, "path", dw, "", "with data.source='task' (set data.source='jsonl' to train on the file)")
        integer(d.num_examples, f"{dw}.num_examples", int(s.batch_size),
                means=f"training examples drawn from the task, at least one batch of {where}.batch_size",
                example=20000)
    return d.source


class SFTStage(Stage):
    kind = "sft"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        s = self.section
        self.total_steps = int(s.steps)
        if data_source(s, f"config.{self.name}") == "task":
            self.examples = self.comp.task.examples("train", s.data.num_examples, self.cfg.seed)
        else:
            self.examples = load_prompt_answer(s.data.path)
        self.iterator = prompt_iterator(self.comp, self.examples, int(s.batch_size), self.cfg.seed + self.index)
        self.opt_cfg = optimizer_from(s.optimizer, f"config.{self.name}.optimizer")
        self.step_fn = sft.make_sft_step(self.comp.module, self.comp.model_cfg, algo_config(s, f"config.{self.name}"),
                                         num_micro_batches=s.num_micro_batches)
        self.update = None
        self.evaluator = make_evaluator(self.comp, s.max_prompt_len) if self.cfg.eval.every > 0 else None
        # With an environment the targets are demonstrations of its tools (observations attended, not trained).
        self.demos = None
        if has_env(s):
            sampling = SamplingConfig(max_new_tokens=int(s.max_response_len), temperature=0.0,
                                      eos_token_ids=self.comp.eos_ids, pad_token_id=self.comp.pad_id)
            self.demos = EpisodeRunner(self.comp, s, f"config.{self.name}", sampling, 1)

    @classmethod
    def check_config(cls, cfg: mc.ConfigDict, name: str) -> None:
        """Every key of an sft section (see `train.validation`)."""
        s, where = cfg[name], f"config.{name}"
        supervised_batches(s, where, "SFT steps", "examples", 64)
        algo_config(s, where)
        data_source(s, where)
        optimizer_from(s.optimizer, f"{where}.optimizer")
        if s.get("env") is not None:
            check_env_section(cfg, name, int(s.max_response_len), f"{where}.max_response_len")
            if has_env(s) and s.data.source != "task":
                raise ConfigError(f"{where}.env.name={s.env.name!r} with {where}.data.source={s.data.source!r}: "
                                  "demonstrations are built from the task's examples; set data.source='task' or "
                                  "leave env.name empty")

    @classmethod
    def check_data(cls, cfg: mc.ConfigDict, name: str, task) -> None:
        """A data file's records (DataError with file:line) and that they fill a batch."""
        s = cfg[name]
        if task is not None and has_env(s):
            env_for_task(task, s, f"config.{name}")
        if s.data.source == "jsonl":
            enough_rows(len(load_prompt_answer(s.data.path)), f"config.{name}.data.path={s.data.path!r}",
                        int(s.batch_size), f"config.{name}.batch_size")

    def init(self, params) -> None:
        self.state = self.make_state(params, self.opt_cfg)

    def _batch(self):
        exs = next(self.iterator)
        s = self.section
        if self.demos is not None:
            exs = self.demos.prompts(exs)
        pt, pm, _ = encode_prompt_batch(self.comp, exs, s.max_prompt_len)
        if self.demos is not None:
            local = {"prompt_tokens": pt, "prompt_mask": pm, **self.demos.demonstrations(exs, int(s.max_response_len))}
        else:
            ct, cm = encode_answers(self.comp, exs, s.max_response_len)
            local = {"prompt_tokens": pt, "prompt_mask": pm, "completion_tokens": ct, "completion_mask": cm}
        return multihost.to_global_tree(self.comp.env, local, int(s.batch_size))

    def evaluate(self) -> dict:
        """The held-out evaluation; with an environment also its greedy episodes (`eval/env/accuracy`)."""
        out = super().evaluate()
        if self.demos is not None and self.evaluator is not None:
            out.update(self.demos.evaluate(self.model_params(), self.evaluator.examples,
                                           int(self.section.max_prompt_len), int(self.cfg.seed) + 7919))
        return out

    def step(self, i: int) -> dict:
        batch = self._batch()
        if self.update is None:
            self.update = jit_update(self.step_fn, self.state, batch, self.comp.env)
        self.state, metrics = self.update(self.state, batch, jax.random.fold_in(self.key, i))
        return metrics



def memory(cfg, s, z) -> dict[str, int]:
    p, n, num_micro = int(s.max_prompt_len), int(s.max_response_len), int(s.num_micro_batches)
    policy = z.params("policy")
    micro = z.rows(int(s.batch_size) // num_micro)
    trained = z.trained("policy")  # all of it, or LoRA's adapters
    t = {"params": policy, "input_params": z.copy("policy"), "optimizer": z.optimizer(s.optimizer, trained),
         "gradients": z.gradients(trained, num_micro), "activations": z.activations(micro, p + n),
         "logprob_chunks": z.head(micro, n, sft.SFTConfig().logprob_chunk, True)}
    return t | z.eval_terms(cfg, s)


KIND = StageKind("sft", SFTStage, sft_stage, memory, update_rows=lambda s: int(s.batch_size),
                 micro_batch_key="num_micro_batches", algo=algo_config)
