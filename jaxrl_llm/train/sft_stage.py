"""SFT stage: masked NLL on (prompt, answer) pairs from the task or a JSONL file."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_llm.algos import sft
from jaxrl_llm.algos.train_state import OptimizerConfig, TrainState, jit_update
from jaxrl_llm.data.loaders import load_prompt_answer
from jaxrl_llm.sharding import multihost
from jaxrl_llm.train.build import Evaluator, encode_answers, encode_prompt_batch, jnp_tree_copy, prompt_iterator
from jaxrl_llm.train.config import to_dataclass
from jaxrl_llm.train.stage import Stage


class SFTStage(Stage):
    kind = "sft"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        s = self.section
        self.total_steps = int(s.steps)
        if s.data.source == "task":
            self.examples = self.comp.task.examples("train", s.data.num_examples, self.cfg.seed)
        elif s.data.source == "jsonl":
            self.examples = load_prompt_answer(s.data.path)
        else:
            raise ValueError(f"config.{self.name}.data.source={s.data.source!r}; expected 'task' or 'jsonl'")
        self.iterator = prompt_iterator(self.comp, self.examples, int(s.batch_size), self.cfg.seed + self.index)
        self.opt_cfg = to_dataclass(OptimizerConfig, s.optimizer, f"config.{self.name}.optimizer")
        self.step_fn = sft.make_sft_step(self.comp.module, self.comp.model_cfg,
                                         sft.SFTConfig(loss_agg=s.loss_agg), num_micro_batches=s.num_micro_batches)
        self.update = None
        self.evaluator = Evaluator(self.comp, s.max_prompt_len) if self.cfg.eval.every > 0 else None

    def init(self, params) -> None:
        self.state = TrainState.create(jnp_tree_copy(params), self.opt_cfg)

    def _batch(self):
        exs = next(self.iterator)
        s = self.section
        pt, pm, _ = encode_prompt_batch(self.comp, exs, s.max_prompt_len)
        ct, cm = encode_answers(self.comp, exs, s.max_response_len)
        local = {"prompt_tokens": pt, "prompt_mask": pm, "completion_tokens": ct, "completion_mask": cm}
        return multihost.to_global_tree(self.comp.env, local, int(s.batch_size))

    def step(self, i: int) -> dict:
        batch = self._batch()
        if self.update is None:
            self.update = jit_update(self.step_fn, self.state, batch, self.comp.env)
        self.state, metrics = self.update(self.state, batch, jax.random.fold_in(self.key, i))
        return metrics

    def params(self):
        return self.state.params

    def tree(self) -> dict:
        return {"params": self.state.params, "opt_state": self.state.opt_state, "step": self.state.step}

    def meta(self) -> dict:
        return {"iterator": self.iterator.state()}

    def restore(self, tree: dict, meta: dict) -> None:
        self.state = TrainState.create(tree["params"], self.opt_cfg).replace(opt_state=tree["opt_state"],
                                                                              step=tree["step"])
        self.iterator.restore(meta["iterator"])

    def evaluate(self) -> dict:
        return self.evaluator(self.state.params) if self.evaluator else {}
