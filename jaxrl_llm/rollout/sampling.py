"""Sampling configuration and logit processing (temperature, top-k, top-p) on [B, V] logits.

Everything here is a pure function of float32 arrays. The keep-set of top-k and
top-p is defined by *rank* (position in one descending sort, ties broken by
the lower token id first), never by comparing with a threshold value, so a
token tied with the last kept one is still excluded when it falls outside the
rank limit.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxrl_llm.errors import ConfigError


# A cache segment shorter than this saves little attention reading for its extra compiled loop.
MIN_SEGMENT_STEPS = 16


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled. Frozen and hashable (a static argument of the jitted sampler).

    max_new_tokens: completion buffer length N (>= 1); decoding stops earlier once every row is done.
    temperature: >= 0. 0.0 means greedy (argmax of the raw logits; top_k/top_p are then ignored).
    top_k: keep the k highest-ranked tokens; 0 = off.
    top_p: nucleus sampling, in (0, 1]; keep the smallest rank-prefix whose probability mass
        reaches top_p (after top-k, renormalised); 1.0 = off.
    n_samples: completions per prompt (>= 1); rows i*n .. i*n+n-1 of the rollout belong to prompt i.
    eos_token_ids: token ids that end a completion (may be empty: then every row runs N steps).
    pad_token_id: written into the completion buffer after a row's first EOS.
    split_layer_weights: split the stacked layer weights into one array per layer once, before the
        decode loop (True, the default: the loop then reads each layer's weights in place; costs one
        extra copy of the layer weights while the sampler runs). False slices them inside every decode
        step instead (no extra copy; XLA copies each layer's slice every step, which is slower).
    cache_segments: decode in up to this many segments (>= 1) of equal length, each at least
        MIN_SEGMENT_STEPS steps (so max_new_tokens < 32 decodes in one). The KV cache starts with
        room for the prompt and the first segment and grows by one segment between them, so each
        step attends over the slots filled so far (rounded up to its segment) instead of all P + N:
        with 4 segments a full-length rollout reads about 5/8 of the keys/values that one P + N
        buffer would (when P is small against N). Costs one copy of the cache per segment boundary
        and, at the last one, the previous buffer beside the full one while it is copied; each
        segment's loop is compiled on its own. 1 = one buffer of P + N slots from the start.
        Applies to the static batch (slots = 0, or slots >= the rollout's rows).
    slots: continuous batching (>= 0; 0 = off). With 0 < slots < the rollout's rows (prompts x n_samples),
        `slots` completions decode at once and a slot whose completion ends takes the next pending one
        (its prompt's prefilled cache copied in) while the others keep decoding, so uneven lengths do not
        leave rows idle until the longest ends. Each slot's cache holds P + N positions (no segments);
        each distinct prompt is prefilled once. The rollout is the same as the static batch's (same rows,
        same order, same tokens for the same key: every row draws from its own key). With slots >= rows
        the static batch runs. See docs/sampling.md.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    n_samples: int = 1
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    split_layer_weights: bool = True
    cache_segments: int = 4
    slots: int = 0

    def __post_init__(self):
        def _is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ConfigError(
                f"SamplingConfig.max_new_tokens={self.max_new_tokens!r}: must be an integer >= 1")
        if (not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool)
                or not math.isfinite(self.temperature) or self.temperature < 0):
            raise ConfigError(f"SamplingConfig.temperature={self.temperature!r}: must be a finite number >= 0 "
                             "(0.0 = greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"SamplingConfig.top_k={self.top_k!r}: must be an integer >= 0 (0 = off)")
        if (not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool)
                or not 0.0 < self.top_p <= 1.0):
            raise ConfigError(f"SamplingConfig.top_p={self.top_p!r}: must be in (0, 1] (1.0 = off)")
        if not _is_int(self.n_samples) or self.n_samples < 1:
            raise ConfigError(f"SamplingConfig.n_samples={self.n_samples!r}: must be an integer >= 1")
        eos = self.eos_token_ids
        if _is_int(eos):
            eos = (eos,)
        try:
            eos = tuple(eos)
        except TypeError:
            raise ConfigError(f"SamplingConfig.eos_token_ids={self.eos_token_ids!r}: must be a tuple of "
                             "token ids >= 0") from None
        if not all(_is_int(e) and e >= 0 for e in eos):
            raise ConfigError(f"SamplingConfig.eos_token_ids={self.eos_token_ids!r}: must be a tuple of "
                             "token ids >= 0")
        # A list from a JSON config would make the config unhashable; store a tuple.
        object.__setattr__(self, "eos_token_ids", eos)
        if not _is_int(self.pad_token_id) or self.pad_token_id < 0:
            raise ConfigError(f"SamplingConfig.pad_token_id={self.pad_token_id!r}: must be an integer >= 0")
        if not isinstance(self.split_layer_weights, bool):
            raise ConfigError(f"SamplingConfig.split_layer_weights={self.split_layer_weights!r}: must be True or "
                             "False")
        if not _is_int(self.cache_segments) or self.cache_segments < 1:
            raise ConfigError(f"SamplingConfig.cache_segments={self.cache_segments!r}: must be an integer >= 1 "
                             "(1 = one KV-cache buffer for the whole rollout)")
        if not _is_int(self.slots) or self.slots < 0:
            raise ConfigError(f"SamplingConfig.slots={self.slots!r}: must be an integer >= 0 (0 = a static "
                             "batch; > 0 = continuous batching with that many decode slots)")
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def segment_ends(self) -> tuple[int, ...]:
        """Decode steps done at the end of each cache segment (the last is max_new_tokens)."""
        n = self.max_new_tokens
        k = max(1, min(self.cache_segments, n // MIN_SEGMENT_STEPS))
        return tuple(-(-n * (j + 1) // k) for j in range(k))

    def replace(self, **kw) -> "SamplingConfig":
        return dataclasses.replace(self, **kw)

    def check_vocab(self, vocab_size: int) -> None:
        """Raises if an EOS or pad id does not exist in a vocabulary of `vocab_size` tokens."""
        bad = [e for e in self.eos_token_ids if e >= vocab_size]
        if bad:
            raise ConfigError(f"SamplingConfig.eos_token_ids={self.eos_token_ids}: ids {bad} are >= the "
                             f"model's vocab_size={vocab_size}")
        if self.pad_token_id >= vocab_size:
            raise ConfigError(f"SamplingConfig.pad_token_id={self.pad_token_id} is >= the model's "
                             f"vocab_size={vocab_size}")


def scale_logits(logits_bv: jax.Array, temperature: float) -> jax.Array:
    """logits / temperature in float32; temperature 0 (greedy) scales by 1."""
    logits_bv = logits_bv.astype(jnp.float32)
    if temperature == 0.0 or temperature == 1.0:
        return logits_bv
    return logits_bv / jnp.float32(temperature)


def _scatter_rows(values_bk: jax.Array, idx_bk: jax.Array, vocab: int) -> jax.Array:
    rows = jnp.arange(values_bk.shape[0])[:, None]
    return jnp.zeros((values_bk.shape[0], vocab), values_bk.dtype).at[rows, idx_bk].set(values_bk)


def keep_mask(logits_bv: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array | None:
    """Boolean [B, V] mask of the tokens top-k / top-p keep, or None when both are off.

    Ranks come from one descending sort (lower token id first on ties):
    * top-k keeps ranks 0 .. k-1 (exactly min(k, V) tokens);
    * top-p, applied after top-k on the distribution renormalised over the
      top-k set (as Hugging Face and vLLM do), keeps rank r iff the mass of
      ranks < r is below top_p: the smallest prefix whose mass reaches top_p.
      Rank 0 is always kept.
    Only `lax.top_k` runs when top-k is on (a partial sort of k entries); a
    full sort only when top-p is on alone.
    """
    vocab = logits_bv.shape[-1]
    k = top_k if 0 < top_k < vocab else 0
    if k == 0 and top_p >= 1.0:
        return None
    logits_bv = logits_bv.astype(jnp.float32)
    if k:
        sorted_bk, idx_bk = jax.lax.top_k(logits_bv, k)
    else:
        idx_bk = jnp.argsort(-logits_bv, axis=-1, stable=True)
        sorted_bk = jnp.take_along_axis(logits_bv, idx_bk, axis=-1)
    keep_bk = jnp.ones(sorted_bk.shape, jnp.bool_)
    if top_p < 1.0:
        probs_bk = jax.nn.softmax(sorted_bk, axis=-1)  # renormalised over the top-k set
        mass_before_bk = jnp.cumsum(probs_bk, axis=-1) - probs_bk
        keep_bk = mass_before_bk < jnp.float32(top_p)
        keep_bk = keep_bk.at[:, 0].set(True)
    return _scatter_rows(keep_bk, idx_bk, vocab)


def process_logits(logits_bv: jax.Array, temperature: float, top_k: int = 0,
                   top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Returns (logp_bv, raw_logp_bv), both float32 [B, V].

    raw_logp_bv = log_softmax(logits / T) over the full vocabulary (T = 1 when greedy).
    logp_bv     = raw_logp_bv renormalised over the top-k/top-p keep set, -inf outside it;
                  equal to raw_logp_bv when both filters are off. This is the distribution
                  the sampler draws from. For greedy (temperature 0) both are the unscaled
                  softmax and the filters are ignored.
    """
    scaled_bv = scale_logits(logits_bv, temperature)
    raw_logp_bv = jax.nn.log_softmax(scaled_bv, axis=-1)
    if temperature == 0.0:
        return raw_logp_bv, raw_logp_bv
    keep_bv = keep_mask(scaled_bv, top_k, top_p)
    if keep_bv is None:
        return raw_logp_bv, raw_logp_bv
    logp_bv = jax.nn.log_softmax(jnp.where(keep_bv, scaled_bv, -jnp.inf), axis=-1)
    return logp_bv, raw_logp_bv


