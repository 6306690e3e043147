"""The jitted sampler against full (uncached) forwards and a numpy reference of the logit filters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.models import CausalLM, ModelConfig, create_model, get_preset, init_fn_for
from jaxrl_llm.rollout import SamplingConfig, keep_mask, make_sampler, process_logits, sample
from jaxrl_llm.sharding import ShardingEnv, make_mesh
from jaxrl_llm.sharding.params import param_shardings

# Large enough init that distributions are peaked (top prob ~0.2) but far from one-hot.
CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, qkv_bias=True, initializer_range=0.3, max_position_embeddings=64)

# Left-padded prompts of lengths 5, 3, 1.
PROMPTS = np.array([[0, 11, 12, 13, 14, 15],
                    [0, 0, 0, 21, 22, 23],
                    [0, 0, 0, 0, 0, 31]], np.int32)
PMASK = (np.arange(6)[None, :] >= np.array([1, 3, 5])[:, None]).astype(np.int32)


def _env1():
    return ShardingEnv(make_mesh({"data": 1}, devices=jax.devices()[:1]))


@pytest.fixture(scope="module")
def model():
    module, params, _ = create_model(CFG, jax.random.key(0), _env1())
    return module, params


@jax.jit
def _forward_small(params, tokens, mask):
    return CausalLM(CFG).apply({"params": params}, tokens, None, mask)[0].astype(jnp.float32)


def full_logits(module, params, tokens, mask):
    """float32 [B, T, V] logits of one uncached forward (positions from the mask)."""
    if module.cfg == CFG:
        return np.asarray(_forward_small(params, jnp.asarray(tokens), jnp.asarray(mask, bool)))
    logits, _ = jax.jit(module.apply)({"params": params}, jnp.asarray(tokens), None, jnp.asarray(mask, bool))
    return np.asarray(logits.astype(jnp.float32))


def completion_logits(module, params, rollout):
    """float32 [B, N, V]: the logits that predict each completion token, from one full forward."""
    tokens, mask = rollout.sequences()
    p = rollout.prompt_tokens.shape[1]
    n = rollout.tokens.shape[1]
    return full_logits(module, params, tokens, mask)[:, p - 1:p - 1 + n]


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def token_logprobs(logits, tokens):
    """float64 log_softmax(logits)[token] (temperature 1)."""
    lp = np_log_softmax(logits.astype(np.float64))
    return np.take_along_axis(lp, tokens[..., None], -1)[..., 0]


def np_keep(logits, top_k, top_p):
    """Reference keep set by rank (stable sort, lower id first on ties), float64."""
    logits = np.asarray(logits, np.float64)
    b, v = logits.shape
    order = np.argsort(-logits, axis=-1, kind="stable")
    keep = np.zeros((b, v), bool)
    for i in range(b):
        ranked = order[i][:top_k] if top_k else order[i]
        if top_p < 1.0:
            pr = np.exp(np_log_softmax(logits[i, ranked]))
            before = np.cumsum(pr) - pr
            ranked = ranked[(before < top_p) | (np.arange(len(ranked)) == 0)]
        keep[i, ranked] = True
    return keep


def np_process(logits, temperature, top_k, top_p):
    scaled = np.asarray(logits, np.float64) / temperature
    raw = np_log_softmax(scaled)
    keep = np_keep(scaled, top_k, top_p)
    return np_log_softmax(np.where(keep, scaled, -np.inf)), raw


def test_greedy_matches_uncached_argmax(model):
    module, params = model
    n = 6
    r = make_sampler(module, CFG, SamplingConfig(max_new_tokens=n, temperature=0.0))(
        params, PROMPTS, PMASK, jax.random.key(0))
    # Step by step, each step a fresh full forward without a cache. One fixed shape [B, P + n]:
    # not-yet-generated slots are masked out and lie in the causal future, so they change nothing.
    tokens = np.concatenate([PROMPTS, np.zeros((3, n), np.int32)], 1)
    mask = np.concatenate([PMASK, np.zeros((3, n), np.int32)], 1)
    want, want_lp = [], []
    for s in range(n):
        last = PROMPTS.shape[1] - 1 + s
        logits = full_logits(module, params, tokens, mask)[:, last]
        tok = logits.argmax(-1).astype(np.int32)
        want.append(tok)
        want_lp.append(np_log_softmax(logits.astype(np.float64))[np.arange(3), tok])
        tokens[:, last + 1], mask[:, last + 1] = tok, 1
    np.testing.assert_array_equal(np.asarray(r.tokens), np.stack(want, 1))
    # Greedy: both log-prob fields are of the unscaled softmax.
    np.testing.assert_allclose(np.asarray(r.logprobs), np.stack(want_lp, 1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(r.raw_logprobs), np.stack(want_lp, 1), atol=1e-5)
    assert int(r.num_steps) == n and not np.asarray(r.finished).any()
    np.testing.assert_array_equal(np.asarray(r.mask), 1)
    np.testing.assert_array_equal(np.asarray(r.lengths), n)


def test_logprobs_match_full_forward(model):
    module, params = model
    sc = SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=12, top_p=0.9, n_samples=2,
                        eos_token_ids=(3, 7, 9), pad_token_id=1)
    r = make_sampler(module, CFG, sc)(params, PROMPTS, PMASK, jax.random.key(3))
    assert r.logprobs.dtype == jnp.float32 and r.raw_logprobs.dtype == jnp.float32
    logits = completion_logits(module, params, r)  # [6, 8, V]
    tok, m = np.asarray(r.tokens), np.asarray(r.mask).astype(bool)
    rows, steps, v = logits.shape
    logp, raw = np_process(logits.reshape(-1, v), 0.7, 12, 0.9)
    logp = np.take_along_axis(logp, tok.reshape(-1, 1), -1).reshape(rows, steps)
    raw = np.take_along_axis(raw, tok.reshape(-1, 1), -1).reshape(rows, steps)
    assert m.sum() > rows  # real completions were compared
    np.testing.assert_allclose(np.asarray(r.logprobs)[m], logp[m], atol=1e-5)
    np.testing.assert_allclose(np.asarray(r.raw_logprobs)[m], raw[m], atol=1e-5)
    # Filtering renormalises: sampling log-probs are strictly above the raw ones somewhere.
    assert (np.asarray(r.logprobs)[m] > np.asarray(r.raw_logprobs)[m] + 1e-3).any()
    np.testing.assert_array_equal(np.asarray(r.logprobs)[~m], 0.0)
    np.testing.assert_array_equal(np.asarray(r.raw_logprobs)[~m], 0.0)


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.5), (8, 0.6)])
def test_filters_never_emit_excluded_tokens(model, top_k, top_p):
    module, params = model
    temp = 1.5  # flat, so an unfiltered sampler would emit excluded tokens often
    sc = SamplingConfig(max_new_tokens=8, temperature=temp, top_k=top_k, top_p=top_p, n_samples=8)
    r = make_sampler(module, CFG, sc)(params, PROMPTS, PMASK, jax.random.key(5))
    logits = completion_logits(module, params, r)
    v = logits.shape[-1]
    keep = np_keep(logits.reshape(-1, v) / temp, top_k, top_p).reshape(logits.shape)
    tok = np.asarray(r.tokens)
    emitted_kept = np.take_along_axis(keep, tok[..., None], -1)[..., 0]
    assert emitted_kept.all(), f"{(~emitted_kept).sum()} emitted tokens were outside the keep set"
    assert keep.sum(-1).min() < v // 2  # the filter actually excluded something
    ranks = (logits > np.take_along_axis(logits, tok[..., None], -1)).sum(-1)
    assert ranks.max() > 0  # not just argmax


def test_keep_mask_ties_and_renormalisation():
    logits = np.array([[1.0, 3.0, 3.0, 3.0, 0.0, -1.0],
                       [2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
                       np.log([0.4, 0.3, 0.2, 0.1, 1e-9, 1e-9])], np.float32)
    cases = {
        (2, 1.0): [[0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]],
        (0, 0.45): [[0, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]],
        # top-p after top-k on the renormalised top-3 (0.44, 0.33, 0.22): 2 tokens reach 0.75
        # (without renormalisation it would take 3).
        (3, 0.75): [[0, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]],
        (1, 0.3): [[0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]],
        (0, 1e-6): [[0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]],  # top token always kept
    }
    for (k, p), want in cases.items():
        got = np.asarray(keep_mask(jnp.asarray(logits), k, p))
        np.testing.assert_array_equal(got, np.array(want, bool), err_msg=f"top_k={k} top_p={p}")
        np.testing.assert_array_equal(got, np_keep(logits, k, p), err_msg=f"top_k={k} top_p={p}")
    assert keep_mask(jnp.asarray(logits), 0, 1.0) is None
    assert keep_mask(jnp.asarray(logits), 6, 1.0) is None  # k >= V keeps everything

    logp, raw = process_logits(jnp.asarray(logits), 0.5, 3, 0.75)
    want_logp, want_raw = np_process(logits, 0.5, 3, 0.75)
    np.testing.assert_allclose(np.asarray(raw), want_raw, atol=1e-6)
    finite = np.isfinite(want_logp)
    np.testing.assert_array_equal(np.isfinite(np.asarray(logp)), finite)
    np.testing.assert_allclose(np.asarray(logp)[finite], want_logp[finite], atol=1e-6)
    np.testing.assert_allclose(np.exp(np.asarray(logp)).sum(-1), 1.0, atol=1e-6)
    g_logp, g_raw = process_logits(jnp.asarray(logits), 0.0, 3, 0.75)  # greedy: unscaled, unfiltered
    np.testing.assert_allclose(np.asarray(g_logp), np_log_softmax(logits.astype(np.float64)), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(g_logp), np.asarray(g_raw))


def test_sample_tokens_are_jax_categorical_and_argmax():
    """sample_tokens with one key for the batch draws exactly jax.random.categorical's tokens for the same key
    (its argmax written as two plain reductions), masked (-inf) entries included, and greedy picks the first
    maximum."""
    from jaxrl_llm.rollout.sampling import first_argmax, sample_tokens
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 40)).astype(np.float32) * 3
    logits[:, ::3] = -np.inf  # what top-k/top-p filtering leaves
    logits[0, :] = -np.inf
    logits[0, 5] = 0.0  # one kept token
    logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    for i in range(40):
        key = jax.random.key(i)
        want = jax.random.categorical(key, logp, axis=-1)
        np.testing.assert_array_equal(np.asarray(sample_tokens(key, logp, logp, False)), np.asarray(want))
    ties = jnp.asarray([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [-1.0, -2.0, -1.0, -5.0]])
    np.testing.assert_array_equal(np.asarray(first_argmax(ties)), [1, 0, 0])
    np.testing.assert_array_equal(np.asarray(sample_tokens(None, ties, ties, True)), [1, 0, 0])
    assert first_argmax(ties).dtype == jnp.int32


@pytest.mark.parametrize("vocab", [3, 256, 1000])
def test_cdf_pick_is_the_inverse_cdf_and_never_picks_a_filtered_id(vocab):
    """The per-row draw: on a grid of u over [0, 1) every id's share of the grid is its probability (the
    exact inverse CDF, in blocks, padded when the vocabulary is not a multiple of the block), ids of
    probability 0 are never picked, u = 0 and the largest float32 below 1 give the first and last positive ids,
    and exact interval boundaries go to the next id."""
    from jaxrl_llm.rollout.sampling import cdf_pick
    rng = np.random.default_rng(vocab)
    logits = rng.normal(size=(4, vocab)) * 2
    logits[:, rng.random(vocab) < 0.4] = -np.inf  # filtered ids, whole blocks of them too at 1000
    if vocab == 1000:
        logits[:, 300:560] = -np.inf
    logits[:, 0] = 1.0  # at least one kept id per row
    logits[1] = -np.inf
    logits[1, vocab - 1] = 0.0  # all mass on the last id
    logits[2, :] = -np.inf
    logits[2, [0, vocab - 1]] = 0.0
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    p = np.exp(np.asarray(logp, np.float64))
    grid = 20000
    u = (np.arange(grid) + 0.5) / grid
    pick = jax.jit(jax.vmap(cdf_pick, in_axes=(None, 0)))
    toks = np.asarray(pick(logp, jnp.asarray(np.repeat(u[:, None], 4, 1), jnp.float32)))  # [grid, 4]
    for row in range(4):
        share = np.bincount(toks[:, row], minlength=vocab) / grid
        assert np.all(share[p[row] == 0] == 0)
        np.testing.assert_allclose(share, p[row], atol=2.0 / grid)
    ends = jnp.asarray([0.0, np.nextafter(np.float32(1), np.float32(0))], jnp.float32)
    for row in range(4):
        first, last = np.flatnonzero(p[row] > 0)[[0, -1]]
        got = np.asarray(pick(logp[row:row + 1], ends[:, None]))[:, 0]
        assert got.tolist() == [first, last]
    if vocab == 3:
        half = jax.nn.log_softmax(jnp.log(jnp.asarray([[0.25, 0.25, 0.5]])), axis=-1)
        got = np.asarray(pick(half, jnp.asarray([[0.0], [0.2499], [0.25], [0.5], [0.75]], jnp.float32)))[:, 0]
        assert got.tolist() == [0, 0, 1, 2, 2]


def test_per_row_draws_follow_the_distribution():
    """sample_tokens(per_row=True): one key per row; 50k rows of one distribution (filtered ids included)
    give each id's frequency within 5 standard errors of its probability."""
    from jaxrl_llm.rollout.sampling import sample_tokens
    rng = np.random.default_rng(5)
    logits = rng.normal(size=40) * 1.5
    logits[::7] = -np.inf
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))
    n = 50_000
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(n))
    toks = np.asarray(jax.jit(lambda k: sample_tokens(k, jnp.broadcast_to(logp, (n, 40)),
                                                      jnp.broadcast_to(logp, (n, 40)), False, per_row=True))(keys))
    p = np.exp(np.asarray(logp, np.float64))
    freq = np.bincount(toks, minlength=40) / n
    assert np.all(freq[p == 0] == 0)
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12)


