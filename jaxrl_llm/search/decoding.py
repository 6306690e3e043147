"""Step-by-step decoding with a persistent KV cache: the building block of every tree search here.

    dec = StepDecoder(module, model_cfg, StepConfig(step_tokens=16, max_steps=8, temperature=1.0,
                                                    eos_token_ids=(2,)), step_ends=table)   # table: bool [V]
    state = dec.start(params, prompt_tokens, prompt_mask, n=4)     # [B, P] -> B * 4 rows, prefilled once each
    state, step = dec.extend(params, state, key)                   # every live row writes its next step
    state = dec.select(state, rows)                                # keep / repeat rows (beam selection)
    state = dec.append(params, state, tokens, mask)                # feed given tokens (a tree path) to rows

A *step* is the tokens a row writes up to and including the first token whose text contains the step
separator (`step_ends[token]`, see `algos.prm.step_end_table`), an EOS, or `step_tokens` tokens, whichever
comes first. A row that has emitted an EOS, or whose buffer of `max_steps * step_tokens` generated tokens is
full, is done and writes nothing more.

Everything is static-shaped: a `SearchState` of R rows keeps the prompts [R, P], the generated tokens
[R, M] (M = max_steps * step_tokens, compact and right-padded), and one KV cache of P + M slots. `extend`
runs a `lax.while_loop` of at most `step_tokens` decode steps (it stops once every row has ended its step);
rows that end early feed masked slots, so the cache index advances by the longest step of the batch and
never by more than M in all. `select` gathers rows (of the cache too), so a beam's prefix is never
re-encoded. Each method compiles once per (R, P) and never per step or per problem.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.errors import ConfigError
from jaxrl_llm.models.api import init_fn_for
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.layers import matmul_weights
from jaxrl_llm.models.transformer import KVCache, positions_from_mask, unstack_layers
from jaxrl_llm.rollout.sampling import SamplingConfig, process_logits, sample_tokens
from jaxrl_llm.sharding.params import param_shardings as _param_shardings
from jaxrl_llm.sharding.rules import ShardingEnv, constrain


def check_count(where: str, minimum: int = 1, **values) -> None:
    """Raises a ConfigError naming `where.name` for any value that is not an integer >= minimum (a search's
    budgets and sizes)."""
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ConfigError(f"{where}.{name}={v!r}: must be an integer >= {minimum}")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """How steps are sampled.

    step_tokens: the most tokens one step may have (a longer step is cut there and counts as ended).
    max_steps: the most steps a row may write; the generated buffer has max_steps * step_tokens slots.
    temperature, top_k, top_p, eos_token_ids, pad_token_id: as in `rollout.SamplingConfig`.
    """

    step_tokens: int = 16
    max_steps: int = 8
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        check_count("StepConfig", step_tokens=self.step_tokens, max_steps=self.max_steps)
        # The sampling fields are checked (and normalised) by SamplingConfig's own rules.
        sc = self.sampling()
        object.__setattr__(self, "eos_token_ids", sc.eos_token_ids)
        object.__setattr__(self, "temperature", sc.temperature)
        object.__setattr__(self, "top_p", sc.top_p)

    @property
    def max_new_tokens(self) -> int:
        return self.step_tokens * self.max_steps

    def sampling(self, **kw) -> SamplingConfig:
        """The equivalent `SamplingConfig` (for whole-solution sampling with the same policy settings)."""
        return SamplingConfig(**{"max_new_tokens": self.step_tokens * self.max_steps, "temperature": self.temperature,
                                 "top_k": self.top_k, "top_p": self.top_p, "eos_token_ids": self.eos_token_ids,
                                 "pad_token_id": self.pad_token_id, **kw})


@flax.struct.dataclass
class SearchState:
    """R rows of partial solutions.

    prompt_tokens / prompt_mask: int32 [R, P], left-padded.
    tokens: int32 [R, M], the generated tokens, compact from column 0; pad after `lengths`.
    lengths: int32 [R]; num_steps: int32 [R], steps written; done: bool [R] (EOS emitted or buffer full);
    finished: bool [R], an EOS was emitted.
    logprob: float32 [R], the sum of the generated tokens' log-probs under softmax(logits / T)
        (temperature 1 when greedy): the policy's likelihood of the partial solution.
    cache: the KV cache of prompt + generated tokens (P + M slots; slots of masked tokens are empty).
    logits: float32 [R, V], predicting each row's next token; position: int32 [R], its RoPE position.
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    lengths: jax.Array
    num_steps: jax.Array
    done: jax.Array
    finished: jax.Array
    logprob: jax.Array
    cache: KVCache
    logits: jax.Array
    position: jax.Array

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def mask(self) -> jax.Array:
        """int32 [R, M], 1 for generated tokens."""
        return (jnp.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]).astype(jnp.int32)

    def sequences(self) -> tuple[jax.Array, jax.Array]:
        """(tokens, mask) of prompt + generated tokens, [R, P + M], e.g. for a reward model's forward."""
        return (jnp.concatenate([self.prompt_tokens, self.tokens], axis=1),
                jnp.concatenate([self.prompt_mask, self.mask], axis=1))