def first_argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` (the first maximum; x without NaNs) as a max and a min reduction, int32.

    XLA:CPU runs argmax's paired (value, index) reduction element by element; two plain reductions
    vectorise.
    """
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)


# The inverse-CDF draw's block: the vocabulary in blocks of this many ids, block sums first, then one block.
CDF_BLOCK = 256


def cdf_pick(logp_bv: jax.Array, u_b: jax.Array) -> jax.Array:
    """The token of each row whose cumulative probability interval holds u * total: the first id j with
    P(<= j) > u * P(all), for u [B] in [0, 1). int32 [B]; ids with probability 0 (-inf log-prob: outside
    top-k/top-p) are never picked.

    Two levels, so no [B, V] cumulative sum exists: the sums of blocks of `CDF_BLOCK` ids, their cumulative
    sum [B, V / CDF_BLOCK], then the cumulative sum inside the one block that holds the target. A row whose
    float rounding points past its last positive id (or at an id of probability 0) takes its last (or most
    probable) positive id instead.
    """
    b, v = logp_bv.shape
    kb = min(CDF_BLOCK, v)
    nb = -(-v // kb)
    p = jnp.exp(logp_bv.astype(jnp.float32))
    pb = jnp.pad(p, ((0, 0), (0, nb * kb - v))).reshape(b, nb, kb)
    block_sums = jnp.sum(pb, axis=-1)
    cum_blocks = jnp.cumsum(block_sums, axis=-1)
    target = u_b.astype(jnp.float32) * cum_blocks[:, -1]

    def first_after(cum, mass):  # [B, K]: the first index with cum > target, within the positive entries
        i = jnp.sum(cum <= target[:, None], axis=-1).astype(jnp.int32)
        positive = (mass > 0).astype(jnp.int32)
        first = first_argmax(positive)
        last = cum.shape[-1] - 1 - first_argmax(positive[:, ::-1])
        return jnp.clip(i, first, last)

    def block(i):
        return jnp.take_along_axis(pb, i[:, None, None], axis=1)[:, 0]

    blk = first_after(cum_blocks, block_sums)
    inner = block(blk)
    base = jnp.take_along_axis(cum_blocks - block_sums, blk[:, None], axis=1)[:, 0]
    idx = first_after(base[:, None] + jnp.cumsum(inner, axis=-1), inner)
    ok = jnp.take_along_axis(inner, idx[:, None], axis=1)[:, 0] > 0
    # rounding's last resort (never a zero-probability id): the first positive id of the first positive block
    first_blk = first_argmax((block_sums > 0).astype(jnp.int32))
    fallback = first_blk * kb + first_argmax((block(first_blk) > 0).astype(jnp.int32))
    return jnp.where(ok, blk * kb + idx, fallback)


def sample_tokens(rng: jax.Array, logp_bv: jax.Array, raw_logp_bv: jax.Array,
                  greedy: bool, per_row: bool = False) -> jax.Array:
    """Draws one token per row: argmax when greedy, else categorical(logp_bv). int32 [B].

    `per_row`: `rng` holds one key per row ([B] keys); row b draws one uniform number from its own key (so a
    row's token does not depend on which other rows share the batch) and takes the token where it falls in
    the row's cumulative distribution (`cdf_pick`: one exp pass over the logits and one small block, not a
    random number per vocabulary entry). Otherwise the draw is `jax.random.categorical`'s own (the argmax of
    logits + Gumbel noise from `rng`, the same tokens for the same key) with the argmax written as
    `first_argmax`.
    """
    if greedy:
        return first_argmax(raw_logp_bv)
    if per_row:
        return cdf_pick(logp_bv, jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(rng))
    noise = jax.random.gumbel(rng, logp_bv.shape, logp_bv.dtype)
    return first_argmax(logp_bv + noise)