def test_eos_stops_rows_and_exits_early(model):
    module, params = model
    n = 10
    greedy = SamplingConfig(max_new_tokens=n, temperature=0.0, pad_token_id=63)
    g = np.asarray(make_sampler(module, CFG, greedy)(params, PROMPTS, PMASK, jax.random.key(0)).tokens)
    eos = tuple(sorted({int(g[0, 1]), int(g[1, 3]), int(g[2, 2])}))
    assert 63 not in eos
    r = make_sampler(module, CFG, greedy.replace(eos_token_ids=eos))(
        params, PROMPTS, PMASK, jax.random.key(0))
    first = np.array([np.flatnonzero(np.isin(row, eos))[0] for row in g])  # first EOS per row
    assert (first <= [1, 3, 2]).all()
    tok, m = np.asarray(r.tokens), np.asarray(r.mask)
    for i, f in enumerate(first):
        np.testing.assert_array_equal(tok[i, :f + 1], g[i, :f + 1])
        np.testing.assert_array_equal(tok[i, f + 1:], 63)
        np.testing.assert_array_equal(m[i], np.arange(n) <= f)
        np.testing.assert_array_equal(np.asarray(r.logprobs)[i, f + 1:], 0.0)
    np.testing.assert_array_equal(np.asarray(r.lengths), first + 1)
    assert np.asarray(r.finished).all()
    assert int(r.num_steps) == first.max() + 1 < n