@flax.struct.dataclass
class Step:
    """The step each row wrote in one `extend`: tokens / mask [R, L] (L = step_tokens), logprob [R] (sum,
    as SearchState.logprob), ended [R]: the step ended with a separator token or an EOS (False: cut at L tokens,
    or the row wrote nothing because it was done)."""

    tokens: jax.Array
    mask: jax.Array
    logprob: jax.Array
    ended: jax.Array


_ROW_AXES = {"prompt_tokens": ("batch", "length"), "prompt_mask": ("batch", "length"),
             "tokens": ("batch", "length"), "lengths": ("batch",), "num_steps": ("batch",), "done": ("batch",),
             "finished": ("batch",), "logprob": ("batch",), "logits": ("batch", "vocab"), "position": ("batch",)}


def _constrain_rows(state: SearchState) -> SearchState:
    return state.replace(**{k: constrain(getattr(state, k), ax) for k, ax in _ROW_AXES.items()})


def _put_rows(buf: jax.Array, cols: jax.Array, values: jax.Array, write: jax.Array) -> jax.Array:
    """buf[r, cols[r]] = values[r] where write[r] ([R, M] buffer, one column per row)."""
    hit = (jnp.arange(buf.shape[1])[None, :] == cols[:, None]) & write[:, None]
    return jnp.where(hit, values[:, None].astype(buf.dtype), buf)


