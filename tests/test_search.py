"""Search: the step decoder against the sampler and full forwards, best-of-N selection, beam search, DVTS, MCTS."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.models import CausalLM, ModelConfig, create_model
from jaxrl_llm.rollout import make_sampler
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
    g = StepDecoder(module, CFG, dataclasses.replace(sc, temperature=0.0), _table())
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


# ------------------------------------------------------------------------------------------- best-of-N selection
from jaxrl_llm.search.beam import beam_search, dvts  # noqa: E402
from jaxrl_llm.search.best_of_n import choose, sample_candidates  # noqa: E402


def test_selection_rules_on_hand_made_answers():
    answers = [["3", "5", "5", None, "3", "5"],   # 5 wins the vote (3 votes), first at index 1
               [None, "7", "8", "8", "7", None],  # 7 and 8 tie at 2 votes: 7 appears first
               [None, None, None, None, None, None]]
    np.testing.assert_array_equal(choose("majority", answers), [1, 1, 0])
    scores = np.array([[0.9, 0.1, 0.2, 5.0, 0.8, 0.3],
                       [0.0, 0.1, 0.5, 0.6, 0.2, 0.0],
                       [0.1, 0.3, 0.2, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(choose("score", scores=scores), [3, 3, 1])
    # weighted: "3" 1.7 > "5" 0.6 (None's 5.0 never counts); "8" 1.1 > "7" 0.3; all None -> best score.
    np.testing.assert_array_equal(choose("weighted_majority", answers, scores), [0, 3, 1])
    with pytest.raises(Exception, match="scores"):
        choose("score", answers)
    with pytest.raises(Exception, match="expected one of"):
        choose("vote", answers)


def test_best_of_n_with_an_oracle_is_the_max_over_the_same_samples(model):
    module, params = model
    sc = StepConfig(step_tokens=3, max_steps=2, temperature=1.0, eos_token_ids=(EOS,))
    sampler = make_sampler(module, CFG, sc.sampling(n_samples=8))
    cands = sample_candidates(sampler, params, PROMPTS, PMASK, jax.random.key(4))
    assert cands.tokens.shape == (3, 8, 6)
    oracle = (cands.tokens == 40).sum(-1) - 0.01 * cands.lengths  # any function of the samples
    pick = choose("score", scores=oracle)
    np.testing.assert_array_equal(oracle[np.arange(3), pick], oracle.max(axis=1))
    assert cands.generated_tokens == int(cands.lengths.sum())


# ------------------------------------------------------------------------------------------------- tree search
def _top2_model(model):
    """Steps of one token, sampled from the policy's top-2 tokens: a binary tree of depth 6 per prompt."""
    module, params = model
    sc = StepConfig(step_tokens=1, max_steps=6, temperature=1.0, top_k=2, eos_token_ids=())
    return module, params, sc, np.ones(CFG.vocab_size, bool)


def _second_best_path(params, prompts, pmask, depth):
    """The path that takes the policy's second-ranked token at every step (found by full forwards)."""
    toks, mask = prompts.copy(), pmask.copy()
    path = []
    for _ in range(depth):
        logits = np.asarray(_forward(params, toks, mask.astype(bool)))[:, -1]
        nxt = np.argsort(-logits, axis=-1, kind="stable")[:, 1].astype(np.int32)
        path.append(nxt)
        toks = np.concatenate([toks, nxt[:, None]], 1)
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], 1)
    return np.stack(path, 1)


def _prefix_scorer(target, p):
    """Host scorer: how many leading generated tokens match the problem's target path (rows in problem order)."""
    def score(tokens, mask):
        gen = np.asarray(tokens)[:, p:]
        rows_per = gen.shape[0] // target.shape[0]
        t = np.repeat(target, rows_per, axis=0)
        match = np.cumprod(gen[:, :t.shape[1]] == t, axis=1)
        return match.sum(1).astype(np.float32)
    return score


