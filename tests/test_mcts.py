"""MCTS over solution steps: finds a known path, its counts and Q values follow from its own record, it is
deterministic, compiles a fixed set of programs, and a sharded run equals the single-device one.

The toy problem: steps of one token sampled from the policy's top-2 tokens at a high temperature (about
50/50), so each tree is binary and both branches are sampled; the value of a partial solution is the fraction
of the target path it matches from the start, where the target takes the policy's SECOND-ranked token at every
step (found with full forwards, independently of the decoder).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.errors import ConfigError
from jaxrl_llm.models import CausalLM, ModelConfig, create_model
from jaxrl_llm.search.decoding import StepConfig, StepDecoder
from jaxrl_llm.search.mcts import mcts, path_tokens, sibling_pairs, step_texts
from jaxrl_llm.sharding import ShardingEnv, make_mesh

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, qkv_bias=True, initializer_range=0.3, max_position_embeddings=96)
PROMPTS = np.array([[0, 11, 12, 13, 14, 15],
                    [0, 0, 0, 21, 22, 23],
                    [0, 0, 0, 0, 0, 31],
                    [0, 0, 41, 42, 43, 44]], np.int32)
PMASK = (np.arange(6)[None, :] >= np.array([1, 3, 5, 2])[:, None]).astype(np.int32)
P = PROMPTS.shape[1]
DEPTH, K = 4, 8
SC = StepConfig(step_tokens=2, max_steps=DEPTH, temperature=50.0, top_k=2)
TABLE = np.ones(CFG.vocab_size, bool)  # every token ends a step: steps of one token (of at most 2)


def _env(n=1):
    return ShardingEnv(make_mesh({"data": n}, devices=jax.devices()[:n]))


@pytest.fixture(scope="module")
def model():
    module, params, _ = create_model(CFG, jax.random.key(0), _env())
    return module, params


@pytest.fixture(scope="module")
def decoder(model):
    return StepDecoder(model[0], CFG, SC, TABLE)


@jax.jit
def _last_logits(params, tokens, mask):
    """Logits after each row's last real token (rows right-padded), by one uncached forward."""
    logits = CausalLM(CFG).apply({"params": params}, tokens, None, mask.astype(bool))[0].astype(jnp.float32)
    last = jnp.sum(mask, axis=1) - 1
    return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]


def _forward_next(params, seqs):
    """Logits [N, V] after each of the given token sequences (padded to one width: one compiled program)."""
    width = P + DEPTH
    toks = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        toks[i, :len(s)], mask[i, :len(s)] = s, 1
    return np.asarray(_last_logits(params, toks, mask))


def _prompt(b):
    return PROMPTS[b][PMASK[b] > 0]


@pytest.fixture(scope="module")
def target(model):
    """[B, DEPTH]: the second-ranked token at every step."""
    seqs = [list(_prompt(b)) for b in range(len(PROMPTS))]
    for _ in range(DEPTH):
        nxt = np.argsort(-_forward_next(model[1], seqs), axis=-1, kind="stable")[:, 1]
        seqs = [s + [int(t)] for s, t in zip(seqs, nxt)]
    return np.array([s[-DEPTH:] for s in seqs], np.int32)


def _matched(gen, target):
    """Fraction of the target matched from the start by each row of generated tokens [R, >= DEPTH] (-1 after
    a row's end)."""
    return np.cumprod(gen[:, :DEPTH] == target, axis=1).sum(1) / DEPTH


