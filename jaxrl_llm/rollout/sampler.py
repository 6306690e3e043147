"""The jitted sampler: prefill with a KV cache, then a `lax.while_loop` decode with early exit.

    sampler = make_sampler(module, model_cfg, SamplingConfig(max_new_tokens=128, temperature=1.0,
                                                             n_samples=4, eos_token_ids=(2,)), env=env)
    rollout = sampler(params, prompt_tokens, prompt_mask, rng)   # prompts [B, P], left-padded

Shapes are static: the completion buffer always has N = max_new_tokens columns;
the loop stops as soon as every row has emitted an EOS (or after N steps).
With `SamplingConfig.slots` (continuous batching) S slots decode at once and a slot
whose completion ends takes the next pending one inside the same compiled loop.
No host sync and no Python loop over tokens. See docs/sampling.md.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl_llm.models.api import init_fn_for
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.layers import matmul_weights, rope_tables
from jaxrl_llm.models.transformer import CACHE_AXES, KVCache, positions_from_mask, unstack_layers
from jaxrl_llm.rollout.sampling import SamplingConfig, process_logits, sample_tokens
from jaxrl_llm.sharding.params import param_shardings as _param_shardings
from jaxrl_llm.sharding.rules import ShardingEnv, constrain


@flax.struct.dataclass
class Rollout:
    """Sampled completions; every batch array has B * n_samples rows (prompt i -> rows i*n .. i*n+n-1).

    prompt_tokens: int32 [B*n, P], the (left-padded) prompts, repeated.
    prompt_mask:   int32 [B*n, P], 1 for real prompt tokens.
    tokens:        int32 [B*n, N], the completion; pad_token_id after the first EOS (and after
                   the last step run, when decoding stopped early).
    mask:          int32 [B*n, N], 1 for completion tokens up to and including the first EOS.
    logprobs:      float32 [B*n, N], log-prob of each sampled token under the SAMPLING
                   distribution: softmax(logits / T) restricted to the top-k/top-p keep set and
                   renormalised. 0 where mask == 0.
    raw_logprobs:  float32 [B*n, N], log-prob under the full softmax(logits / T): what a training
                   forward recomputes with log_softmax(logits / temperature). 0 where mask == 0.
                   Greedy (T = 0): both fields are log_softmax(logits) (temperature 1).
    lengths:       int32 [B*n], number of completion tokens (= mask.sum(-1)).
    finished:      bool [B*n], the row emitted an EOS.
    num_steps:     int32 [], decode steps run: with a static batch, < N when every row finished early;
                   with continuous batching (`SamplingConfig.slots`), loop iterations, each decoding one
                   token in every busy slot.
    slot_steps:    int32 [], rows decoded over all steps (each step's width: every row of a static batch,
                   the slots of continuous batching, fewer once its tail is compacted); slot utilisation =
                   lengths.sum() / slot_steps (`slot_utilisation`). None from producers that do not count.
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    raw_logprobs: jax.Array
    lengths: jax.Array
    finished: jax.Array
    num_steps: jax.Array
    slot_steps: jax.Array | None = None

    def sequences(self) -> tuple[jax.Array, jax.Array]:
        """(tokens, mask) of prompt + completion, [B*n, P + N], for a training forward."""
        return (jnp.concatenate([self.prompt_tokens, self.tokens], axis=1),
                jnp.concatenate([self.prompt_mask, self.mask], axis=1))


@flax.struct.dataclass
class _DecodeState:
    step: jax.Array          # [] decode steps done
    tokens: jax.Array        # int32 [B, N]
    logprobs: jax.Array      # float32 [B, N]
    raw_logprobs: jax.Array  # float32 [B, N]
    done: jax.Array          # bool [B], the row has ended (an EOS, or its stop length)
    finished: jax.Array      # bool [B], the row has emitted an EOS
    lengths: jax.Array       # int32 [B]
    cache: KVCache
    logits: jax.Array        # float32 [B, V], predicting the token of `step`
    position: jax.Array      # int32 [B], RoPE position of the token of `step`