def test_n_samples_layout_and_determinism(model):
    module, params = model
    sc = SamplingConfig(max_new_tokens=6, temperature=1.0, n_samples=4)
    sampler = make_sampler(module, CFG, sc)
    r = sampler(params, PROMPTS, PMASK, jax.random.key(7))
    assert r.tokens.shape == (12, 6) and r.prompt_tokens.shape == (12, 6)
    np.testing.assert_array_equal(np.asarray(r.prompt_tokens), np.repeat(PROMPTS, 4, axis=0))
    np.testing.assert_array_equal(np.asarray(r.prompt_mask), np.repeat(PMASK, 4, axis=0))
    tok = np.asarray(r.tokens)
    for i in range(3):
        assert len({tuple(t) for t in tok[i * 4:(i + 1) * 4]}) > 1, f"samples of prompt {i} are identical"
    again = sampler(params, PROMPTS, PMASK, jax.random.key(7))
    for a, b in zip(jax.tree.leaves(r), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = sampler(params, PROMPTS, PMASK, jax.random.key(8))
    assert not np.array_equal(np.asarray(other.tokens), tok)
    # The convenience wrapper is the same computation.
    conv = sample(module, CFG, params, PROMPTS, PMASK, jax.random.key(7), sc)
    np.testing.assert_array_equal(np.asarray(conv.tokens), tok)


def test_n_samples_prefill_each_prompt_once(model):
    """n_samples > 1 prefills the B distinct prompts and repeats their cache: the rollout is that of the
    prompts repeated by hand with n_samples=1 (same rows, same noise)."""
    module, params = model
    for eos in ((), (1, 2, 3, 4, 5, 6)):
        sc = SamplingConfig(max_new_tokens=10, temperature=1.0, n_samples=4, eos_token_ids=eos)
        got = make_sampler(module, CFG, sc)(params, PROMPTS, PMASK, jax.random.key(2))
        want = make_sampler(module, CFG, sc.replace(n_samples=1))(
            params, np.repeat(PROMPTS, 4, axis=0), np.repeat(PMASK, 4, axis=0), jax.random.key(2))
        for name in ("tokens", "mask", "lengths", "finished", "num_steps", "prompt_tokens", "prompt_mask"):
            np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)))
        np.testing.assert_allclose(np.asarray(got.raw_logprobs), np.asarray(want.raw_logprobs), atol=1e-5)
    hlo = jax.jit(make_sampler(module, CFG, sc)).lower(params, PROMPTS, PMASK, jax.random.key(2)).as_text()
    assert "tensor<3x6x32xf32>" in hlo  # the prefill's hidden states: 3 prompts, not 12 rows


