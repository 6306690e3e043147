"""The jitted pieces of a multi-turn rollout: prefill, decode one turn, append an observation.

A multi-turn episode alternates model turns and environment observations (a tool's output, a
checker's feedback) in one growing sequence. The host loop that runs an environment
(`jaxrl_llm.envs.rollout`) calls three jitted functions of this module, in turn:

    mt = make_multiturn_sampler(module, model_cfg, sampling, obs_tokens=16, env=env)
    st = mt.start(params, prompt_tokens, prompt_mask)         # prefill [B, P]; rows repeated n_samples times
    st = mt.turn(params, st, rng, turn)                       # every live row writes one turn
    ... the host reads each row's turn (st.turn_start .. st.col), steps its environment ...
    st = mt.observe(params, st, obs_tokens, obs_mask)         # [B*n, O] observations, prefilled into the cache
    ... turn / observe again; st.replace(finished=...) ends episodes (the host knows which are done) ...

Layout. Every row shares one column counter: the completion buffer's column c is the KV cache's
slot P + c for every row. A turn runs until every live row has emitted an end-of-turn token (the
sampling config's EOS ids), `max_turn_tokens` tokens were written, or the buffer is full; a row
that finished its turn earlier leaves its remaining columns of that turn empty (masked: never
attended, never trained). An observation block takes `obs_tokens` columns for every row, its own
tokens right-aligned and the rest masked, so the column before a turn's first token is always a
real one (the last observation token, or the prompt's last token): the training forward, whose
logits at column c - 1 predict the token at column c, needs no gather. A row's sequence may have
gaps; positions (RoPE) count real tokens only (`positions_from_mask` of the training forward gives
the same ones), and the training forward reproduces the sampler's distribution exactly with the
attention mask `context_mask`. (So a continuing episode's observation must have at least one
token: `envs.rollout` checks it.)

Two masks come out:
    loss_mask     [B*n, N]: the tokens the model wrote (trained; the sampler's log-probs there);
    context_mask  [B*n, N]: loss_mask plus the observation tokens (attended, never trained).

The KV cache is kept across turns: an observation is prefilled into it as one [B*n, O] block, the
history is never encoded again. Shapes are static: one compile of `turn` and one of `observe` per
(batch, prompt length) whatever the number of turns.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.layers import matmul_weights
from jaxrl_llm.models.transformer import KVCache, positions_from_mask, unstack_layers
from jaxrl_llm.rollout.sampling import SamplingConfig, process_logits, sample_tokens
from jaxrl_llm.sharding.rules import ShardingEnv, constrain


@flax.struct.dataclass
class TurnState:
    """The state of a batch of episodes between jitted calls (rows prompt-major, as `Rollout`).

    prompt_tokens, prompt_mask: [R, P] the prompts, repeated n_samples times.
    tokens:       int32 [R, N] the episode after the prompt: model turns and observations (pad elsewhere).
    loss_mask:    int32 [R, N] 1 on tokens the model wrote.
    context_mask: int32 [R, N] 1 on tokens the model wrote or was shown (observations).
    logprobs, raw_logprobs: float32 [R, N] the sampler's log-probs (as `Rollout`), 0 off loss_mask.
    col:          int32 [] next free column (shared by every row; cache slot P + col).
    turn_start:   int32 [] first column of the last turn.
    finished:     bool [R] the episode is over (no more turns).
    ended_turn:   bool [R] the row's last turn ended with an end-of-turn token (False: cut by a budget).
    logits:       float32 [R, V] predicting each row's next token.
    position:     int32 [R] RoPE position of each row's next token (= its real tokens so far).
    cache:        the KV cache, P + N slots.
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    loss_mask: jax.Array
    context_mask: jax.Array
    logprobs: jax.Array
    raw_logprobs: jax.Array
    col: jax.Array
    turn_start: jax.Array
    finished: jax.Array
    ended_turn: jax.Array
    logits: jax.Array
    position: jax.Array
    cache: KVCache


