"""Scorers: what ranks candidates in search. Each is `scorer(tokens, mask) -> float [R]` over R rows of
prompt + (partial) solution, [R, P + M] with the prompt's P columns first; higher is better.

    prm = prm_scorer(prm_module, prm_params, end_table, prompt_len=P, how="last")   # jitted, on the device
    orm = orm_scorer(rm_module, rm_params)                                           # jitted, on the device
    ver = verifier_scorer(tokenizer, task, examples, prompt_len=P)                   # on the host
    oracle = step_grade_scorer(tokenizer, task, examples, prompt_len=P)              # the task's true step grades

Rows are in problem order: with R rows for B examples, row r answers examples[r // (R // B)] (as every search
here lays them out). A PRM scorer with how="last" scores a partial solution by its last step (what beam search
and MCTS rank prefixes by); "min" / "prod" rank whole solutions (Lightman et al. 2023).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.algos.prm import aggregate_steps, check_prm_module, step_scores
from jaxrl_llm.errors import ConfigError
from jaxrl_llm.models.transformer import ScalarHeadModel
from jaxrl_llm.tasks.base import Example, RewardInputs
from jaxrl_llm.tokenizer import decode_completions


def prm_scorer(module: Any, params: Any, end_table: Any, prompt_len: int, how: str = "last"):
    """A PRM's score of each row's steps so far, aggregated by `how` ("last", "min", "prod", "mean")."""
    check_prm_module(module)
    table = jnp.asarray(end_table)

    @jax.jit
    def score(params, tokens, mask):
        p = prompt_len
        scores, ends = step_scores(module, params, tokens[:, :p], mask[:, :p], tokens[:, p:], mask[:, p:], table)
        return aggregate_steps(scores, ends, how)

    return lambda tokens, mask: score(params, tokens, mask)


def orm_scorer(module: Any, params: Any):
    """An outcome reward model's (a `ScalarHeadModel(per_token=False)`) score of each whole row."""
    if not isinstance(module, ScalarHeadModel) or module.per_token:
        raise ConfigError("orm_scorer needs a reward model (models.reward_model(cfg): ScalarHeadModel with "
                          "per_token=False)")
    fwd = jax.jit(lambda pp, t, m: module.apply({"params": pp}, t, None, m.astype(jnp.bool_)).astype(jnp.float32))
    return lambda tokens, mask: fwd(params, tokens, mask)


def _texts(tokenizer, tokens, mask, prompt_len: int) -> list[str]:
    tokens, mask = np.asarray(jax.device_get(tokens)), np.asarray(jax.device_get(mask))
    return decode_completions(tokenizer, tokens[:, prompt_len:], mask[:, prompt_len:])