def test_split_layer_weights_is_the_same_computation(model):
    """Weights split once before the decode loop (default) or sliced inside every step: same rollout; the
    split sampler's loop body holds no slice of the stacked weights."""
    module, params = model
    out = {}
    for split in (True, False):
        sc = SamplingConfig(max_new_tokens=6, temperature=1.0, n_samples=2, split_layer_weights=split)
        out[split] = make_sampler(module, CFG, sc)(params, PROMPTS, PMASK, jax.random.key(3))
    for a, b in zip(jax.tree.leaves(out[True]), jax.tree.leaves(out[False])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out[True].tokens), np.asarray(out[False].tokens))
    with pytest.raises(ValueError, match="split_layer_weights"):
        SamplingConfig(split_layer_weights="yes")


def test_cache_segments_are_the_same_rollout(model):
    """Decoding in 3 cache segments (the cache grows from P + 16 to P + 32 to P + 48 slots) gives the rollout
    of one P + 48 buffer, also when every row stops early inside a segment; each segment's loop carries a
    cache of its own length."""
    module, params = model
    assert SamplingConfig(max_new_tokens=48).segment_ends == (16, 32, 48)
    assert SamplingConfig(max_new_tokens=50, cache_segments=8).segment_ends == (17, 34, 50)  # >= 16 steps each
    assert SamplingConfig(max_new_tokens=31).segment_ends == (31,)
    assert SamplingConfig(max_new_tokens=48, cache_segments=1).segment_ends == (48,)
    def run(k, eos, key):
        sc = SamplingConfig(max_new_tokens=48, temperature=1.0, n_samples=3, eos_token_ids=eos, cache_segments=k)
        return make_sampler(module, CFG, sc)(params, PROMPTS, PMASK, jax.random.key(key))

    for eos in ((), (1, 2, 3, 4, 5, 6)):  # no EOS: all 48 steps; frequent EOS: all rows stop in segment 2
        key = 5
        if eos:  # the first key from 5 whose rows all stop after segment 1 and before the limit
            key = next((k for k in range(5, 45) if 16 < int(run(1, eos, k).num_steps) < 48
                        and np.asarray(run(1, eos, k).finished).all()), None)
            assert key is not None, "no key in 5..44 makes every row stop inside segment 2 or 3"
        out = {k: run(k, eos, key) for k in (1, 3)}
        for name in ("tokens", "mask", "lengths", "finished", "num_steps"):
            np.testing.assert_array_equal(np.asarray(getattr(out[3], name)), np.asarray(getattr(out[1], name)))
        for name in ("logprobs", "raw_logprobs"):
            np.testing.assert_allclose(np.asarray(getattr(out[3], name)), np.asarray(getattr(out[1], name)),
                                       rtol=1e-5, atol=1e-5)
        if eos:
            assert 16 < int(out[3].num_steps) < 48 and np.asarray(out[3].finished).all()
    sc = SamplingConfig(max_new_tokens=48, temperature=1.0, cache_segments=3)
    hlo = jax.jit(make_sampler(module, CFG, sc)).lower(params, PROMPTS, PMASK, jax.random.key(5)).as_text()
    for slots in (6 + 16, 6 + 32, 6 + 48):
        assert f"tensor<3x2x{slots}x8xf32>" in hlo, slots
    with pytest.raises(ValueError, match="cache_segments"):
        SamplingConfig(cache_segments=0)