def test_beam_search_and_dvts_find_the_path_the_scorer_prefers(model):
    module, params, sc, table = _top2_model(model)
    target = _second_best_path(params, PROMPTS, PMASK, 6)
    dec = StepDecoder(module, CFG, sc, table)
    scorer = _prefix_scorer(target, PROMPTS.shape[1])
    res = beam_search(dec, params, PROMPTS, PMASK, jax.random.key(0), scorer, beam_width=2, expansions=8)
    best, _ = res.best_tokens()
    np.testing.assert_array_equal(best, target)
    assert res.scores.shape == (3, 2) and (res.scores[np.arange(3), res.best] == 6).all()
    assert res.rounds == 6 and res.generated_tokens == 6 * 3 * 2 * 8
    # The same key gives the same search; whole-solution sampling at the same budget does not find the path.
    again = beam_search(dec, params, PROMPTS, PMASK, jax.random.key(0), scorer, beam_width=2, expansions=8)
    np.testing.assert_array_equal(again.tokens, res.tokens)
    cands = sample_candidates(make_sampler(module, CFG, sc.sampling(n_samples=16)), params, PROMPTS, PMASK,
                              jax.random.key(0))
    bon = scorer(np.concatenate([np.repeat(PROMPTS, 16, 0), cands.tokens.reshape(48, -1)], 1), None)
    assert bon.reshape(3, 16).max(1).min() < 6
    tree = dvts(dec, params, PROMPTS, PMASK, jax.random.key(1), scorer, subtrees=2, expansions=8)
    assert tree.tokens.shape == (3, 2, 6)
    np.testing.assert_array_equal(tree.best_tokens()[0], target)


def test_sharded_search_equals_single_device(model):
    module, params, sc, table = _top2_model(model)
    prompts, pmask = np.concatenate([PROMPTS, PROMPTS[:1]]), np.concatenate([PMASK, PMASK[:1]])
    scorer = _prefix_scorer(_second_best_path(params, prompts, pmask, 6), prompts.shape[1])
    out = [beam_search(StepDecoder(module, CFG, sc, table, env=env), params, prompts, pmask, jax.random.key(2),
                       scorer, beam_width=2, expansions=4) for env in (None, _env(2))]
    np.testing.assert_array_equal(out[0].tokens, out[1].tokens)
    np.testing.assert_allclose(out[0].logprob, out[1].logprob, rtol=1e-5, atol=1e-5)