def _row_examples(examples: Sequence[Example], rows: int) -> list[Example]:
    if rows % len(examples):
        raise ValueError(f"{rows} rows do not split evenly over {len(examples)} examples")
    per = rows // len(examples)
    return [examples[r // per] for r in range(rows)]


def verifier_scorer(tokenizer, task, examples: Sequence[Example], prompt_len: int, max_new_tokens: int = 0):
    """The task's reward (its verifier) of each row's decoded solution, on the host."""
    def score(tokens, mask):
        texts = _texts(tokenizer, tokens, mask, prompt_len)
        exs = _row_examples(examples, len(texts))
        lengths = np.asarray(jax.device_get(mask))[:, prompt_len:].sum(-1)
        out = task.reward(RewardInputs(texts, exs, lengths, np.ones(len(texts), bool), max_new_tokens))
        return np.asarray(out.scores, np.float32)
    return score


def step_grade_scorer(tokenizer, task, examples: Sequence[Example], prompt_len: int, how: str = "last"):
    """An oracle PRM from the task's true step grades (`StepGradedTask.grade_steps`): each step scores 1 if
    right, 0 if wrong, aggregated by `how` as a PRM's probabilities are. The upper bound a learned PRM
    approaches."""
    if not hasattr(task, "grade_steps"):
        raise ConfigError(f"task {getattr(task, 'name', task)!r} cannot grade steps (no grade_steps); use a PRM")

    def agg(g: list[bool]) -> float:
        if not g:
            return 0.0
        v = np.asarray(g, np.float32)
        return float({"last": v[-1], "min": v.min(), "prod": v.prod(), "mean": v.mean()}[how])

    def score(tokens, mask):
        texts = _texts(tokenizer, tokens, mask, prompt_len)
        exs = _row_examples(examples, len(texts))
        return np.asarray([agg(list(task.grade_steps(t, e))) for t, e in zip(texts, exs)], np.float32)
    return score


def _cached_values(mod, tokens, positions, mask, cache):
    """A `ScalarHeadModel`'s backbone over `tokens` written into a KV cache: (hidden, cache) (a `method=` for
    apply; `_head` reads the score from a hidden state)."""
    hidden, cache = mod.model(tokens, positions, mask, cache)
    return hidden, cache


def _head(mod, hidden):
    return mod.score(hidden.astype(jnp.float32))[..., 0]


class CachedPRMScorer:
    """A PRM that scores each new step incrementally, for beam search: it keeps its own KV cache of every row's
    prompt and solution so far and is fed only the step each round (one forward of [R, step_tokens] tokens
    attending over the cache), instead of a forward over the whole prompt + prefix. Its rows follow the
    search's (`select` gathers its cache with the beam's). A row's score is sigmoid of the PRM's logit at the
    last token of its latest step: the value `prm_scorer(..., how="last")` computes from scratch.

        scorer = CachedPRMScorer(prm_module, prm_params, step_cfg)   # pass it to beam_search / dvts
    """

    def __init__(self, module: Any, params: Any, step_cfg, env=None):
        from jaxrl_llm.models.transformer import KVCache, positions_from_mask, unstack_layers
        from jaxrl_llm.search.decoding import feed_tokens
        from jaxrl_llm.sharding.rules import constrain

        check_prm_module(module)
        self.params, self.cfg = params, module.cfg
        m = step_cfg.max_new_tokens

        def fwd(pp, *a):
            return module.apply({"params": pp}, *a, method=_cached_values)

        def score_of(pp, hidden):
            return jax.nn.sigmoid(module.apply({"params": pp}, hidden, method=_head)[:, 0])

        def start(pp, prompt_tokens, prompt_mask, n):
            pp = unstack_layers(pp)
            b, p = prompt_tokens.shape
            cache = KVCache.zeros(self.cfg, b, p + m)
            mask = prompt_mask.astype(jnp.int32)
            _, cache = fwd(pp, prompt_tokens.astype(jnp.int32), positions_from_mask(mask), mask.astype(bool), cache)
            pos = jnp.sum(mask, axis=-1, dtype=jnp.int32)
            rep = lambda a: jnp.repeat(a, n, axis=0)  # noqa: E731
            return {"cache": cache.repeat(n) if n > 1 else cache, "position": rep(pos),
                    "score": constrain(jnp.zeros((b * n,), jnp.float32), ("batch",))}

        def feed(pp, st, tokens, mask):
            pp = unstack_layers(pp)
            h, cache, pos, n = feed_tokens(lambda *a: fwd(pp, *a), st["cache"], st["position"],
                                           tokens.astype(jnp.int32), mask.astype(jnp.int32))
            score = jnp.where(n > 0, score_of(pp, h), st["score"])
            return {"cache": cache, "position": pos, "score": score}, score

        def select(st, rows):
            take = lambda a: jnp.take(a, rows.astype(jnp.int32), axis=0)  # noqa: E731
            c = st["cache"]
            cache = KVCache(k=tuple(take(a) for a in c.k), v=tuple(take(a) for a in c.v), mask=take(c.mask),
                            index=c.index)
            return {"cache": cache, "position": take(st["position"]), "score": take(st["score"])}

        def in_env(fn, **kw):
            if env is None:
                return jax.jit(fn, **kw)

            def traced(*a, **k):
                with env.activate():
                    return fn(*a, **k)
            return jax.jit(traced, **kw)

        self._start = in_env(start, static_argnames=("n",))
        self._feed = in_env(feed)
        self._select = in_env(select)

    def start(self, prompt_tokens, prompt_mask, n: int = 1):
        return self._start(self.params, prompt_tokens, prompt_mask, n=n)

    def feed(self, st, step):
        """(new state, scores [R]) after the rows' new `step` (a `decoding.Step`)."""
        return self._feed(self.params, st, step.tokens, step.mask)

    def select(self, st, rows):
        return self._select(st, rows)

    def __call__(self, tokens, mask):
        raise TypeError("CachedPRMScorer scores step by step (start / feed / select) inside beam_search and "
                        "dvts; use prm_scorer for whole sequences")
