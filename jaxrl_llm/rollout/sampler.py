"""The jitted sampler: prefill with a KV cache, then a `lax.while_loop` decode with early exit.

    sampler = make_sampler(module, model_cfg, SamplingConfig(max_new_tokens=128, temperature=1.0,
                                                             n_samples=4, eos_token_ids=(2,)), env=env)
    rollout = sampler(params, prompt_tokens, prompt_mask, rng)   # prompts [B, P], left-padded

Shapes are static: the completion buffer always has N = max_new_tokens columns;
the loop stops as soon as every row has emitted an EOS (or after N steps).
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
from jaxrl_llm.models.transformer import KVCache, positions_from_mask, unstack_layers
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
    num_steps:     int32 [], decode steps run (< N when every row finished early).
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
    done: jax.Array          # bool [B], the row has emitted an EOS
    lengths: jax.Array       # int32 [B]
    cache: KVCache
    logits: jax.Array        # float32 [B, V], predicting the token of `step`
    position: jax.Array      # int32 [B], RoPE position of the token of `step`


_BATCH_AXES = {
    "prompt_tokens": ("batch", "length"), "prompt_mask": ("batch", "length"),
    "tokens": ("batch", "length"), "mask": ("batch", "length"), "logprobs": ("batch", "length"),
    "raw_logprobs": ("batch", "length"), "lengths": ("batch",), "finished": ("batch",),
}


def decode_fn(module: nn.Module, model_cfg: ModelConfig, sampling: SamplingConfig):
    """The pure sampling function (params, prompt_tokens, prompt_mask, rng) -> Rollout."""
    n_new, n_rep = sampling.max_new_tokens, sampling.n_samples
    eos = jnp.asarray(sampling.eos_token_ids or (-1,), jnp.int32)  # -1 never matches a token
    pad = sampling.pad_token_id
    greedy = sampling.greedy

    def next_logits(params, hidden_bte):
        logits = module.apply({"params": params}, hidden_bte[:, -1:], method="logits")
        return constrain(logits[:, 0].astype(jnp.float32), ("batch", "vocab"))

    def run(params, prompt_tokens, prompt_mask, rng) -> Rollout:
        b, p = prompt_tokens.shape
        if prompt_mask.shape != (b, p):
            raise ValueError(f"prompt_mask shape {prompt_mask.shape} != prompt_tokens shape {(b, p)}")
        if p + n_new > model_cfg.max_position_embeddings:
            raise ValueError(
                f"prompt length {p} + max_new_tokens {n_new} = {p + n_new} exceeds the model's "
                f"max_position_embeddings={model_cfg.max_position_embeddings}; shorten the prompts "
                "or lower SamplingConfig.max_new_tokens")
        tokens_bp = constrain(jnp.repeat(prompt_tokens.astype(jnp.int32), n_rep, axis=0), ("batch", "length"))
        mask_bp = constrain(jnp.repeat(prompt_mask.astype(jnp.int32), n_rep, axis=0), ("batch", "length"))
        rows = b * n_rep

        if sampling.split_layer_weights:
            params = unstack_layers(params)  # once, outside the decode loop
        params = matmul_weights(params, model_cfg)  # cast once, outside the decode loop
        ends = sampling.segment_ends
        # Prefill each distinct prompt once, then repeat its cache for its n_samples rows.
        cache = KVCache.zeros(model_cfg, b, p + ends[0])
        prompt_tokens = constrain(prompt_tokens.astype(jnp.int32), ("batch", "length"))
        prompt_mask = constrain(prompt_mask.astype(jnp.int32), ("batch", "length"))
        hidden, cache = module.apply({"params": params}, prompt_tokens, positions_from_mask(prompt_mask),
                                     prompt_mask.astype(jnp.bool_), cache, return_hidden=True)
        logits = next_logits(params, hidden)
        if n_rep > 1:
            cache = cache.repeat(n_rep)
            logits = constrain(jnp.repeat(logits, n_rep, axis=0), ("batch", "vocab"))
        start = constrain(jnp.sum(mask_bp, axis=-1, dtype=jnp.int32), ("batch",))
        # Every step's RoPE cos/sin [rows, N, head_dim / 2], once: step s reads column s.
        cos_all, sin_all = rope_tables(model_cfg, start[:, None] + jnp.arange(n_new, dtype=jnp.int32)[None, :])
        zeros_f = constrain(jnp.zeros((rows, n_new), jnp.float32), ("batch", "length"))
        state = _DecodeState(
            step=jnp.zeros((), jnp.int32),
            tokens=constrain(jnp.full((rows, n_new), pad, jnp.int32), ("batch", "length")),
            logprobs=zeros_f, raw_logprobs=zeros_f,
            done=constrain(jnp.zeros((rows,), jnp.bool_), ("batch",)),
            lengths=constrain(jnp.zeros((rows,), jnp.int32), ("batch",)),
            cache=cache,
            logits=logits,
            position=start,
        )

        def cond_until(end):
            return lambda s: (s.step < end) & ~jnp.all(s.done)

        def pick(s: _DecodeState):
            """Samples the token of `s.step` from `s.logits` and records it: (state without the forward, live)."""
            logp_bv, raw_bv = process_logits(s.logits, sampling.temperature, sampling.top_k, sampling.top_p)
            tok = sample_tokens(jax.random.fold_in(rng, s.step), logp_bv, raw_bv, greedy)
            live = ~s.done
            lp = jnp.take_along_axis(logp_bv, tok[:, None], axis=-1)[:, 0]
            raw = jnp.take_along_axis(raw_bv, tok[:, None], axis=-1)[:, 0]
            tok = jnp.where(live, tok, pad)
            put = lambda buf, col: jax.lax.dynamic_update_slice(  # noqa: E731
                buf, col[:, None].astype(buf.dtype), (0, s.step))
            return s.replace(
                step=s.step + 1,
                tokens=constrain(put(s.tokens, tok), ("batch", "length")),
                logprobs=constrain(put(s.logprobs, jnp.where(live, lp, 0.0)), ("batch", "length")),
                raw_logprobs=constrain(put(s.raw_logprobs, jnp.where(live, raw, 0.0)), ("batch", "length")),
                done=s.done | jnp.any(tok[:, None] == eos[None, :], axis=-1),
                lengths=s.lengths + live.astype(jnp.int32),
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
        mask = (jnp.arange(n_new)[None, :] < s.lengths[:, None]).astype(jnp.int32)
        return Rollout(prompt_tokens=tokens_bp, prompt_mask=mask_bp, tokens=s.tokens,
                       mask=constrain(mask, ("batch", "length")), logprobs=s.logprobs,
                       raw_logprobs=s.raw_logprobs, lengths=s.lengths, finished=s.done,
                       num_steps=s.step)

    return run


def make_sampler(module: nn.Module, model_cfg: ModelConfig, sampling: SamplingConfig,
                 env: ShardingEnv | None = None, param_shardings: Any = None) -> Callable[..., Rollout]:
    """Returns `sampler(params, prompt_tokens [B, P] int32 left-padded, prompt_mask [B, P], rng) -> Rollout`.

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

    def traced(params, prompt_tokens, prompt_mask, rng):
        with env.activate():
            return run(params, prompt_tokens, prompt_mask, rng)

    @functools.lru_cache(maxsize=16)
    def jitted_for(prompt_shape: tuple[int, int]):
        b, p = prompt_shape
        rows, n_new = b * sampling.n_samples, sampling.max_new_tokens
        shapes = {"prompt_tokens": (rows, p), "prompt_mask": (rows, p), "tokens": (rows, n_new),
                  "mask": (rows, n_new), "logprobs": (rows, n_new), "raw_logprobs": (rows, n_new),
                  "lengths": (rows,), "finished": (rows,)}
        replicated = NamedSharding(env.mesh, PartitionSpec())
        out = Rollout(**{k: env.sharding(_BATCH_AXES[k], shapes[k]) for k in shapes}, num_steps=replicated)
        prompt = env.sharding(("batch", "length"), (b, p))
        return jax.jit(traced, in_shardings=(param_shardings, prompt, prompt, replicated), out_shardings=out)

    def sampler(params, prompt_tokens, prompt_mask, rng) -> Rollout:
        return jitted_for(tuple(prompt_tokens.shape))(params, prompt_tokens, prompt_mask, rng)

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