def _value_fn(target, log=None):
    def value(tokens, mask):
        gen = np.where(np.asarray(mask)[:, P:] > 0, np.asarray(tokens)[:, P:], -1)
        if log is not None:
            log.append(gen)
        return _matched(gen, np.repeat(target, gen.shape[0] // len(target), axis=0))
    return value


def _ancestors(res, b, node):
    out = []
    while node >= 0:
        out.append(node)
        node = int(res.parent[b, node])
    return out


def _check_record(res, sims):
    """Visit counts and Q values recomputed from the per-simulation record (leaves, backed_up)."""
    for b in range(res.parent.shape[0]):
        n = int(res.num_nodes[b])
        visits, w = np.zeros(n, int), res.value[b, :n].copy()
        visits[1:] = 1  # each child's own evaluation
        for leaf, v in zip(res.leaves[b], res.backed_up[b]):
            if leaf < 0:
                continue
            for a in _ancestors(res, b, int(leaf)):
                visits[a] += 1
                w[a] += v
        np.testing.assert_array_equal(res.visits[b, :n], visits)
        np.testing.assert_allclose(res.q[b, :n], w / visits, rtol=1e-12, atol=1e-12)
        assert res.visits[b, 0] == res.simulations[b] == sims[b]
        assert (res.visits[b, n:] == 0).all()


def test_mcts_finds_the_path_the_value_prefers(model, decoder, target):
    module, params = model
    log = []
    res = mcts(decoder, params, PROMPTS, PMASK, jax.random.key(0), _value_fn(target, log), simulations=10,
               expansions=K, c_puct=0.5)
    np.testing.assert_array_equal(res.tokens[:, :DEPTH], target)
    assert (res.lengths == DEPTH).all() and res.best_terminal.all() and (res.best_q == 1.0).all()
    assert (res.best_nodes[:, -1] >= 0).all() and (res.depth[np.arange(4), res.best_nodes[:, -1]] == DEPTH).all()
    _check_record(res, [10] * 4)
    # Every sampled row wrote one token; the count is the rows' tokens over the simulations that expanded.
    expanded = (res.leaves >= 0) & ~np.take_along_axis(res.terminal, np.maximum(res.leaves, 0), axis=1)
    np.testing.assert_array_equal(res.generated_tokens, K * expanded.sum(1))
    parent_seqs = []
    for b in range(4):
        n = int(res.num_nodes[b])
        kids = np.arange(1, n)
        par = res.parent[b, kids]
        assert (res.depth[b, kids] == res.depth[b, par] + 1).all()
        assert (res.terminal[b, :n] == (res.depth[b, :n] == DEPTH)).all()  # no EOS in this toy
        for node in range(n):
            ch = res.children[b, node][res.children[b, node] >= 0]
            if len(ch):
                np.testing.assert_allclose(res.prior[b, ch].sum(), 1.0, rtol=1e-9)
                assert len({tuple(res.step_tokens[b, c, :1]) for c in ch}) == len(ch)  # merged duplicates
            path = path_tokens(res, b, node)
            assert len(path) == res.path_lengths[b, node] == res.depth[b, node]
            if node:  # a child's value is the value of its own path (the decoder fed the right path)
                padded = np.pad(path, (0, DEPTH - len(path)), constant_values=-1)[None]
                assert res.value[b, node] == _matched(padded, target[b:b + 1])[0]
        parent_seqs.append([list(_prompt(b)) + list(path_tokens(res, b, int(p))) for p in par])
    # Each child is one of the policy's top-2 tokens after its parent's path (uncached forwards).
    for b in range(4):
        logits = _forward_next(params, parent_seqs[b])
        top2 = np.argsort(-logits, axis=-1, kind="stable")[:, :2]
        kids = np.arange(1, int(res.num_nodes[b]))
        assert (top2 == res.step_tokens[b, kids, :1]).any(axis=1).all()
    # The values were computed on prompt + leaf's path + one new step; simulations whose leaves were all
    # terminal (the tree had found the whole target) called nothing.
    sims = np.flatnonzero(expanded.any(0))
    assert len(log) == len(sims) and all(g.shape == (4 * K, SC.max_new_tokens) for g in log)
    for g, s in zip(log, sims):
        for b in np.flatnonzero(expanded[:, s]):
            path = path_tokens(res, b, int(res.leaves[b, s]))
            rows = g[b * K:(b + 1) * K]
            assert ((rows >= 0).sum(1) == len(path) + 1).all()
            np.testing.assert_array_equal(rows[:, :len(path)], np.broadcast_to(path, (K, len(path))))


def test_same_key_same_tree_and_a_fixed_set_of_programs(model, decoder, target):
    module, params = model
    fns = (decoder.start, decoder.append, decoder.select, decoder.extend)
    kw = dict(simulations=3, expansions=K)
    a = mcts(decoder, params, PROMPTS, PMASK, jax.random.key(5), _value_fn(target), **kw)
    sizes = [f._cache_size() for f in fns]
    b = mcts(decoder, params, PROMPTS, PMASK, jax.random.key(5), _value_fn(target), **kw)
    for f in ("parent", "step_tokens", "visits", "q", "prior", "tokens"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    c = mcts(decoder, params, PROMPTS, PMASK, jax.random.key(6), _value_fn(target), **kw)
    assert not np.array_equal(a.step_tokens, c.step_tokens) or not np.array_equal(a.parent, c.parent)
    # A bigger budget, deeper paths, another key: no new program.
    mcts(decoder, params, PROMPTS, PMASK, jax.random.key(7), _value_fn(target), simulations=9, expansions=K)
    assert [f._cache_size() for f in fns] == sizes


def test_rollouts_complete_each_candidate_and_count_their_tokens(model, target):
    module, params = model
    dec = StepDecoder(module, CFG, SC, TABLE)
    greedy = StepDecoder(module, CFG, StepConfig(step_tokens=2, max_steps=DEPTH, temperature=0.0), TABLE)
    log = []
    # Nothing matches problem 3's target: its search follows the prior, so its leaves are at other depths than
    # the others' (each row must stop at its own max_steps).
    target = np.concatenate([target[:3], np.full((1, DEPTH), -5, np.int32)])
    res = mcts(dec, params, PROMPTS, PMASK, jax.random.key(1), _value_fn(target, log), simulations=8, expansions=K,
               c_puct=0.5, leaf="rollout", rollout_decoder=greedy)
    np.testing.assert_array_equal(res.tokens[:3, :DEPTH], target[:3])
    assert (res.value[3] == 0).all()
    _check_record(res, [8] * 4)
    expanded = (res.leaves >= 0) & ~np.take_along_axis(res.terminal, np.maximum(res.leaves, 0), axis=1)
    sims = np.flatnonzero(expanded.any(0))
    assert len(log) == len(sims)
    leaf_depth = np.take_along_axis(res.depth, np.maximum(res.leaves, 0), axis=1)
    # K rows per expanding problem: one token of expansion, then one per remaining step.
    np.testing.assert_array_equal(res.generated_tokens, (K * (DEPTH - leaf_depth) * expanded).sum(1))
    done = []
    for g, s in zip(log, sims):
        for b in np.flatnonzero(expanded[:, s]):
            rows = g[b * K:(b + 1) * K]
            assert ((rows >= 0).sum(1) == DEPTH).all()  # every candidate completed to max_steps, no further
            path = path_tokens(res, b, int(res.leaves[b, s]))
            np.testing.assert_array_equal(rows[:, :len(path)], np.broadcast_to(path, (K, len(path))))
            for r in rows:  # (prefix, the token the rollout wrote after it)
                done += [(list(_prompt(b)) + list(r[:d]), r[d]) for d in range(len(path) + 1, DEPTH)]
    # The rollouts are greedy: every token after the candidate step is the argmax of an uncached forward.
    assert done
    nxt = _forward_next(params, [d[0] for d in done]).argmax(-1)
    np.testing.assert_array_equal(nxt, [d[1] for d in done])
    # Greedy continuations take the policy's first choice, never the target's second: a child's rollout value
    # is what its own path matches.
    for b in range(4):
        for c in range(1, int(res.num_nodes[b])):
            path = np.pad(path_tokens(res, b, c), (0, DEPTH - int(res.depth[b, c])), constant_values=-1)
            assert res.value[b, c] == _matched(path[None], target[b:b + 1])[0]


def test_a_token_budget_stops_each_problem(model, decoder, target):
    res = mcts(decoder, model[1], PROMPTS, PMASK, jax.random.key(0), _value_fn(target), simulations=10,
               expansions=K, max_generated_tokens=2 * K + 1)
    np.testing.assert_array_equal(res.simulations, [3] * 4)  # K tokens per simulation: 3K >= 2K + 1 > 2K
    np.testing.assert_array_equal(res.generated_tokens, [3 * K] * 4)
    assert (res.leaves[:, 3:] == -1).all() and (res.leaves[:, :3] >= 0).all()
    _check_record(res, [3] * 4)


def test_sibling_pairs_and_step_texts(model, decoder, target):
    res = mcts(decoder, model[1], PROMPTS, PMASK, jax.random.key(0), _value_fn(target), simulations=10,
               expansions=K, c_puct=0.5)
    pairs = sibling_pairs(res, min_q_gap=0.2)
    assert pairs and {p.problem for p in pairs} == {0, 1, 2, 3}
    for p in pairs:
        assert res.parent[p.problem, p.chosen_node] == res.parent[p.problem, p.rejected_node] == p.parent
        np.testing.assert_array_equal(p.prefix, np.concatenate([_prompt(p.problem),
                                                                path_tokens(res, p.problem, p.parent)]))
        np.testing.assert_array_equal(p.chosen, res.step_tokens[p.problem, p.chosen_node, :1])
        np.testing.assert_array_equal(p.rejected, res.step_tokens[p.problem, p.rejected_node, :1])
        assert p.chosen_q == res.q[p.problem, p.chosen_node] and p.rejected_q == res.q[p.problem, p.rejected_node]
        assert p.chosen_q - p.rejected_q >= 0.2
    # At the root the target's first token beats the other one.
    root = [p for p in pairs if p.parent == 0]
    assert len(root) == 4 and all(p.chosen[0] == target[p.problem, 0] for p in root)
    assert len(sibling_pairs(res, min_q_gap=0.0)) >= len(pairs) and not sibling_pairs(res, min_q_gap=1.01)

    class Tok:  # decodes token t as "<t>"
        eos_token_id, pad_token_id = 2, 0

        def __len__(self):
            return CFG.vocab_size

        def decode(self, ids, **kw):
            return "".join(f"<{t}>" for t in ids)

    texts = step_texts(res, Tok())
    assert [len(t) for t in texts] == list(res.num_nodes) and texts[0][0] == ""
    assert texts[1][1] == f"<{res.step_tokens[1, 1, 0]}>"


def test_user_errors_name_the_argument(model, decoder, target):
    params = model[1]
    with pytest.raises(ConfigError, match="leaf='tree'"):
        mcts(decoder, params, PROMPTS, PMASK, jax.random.key(0), _value_fn(target), simulations=1, expansions=2,
             leaf="tree")
    with pytest.raises(ConfigError, match=r"value_fn returned shape \(4,\); expected \(32,\)"):
        mcts(decoder, params, PROMPTS, PMASK, jax.random.key(0), lambda t, m: np.zeros(4), simulations=1,
             expansions=K)


def test_sharded_mcts_equals_single_device(model, decoder, target):
    module, params = model
    # Rollouts, and problems at different depths (3 has no reachable target): rows stop at different times.
    target = np.concatenate([target[:3], np.full((1, DEPTH), -5, np.int32)])
    kw = dict(simulations=6, expansions=K, c_puct=2.0, leaf="rollout")
    one = mcts(decoder, params, PROMPTS, PMASK, jax.random.key(3), _value_fn(target), **kw)
    two = mcts(StepDecoder(module, CFG, SC, TABLE, env=_env(2)), params, PROMPTS, PMASK, jax.random.key(3),
               _value_fn(target), **kw)
    assert len(set(np.take_along_axis(one.depth, one.leaves, 1)[:, 3])) > 1  # simulation 3: depths differ
    for f in ("parent", "children", "step_tokens", "visits", "terminal", "tokens", "leaves", "generated_tokens"):
        np.testing.assert_array_equal(getattr(one, f), getattr(two, f), err_msg=f)
    for f in ("q", "prior", "step_logprob"):
        np.testing.assert_allclose(getattr(one, f), getattr(two, f), rtol=1e-5, atol=1e-6, err_msg=f)