@pytest.mark.parametrize("axes", [{"data": 8}, {"fsdp": 4, "tensor": 2}])
def test_sharded_equals_single_device(model, devices, axes):
    module, params = model
    sc = SamplingConfig(max_new_tokens=8, temperature=0.8, top_k=16, top_p=0.95, n_samples=4,
                        eos_token_ids=(3, 7), pad_token_id=0)
    prompts, pmask = np.concatenate([PROMPTS, PROMPTS[::-1]]), np.concatenate([PMASK, PMASK[::-1]])
    want = make_sampler(module, CFG, sc)(params, prompts, pmask, jax.random.key(11))

    env = ShardingEnv(make_mesh(axes, devices=devices))
    _, shardings = param_shardings(init_fn_for(module), env)
    sharded_params = jax.device_put(params, shardings)
    got = make_sampler(module, CFG, sc, env=env, param_shardings=shardings)(
        sharded_params, prompts, pmask, jax.random.key(11))
    assert not got.tokens.sharding.is_fully_replicated  # 24 rows over the batch axes
    assert len(got.tokens.sharding.device_set) == 8
    for name in ("tokens", "mask", "lengths", "finished", "prompt_tokens", "prompt_mask", "num_steps"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)),
                                      err_msg=name)
    for name in ("logprobs", "raw_logprobs"):
        np.testing.assert_allclose(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)),
                                   atol=1e-5, err_msg=name)