@flax.struct.dataclass
class _SlotState:
    """The continuous-batching loop: S slots, each holding one request (a row of the rollout) or none."""
    step: jax.Array          # [] loop iterations run (each decodes one token in every busy slot)
    next_request: jax.Array  # [] the next request not yet given a slot
    request: jax.Array       # int32 [S], the slot's request; R (out of range) when the slot is empty
    t: jax.Array             # int32 [S], tokens the slot's request has so far
    tokens: jax.Array        # int32 [R, N], every request's completion, in request order
    logprobs: jax.Array      # float32 [R, N]
    raw_logprobs: jax.Array  # float32 [R, N]
    finished: jax.Array      # bool [R], the request emitted an EOS
    lengths: jax.Array       # int32 [R]
    cache: KVCache           # S rows of P + N slots; index [S], each slot's next free column
    logits: jax.Array        # float32 [S, V], predicting the slot's next token
    position: jax.Array      # int32 [S], RoPE position of the slot's next token


# Continuous batching compacts its tail into batches half as wide, down to this fraction of the slots.
TAIL_MIN_WIDTH_FRACTION = 1 / 8

_BATCH_AXES = {
    "prompt_tokens": ("batch", "length"), "prompt_mask": ("batch", "length"),
    "tokens": ("batch", "length"), "mask": ("batch", "length"), "logprobs": ("batch", "length"),
    "raw_logprobs": ("batch", "length"), "lengths": ("batch",), "finished": ("batch",),
}