def test_cached_prm_scorer_equals_the_full_forward_and_gives_the_same_beams(model):
    from jaxrl_llm.models.transformer import ScalarHeadModel
    from jaxrl_llm.search.scorers import CachedPRMScorer, prm_scorer

    module, params = model
    prm = ScalarHeadModel(CFG, per_token=True, zero_init_head=False)
    _, prm_params, _ = create_model(CFG, jax.random.key(7), _env(), module=prm)
    sc = StepConfig(step_tokens=4, max_steps=4, temperature=1.0, eos_token_ids=(EOS,))
    dec = StepDecoder(module, CFG, sc, _table())
    full = prm_scorer(prm, prm_params, _table(), PROMPTS.shape[1], how="last")
    cached = CachedPRMScorer(prm, prm_params, sc)
    state, pst = dec.start(params, PROMPTS, PMASK, n=2), cached.start(PROMPTS, PMASK, 2)
    for i in range(3):
        state, step = dec.extend(params, state, jax.random.key(i))
        pst, scores = cached.feed(pst, step)
        np.testing.assert_allclose(np.asarray(scores), np.asarray(full(*state.sequences())), rtol=1e-4, atol=1e-5)
        rows = jnp.array([1, 0, 3, 3, 5, 4], jnp.int32)
        state, pst = dec.select(state, rows), cached.select(pst, rows)
    a = beam_search(dec, params, PROMPTS, PMASK, jax.random.key(5), full, beam_width=2, expansions=3)
    b = beam_search(dec, params, PROMPTS, PMASK, jax.random.key(5), cached, beam_width=2, expansions=3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ accuracy against compute
class _FirstCharTask:
    """A stand-in task on decoded text: the answer is the solution's first character."""

    step_separator = ";"

    def extract_answer(self, text):
        return text[:1] or None

    def is_correct(self, text, example):
        return text[:1] == example.answer

    def reward(self, inputs):
        from jaxrl_llm.tasks.base import RewardOutput
        ok = np.asarray([self.is_correct(t, e) for t, e in zip(inputs.completions, inputs.examples)])
        return RewardOutput(scores=ok.astype(np.float32), correct=ok)


def test_evaluate_search_runs_every_method_at_its_budget(model):
    from jaxrl_llm.eval.search_eval import SearchEvalConfig, evaluate_search, search_table
    from jaxrl_llm.models.transformer import ScalarHeadModel
    from jaxrl_llm.tasks.base import Example
    from jaxrl_llm.tokenizer import load_tokenizer

    module, params = model
    tok = load_tokenizer()
    prm = ScalarHeadModel(CFG, per_token=True, zero_init_head=False)
    orm = ScalarHeadModel(CFG, per_token=False, zero_init_head=False)
    prm_params = create_model(CFG, jax.random.key(7), _env(), module=prm)[1]
    orm_params = create_model(CFG, jax.random.key(8), _env(), module=orm)[1]
    examples = [Example(prompt=p, answer=a) for p, a in (("1+2=", "3"), ("4+4=", "8"), ("2+5=", "7"))]
    sc = StepConfig(step_tokens=3, max_steps=3, temperature=1.0, eos_token_ids=(EOS,))
    cfg = SearchEvalConfig(budgets=(4,), expansions=2, step=sc, batch_size=2, max_prompt_len=6)
    rows = evaluate_search((module, CFG, params), tok, _FirstCharTask(), examples, cfg, step_ends=_table(),
                           prm=(prm, prm_params), orm=(orm, orm_params))
    by = {r["method"]: r for r in rows}
    assert set(by) == {"greedy", "majority", "verifier", "orm", "prm", "prm_vote", "beam", "dvts", "mcts"}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["problems"] == 3 for r in rows)
    assert 0 < by["greedy"]["tokens_per_problem"] <= 9
    # The verifier picks among the same samples as the votes and scorers: pass@4, their upper bound.
    assert all(by["verifier"]["accuracy"] >= by[m]["accuracy"] for m in ("majority", "orm", "prm", "prm_vote"))
    for m in ("majority", "verifier", "orm", "prm", "prm_vote", "beam", "dvts"):  # 4 candidates of <= 9 tokens
        assert by[m]["tokens_per_problem"] <= 4 * 9
    # The same samples (one key per budget and chunk): the votes and scores choose among identical candidates.
    assert by["majority"]["tokens_per_problem"] == by["orm"]["tokens_per_problem"] == by["prm"]["tokens_per_problem"]
    assert "| greedy |" in search_table(rows) and "| mcts |" in search_table(rows)


def test_mcts_answer_takes_the_best_whole_solution():
    from types import SimpleNamespace

    from jaxrl_llm.eval.search_eval import mcts_answer

    # one problem: root 0 -> 1 (terminal, q .4), 2 (not terminal, q .9) -> 3 (terminal, q .7)
    out = SimpleNamespace(
        tokens=np.array([[5, 6, 0, 0]]), lengths=np.array([2]), best_q=np.array([0.9]),
        best_terminal=np.array([False]), num_nodes=np.array([4]), terminal=np.array([[False, True, False, True]]),
        q=np.array([[0.5, 0.4, 0.9, 0.7]]), visits=np.array([[3, 1, 2, 1]]), finished=np.array([[False, True, False, True]]),
        depth=np.array([[0, 1, 1, 2]]), parent=np.array([[-1, 0, 0, 2]]),
        step_tokens=np.array([[[0, 0], [9, 2], [5, 6], [7, 2]]]), step_lengths=np.array([[0, 2, 2, 2]]),
        generated_tokens=np.array([8]), simulations=np.array([2]))
    res = mcts_answer(out)
    np.testing.assert_array_equal(res.tokens[0, 0, :4], [5, 6, 7, 2])
    assert res.lengths[0, 0] == 4 and res.scores[0, 0] == np.float32(0.7) and res.num_steps[0, 0] == 2