def test_bfloat16_compute_returns_float32_logprobs(model):
    module32, params = model
    cfg = CFG.replace(dtype="bfloat16")
    module = CausalLM(cfg)  # same parameter tree as the float32 model (param_dtype is float32)
    sc = SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=0.9, n_samples=2)
    r = make_sampler(module, cfg, sc)(params, PROMPTS, PMASK, jax.random.key(2))
    assert r.logprobs.dtype == jnp.float32 and r.raw_logprobs.dtype == jnp.float32
    lp, raw, m = np.asarray(r.logprobs), np.asarray(r.raw_logprobs), np.asarray(r.mask).astype(bool)
    assert np.isfinite(lp).all() and np.isfinite(raw).all()
    assert (lp[m] <= 0).all() and (raw[m] <= lp[m] + 1e-6).all()  # renormalising only raises log-probs
    # bf16 logits cast to float32: close to the float32 model's log-probs for the same tokens.
    logits = completion_logits(module32, params, r)
    ref = token_logprobs(logits, np.asarray(r.tokens))
    np.testing.assert_allclose(raw[m], ref[m], atol=0.1)


def test_bf16_matmuls_sampler_agrees_with_the_trainers_logprobs(model):
    """matmul_dtype="bfloat16": the sampler (kernels cast once before the loop) and the trainer's
    log-prob forward run the same bf16-operand matmuls, so their log-probs of the sampled tokens agree
    (no sampler/trainer mismatch from the lower precision), while both differ from the float32 model's."""
    from jaxrl_llm.algos import grpo
    _, params = model
    cfg = CFG.replace(matmul_dtype="bfloat16")
    module = CausalLM(cfg)
    sc = SamplingConfig(max_new_tokens=6, temperature=1.0, n_samples=2)
    r = make_sampler(module, cfg, sc)(params, PROMPTS, PMASK, jax.random.key(2))
    batch = {"prompt_tokens": r.prompt_tokens, "prompt_mask": r.prompt_mask, "completion_tokens": r.tokens,
             "completion_mask": r.mask}
    m = np.asarray(r.mask).astype(bool)
    trainer = np.asarray(jax.jit(grpo.make_logprob_fn(module, cfg))(params, batch))
    f32 = np.asarray(jax.jit(grpo.make_logprob_fn(CausalLM(CFG), CFG))(params, batch))
    mismatch, precision = np.abs(np.asarray(r.raw_logprobs)[m] - trainer[m]), np.abs(f32[m] - trainer[m])
    print(f"sampler vs trainer max {mismatch.max():.2e} mean {mismatch.mean():.2e}; "
          f"bf16 vs f32 max {precision.max():.2e} mean {precision.mean():.2e}")
    # Per-token decode and the whole-sequence forward accumulate the bf16 products in different orders, so
    # single tokens may differ by a few 1e-4; on average the two agree far better than bf16 and f32 do.
    assert mismatch.max() < 1e-3 and mismatch.mean() < 0.1 * precision.mean()
    assert 1e-4 < precision.max() < 0.1