def decode_fn(module: nn.Module, model_cfg: ModelConfig, sampling: SamplingConfig):
    """The pure sampling function (params, prompt_tokens, prompt_mask, rng, stop_lengths=None) -> Rollout.

    Row r (prompt r // n_samples) draws the token of its step t with the key fold_in(fold_in(rng, r), t):
    a completion's tokens depend on its row, its prompt and the key only, not on which rows share the
    batch, so the static batch and the continuous-batching engine (`sampling.slots`) give the same rollout.
    `stop_lengths` (int32 [B * n_samples], optional): a completion ends after that many tokens unless it
    emits an EOS first (a per-request budget <= max_new_tokens; `finished` stays False for it).
    """
    n_new, n_rep = sampling.max_new_tokens, sampling.n_samples
    eos = jnp.asarray(sampling.eos_token_ids or (-1,), jnp.int32)  # -1 never matches a token
    pad = sampling.pad_token_id
    greedy = sampling.greedy

    def next_logits(params, hidden_bte):
        logits = module.apply({"params": params}, hidden_bte[:, -1:], method="logits")
        return constrain(logits[:, 0].astype(jnp.float32), ("batch", "vocab"))

    def draw(logits_sv, keys_s):
        """(token, its sampling log-prob, its raw log-prob) per row from float32 logits [S, V]."""
        logp_bv, raw_bv = process_logits(logits_sv, sampling.temperature, sampling.top_k, sampling.top_p)
        tok = sample_tokens(keys_s, logp_bv, raw_bv, greedy, per_row=True)
        lp = jnp.take_along_axis(logp_bv, tok[:, None], axis=-1)[:, 0]
        raw = jnp.take_along_axis(raw_bv, tok[:, None], axis=-1)[:, 0]
        return tok, lp, raw

    def prefill(params, prompt_tokens, prompt_mask, cache_length):
        """Params ready for the decode loop and each distinct prompt's (cache, next-token logits)."""
        b, p = prompt_tokens.shape
        if prompt_mask.shape != (b, p):
            raise ValueError(f"prompt_mask shape {prompt_mask.shape} != prompt_tokens shape {(b, p)}")
        if p + n_new > model_cfg.max_position_embeddings:
            raise ValueError(
                f"prompt length {p} + max_new_tokens {n_new} = {p + n_new} exceeds the model's "
                f"max_position_embeddings={model_cfg.max_position_embeddings}; shorten the prompts "
                "or lower SamplingConfig.max_new_tokens")
        if sampling.split_layer_weights:
            params = unstack_layers(params)  # once, outside the decode loop
        params = matmul_weights(params, model_cfg)  # cast once, outside the decode loop
        cache = KVCache.zeros(model_cfg, b, cache_length)
        prompt_tokens = constrain(prompt_tokens.astype(jnp.int32), ("batch", "length"))
        prompt_mask = constrain(prompt_mask.astype(jnp.int32), ("batch", "length"))
        hidden, cache = module.apply({"params": params}, prompt_tokens, positions_from_mask(prompt_mask),
                                     prompt_mask.astype(jnp.bool_), cache, return_hidden=True)
        return params, cache, next_logits(params, hidden)

    def empty_outputs(rows: int) -> dict:
        """The completion buffers of `rows` rows, before any step (fields of both loop states)."""
        zeros_f = constrain(jnp.zeros((rows, n_new), jnp.float32), ("batch", "length"))
        return dict(tokens=constrain(jnp.full((rows, n_new), pad, jnp.int32), ("batch", "length")),
                    logprobs=zeros_f, raw_logprobs=zeros_f,
                    finished=constrain(jnp.zeros((rows,), jnp.bool_), ("batch",)),
                    lengths=constrain(jnp.zeros((rows,), jnp.int32), ("batch",)))

    def rollout(st, tokens_bp, mask_bp, slot_steps) -> Rollout:
        """The Rollout from a finished loop state (either kind)."""
        mask = (jnp.arange(n_new)[None, :] < st.lengths[:, None]).astype(jnp.int32)
        return Rollout(prompt_tokens=tokens_bp, prompt_mask=mask_bp, tokens=st.tokens,
                       mask=constrain(mask, ("batch", "length")), logprobs=st.logprobs,
                       raw_logprobs=st.raw_logprobs, lengths=st.lengths, finished=st.finished,
                       num_steps=st.step, slot_steps=slot_steps)

    def run(params, prompt_tokens, prompt_mask, rng, stop_lengths=None) -> Rollout:
        b, p = prompt_tokens.shape
        rows = b * n_rep
        tokens_bp = constrain(jnp.repeat(prompt_tokens.astype(jnp.int32), n_rep, axis=0), ("batch", "length"))
        mask_bp = constrain(jnp.repeat(prompt_mask.astype(jnp.int32), n_rep, axis=0), ("batch", "length"))
        limit = (jnp.full((rows,), n_new, jnp.int32) if stop_lengths is None
                 else jnp.clip(jnp.asarray(stop_lengths, jnp.int32).reshape(rows), 1, n_new))
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(rows, dtype=jnp.int32))
        if 0 < sampling.slots < rows:
            return continuous(params, prompt_tokens, prompt_mask, tokens_bp, mask_bp, limit, row_keys)
        return static(params, prompt_tokens, prompt_mask, tokens_bp, mask_bp, limit, row_keys)

    def static(params, prompt_tokens, prompt_mask, tokens_bp, mask_bp, limit, row_keys) -> Rollout:
        """Every row in the batch from the start; the loop runs until every row has ended."""
        b, p = prompt_tokens.shape
        rows = b * n_rep
        ends = sampling.segment_ends
        # Prefill each distinct prompt once, then repeat its cache for its n_samples rows.
        params, cache, logits = prefill(params, prompt_tokens, prompt_mask, p + ends[0])
        if n_rep > 1:
            cache = cache.repeat(n_rep)
            logits = constrain(jnp.repeat(logits, n_rep, axis=0), ("batch", "vocab"))
        start = constrain(jnp.sum(mask_bp, axis=-1, dtype=jnp.int32), ("batch",))
        # Every step's RoPE cos/sin [rows, N, head_dim / 2], once: step s reads column s.
        cos_all, sin_all = rope_tables(model_cfg, start[:, None] + jnp.arange(n_new, dtype=jnp.int32)[None, :])
        state = _DecodeState(
            step=jnp.zeros((), jnp.int32), done=constrain(jnp.zeros((rows,), jnp.bool_), ("batch",)),
            **empty_outputs(rows), cache=cache, logits=logits, position=start)

        def cond_until(end):
            return lambda s: (s.step < end) & ~jnp.all(s.done)

        def pick(s: _DecodeState):
            """Samples the token of `s.step` from `s.logits` and records it: (state without the forward, live)."""
            tok, lp, raw = draw(s.logits, jax.vmap(jax.random.fold_in, (0, None))(row_keys, s.step))
            live = ~s.done
            tok = jnp.where(live, tok, pad)
            put = lambda buf, col: jax.lax.dynamic_update_slice(  # noqa: E731
                buf, col[:, None].astype(buf.dtype), (0, s.step))
            is_eos = live & jnp.any(tok[:, None] == eos[None, :], axis=-1)
            lengths = s.lengths + live.astype(jnp.int32)
            return s.replace(
                step=s.step + 1,
                tokens=constrain(put(s.tokens, tok), ("batch", "length")),
                logprobs=constrain(put(s.logprobs, jnp.where(live, lp, 0.0)), ("batch", "length")),
                raw_logprobs=constrain(put(s.raw_logprobs, jnp.where(live, raw, 0.0)), ("batch", "length")),
                done=s.done | is_eos | (lengths >= limit),
                finished=s.finished | is_eos,
                lengths=lengths,
            ), tok, live

        def body(s: _DecodeState) -> _DecodeState:
            s, tok, live = pick(s)
            # Feed the token back; a finished row's cache slot is masked out (it is never read).
            # pick advanced s.step: the token fed is step s.step - 1, its RoPE tables that column.
            rope = tuple(jax.lax.dynamic_slice_in_dim(a, s.step - 1, 1, axis=1) for a in (cos_all, sin_all))
            hidden, cache = module.apply({"params": params}, tok[:, None], s.position[:, None],
                                         live[:, None], s.cache, return_hidden=True, rope=rope)
            return s.replace(cache=cache, logits=next_logits(params, hidden), position=s.position + 1)

        # One loop per cache segment: the cache grows by a segment between them, so every step
        # attends over the slots filled so far (rounded up to its segment), not all P + N.
        # The last step only samples (its forward would feed a token nobody reads).
        s = state
        for j, end in enumerate(ends):
            if j:
                s = s.replace(cache=s.cache.grow(p + end))
            s = jax.lax.while_loop(cond_until(end - 1 if end == n_new else end), body, s)
        running = ~jnp.all(s.done)  # False when every row finished early: then the last pick records nothing
        last, _, _ = pick(s)
        s = last.replace(step=s.step + running.astype(jnp.int32))
        return rollout(s, tokens_bp, mask_bp, slot_steps=s.step * rows)

    def continuous(params, prompt_tokens, prompt_mask, tokens_bp, mask_bp, limit, row_keys) -> Rollout:
        """Continuous batching: `sampling.slots` rows decode at once; when a completion ends, its slot takes
        the next pending one (its prompt's prefilled keys/values copied into the slot) while the other slots
        keep decoding. One compiled loop; requests (rows) are taken in order, each prompt prefilled once."""
        b, p = prompt_tokens.shape
        rows, n_slots = b * n_rep, sampling.slots
        params, prompt_cache, prompt_logits = prefill(params, prompt_tokens, prompt_mask, p)
        start = constrain(jnp.sum(prompt_mask.astype(jnp.int32), axis=-1, dtype=jnp.int32), ("batch",))
        prompt_kv_mask = prompt_cache.mask

        def refill(st: _SlotState, take, req) -> _SlotState:
            """Slots where `take` start request `req` (its prompt's cache prefix and first logits)."""
            src = jnp.clip(req, 0, rows - 1) // n_rep  # the prompt of each slot's new request
            put4 = lambda a, pa: jnp.where(take[:, None, None, None], pa[src], a[:, :, :p])  # noqa: E731
            cache = st.cache
            ks = tuple(c.at[:, :, :p].set(put4(c, pc)) for c, pc in zip(cache.k, prompt_cache.k))
            vs = tuple(c.at[:, :, :p].set(put4(c, pc)) for c, pc in zip(cache.v, prompt_cache.v))
            fresh = jnp.concatenate([prompt_kv_mask[src], jnp.zeros((take.shape[0], n_new), jnp.bool_)], axis=1)
            cache = KVCache(k=tuple(constrain(a, CACHE_AXES) for a in ks),
                            v=tuple(constrain(a, CACHE_AXES) for a in vs),
                            mask=constrain(jnp.where(take[:, None], fresh, cache.mask), ("batch", "length")),
                            index=jnp.where(take, p, cache.index))
            return st.replace(cache=cache, logits=jnp.where(take[:, None], prompt_logits[src], st.logits),
                              position=jnp.where(take, start[src], st.position), t=jnp.where(take, 0, st.t))

        def admit(st: _SlotState, free) -> _SlotState:
            """Free slots take the next pending requests, in order."""
            rank = jnp.cumsum(free.astype(jnp.int32)) - 1
            req = st.next_request + rank
            take = free & (req < rows)
            st = st.replace(request=constrain(jnp.where(take, req, jnp.where(free, rows, st.request)), ("batch",)),
                            next_request=st.next_request + jnp.sum(take, dtype=jnp.int32))
            return jax.lax.cond(jnp.any(take), lambda s: refill(s, take, req), lambda s: s, st)

        cache = KVCache.zeros(model_cfg, n_slots, p + n_new)
        empty = jnp.full((n_slots,), rows, jnp.int32)  # `rows`: no request (out of range, writes are dropped)
        st = _SlotState(
            step=jnp.zeros((), jnp.int32), next_request=jnp.zeros((), jnp.int32),
            request=empty, t=jnp.zeros((n_slots,), jnp.int32), **empty_outputs(rows),
            cache=cache.replace(index=jnp.full((n_slots,), p, jnp.int32)),
            logits=jnp.zeros((n_slots, prompt_logits.shape[-1]), jnp.float32),
            position=jnp.zeros((n_slots,), jnp.int32))
        st = admit(st, jnp.ones((n_slots,), jnp.bool_))

        def body(st: _SlotState) -> _SlotState:
            busy = st.request < rows
            req = st.request
            row = jnp.clip(req, 0, rows - 1)  # an empty slot reads row rows-1's key and limit, records nothing
            tok, lp, raw = draw(st.logits, jax.vmap(jax.random.fold_in)(row_keys[row], st.t))
            is_eos = busy & jnp.any(tok[:, None] == eos[None, :], axis=-1)
            t1 = st.t + 1
            ended = busy & (is_eos | (t1 >= limit[row]))
            put = lambda buf, v: buf.at[req, st.t].set(v.astype(buf.dtype), mode="drop")  # noqa: E731
            st = st.replace(step=st.step + 1, t=t1,
                            tokens=put(st.tokens, tok), logprobs=put(st.logprobs, lp),
                            raw_logprobs=put(st.raw_logprobs, raw),
                            lengths=st.lengths.at[req].set(t1, mode="drop"),
                            finished=st.finished.at[req].set(is_eos, mode="drop"))
            feed = busy & ~ended
            rope = rope_tables(model_cfg, st.position[:, None])
            hidden, cache = module.apply({"params": params}, tok[:, None], st.position[:, None], feed[:, None],
                                         st.cache, return_hidden=True, rope=rope)
            st = st.replace(cache=cache, logits=next_logits(params, hidden), position=st.position + 1)
            return admit(st, ~feed)

        # The tail: once no request is pending and the busy slots fit in half the width, they move into a
        # batch half as wide (one copy of their cache rows), down to TAIL_MIN_WIDTH_FRACTION of the slots:
        # the last long completions do not keep every slot's forward running.
        widths = tail_widths(n_slots)
        slot_steps = jnp.zeros((), jnp.int32)
        for j, width in enumerate(widths):
            if j:
                st = compact(st, width, rows)
            narrower = widths[j + 1] if j + 1 < len(widths) else 0

            def cond(st, narrower=narrower):
                busy = jnp.sum(st.request < rows)
                return (busy > 0) & ~((st.next_request >= rows) & (busy <= narrower))

            before = st.step
            st = jax.lax.while_loop(cond, body, st)
            slot_steps = slot_steps + (st.step - before) * width
        return rollout(st, tokens_bp, mask_bp, slot_steps)

    def compact(st: _SlotState, width: int, rows: int) -> _SlotState:
        """The busy slots (at most `width`) moved to the front of a batch `width` slots wide."""
        order = jnp.argsort(st.request >= rows, stable=True)[:width]  # busy slots first, in slot order
        take = lambda a: constrain(a[order], ("batch",) + (None,) * (a.ndim - 1))  # noqa: E731
        cache = st.cache
        cache = KVCache(k=tuple(constrain(a[order], CACHE_AXES) for a in cache.k),
                        v=tuple(constrain(a[order], CACHE_AXES) for a in cache.v),
                        mask=constrain(cache.mask[order], ("batch", "length")), index=cache.index[order])
        return st.replace(request=take(st.request), t=take(st.t), cache=cache, logits=take(st.logits),
                          position=take(st.position))

    return run