def _put(buf: jax.Array, block: jax.Array, col: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice(buf, block.astype(buf.dtype), (0, col))


@dataclasses.dataclass(frozen=True)
class MultiTurnSampler:
    """Three jitted functions over a `TurnState` (see the module docstring); `sampling` as the sampler's
    (n_samples, temperature, top-k/p, EOS ids = the end-of-turn tokens, pad); `obs_tokens` the width of
    an observation block."""

    start: Any
    turn: Any
    observe: Any
    sampling: SamplingConfig
    obs_tokens: int


def make_multiturn_sampler(module: nn.Module, model_cfg: ModelConfig, sampling: SamplingConfig, obs_tokens: int,
                           env: ShardingEnv | None = None) -> MultiTurnSampler:
    """The jitted start / turn / observe functions for `module` (see the module docstring)."""
    if not isinstance(obs_tokens, int) or obs_tokens < 1:
        raise ValueError(f"obs_tokens={obs_tokens!r}: must be an integer >= 1")
    sampling.check_vocab(model_cfg.vocab_size)
    n_new, n_rep, pad = sampling.max_new_tokens, sampling.n_samples, sampling.pad_token_id
    eos = jnp.asarray(sampling.eos_token_ids or (-1,), jnp.int32)

    def prep(params):
        if sampling.split_layer_weights:
            params = unstack_layers(params)
        return matmul_weights(params, model_cfg)

    def last_logits(params, hidden_bte):
        logits = module.apply({"params": params}, hidden_bte, method="logits")
        return constrain(logits[:, 0].astype(jnp.float32), ("batch", "vocab"))

    def start(params, prompt_tokens, prompt_mask) -> TurnState:
        b, p = prompt_tokens.shape
        if p + n_new > model_cfg.max_position_embeddings:
            raise ValueError(f"prompt length {p} + max_new_tokens {n_new} exceeds the model's "
                             f"max_position_embeddings={model_cfg.max_position_embeddings}")
        params = prep(params)
        prompt_tokens = constrain(prompt_tokens.astype(jnp.int32), ("batch", "length"))
        prompt_mask = constrain(prompt_mask.astype(jnp.int32), ("batch", "length"))
        cache = KVCache.zeros(model_cfg, b, p + n_new)
        hidden, cache = module.apply({"params": params}, prompt_tokens, positions_from_mask(prompt_mask),
                                     prompt_mask.astype(jnp.bool_), cache, return_hidden=True)
        logits = last_logits(params, hidden[:, -1:])
        rows = b * n_rep
        if n_rep > 1:
            cache = cache.repeat(n_rep)
            logits = constrain(jnp.repeat(logits, n_rep, axis=0), ("batch", "vocab"))
        rep = lambda x: constrain(jnp.repeat(x, n_rep, axis=0), ("batch", "length"))  # noqa: E731
        zeros_i = constrain(jnp.zeros((rows, n_new), jnp.int32), ("batch", "length"))
        zeros_f = constrain(jnp.zeros((rows, n_new), jnp.float32), ("batch", "length"))
        return TurnState(
            prompt_tokens=rep(prompt_tokens), prompt_mask=rep(prompt_mask),
            tokens=constrain(jnp.full((rows, n_new), pad, jnp.int32), ("batch", "length")),
            loss_mask=zeros_i, context_mask=zeros_i, logprobs=zeros_f, raw_logprobs=zeros_f,
            col=jnp.zeros((), jnp.int32), turn_start=jnp.zeros((), jnp.int32),
            finished=jnp.zeros((rows,), jnp.bool_), ended_turn=jnp.zeros((rows,), jnp.bool_),
            logits=logits, position=jnp.repeat(jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32), n_rep),
            cache=cache)

    def turn(params, st: TurnState, rng, max_turn_tokens) -> TurnState:
        """Every unfinished row writes one turn: until its end-of-turn token, `max_turn_tokens` tokens (a
        traced int) or the end of the buffer. Token of column c drawn with fold_in(rng, c)."""
        params = prep(params)
        limit = jnp.minimum(st.col + max_turn_tokens, n_new)

        def cond(c):
            s, active = c
            return (s.col < limit) & jnp.any(active)

        def body(c):
            s, active = c
            logp_bv, raw_bv = process_logits(s.logits, sampling.temperature, sampling.top_k, sampling.top_p)
            tok = sample_tokens(jax.random.fold_in(rng, s.col), logp_bv, raw_bv, sampling.greedy)
            lp = jnp.take_along_axis(logp_bv, tok[:, None], axis=-1)[:, 0]
            raw = jnp.take_along_axis(raw_bv, tok[:, None], axis=-1)[:, 0]
            tok = jnp.where(active, tok, pad)
            live = active.astype(jnp.int32)
            hidden, cache = module.apply({"params": params}, tok[:, None], s.position[:, None], active[:, None],
                                         s.cache, return_hidden=True)
            logits = jnp.where(active[:, None], last_logits(params, hidden), s.logits)
            stop = jnp.any(tok[:, None] == eos[None, :], axis=-1) & active
            s = s.replace(
                tokens=constrain(_put(s.tokens, tok[:, None], s.col), ("batch", "length")),
                loss_mask=constrain(_put(s.loss_mask, live[:, None], s.col), ("batch", "length")),
                context_mask=constrain(_put(s.context_mask, live[:, None], s.col), ("batch", "length")),
                logprobs=_put(s.logprobs, jnp.where(active, lp, 0.0)[:, None], s.col),
                raw_logprobs=_put(s.raw_logprobs, jnp.where(active, raw, 0.0)[:, None], s.col),
                col=s.col + 1, cache=cache, logits=constrain(logits, ("batch", "vocab")),
                position=s.position + live, ended_turn=s.ended_turn | stop)
            return s, active & ~stop

        st = st.replace(turn_start=st.col, ended_turn=jnp.zeros_like(st.ended_turn))
        st, _ = jax.lax.while_loop(cond, body, (st, ~st.finished))
        return st

    def observe(params, st: TurnState, obs, obs_mask) -> TurnState:
        """Appends [R, O] observation tokens (right-aligned: obs_mask 0 on the left padding, and on every column
        of a row without one) at column st.col and prefills them into the cache; each row with an observation
        then predicts from its last one, the block's last column. The caller checks st.col + O <= N."""
        params = prep(params)
        obs = constrain(obs.astype(jnp.int32), ("batch", "length"))
        m = constrain(obs_mask.astype(jnp.int32), ("batch", "length"))
        n_obs = jnp.sum(m, axis=-1)
        positions = st.position[:, None] + jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)
        hidden, cache = module.apply({"params": params}, obs, positions, m.astype(jnp.bool_), st.cache,
                                     return_hidden=True)
        logits = jnp.where((n_obs > 0)[:, None], last_logits(params, hidden[:, -1:]), st.logits)
        return st.replace(
            tokens=constrain(_put(st.tokens, jnp.where(m > 0, obs, pad), st.col), ("batch", "length")),
            context_mask=constrain(_put(st.context_mask, m, st.col), ("batch", "length")),
            col=st.col + obs.shape[1], cache=cache, logits=constrain(logits, ("batch", "vocab")),
            position=st.position + n_obs)

    return MultiTurnSampler(start=_jit(start, env), turn=_jit(turn, env, donate=(1,)),
                            observe=_jit(observe, env, donate=(1,)), sampling=sampling, obs_tokens=obs_tokens)


def _jit(fn, env: ShardingEnv | None, donate: tuple[int, ...] = ()):
    """`jax.jit(fn)`, traced inside `env.activate()` (activations placed by logical axes) when given."""
    if env is None:
        return jax.jit(fn, donate_argnums=donate)

    def traced(*a):
        with env.activate():
            return fn(*a)
    return jax.jit(traced, donate_argnums=donate)