class StepDecoder:
    """Jitted prefill / extend / select / append over a `SearchState` (see the module docstring).

    step_ends: bool [V] (numpy or jax), True for tokens that end a step (their text contains the separator).
    env: a ShardingEnv: the functions are traced inside it, so rows are sharded over the data axes like the
        sampler's (results equal the single-device ones); params are placed by `param_shardings` (computed
        from the module when None; a no-op for params already placed so).
    """

    def __init__(self, module: nn.Module, model_cfg: ModelConfig, cfg: StepConfig, step_ends: Any,
                 env: ShardingEnv | None = None, param_shardings: Any = None):
        if not isinstance(cfg, StepConfig):
            raise TypeError(f"cfg must be a StepConfig, got {type(cfg).__name__}")
        cfg.sampling().check_vocab(model_cfg.vocab_size)
        step_ends = np.asarray(step_ends, bool)
        if step_ends.shape != (model_cfg.vocab_size,):
            raise ConfigError(f"step_ends has shape {step_ends.shape}; expected ({model_cfg.vocab_size},), one "
                              "flag per token of the model's vocabulary (algos.prm.step_end_table)")
        self.module, self.model_cfg, self.cfg, self.env = module, model_cfg, cfg, env
        self._step_ends = step_ends
        if env is not None and param_shardings is None:
            _, param_shardings = _param_shardings(init_fn_for(module), env)
        self._param_shardings = param_shardings
        self.start = self._jit(self._start, static_argnames=("n",))
        self.extend = self._jit(self._extend)
        self.select = self._jit(self._select)
        self.append = self._jit(self._append)

    def _jit(self, fn, **kw):
        env = self.env
        if env is None:
            return jax.jit(fn, **kw)

        @functools.wraps(fn)
        def traced(*a, **k):
            with env.activate():
                return fn(*a, **k)
        jitted = jax.jit(traced, **kw)

        def call(*a, **k):
            if fn.__name__ != "_select":  # every other method takes params first
                a = (jax.device_put(a[0], self._param_shardings),) + a[1:]
            return jitted(*a, **k)
        return call

    # ---------------------------------------------------------------------------------------------- pieces
    def _decode_params(self, params):
        params = unstack_layers(params)  # once per call, outside the decode loop (see rollout.sampler)
        return matmul_weights(params, self.model_cfg)

    def _forward(self, params, tokens, positions, mask, cache):
        """Hidden states of `tokens` [R, T] written into `cache`; returns (hidden [R, T, E], cache)."""
        return self.module.apply({"params": params}, tokens, positions, mask, cache, return_hidden=True)

    def _logits(self, params, hidden_r1e):
        logits = self.module.apply({"params": params}, hidden_r1e, method="logits")
        return constrain(logits[:, 0].astype(jnp.float32), ("batch", "vocab"))

    # ---------------------------------------------------------------------------------------------- methods
    def _start(self, params, prompt_tokens, prompt_mask, n: int = 1) -> SearchState:
        """Prefill each prompt once and repeat its cache for n rows (prompt i -> rows i*n .. i*n+n-1)."""
        cfg, mcfg = self.cfg, self.model_cfg
        b, p = prompt_tokens.shape
        m = cfg.max_new_tokens
        if p + m > mcfg.max_position_embeddings:
            raise ConfigError(f"prompt length {p} + max_steps * step_tokens = {p + m} exceeds the model's "
                              f"max_position_embeddings={mcfg.max_position_embeddings}; shorten the prompts or "
                              "lower StepConfig.max_steps / step_tokens")
        params = self._decode_params(params)
        prompt_tokens = constrain(prompt_tokens.astype(jnp.int32), ("batch", "length"))
        prompt_mask = constrain(prompt_mask.astype(jnp.int32), ("batch", "length"))
        cache = KVCache.zeros(mcfg, b, p + m)
        hidden, cache = self._forward(params, prompt_tokens, positions_from_mask(prompt_mask),
                                      prompt_mask.astype(jnp.bool_), cache)
        logits = self._logits(params, hidden[:, -1:])
        rows = b * n
        rep = (lambda a: jnp.repeat(a, n, axis=0)) if n > 1 else (lambda a: a)
        zeros_i = jnp.zeros((rows,), jnp.int32)
        state = SearchState(
            prompt_tokens=rep(prompt_tokens), prompt_mask=rep(prompt_mask),
            tokens=jnp.full((rows, m), cfg.pad_token_id, jnp.int32), lengths=zeros_i, num_steps=zeros_i,
            done=jnp.zeros((rows,), jnp.bool_), finished=jnp.zeros((rows,), jnp.bool_),
            logprob=jnp.zeros((rows,), jnp.float32), cache=cache.repeat(n) if n > 1 else cache,
            logits=rep(logits), position=rep(jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32)))
        return _constrain_rows(state)

    def _extend(self, params, state: SearchState, key) -> tuple[SearchState, Step]:
        """Every row that is not done writes one step (at most `step_tokens` tokens)."""
        cfg = self.cfg
        L, m, pad = cfg.step_tokens, cfg.max_new_tokens, cfg.pad_token_id
        params = self._decode_params(params)
        eos = jnp.asarray(cfg.eos_token_ids or (-1,), jnp.int32)
        ends = jnp.asarray(self._step_ends)
        rows = state.rows
        rng = jax.random.fold_in(key, 0)

        def cond(c):
            t, s, step, active = c
            return (t < L) & jnp.any(active) & (s.cache.index < s.cache.length)

        def body(c):
            t, s, step, active = c
            logp, raw = process_logits(s.logits, cfg.temperature, cfg.top_k, cfg.top_p)
            tok = sample_tokens(jax.random.fold_in(rng, t), logp, raw, cfg.temperature == 0.0)
            lp = jnp.take_along_axis(raw, tok[:, None], axis=-1)[:, 0]
            tok = jnp.where(active, tok, pad)
            is_eos = jnp.any(tok[:, None] == eos[None, :], axis=-1) & active
            ended = (ends[tok] & active) | is_eos
            hidden, cache = self._forward(params, tok[:, None], s.position[:, None], active[:, None], s.cache)
            lengths = s.lengths + active.astype(jnp.int32)
            full = lengths >= m
            s = s.replace(
                tokens=_put_rows(s.tokens, s.lengths, tok, active),
                lengths=lengths,
                logprob=s.logprob + jnp.where(active, lp, 0.0),
                finished=s.finished | is_eos,
                done=s.done | is_eos | (full & active),
                cache=cache, logits=jnp.where(active[:, None], self._logits(params, hidden), s.logits),
                position=s.position + active.astype(jnp.int32))
            step = step.replace(
                tokens=_put_rows(step.tokens, jnp.full((rows,), t), tok, active),
                mask=_put_rows(step.mask, jnp.full((rows,), t), jnp.ones((rows,), jnp.int32), active),
                logprob=step.logprob + jnp.where(active, lp, 0.0),
                ended=step.ended | ended)
            return t + 1, _constrain_rows(s), step, active & ~ended & ~full

        live = ~state.done
        step0 = Step(tokens=jnp.full((rows, L), pad, jnp.int32), mask=jnp.zeros((rows, L), jnp.int32),
                     logprob=jnp.zeros((rows,), jnp.float32), ended=jnp.zeros((rows,), jnp.bool_))
        _, s, step, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state, step0, live))
        wrote = jnp.sum(step.mask, axis=-1) > 0
        s = s.replace(num_steps=s.num_steps + wrote.astype(jnp.int32))
        # A row with no room left for a token (its buffer, or the shared cache after appends) is done too.
        s = s.replace(done=s.done | (s.lengths >= m) | (s.cache.index >= s.cache.length))
        return _constrain_rows(s), step

    def _select(self, state: SearchState, rows) -> SearchState:
        """The state of rows `rows` (int [R'], any order, repeats allowed): beam selection and expansion."""
        rows = rows.astype(jnp.int32)
        take = lambda a: jnp.take(a, rows, axis=0)  # noqa: E731
        cache = state.cache
        cache = KVCache(k=tuple(take(a) for a in cache.k), v=tuple(take(a) for a in cache.v),
                        mask=take(cache.mask), index=cache.index)
        fields = {k: take(getattr(state, k)) for k in _ROW_AXES}
        return _constrain_rows(state.replace(cache=cache, **fields))

    def _append(self, params, state: SearchState, tokens, mask) -> SearchState:
        """Feeds given tokens [R, T] (right-padded; `mask` 1 for real ones) to each row, as if the row had
        written them: a tree search's path from the root, prefilled in one forward on top of the cached
        prompt. Rows with no real token keep their logits. `num_steps` and `logprob` are not updated (the
        caller knows the path's steps and their log-probs); a token that is an EOS marks the row finished and
        done. The cache index advances by T for every row, so a path of T columns leaves room for
        (P + M - index - T) more decoded tokens; `extend` stops a row (done) when the cache is full."""
        cfg, m = self.cfg, self.cfg.max_new_tokens
        params = self._decode_params(params)
        tokens = tokens.astype(jnp.int32)
        mask = mask.astype(jnp.int32)
        r, t = tokens.shape
        if t > m:
            raise ConfigError(f"append: {t} tokens per row is more than the generated buffer's "
                              f"max_steps * step_tokens = {m}")
        fwd = lambda *a: self._forward(params, *a)  # noqa: E731
        h_last, cache, position, n = feed_tokens(fwd, state.cache, state.position, tokens, mask)
        logits = jnp.where((n > 0)[:, None], self._logits(params, h_last), state.logits)
        # Write the tokens into the compact buffer after each row's current length.
        cols = state.lengths[:, None] + jnp.arange(t)[None, :]
        hit = (jnp.arange(m)[None, None, :] == cols[:, :, None]) & (mask[:, :, None] > 0)  # [R, T, M]
        buf = jnp.where(jnp.any(hit, axis=1), jnp.sum(jnp.where(hit, tokens[:, :, None], 0), axis=1),
                        state.tokens)
        eos = jnp.asarray(cfg.eos_token_ids or (-1,), jnp.int32)
        got_eos = jnp.any((tokens[:, :, None] == eos[None, None, :]) & (mask[:, :, None] > 0), axis=(1, 2))
        lengths = state.lengths + n
        return _constrain_rows(state.replace(
            tokens=buf, lengths=lengths, finished=state.finished | got_eos,
            done=state.done | got_eos | (lengths >= m), cache=cache, logits=logits, position=position))


def feed_tokens(forward, cache: KVCache, position, tokens, mask):
    """Feeds right-padded tokens [R, T] (`mask` 1 for real ones) into `cache` after each row's `position`:
    `forward(tokens, positions, mask, cache) -> (hidden [R, T, E], cache)` is the model's cached forward.
    Returns (hidden of each row's last real token [R, 1, E] (row 0's column for a row with none), the cache,
    the advanced positions [R], the number of real tokens [R])."""
    n = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    positions = position[:, None] + jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    hidden, cache = forward(tokens, positions, mask.astype(jnp.bool_), cache)
    last = jnp.maximum(n - 1, 0)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1), cache, position + n, n