def tail_widths(slots: int) -> tuple[int, ...]:
    """The widths continuous batching decodes at: `slots`, then halved while a half is a whole number of
    slots and at least TAIL_MIN_WIDTH_FRACTION of them (64 -> 64, 32, 16, 8): one compiled loop each."""
    widths = [slots]
    while widths[-1] % 2 == 0 and widths[-1] // 2 >= max(1, slots * TAIL_MIN_WIDTH_FRACTION):
        widths.append(widths[-1] // 2)
    return tuple(widths)


def slot_utilisation(rollout: Rollout) -> float:
    """Useful tokens / decoded slot-steps (`Rollout.slot_steps`): 1.0 = no decoded row was ever idle."""
    if rollout.slot_steps is None:
        raise ValueError("slot_utilisation: this rollout does not count its slot-steps (slot_steps is None)")
    steps = int(rollout.slot_steps)
    return float(jnp.sum(rollout.lengths)) / steps if steps else 1.0


def make_sampler(module: nn.Module, model_cfg: ModelConfig, sampling: SamplingConfig,
                 env: ShardingEnv | None = None, param_shardings: Any = None) -> Callable[..., Rollout]:
    """Returns `sampler(params, prompt_tokens [B, P] int32 left-padded, prompt_mask [B, P], rng,
    stop_lengths=None) -> Rollout` (`stop_lengths`: see `decode_fn`).

    Without `env` this is a plain `jax.jit`. With `env`, the function is traced
    inside `env.activate()` (so activations are placed by logical axes) and
    jitted with explicit shardings: params by `param_shardings` (computed from
    the module when None), batch arrays by logical ("batch", ...) axes, the key
    replicated. Batch shardings depend on B, so one jit is built (and cached)
    per prompt shape.
    """
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    sampling.check_vocab(model_cfg.vocab_size)
    run = decode_fn(module, model_cfg, sampling)
    if env is None:
        return jax.jit(run)

    if param_shardings is None:
        _, param_shardings = _param_shardings(init_fn_for(module), env)

    def traced(params, prompt_tokens, prompt_mask, rng, stop_lengths=None):
        with env.activate():
            return run(params, prompt_tokens, prompt_mask, rng, stop_lengths)

    @functools.lru_cache(maxsize=16)
    def jitted_for(prompt_shape: tuple[int, int], with_stop_lengths: bool = False):
        b, p = prompt_shape
        rows, n_new = b * sampling.n_samples, sampling.max_new_tokens
        shapes = {"prompt_tokens": (rows, p), "prompt_mask": (rows, p), "tokens": (rows, n_new),
                  "mask": (rows, n_new), "logprobs": (rows, n_new), "raw_logprobs": (rows, n_new),
                  "lengths": (rows,), "finished": (rows,)}
        replicated = NamedSharding(env.mesh, PartitionSpec())
        out = Rollout(**{k: env.sharding(_BATCH_AXES[k], shapes[k]) for k in shapes}, num_steps=replicated,
                      slot_steps=replicated)
        prompt = env.sharding(("batch", "length"), (b, p))
        ins = (param_shardings, prompt, prompt, replicated)
        if with_stop_lengths:
            ins += (env.sharding(("batch",), (rows,)),)
        return jax.jit(traced, in_shardings=ins, out_shardings=out)

    def sampler(params, prompt_tokens, prompt_mask, rng, stop_lengths=None) -> Rollout:
        args = (params, prompt_tokens, prompt_mask, rng) + (() if stop_lengths is None else (stop_lengths,))
        return jitted_for(tuple(prompt_tokens.shape), stop_lengths is not None)(*args)

    sampler.jitted_for = jitted_for  # e.g. sampler.jitted_for((B, P)).lower(...) to inspect HLO
    return sampler


@functools.lru_cache(maxsize=8)
def _cached_sampler(module, model_cfg, sampling, env):
    return make_sampler(module, model_cfg, sampling, env)


def sample(module: nn.Module, model_cfg: ModelConfig, params: Any, prompt_tokens: jax.Array,
           prompt_mask: jax.Array, rng: jax.Array, sampling: SamplingConfig,
           env: ShardingEnv | None = None) -> Rollout:
    """One-call convenience around `make_sampler` (the compiled sampler is cached per config)."""
    return _cached_sampler(module, model_cfg, sampling, env)(params, prompt_tokens, prompt_mask, rng)
