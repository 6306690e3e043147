"""Search: the step decoder against the sampler and full forwards, best-of-N selection, beam search, DVTS, MCTS."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.models import CausalLM, ModelConfig, create_model
from jaxrl_llm.rollout import SamplingConfig, make_sampler
from jaxrl_llm.search.decoding import StepConfig, StepDecoder
from jaxrl_llm.sharding import ShardingEnv, make_mesh

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, qkv_bias=True, initializer_range=0.3, max_position_embeddings=96)
PROMPTS = np.array([[0, 11, 12, 13, 14, 15],
                    [0, 0, 0, 21, 22, 23],
                    [0, 0, 0, 0, 0, 31]], np.int32)
PMASK = (np.arange(6)[None, :] >= np.array([1, 3, 5])[:, None]).astype(np.int32)
SEP = (7, 8, 9)  # tokens that end a step
EOS = 2


def _table(ids=SEP):
    t = np.zeros(CFG.vocab_size, bool)
    t[list(ids)] = True
    return t


def _env(n=1):
    return ShardingEnv(make_mesh({"data": n}, devices=jax.devices()[:n]))


@pytest.fixture(scope="module")
def model():
    module, params, _ = create_model(CFG, jax.random.key(0), _env())
    return module, params


@jax.jit
def _forward(params, tokens, mask):
    return CausalLM(CFG).apply({"params": params}, tokens, None, mask)[0].astype(jnp.float32)


def _steps(dec, params, state, key, k):
    out = []
    for i in range(k):
        state, step = dec.extend(params, state, jax.random.fold_in(key, i))
        out.append(jax.device_get(step))
    return state, out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_decoder_matches_full_forward_and_step_boundaries(model, temperature):
    module, params = model
    sc = StepConfig(step_tokens=5, max_steps=4, temperature=temperature, eos_token_ids=(EOS,))
    dec = StepDecoder(module, CFG, sc, _table())
    state = dec.start(params, PROMPTS, PMASK, n=2)
    state, steps = _steps(dec, params, state, jax.random.key(3), 4)
    s = jax.device_get(state)
    # Steps concatenate to the buffer; each ends at its first separator / EOS or after 5 tokens.
    for r in range(s.tokens.shape[0]):
        written = np.concatenate([st.tokens[r][st.mask[r] > 0] for st in steps])
        assert s.lengths[r] == len(written)
        np.testing.assert_array_equal(s.tokens[r, :len(written)], written)
        for st in steps:
            toks = st.tokens[r][st.mask[r] > 0]
            if len(toks):
                inner = toks[:-1]
                assert not np.isin(inner, SEP + (EOS,)).any()
                assert st.ended[r] == bool(np.isin(toks[-1], SEP + (EOS,)))
                assert st.ended[r] or len(toks) == 5
    # Log-probs: the sum over generated tokens of log_softmax(logits / T) of one uncached forward.
    tokens, mask = jax.device_get(state.sequences())
    logits = np.asarray(_forward(params, tokens, mask.astype(bool)))
    p = PROMPTS.shape[1]
    t = 1.0 if temperature == 0.0 else temperature
    lp = jax.nn.log_softmax(logits[:, p - 1:-1] / t, axis=-1)
    gen = s.tokens
    tok_lp = np.take_along_axis(np.asarray(lp), gen[..., None], -1)[..., 0] * (np.asarray(mask[:, p:]))
    np.testing.assert_allclose(s.logprob, tok_lp.sum(-1), rtol=1e-4, atol=1e-4)
    if temperature == 0.0:  # greedy: every token is the argmax of the full forward's logits
        am = np.asarray(logits[:, p - 1:-1]).argmax(-1)
        m = np.asarray(mask[:, p:]) > 0
        np.testing.assert_array_equal(gen[m], am[m])
    # The two rows of a prompt share its prefill; sampled rows differ.
    np.testing.assert_array_equal(s.prompt_tokens[0], s.prompt_tokens[1])


def test_decoder_greedy_equals_sampler(model):
    module, params = model
    sc = StepConfig(step_tokens=4, max_steps=5, temperature=0.0, eos_token_ids=(EOS,))
    dec = StepDecoder(module, CFG, sc, _table())
    state, _ = _steps(dec, params, dec.start(params, PROMPTS, PMASK), jax.random.key(0), 5)
    ro = make_sampler(module, CFG, sc.sampling())(params, PROMPTS, PMASK, jax.random.key(0))
    s = jax.device_get(state)
    # The sampler writes the same greedy tokens; the decoder stops after 5 steps, which is fewer than the
    # sampler's 20 tokens when a step ended early at a separator.
    toks = np.asarray(ro.tokens)
    for r, n in enumerate(s.lengths):
        np.testing.assert_array_equal(s.tokens[r, :n], toks[r, :n])
        assert n == np.asarray(ro.lengths)[r] or (s.num_steps[r] == 5 and not s.finished[r])
    assert (s.lengths < 20).any() and (s.lengths == 20).any()  # both cases occur here


def test_select_and_append_reuse_the_cache(model):
    module, params = model
    sc = StepConfig(step_tokens=4, max_steps=4, temperature=1.0, eos_token_ids=(EOS,))
    dec = StepDecoder(module, CFG, sc, _table())
    state = dec.start(params, PROMPTS, PMASK, n=2)
    state, _ = _steps(dec, params, state, jax.random.key(1), 2)
    rows = jnp.array([5, 0, 0, 3, 2, 1], jnp.int32)
    picked = dec.select(state, rows)
    for f in ("tokens", "lengths", "logprob", "prompt_tokens"):
        np.testing.assert_array_equal(np.asarray(getattr(picked, f)), np.asarray(getattr(state, f))[np.asarray(rows)])
    # Continuing a selected row gives the same step as continuing the original with the same key row-for-row:
    # rows 1 and 2 of `picked` are both copies of row 0, so greedy continuation is identical.
    g = StepDecoder(module, CFG, sc.__class__(**{**sc.__dict__, "temperature": 0.0}), _table())
    a, st_a = g.extend(params, picked, jax.random.key(9))
    np.testing.assert_array_equal(np.asarray(st_a.tokens)[1], np.asarray(st_a.tokens)[2])
    # append: feeding row r's generated tokens to a fresh prompt state gives the same next-token logits.
    fresh = g.start(params, PROMPTS, PMASK, n=2)
    s = jax.device_get(state)
    width = 2 * sc.step_tokens
    toks = s.tokens[:, :width]
    mask = (np.arange(width)[None] < s.lengths[:, None]).astype(np.int32)
    appended = g.append(params, fresh, toks, mask)
    np.testing.assert_allclose(np.asarray(appended.logits), np.asarray(state.logits), rtol=2e-4, atol=2e-4)
    np.testing.assert_array_equal(np.asarray(appended.tokens), s.tokens)
    np.testing.assert_array_equal(np.asarray(appended.position), np.asarray(state.position))
