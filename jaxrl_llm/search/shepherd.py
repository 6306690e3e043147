"""Automatic process labels (Math-Shepherd, Wang et al. 2023, arXiv 2312.08935): how good is a step, measured
by where the policy gets from it.

For a solution of steps s_1 .. s_K to a problem x, step k < K is labelled by completing the prefix
x + s_1 .. s_k + separator N times with the policy and checking each completion's final answer with the
task's verifier (`task.is_correct(prefix + continuation, example)`):

    soft label ("SE" in the paper)  y_k = (number of correct completions) / N
    hard label ("HE")               y_k = 1[at least one completion is correct]

The last step needs no sampling: y_K = 1[the whole solution is correct] (both kinds).

    sampling = SamplingConfig(max_new_tokens=32, temperature=1.0, n_samples=8, eos_token_ids=eos, pad_token_id=pad)
    sampler = make_sampler(module, model_cfg, sampling)
    labels = shepherd_labels(sampler, params, tokenizer, task, examples, steps, n=8, key=key, batch_size=16,
                             max_prompt_len=16, max_prefix_len=32)        # list[list[float]], one per step

Cost and shapes: one query per (solution, step k < K); queries go through the jitted sampler in batches of
`batch_size` prefixes of a fixed length (max_prompt_len + max_prefix_len, left-padded; the last batch is
filled up with copies of a query whose results are dropped), so the sampler compiles once. Each prefix is
prefilled once and its KV cache repeated for its N continuations (`SamplingConfig.n_samples`). A prefix is
the prompt's tokens followed by the tokens of "s_1<sep>...<sep>s_k<sep>" tokenized on their own, as a
completion is. Batch b samples with `fold_in(key, b)`: the labels are a deterministic function of the key.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxrl_llm.data.iterator import tokenize_batch
from jaxrl_llm.errors import DataError
from jaxrl_llm.tasks.base import Example, Task
from jaxrl_llm.tokenizer import decode_completions, tokenizer_info


def _separator(task: Task, separator: str | None) -> str:
    sep = separator if separator is not None else getattr(task, "step_separator", None)
    if not isinstance(sep, str) or not sep:
        raise ValueError(f"shepherd_labels: no step separator: task {getattr(task, 'name', type(task).__name__)!r} "
                         "has no step_separator (the SteppedTask ability); pass separator='...'")
    return sep


def shepherd_queries(tokenizer, examples: Sequence[Example], steps: Sequence[Sequence[str]], separator: str,
                     max_prompt_len: int, chat: bool | None = None
                     ) -> tuple[list[tuple[int, int]], list[list[int]], list[str]]:
    """The prefixes to complete: (solution i, step k) for every step k < K_i (0-based, k < K_i - 1), each
    prefix's token ids (prompt, then "s_1<sep>...s_k<sep>") and its completion-side text."""
    prompts = tokenize_batch(tokenizer, list(examples), max_prompt_len, chat=chat)
    keys, ids, texts = [], [], []
    for i, solution in enumerate(steps):
        head = prompts.tokens[i][prompts.mask[i]].tolist()
        for k in range(len(solution) - 1):
            text = separator.join(solution[:k + 1]) + separator
            keys.append((i, k))
            ids.append(head + tokenizer(text, add_special_tokens=False)["input_ids"])
            texts.append(text)
    return keys, ids, texts


def shepherd_labels(sampler_fn: Callable, params: Any, tokenizer, task: Task, examples: Sequence[Example],
                    steps: Sequence[Sequence[str]], n: int, key: jax.Array, batch_size: int, *,
                    max_prompt_len: int, max_prefix_len: int, separator: str | None = None, hard: bool = False,
                    chat: bool | None = None) -> list[list[float]]:
    """Math-Shepherd labels of every step of every solution (see the module docstring): list i holds one
    float per step of `steps[i]`, the solution to `examples[i]`.

    sampler_fn: `(params, prompt_tokens [B, P], prompt_mask [B, P], rng) -> Rollout` with n_samples = `n`
        (`rollout.make_sampler`), called on batches of `batch_size` prefixes of P = max_prompt_len +
        max_prefix_len tokens. max_prefix_len bounds the tokens of "s_1<sep>...s_k<sep>" (a longer prefix is
        an error). separator: default `task.step_separator`.
    """
    if len(examples) != len(steps):
        raise ValueError(f"shepherd_labels: {len(examples)} examples but {len(steps)} solutions; one each")
    if n < 1 or batch_size < 1:
        raise ValueError(f"shepherd_labels: n={n} and batch_size={batch_size} must be >= 1")
    sep = _separator(task, separator)
    for i, solution in enumerate(steps):
        if not len(solution):
            raise DataError(f"shepherd_labels: solution {i} has no step")
    labels = [[0.0] * len(s) for s in steps]
    for i, solution in enumerate(steps):  # the last step: the whole solution's correctness, no sampling
        labels[i][-1] = float(bool(task.is_correct(sep.join(solution), examples[i])))
    keys, ids, texts = shepherd_queries(tokenizer, examples, steps, sep, max_prompt_len, chat)
    if not keys:
        return labels
    width = max_prompt_len + max_prefix_len
    too_long = [j for j, row in enumerate(ids) if len(row) > width]
    if too_long:
        (i, k), j = keys[too_long[0]], too_long[0]
        raise DataError(f"shepherd_labels: the prefix of solution {i} up to step {k + 1} has "
                        f"{len(ids[j])} tokens with its prompt > max_prompt_len + max_prefix_len = {width}; raise "
                        "max_prefix_len")
    pad = tokenizer_info(tokenizer).pad_id
    for b, start in enumerate(range(0, len(keys), batch_size)):
        rows = list(range(start, min(start + batch_size, len(keys))))
        rows += [rows[0]] * (batch_size - len(rows))  # a fixed batch shape: one compile
        tokens = np.full((batch_size, width), pad, np.int32)
        mask = np.zeros((batch_size, width), bool)
        for r, j in enumerate(rows):
            tokens[r, width - len(ids[j]):] = ids[j]
            mask[r, width - len(ids[j]):] = True
        ro = jax.device_get(sampler_fn(params, tokens, mask, jax.random.fold_in(key, b)))
        if ro.tokens.shape[0] != batch_size * n:
            raise ValueError(f"shepherd_labels: the sampler returned {ro.tokens.shape[0]} rows for {batch_size} "
                             f"prefixes; expected {batch_size * n} (its SamplingConfig.n_samples must be n={n})")
        conts = decode_completions(tokenizer, ro.tokens, ro.mask, skip_special_tokens=True)
        for r, j in enumerate(rows[:min(batch_size, len(keys) - start)]):
            i, k = keys[j]
            good = sum(bool(task.is_correct(texts[j] + c, examples[i])) for c in conts[r * n:(r + 1) * n])
            labels[i][k] = float(good > 0) if hard else good / n
    return labels
