"""Held-out evaluation of a policy: sample n completions per prompt with the jitted sampler, score them.

    ev = Evaluator(module, model_cfg, env, tokenizer, task, task.examples("test", 256, seed),
                   max_prompt_len=16, max_new_tokens=16)          # greedy, one sample per prompt
    ev(params)                          # {"eval/accuracy": ..., "eval/response_length": ...}: during training
    ev.evaluate(params, ks=(1, 4))      # EvalResult: pass@k, maj@k, mean reward (`jaxrl-llm eval`)

Every process holds the whole held-out set and scores all of it (rows are placed over the mesh's batch
axes and gathered back), so the figures are the same on every process. The prompts are encoded once; with
`batch_size` they are sampled that many at a time (the last chunk padded: one compiled shape).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from jaxrl_llm.data.iterator import tokenize_batch
from jaxrl_llm.eval.metrics import EvalResult, evaluate_samples
from jaxrl_llm.rollout import SamplingConfig, make_sampler
from jaxrl_llm.sharding import multihost
from jaxrl_llm.tasks.base import Example, Task
from jaxrl_llm.tokenizer import decode_completions, tokenizer_info


@dataclasses.dataclass(frozen=True)
class Generations:
    """n completions of each of E prompts: texts[e][j], lengths [E, n], finished [E, n]."""

    texts: list[list[str]]
    lengths: np.ndarray
    finished: np.ndarray


class Evaluator:
    """Samples and scores completions of a fixed held-out set of `examples` (see the module docstring).

    chat: render prompts with the chat template (None: message-list prompts do, text prompts do not).
    seed: the sampling key (greedy decoding ignores it).
    """

    def __init__(self, module: Any, model_cfg, env, tokenizer, task: Task, examples: Sequence[Example], *,
                 max_prompt_len: int, max_new_tokens: int, n_samples: int = 1, temperature: float = 0.0,
                 chat: bool | None = None, seed: int = 0, batch_size: int = 0, param_shardings: Any = None):
        if not examples:
            raise ValueError("Evaluator: no held-out examples")
        self.task, self.tokenizer, self.env = task, tokenizer, env
        self.examples = list(examples)
        self.n, self.max_new_tokens = int(n_samples), int(max_new_tokens)
        self.batch_size = int(batch_size) or len(self.examples)
        padded = self.examples + [self.examples[-1]] * (-len(self.examples) % self.batch_size)
        enc = tokenize_batch(tokenizer, padded, max_prompt_len, chat=chat)
        self.tokens, self.mask = enc.tokens, enc.mask
        info = tokenizer_info(tokenizer)
        sc = SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=float(temperature), n_samples=self.n,
                            eos_token_ids=tuple(info.eos_ids), pad_token_id=info.pad_id)
        self.sampler = make_sampler(module, model_cfg, sc, env=env, param_shardings=param_shardings)
        self.key = multihost.replicated(env, jax.random.key(seed))

    def generate(self, params, seed: int | None = None) -> Generations:
        """n completions of every held-out prompt under `params`. Sampling keys: the evaluator's own (its
        first chunk takes it as it is, chunk at row r fold_in(key, r)); with `seed`, fold_in(key(seed), r)
        for every chunk."""
        base = self.key if seed is None else multihost.replicated(self.env, jax.random.key(seed))
        texts, lengths, finished = [], [], []
        for start in range(0, len(self.tokens), self.batch_size):
            stop = start + self.batch_size
            chunk_key = base if (start == 0 and seed is None) else jax.random.fold_in(base, start)
            ro = self.sampler(params, multihost.replicated_rows(self.env, self.tokens[start:stop]),
                              multihost.replicated_rows(self.env, self.mask[start:stop]), chunk_key)
            rows = (min(stop, len(self.examples)) - start) * self.n
            tokens, mask = multihost.to_host(ro.tokens)[:rows], multihost.to_host(ro.mask)[:rows]
            texts += decode_completions(self.tokenizer, tokens, mask)
            lengths.append(multihost.to_host(ro.lengths)[:rows])
            finished.append(multihost.to_host(ro.finished)[:rows])
        e, n = len(self.examples), self.n
        return Generations([texts[i * n:(i + 1) * n] for i in range(e)], np.concatenate(lengths).reshape(e, n),
                           np.concatenate(finished).reshape(e, n))

    def __call__(self, params) -> dict[str, float]:
        """Mean correctness over every sample (greedy accuracy with the defaults) and mean response length."""
        gen = self.generate(params)
        correct = [self.task.is_correct(t, ex) for ex, ts in zip(self.examples, gen.texts) for t in ts]
        return {"eval/accuracy": float(np.mean(correct)), "eval/response_length": float(gen.lengths.mean())}

    def evaluate(self, params, ks: Sequence[int] = (1,), seed: int | None = None, **kw) -> EvalResult:
        """pass@k / maj@k / mean reward of the held-out set (`eval.metrics.evaluate_samples`; `kw` go there)."""
        gen = self.generate(params, seed)
        return evaluate_samples(self.task, self.examples, gen.texts, ks=ks, lengths=gen.lengths,
                                finished=gen.finished, max_new_tokens=self.max_new_tokens, **kw)