def test_tiny_preset_greedy_consistent_with_full_forward():
    cfg = get_preset("tiny")
    module, params, _ = create_model(cfg, jax.random.key(1), _env1())
    prompts = np.array([[0, 0, 0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8]], np.int32)
    pmask = np.array([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8], np.int32)
    r = make_sampler(module, cfg, SamplingConfig(max_new_tokens=5, temperature=0.0))(
        params, prompts, pmask, jax.random.key(0))
    logits = completion_logits(module, params, r)
    # Greedy with a cache = argmax of the teacher-forced full forward at every step.
    np.testing.assert_array_equal(np.asarray(r.tokens), logits.argmax(-1))
    ref = token_logprobs(logits, np.asarray(r.tokens))
    np.testing.assert_allclose(np.asarray(r.logprobs), ref, atol=1e-5)


def test_config_validation_messages():
    bad = [(dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-0.1), "temperature"),
           (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
           (dict(n_samples=0), "n_samples"), (dict(eos_token_ids=(-2,)), "eos_token_ids"),
           (dict(pad_token_id=-1), "pad_token_id"), (dict(temperature=float("nan")), "temperature")]
    for kw, field in bad:
        with pytest.raises(ValueError, match=field):
            SamplingConfig(**kw)
    sc = SamplingConfig(eos_token_ids=[2, 5])  # a list from JSON becomes a tuple (hashable)
    assert sc.eos_token_ids == (2, 5) and hash(sc) == hash(SamplingConfig(eos_token_ids=(2, 5)))
    with pytest.raises(ValueError, match="vocab_size"):
        make_sampler(None, CFG, SamplingConfig(eos_token_ids=(64,)))


def test_prefill_never_materialises_prompt_logits():
    cfg = CFG.replace(intermediate_size=48)  # so no MLP activation has the vocab's size
    module = CausalLM(cfg)
    params = jax.eval_shape(lambda r: module.init(r, jnp.zeros((1, 4), jnp.int32))["params"],
                            jax.random.key(0))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(params))
    sampler = make_sampler(module, cfg, SamplingConfig(max_new_tokens=4, temperature=1.0))
    text = str(jax.make_jaxpr(sampler)(params, PROMPTS, PMASK, jax.random.key(0)))
    assert "[3,1,64]" in text  # the last-slot logits are there ...
    assert "[3,6,64]" not in text  # ... but never logits for every prompt slot [B, P, V]


def test_bench_draw_runs_both_draws(capsys):
    """bench/draw.py (the per-row draws' cost) at a small shape, so it cannot rot."""
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
    import draw
    draw.main(["--rows", "4", "--vocab", "300", "--steps", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "[4, 300] gumbel per row:" in out and "[4, 300] inverse CDF per row:" in out
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(3))
    logp = jax.nn.log_softmax(jnp.asarray([[0.0, -np.inf, 0.0], [-np.inf, 0.0, -np.inf], [0.0, 0.0, 0.0]]))
    for fn in (draw.gumbel_per_row, draw.cdf_per_row):  # both draw only kept ids
        tok = np.asarray(fn(keys, logp))
        assert tok[1] == 1 and tok[0] in (0, 2)
