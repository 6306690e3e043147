"""Step-level beam search guided by a scorer (a PRM), and diverse verifier tree search (DVTS).

    result = beam_search(decoder, params, prompt_tokens, prompt_mask, key, scorer,
                         beam_width=4, expansions=4)           # B problems -> result.tokens [B, W, M]
    result = dvts(decoder, params, prompt_tokens, prompt_mask, key, scorer, subtrees=4, expansions=4)

Beam search (Snell et al. 2024, "Scaling LLM test-time compute optimally", arXiv 2408.03314; the
search-and-learn recipe): every problem keeps W beams; each round, every beam is expanded into E candidate
next steps (W * E rows, one `StepDecoder.extend` for all problems at once), the scorer scores every candidate
(the PRM's score of its last step, by default), and the W best candidates of each problem become the next
beams. A beam that has ended (EOS, or its step budget is spent) stays a candidate with its score and is not
expanded again (one copy of it competes, never its duplicates). Search stops when every beam of every problem
has ended, or after `max_steps` rounds.

DVTS (Beeching et al. 2024, the same recipe): the budget is split into S independent subtrees per problem,
each a beam search of width 1 with E expansions; the subtrees' final solutions are the candidates. It keeps
the diversity that one wide beam loses when a few prefixes dominate (better at larger budgets).

Cost model: R = B * W * E rows decode in lock step; each round costs one `extend` (at most `step_tokens` decode
steps over R rows, attending over the prompt and the prefix in the KV cache: nothing is re-encoded), one scorer
call over the R sequences (a PRM forward over prompt + prefix, [R, P + M]) and one `select` (a gather of the R
rows' KV cache). Tokens generated: the rows' step lengths summed over rounds (`generated_tokens`), about
W * E times one solution's length, i.e. the budget of best-of-(W * E).

Compiled programs: start, extend, select (one each for the R rows) and whatever the scorer compiles, once;
the host loop over rounds reads the scores back (one small transfer per round).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.search.decoding import SearchState, StepDecoder, check_count

# A scorer: (tokens [R, T], mask [R, T]) of prompt + generated tokens -> float [R], higher is better.
Scorer = Callable[[Any, Any], Any]


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """K candidate solutions per problem (numpy).

    tokens: int32 [B, K, M] generated tokens (pad after `lengths`); lengths: int32 [B, K];
    scores: float32 [B, K], the scorer's final score of each; finished: bool [B, K] (ended with EOS);
    num_steps: int32 [B, K]; logprob: float32 [B, K], the policy's log-likelihood of each;
    best: int32 [B], index of the highest-scoring candidate (the first on ties);
    generated_tokens: int, tokens generated over the whole search (every candidate ever expanded);
    rounds: int, extend calls run.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    scores: np.ndarray
    finished: np.ndarray
    num_steps: np.ndarray
    logprob: np.ndarray
    best: np.ndarray
    generated_tokens: int
    rounds: int

    def best_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [B, M], mask [B, M]) of each problem's best candidate."""
        b = np.arange(self.tokens.shape[0])
        toks = self.tokens[b, self.best]
        mask = (np.arange(toks.shape[1])[None, :] < self.lengths[b, self.best][:, None]).astype(np.int32)
        return toks, mask


def _top_rows(scores: np.ndarray, valid: np.ndarray, b: int, width: int) -> np.ndarray:
    """Global row indices of the `width` best valid rows of each of the b problems ([b * width]); ties go to
    the lower row. scores/valid are [b * C]."""
    c = scores.shape[0] // b
    s = np.where(valid, scores.astype(np.float64), -np.inf).reshape(b, c)
    s = np.where(np.isnan(s), -np.inf, s)
    order = np.argsort(-s, axis=1, kind="stable")[:, :width]
    return (order + np.arange(b)[:, None] * c).reshape(-1)


def beam_search(decoder: StepDecoder, params: Any, prompt_tokens, prompt_mask, key: jax.Array, scorer: Scorer, *,
                beam_width: int = 4, expansions: int = 4, max_steps: int | None = None) -> SearchResult:
    """Step-level beam search (see the module docstring); returns the W final beams of each problem.

    scorer(tokens, mask) scores R = B * beam_width * expansions rows of prompt + partial solution (e.g.
    `search.scorers.prm_scorer`); it may run on the device or the host. A scorer with `start / feed / select`
    (`search.scorers.CachedPRMScorer`) is fed each round's step instead and follows the beams' rows. max_steps: rounds (default the
    decoder's `max_steps`). Deterministic for `key` (round r uses fold_in(key, r)).
    """
    max_steps = decoder.cfg.max_steps if max_steps is None else max_steps
    check_count("beam_search", beam_width=beam_width, expansions=expansions, max_steps=max_steps)
    b = int(np.shape(prompt_tokens)[0])
    w, e = beam_width, expansions
    state = decoder.start(params, prompt_tokens, prompt_mask, n=w * e)
    incremental = hasattr(scorer, "feed")  # e.g. search.scorers.CachedPRMScorer: fed one step per round
    sstate = scorer.start(prompt_tokens, prompt_mask, w * e) if incremental else None
    generated, rounds = 0, 0
    chosen = np.arange(b * w * e)
    scores = np.zeros(b * w * e, np.float32)
    for r in range(max_steps):
        live = np.asarray(jax.device_get(~state.done))
        state, step = decoder.extend(params, state, jax.random.fold_in(key, r))
        rounds += 1
        generated += int(jax.device_get(jnp.sum(step.mask)))
        if incremental:
            sstate, scores = scorer.feed(sstate, step)
        else:
            scores = scorer(*state.sequences())
        scores = np.asarray(jax.device_get(scores), np.float32).reshape(-1)
        # An ended beam has E identical copies: only the first competes.
        valid = live | (np.arange(live.shape[0]) % e == 0)
        chosen = _top_rows(scores, valid, b, w)
        if r == max_steps - 1 or bool(jax.device_get(jnp.all(state.done))):
            break
        rows = jnp.asarray(np.repeat(chosen, e), jnp.int32)
        state = decoder.select(state, rows)
        if incremental:
            sstate = scorer.select(sstate, rows)
    return _result(state, chosen, scores, b, w, generated, rounds)


def _result(state: SearchState, rows: np.ndarray, scores: np.ndarray, b: int, k: int, generated: int,
            rounds: int) -> SearchResult:
    s = jax.device_get(state)
    pick = lambda a: np.asarray(a)[rows].reshape((b, k) + np.asarray(a).shape[1:])  # noqa: E731
    sc = pick(scores)
    best = np.argmax(np.where(np.isnan(sc), -np.inf, sc), axis=1).astype(np.int32)
    return SearchResult(tokens=pick(s.tokens), lengths=pick(s.lengths), scores=sc, finished=pick(s.finished),
                        num_steps=pick(s.num_steps), logprob=pick(s.logprob), best=best,
                        generated_tokens=generated, rounds=rounds)


def dvts(decoder: StepDecoder, params: Any, prompt_tokens, prompt_mask, key: jax.Array, scorer: Scorer, *,
         subtrees: int = 4, expansions: int = 4, max_steps: int | None = None) -> SearchResult:
    """Diverse verifier tree search: `subtrees` independent width-1 beam searches per problem (each expanding
    `expansions` candidates per round); the result has one candidate per subtree ([B, subtrees, M])."""
    check_count("dvts", subtrees=subtrees)
    pt = np.repeat(np.asarray(prompt_tokens), subtrees, axis=0)
    pm = np.repeat(np.asarray(prompt_mask), subtrees, axis=0)
    res = beam_search(decoder, params, pt, pm, key, scorer, beam_width=1, expansions=expansions,
                      max_steps=max_steps)
    b = int(np.shape(prompt_tokens)[0])
    reshape = lambda a: a.reshape((b, subtrees) + a.shape[2:])  # noqa: E731
    sc = reshape(res.scores)
    return dataclasses.replace(
        res, tokens=reshape(res.tokens), lengths=reshape(res.lengths), scores=sc, finished=reshape(res.finished),
        num_steps=reshape(res.num_steps), logprob=reshape(res.logprob),
        best=np.argmax(np.where(np.isnan(sc), -np.inf, sc), axis=1).astype(np.int32))
