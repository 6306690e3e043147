"""Process reward models: step ends, the PRM loss and its accumulation, learning a step rule, Math-Shepherd
labels, the implicit PRM (PRIME) loss, the step-label file loader and the "prm" stage.

Compiled programs are few and tiny (the test model of test_sft_rm_dpo_steps, compiled with XLA's backend
optimisation off): the whole file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_llm.algos.prm import (ImplicitPRMConfig, PRMConfig, aggregate_steps, bce_with_logits, binary_auc,
                                 implicit_prm_loss, implicit_step_rewards, implicit_token_rewards,
                                 make_implicit_prm_step, make_implicit_reference_fn, make_prm_step, step_end_mask,
                                 step_end_table, step_index, step_scores, step_sums)
from jaxrl_llm.algos.train_state import TrainState
from jaxrl_llm.models import ModelConfig, create_model, process_reward_model, reward_model
from jaxrl_llm.sharding import ShardingEnv, make_mesh

V = 64
CFG = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
SGD = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
FAST_COMPILE = {"xla_backend_optimization_level": 0}
SEP = 3  # the separator token of the synthetic data
BAD = 5  # a step holding this token is bad


class _Tok:
    """A tokenizer of a fixed vocabulary: what step_end_table reads (len, batch_decode)."""

    def __init__(self, vocab):
        self.vocab = vocab

    def __len__(self):
        return len(self.vocab)

    def batch_decode(self, rows, **kw):
        return ["".join(self.vocab[i] for i in r) for r in rows]


# ----------------------------------------------------------------------------- step ends


def test_step_end_table_matches_merged_and_split_separators():
    tok = _Tok(["a", "b", ";", "; ", "x;\n", "\n\n", "c", " "])
    assert np.flatnonzero(step_end_table(tok, ";", 10)).tolist() == [2, 3, 4]
    assert np.flatnonzero(step_end_table(tok, "; ", 10)).tolist() == [2, 3, 4]  # the core ";" of "; "
    assert np.flatnonzero(step_end_table(tok, "\n", 8)).tolist() == [4, 5]
    assert np.flatnonzero(step_end_table(tok, "\n\n", 8)).tolist() == [5]  # whitespace-only: the whole of it
    assert np.flatnonzero(step_end_table(tok, ("\n", ";"), 8)).tolist() == [2, 3, 4, 5]
    assert step_end_table(tok, ";", 10).shape == (10,)  # ids past the tokenizer (a padded vocabulary): False
    with pytest.raises(ValueError, match=r"no token of the tokenizer's 8 contains the step separator \('#',\)"):
        step_end_table(tok, "#", 8)
    from jaxrl_llm.tokenizer import load_tokenizer
    tiny = load_tokenizer("tiny")  # the shipped tokenizer writes "\n" and ";" as tokens of their own
    for sep in ("\n", ";", "; "):
        assert [tiny.decode([int(i)]) for i in np.flatnonzero(step_end_table(tiny, sep, 512))] == [sep.strip() or sep]


def test_step_end_mask_separators_and_last_real_token():
    table = np.zeros(10, bool)
    table[[2, 3]] = True
    tokens = np.array([[7, 2, 7, 7, 3, 7, 1, 0],    # two separators, then a last step ending at EOS (1)
                       [7, 7, 7, 0, 0, 0, 0, 0],    # one step
                       [7, 2, 0, 0, 0, 0, 0, 0],    # ends on a separator: no extra step
                       [0, 0, 0, 0, 0, 0, 0, 0]])   # empty
    mask = np.array([[1] * 7 + [0], [1] * 3 + [0] * 5, [1, 1] + [0] * 6, [0] * 8], bool)
    ends = np.asarray(jax.jit(step_end_mask)(tokens, mask, table))
    assert [np.flatnonzero(r).tolist() for r in ends] == [[1, 4, 6], [2], [1], []]
    table_masked = table.copy()
    table_masked[0] = True  # a separator in the padding never counts
    assert np.array_equal(np.asarray(step_end_mask(tokens, mask, table_masked)), ends)
    np.testing.assert_array_equal(step_index(jnp.asarray(ends))[0], [0, 0, 1, 1, 1, 2, 2, 3])
    values = np.arange(1, 9, dtype=np.float32)[None].repeat(4, 0) * mask
    sums = np.asarray(step_sums(jnp.asarray(values), jnp.asarray(ends)))
    np.testing.assert_allclose(sums[0], [0, 1 + 2, 0, 0, 3 + 4 + 5, 0, 6 + 7, 0])
    np.testing.assert_allclose(sums[1], [0, 0, 6, 0, 0, 0, 0, 0])


def test_aggregate_steps():
    scores = np.array([[0.9, 0.0, 0.5, 0.8], [0.0, 0.0, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0]], np.float32)
    ends = np.array([[1, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]], bool)
    expect = {"min": [0.5, 0.3, 0.0], "prod": [0.9 * 0.5 * 0.8, 0.3, 0.0], "mean": [2.2 / 3, 0.3, 0.0],
              "last": [0.8, 0.3, 0.0]}
    for how, want in expect.items():
        np.testing.assert_allclose(aggregate_steps(scores, ends, how), want, rtol=1e-6, err_msg=how)
    with pytest.raises(ValueError, match=r"how='mim' is not supported. Did you mean 'min'"):
        aggregate_steps(scores, ends, "mim")


def test_binary_auc():
    assert binary_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert binary_auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert np.isnan(binary_auc(np.array([0.5, 0.7]), np.array([1, 1])))


# ----------------------------------------------------------------------------- the PRM step


def _env():
    return ShardingEnv(make_mesh({"data": 1}, devices=jax.devices()[:1]))


@pytest.fixture(scope="module")
def prm():
    """A PRM on a random backbone with a random (not zero) head, so the body gets gradients at once."""
    _, lm_params, _ = create_model(CFG, jax.random.key(0), _env())
    head = {"kernel": 0.2 * np.random.default_rng(1).standard_normal((CFG.hidden_size, 1)).astype(np.float32),
            "bias": np.zeros((1,), np.float32)}
    return process_reward_model(CFG), {"model": jax.device_get(lm_params["model"]), "score": head}


def step_batch(seed, b=8, p=4, k=3, step_len=3, bad_rate=0.3):
    """Synthetic solutions of k steps of `step_len` tokens, each ended by SEP (the last by EOS = 1); a step is
    bad iff it holds BAD. Some rows are cut short (their last step unlabelled)."""
    rng = np.random.default_rng(seed)
    n = k * (step_len + 1)
    tokens = rng.integers(10, V, (b, n)).astype(np.int32)
    labels, lmask = np.zeros((b, n), np.float32), np.zeros((b, n), bool)
    for i in range(b):
        for j in range(k):
            end = j * (step_len + 1) + step_len
            tokens[i, end] = SEP if j < k - 1 else 1
            bad = rng.random() < bad_rate
            if bad:
                tokens[i, end - 1 - rng.integers(step_len)] = BAD
            labels[i, end], lmask[i, end] = 0.0 if bad else 1.0, True
    mask = np.ones((b, n), bool)
    cut = rng.random(b) < 0.25  # truncated: the last step has no label and the mask stops before its end
    mask[cut, -2:] = False
    lmask[cut, -1] = False
    labels[~lmask] = 0.0
    return {"prompt_tokens": rng.integers(10, V, (b, p)).astype(np.int32), "prompt_mask": np.ones((b, p), bool),
            "completion_tokens": np.where(mask, tokens, 0).astype(np.int32), "completion_mask": mask,
            "step_labels": labels, "step_mask": lmask}


_COMPILED = {}


def run_steps(make, cfg, num_micro, module, params, batches, tx=None, lr=1.0, steps=1):
    """`steps` updates from a copy of `params`; `batches`: a batch or i -> batch. Returns (params, metrics)."""
    get = lambda i: batches(i) if callable(batches) else batches  # noqa: E731
    state = TrainState.create(jax.device_put(jax.device_get(params)), tx or SGD)
    if tx is None:
        state = state.replace(opt_state=state.opt_state._replace(hyperparams={"learning_rate": jnp.float32(lr)}))
    key = (make.__name__, cfg, num_micro, id(module), tx is None, tuple((k, np.shape(v)) for k, v in get(0).items()))
    if key not in _COMPILED:
        step = jax.jit(make(module, CFG, cfg, num_micro), donate_argnums=0)
        _COMPILED[key] = step.lower(state, get(0), jax.random.key(0)).compile(compiler_options=FAST_COMPILE)
    history = []
    for i in range(steps):
        state, metrics = _COMPILED[key](state, get(i), jax.random.key(i))
        history.append(jax.device_get(metrics))
    return jax.device_get(state.params), history


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_prm_loss_is_the_bce_at_labelled_step_ends(prm):
    module, params = prm
    batch = step_batch(0)
    p = batch["prompt_tokens"].shape[1]
    tokens = np.concatenate([batch["prompt_tokens"], batch["completion_tokens"]], 1)
    mask = np.concatenate([batch["prompt_mask"], batch["completion_mask"]], 1)
    z = np.asarray(module.apply({"params": params}, tokens, None, mask), np.float64)[:, p:]
    m, y = batch["step_mask"], batch["step_labels"].astype(np.float64)
    want = np.sum(m * (np.log1p(np.exp(z)) - y * z)) / m.sum()
    _, hist = run_steps(make_prm_step, PRMConfig(), 1, module, params, batch, lr=0.0)
    assert float(hist[0]["loss"]) == pytest.approx(want, rel=1e-5)
    assert float(hist[0]["num_steps"]) == m.sum()
    assert float(hist[0]["accuracy"]) == pytest.approx(np.sum(m * ((z > 0) == (y >= 0.5))) / m.sum(), rel=1e-6)
    # the loss reads the labelled positions only: moving the labels one token left changes it
    shifted = {**batch, "step_labels": np.roll(batch["step_labels"], -1, 1), "step_mask": np.roll(m, -1, 1)}
    _, hist2 = run_steps(make_prm_step, PRMConfig(), 1, module, params, shifted, lr=0.0)
    assert abs(float(hist2[0]["loss"]) - want) > 1e-3
    # zero head: every logit is 0, every step's BCE log 2; hard labels binarise soft ones
    zero = {**params, "score": jax.tree.map(np.zeros_like, params["score"])}
    soft = {**batch, "step_labels": np.where(m, 0.7, 0.0).astype(np.float32)}
    _, h = run_steps(make_prm_step, PRMConfig(), 1, module, zero, soft, lr=0.0)
    assert float(h[0]["loss"]) == pytest.approx(np.log(2.0), rel=1e-6)
    assert float(bce_with_logits(jnp.float32(2.0), jnp.float32(0.7))) == pytest.approx(
        -(0.7 * np.log(1 / (1 + np.exp(-2.0))) + 0.3 * np.log(1 - 1 / (1 + np.exp(-2.0)))), rel=1e-6)


def test_prm_accumulation_is_exact(prm):
    module, params = prm
    batch = step_batch(1)
    p1, m1 = run_steps(make_prm_step, PRMConfig(hard_labels=True), 1, module, params, batch)
    p4, m4 = run_steps(make_prm_step, PRMConfig(hard_labels=True), 4, module, params, batch)
    update = _max_diff(p1, params)
    assert update > 1e-3
    assert _max_diff(p1, p4) < 1e-6 * max(1.0, update)
    for k in ("loss", "accuracy", "prob/mean", "prob/good_steps", "prob/bad_steps", "label/mean", "num_steps"):
        np.testing.assert_allclose(m1[0][k], m4[0][k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_prm_learns_a_step_rule(prm):
    """A step is bad iff it holds token BAD: read at each step's end, the PRM must tell its own step from the
    earlier ones. Held-out step accuracy after 150 Adam steps."""
    module, params = prm
    params = {**params, "score": jax.tree.map(np.zeros_like, params["score"])}
    held = step_batch(10_000, b=64)
    trained, hist = run_steps(make_prm_step, PRMConfig(), 1, module, params, lambda i: step_batch(i, b=16),
                              tx=optax.adam(3e-3), steps=150)
    assert float(hist[0]["accuracy"]) < 0.8
    scores, ends = jax.jit(lambda p, b: step_scores(module, p, b["prompt_tokens"], b["prompt_mask"],
                                                    b["completion_tokens"], b["completion_mask"],
                                                    np.eye(V, dtype=bool)[SEP] | np.eye(V, dtype=bool)[1]))(
        trained, held)
    m = held["step_mask"]
    assert np.all(np.asarray(ends)[m])  # every labelled position is a step end
    pred = np.asarray(scores)[m] > 0.5
    acc = float(np.mean(pred == (held["step_labels"][m] >= 0.5)))
    assert acc >= 0.9, (acc, hist[-1])
    assert binary_auc(np.asarray(scores)[m], held["step_labels"][m]) > 0.95


def test_prm_errors(prm):
    module, params = prm
    with pytest.raises(ValueError, match=r"needs ScalarHeadModel\(cfg, per_token=True\).*per_token=False"):
        make_prm_step(reward_model(CFG), CFG)
    state = TrainState.create(params, SGD)
    batch = step_batch(0)
    with pytest.raises(KeyError, match=r"prm step: batch is missing \['step_mask'\]"):
        make_prm_step(module, CFG)(state, {k: v for k, v in batch.items() if k != "step_mask"}, jax.random.key(0))
    with pytest.raises(ValueError, match=r"step_labels has shape \(8, 3\)"):
        make_prm_step(module, CFG)(state, {**batch, "step_labels": np.zeros((8, 3))}, jax.random.key(0))


# ----------------------------------------------------------------------------- implicit PRM (PRIME)


@pytest.fixture(scope="module")
def lm():
    module, params, _ = create_model(CFG, jax.random.key(0), _env())
    params = jax.device_get(params)
    rng = np.random.default_rng(7)
    ref = jax.tree.map(lambda x: (x + 0.05 * rng.standard_normal(x.shape)).astype(x.dtype), params)
    return module, params, ref


def _token_logps(module, params, batch):
    """float64 log-probs of the completion tokens from full logits (independent of the chunked code)."""
    p = batch["prompt_tokens"].shape[1]
    tokens = np.concatenate([batch["prompt_tokens"], batch["completion_tokens"]], 1)
    mask = np.concatenate([batch["prompt_mask"], batch["completion_mask"]], 1)
    logits = np.asarray(module.apply({"params": params}, tokens, None, mask)[0], np.float64)[:, p - 1:-1]
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(logits, batch["completion_tokens"][..., None], -1)[..., 0]
    return (picked - lse) * batch["completion_mask"]


def test_implicit_prm_loss_by_hand():
    # r = 0.05 * ((-1 - -2) + (-0.5 - -0.5)) = 0.05 and r = 0.05 * (-3 - -1) = -0.1 (the masked token ignored)
    logp = jnp.array([[-1.0, -0.5, -9.0], [-3.0, -7.0, -7.0]])
    ref = jnp.array([[-2.0, -0.5, -1.0], [-1.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]], bool)
    rt = implicit_token_rewards(logp, ref, mask, 0.05)
    np.testing.assert_allclose(rt, [[0.05, 0.0, 0.0], [-0.1, 0.0, 0.0]], atol=1e-7)
    loss, r = implicit_prm_loss(rt, jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(r, [0.05, -0.1], rtol=1e-6)
    np.testing.assert_allclose(loss, [np.log1p(np.exp(-0.05)), np.log1p(np.exp(-0.1))], rtol=1e-6)


def test_implicit_prm_step_and_step_rewards(lm):
    module, params, ref_params = lm
    batch = {k: step_batch(3)[k] for k in ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask")}
    batch["outcome"] = np.array([1, 0, 1, 1, 0, 0, 1, 0.5], np.float32)
    cfg = ImplicitPRMConfig(beta=0.5, logprob_chunk=5)  # a chunk that does not divide N
    batch.update(jax.jit(make_implicit_reference_fn(module, CFG, cfg.logprob_chunk, 2))(ref_params, batch))
    want_ref = _token_logps(module, ref_params, batch)
    np.testing.assert_allclose(batch["ref_logps"], want_ref, rtol=1e-5, atol=1e-5)
    r = 0.5 * np.sum(_token_logps(module, params, batch) - want_ref, -1)
    assert np.ptp(r) > 0.1
    y = batch["outcome"]
    want = np.mean(np.log1p(np.exp(r)) - y * r)
    p1, h1 = run_steps(make_implicit_prm_step, cfg, 1, module, params, batch)
    assert float(h1[0]["loss"]) == pytest.approx(want, rel=1e-5)
    assert float(h1[0]["reward/mean"]) == pytest.approx(np.mean(r), rel=1e-4, abs=1e-6)
    p4, _ = run_steps(make_implicit_prm_step, cfg, 4, module, params, batch)
    assert _max_diff(p1, params) > 1e-3 and _max_diff(p1, p4) < 1e-5 * max(1.0, _max_diff(p1, params))
    # step rewards: the per-token rewards summed over each step, read at its end
    table = np.eye(V, dtype=bool)[SEP]
    sr, ends = jax.jit(lambda a, b, x: implicit_step_rewards(module, a, b, CFG, x["prompt_tokens"], x["prompt_mask"],
                                                             x["completion_tokens"], x["completion_mask"], table,
                                                             beta=0.5, chunk=5))(params, ref_params, batch)
    tok_r = 0.5 * (_token_logps(module, params, batch) - want_ref)
    for i in range(8):
        e = np.flatnonzero(np.asarray(ends)[i])
        starts = np.concatenate([[0], e[:-1] + 1])
        np.testing.assert_allclose(np.asarray(sr)[i, e], [tok_r[i, s:t + 1].sum() for s, t in zip(starts, e)],
                                   rtol=1e-4, atol=1e-5)
        assert np.asarray(sr)[i, e].sum() == pytest.approx(r[i], rel=1e-4, abs=1e-5)


# ----------------------------------------------------------------------------- Math-Shepherd labels


class _SumTask:
    """Prompts "a+b=": a completion is correct iff it ends with "=<a+b>"."""

    name = "sum_steps"
    step_separator = ";"

    def is_correct(self, completion, example):
        return completion.endswith("=" + example.answer)


def _fake_policy(tok, n, answers, calls):
    """A hand-built policy: after a prefix holding j separators, samples s = 0..n-1 reach the right answer iff
    s < j - 1 (so the soft label of step k, 0-based, is k / n)."""
    from jaxrl_llm.rollout.sampler import Rollout
    info = tok_info(tok)

    def sampler(params, tokens, mask, rng):
        calls.append(tokens.shape)
        rows, width = [], 6
        for t, m in zip(np.asarray(tokens), np.asarray(mask, bool)):
            text = tok.decode(t[m].tolist(), skip_special_tokens=True)
            prompt = next(p for p in answers if text.startswith(p))
            j = text.count(";")
            for s in range(n):
                cont = "x=" + (answers[prompt] if s < j - 1 else "0")
                rows.append(tok(cont, add_special_tokens=False)["input_ids"] + [info.eos_ids[0]])
        out = np.full((len(rows), width), info.pad_id, np.int32)
        m = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            out[i, :len(r)], m[i, :len(r)] = r, 1
        z = np.zeros(out.shape, np.float32)
        lengths = m.sum(-1).astype(np.int32)
        return Rollout(np.repeat(tokens, n, 0), np.repeat(mask, n, 0).astype(np.int32), out, m, z, z, lengths,
                       np.ones(len(rows), bool), np.int32(width))
    return sampler


def tok_info(tok):
    from jaxrl_llm.tokenizer import tokenizer_info
    return tokenizer_info(tok)


def test_shepherd_labels_on_a_hand_built_policy():
    from jaxrl_llm.search.shepherd import shepherd_labels
    from jaxrl_llm.tasks import Example
    from jaxrl_llm.tokenizer import load_tokenizer
    tok = load_tokenizer("tiny")
    answers = {"5+2=": "7", "3+3=": "6"}
    examples = [Example("5+2=", "7"), Example("3+3=", "6"), Example("5+2=", "7")]
    steps = [["a", "b", "c", "x=7"], ["a", "b", "x=0"], ["x=7"]]
    calls = []
    sampler = _fake_policy(tok, 4, answers, calls)
    kw = dict(n=4, key=jax.random.key(0), batch_size=2, max_prompt_len=6, max_prefix_len=8)
    soft = shepherd_labels(sampler, None, tok, _SumTask(), examples, steps, **kw)
    assert soft == [[0.0, 0.25, 0.5, 1.0], [0.0, 0.25, 0.0], [1.0]]
    assert calls == [(2, 14)] * 3  # 5 prefixes in batches of 2 (the last filled up), one shape
    hard = shepherd_labels(sampler, None, tok, _SumTask(), examples, steps, hard=True, **kw)
    assert hard == [[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [1.0]]
    with pytest.raises(ValueError, match=r"expected 12 rows|returned 8 rows for 2 prefixes; expected 12"):
        shepherd_labels(sampler, None, tok, _SumTask(), examples, steps, **{**kw, "n": 6})
    from jaxrl_llm.errors import DataError
    with pytest.raises(DataError, match=r"prefix of solution 0 up to step 1 has \d+ tokens"):
        shepherd_labels(sampler, None, tok, _SumTask(), examples, [["a" * 40, "x=7"], ["x=0"], ["x=7"]],
                        **kw)


def test_shepherd_labels_with_the_jitted_sampler():
    """The real sampler (random model): one compile for every batch, labels in {0, 1/2, 1}, the same for the
    same key."""
    from jaxrl_llm.rollout import SamplingConfig, make_sampler
    from jaxrl_llm.search.shepherd import shepherd_labels
    from jaxrl_llm.tasks import Example
    from jaxrl_llm.tokenizer import load_tokenizer
    tok = load_tokenizer("tiny")
    cfg = CFG.replace(vocab_size=512)
    module, params, _ = create_model(cfg, jax.random.key(1), _env())
    sampler = make_sampler(module, cfg, SamplingConfig(max_new_tokens=4, n_samples=2, eos_token_ids=(1,),
                                                       pad_token_id=0))
    examples = [Example("5+2=", "7"), Example("3+3=", "6")]
    steps = [["5+2=7", "7+0=7", "7"], ["3+3=6", "6"]]
    kw = dict(n=2, batch_size=2, max_prompt_len=6, max_prefix_len=12)
    a = shepherd_labels(sampler, params, tok, _SumTask(), examples, steps, key=jax.random.key(3), **kw)
    b = shepherd_labels(sampler, params, tok, _SumTask(), examples, steps, key=jax.random.key(3), **kw)
    assert a == b and [len(x) for x in a] == [3, 2]
    assert all(v in (0.0, 0.5, 1.0) for row in a for v in row) and a[1][-1] == 0.0  # "…;6" does not end in "=6"
    assert sampler._cache_size() == 1


# ----------------------------------------------------------------------------- the step-label file and the stage


def _records(n, seed=0):
    """"a+b+c=": steps "a+b=s1", "s1+c=s2"; a wrong step (and every one after it) labelled 0."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b, c = (int(x) for x in rng.integers(0, 9, 3))
        s1 = a + b + (int(rng.integers(1, 3)) if rng.random() < 0.3 else 0)
        s2 = s1 + c + (int(rng.integers(1, 3)) if rng.random() < 0.3 else 0)
        ok1 = s1 == a + b
        out.append({"prompt": f"{a}+{b}+{c}=", "steps": [f"{a}+{b}={s1}", f"{s1}+{c}={s2}"],
                    "labels": [int(ok1), int(ok1 and s2 == s1 + c)]})
    return out


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_step_label_file_errors_name_file_and_line(tmp_path):
    from jaxrl_llm.errors import DataError
    from jaxrl_llm.train.stages.prm import load_step_labels
    good = {"prompt": "1+1=", "steps": ["1+1=2"], "labels": [1]}
    cases = [("{not json", r"bad.jsonl:2: malformed JSON"),
             ({"prompt": 3, "steps": ["a"], "labels": [1]}, r"bad.jsonl:2: field 'prompt' is a number"),
             ({"prompt": "x", "steps": [], "labels": []}, r"bad.jsonl:2: field 'steps' is an array; expected a non"),
             ({"prompt": "x", "steps": ["a", "b"], "labels": [1]}, r"bad.jsonl:2: field 'labels' is 1 labels for 2 st"),
             ({"prompt": "x", "steps": ["a"], "labels": [-1]}, r"bad.jsonl:2: labels\[0\] is -1; expected a number in "
                                                               r"\[0, 1\].*PRM800K"),
             ({"prompt": "x", "steps": ["a"], "labels": [1], "separator": 5}, r"bad.jsonl:2: field 'separator'")]
    for row, pattern in cases:
        with pytest.raises(DataError, match=pattern):
            load_step_labels(_write(tmp_path / "bad.jsonl", [good, row]))
    recs = load_step_labels(_write(tmp_path / "ok.jsonl", [good, {**good, "labels": [0.25], "separator": ";"}]))
    assert recs[1].labels == (0.25,) and recs[1].separator == ";" and recs[1].where.endswith("ok.jsonl:2")


def test_encode_step_records_puts_labels_at_step_ends(tmp_path):
    from jaxrl_llm.errors import DataError
    from jaxrl_llm.tokenizer import load_tokenizer
    from jaxrl_llm.train.stages.prm import StepRecord, encode_step_records
    tok = load_tokenizer("tiny")
    recs = [StepRecord("1+2+3=", ("1+2=3", "3+3=6"), (1.0, 0.5), where="f:1"),
            StepRecord("4+4=", ("4+4=8", "8", "x"), (1.0, 0.0, 0.0), separator=";", where="f:2")]
    arrays, stats = encode_step_records(tok, recs, "\n", 8, 16, 512)
    texts = [[tok.decode([t]) for t in row[m]]
             for row, m in zip(arrays["completion_tokens"], arrays["completion_mask"])]
    ends = [[texts[i][j] for j in np.flatnonzero(arrays["step_mask"][i])] for i in range(2)]
    assert ends == [["\n", tok.decode([1])], [";", ";", tok.decode([1])]]  # separators, then the EOS
    assert arrays["step_labels"][arrays["step_mask"]].tolist() == [1.0, 0.5, 1.0, 0.0, 0.0]
    short, stats = encode_step_records(tok, recs, "\n", 8, 8, 512)  # ends past 8 tokens lose their labels
    assert short["step_mask"].sum(-1).tolist() == [1, 2] and stats.steps_truncated == 2 and stats.rows == 2
    assert short["step_labels"][short["step_mask"]].tolist() == [1.0, 1.0, 0.0]
    none, stats = encode_step_records(tok, recs, "\n", 8, 5, 512)  # no step ends within 5 tokens: dropped
    assert len(none["step_mask"]) == 0 and stats.rows_dropped == 2
    with pytest.raises(DataError, match=r"f:1: step 0 \('1\+2=3;x'\) contains the step separator ';'"):
        encode_step_records(tok, [StepRecord("1=", ("1+2=3;x",), (1.0,), where="f:1")], ";", 8, 16, 512)


def _stage_config(tmp_path, section, task="arithmetic"):
    from jaxrl_llm.train.config import base_config
    c = base_config()
    c.name, c.run_root, c.model.preset, c.task.name = "prm", str(tmp_path / "runs"), "dummy", task
    c.eval.every, c.eval.num_examples = 2, 8
    c.log.every, c.log.progress, c.log.tensorboard, c.log.samples_every, c.checkpoint.every = 1, False, False, 0, 0
    c.stages, c.prm = ("prm",), section
    return c


def test_prm_stage_trains_from_a_file_and_its_params_load(tmp_path):
    from jaxrl_llm.train.build import build
    from jaxrl_llm.train.config import ConfigError, prm_stage, validate
    from jaxrl_llm.train.run_dir import RunDir
    from jaxrl_llm.train.stages.prm import load_prm_params, stage_separator
    from jaxrl_llm.train.trainer import train
    s = prm_stage(steps=4, batch_size=8, learning_rate=1e-3, max_prompt_len=8, max_response_len=12)
    s.data.path, s.data.eval_rows = _write(tmp_path / "steps.jsonl", _records(48)), 8
    cfg = _stage_config(tmp_path, s)
    summary = train(cfg)
    assert summary["prm/solutions/train"] == 44 and summary["prm/steps/train"] == 88
    assert 0.0 <= summary["prm/accuracy_after"] <= 1.0 and "prm/auc_after" in summary
    rows = [json.loads(x) for x in (tmp_path / "runs" / "prm" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert any("eval/auc" in r for r in rows)
    (tmp_path / "steps.jsonl").unlink()  # run again: the finished stage is restored, its file not read again
    again = train(cfg)
    assert again == {k: v for k, v in summary.items() if k != "plots"}
    comp, params = build(cfg)
    run = RunDir(cfg.run_root, cfg.name, cfg)
    try:
        prm_params = load_prm_params(comp, run, "prm", ("prm",), params)
    finally:
        run.close()
    assert set(prm_params) == {"model", "score"} and np.any(np.asarray(prm_params["score"]["kernel"]))
    table = step_end_table(comp.tokenizer, stage_separator(cfg.prm, comp.task), comp.model_cfg.vocab_size)
    b = step_batch(0)
    scores, ends = step_scores(process_reward_model(comp.model_cfg), prm_params, b["prompt_tokens"], b["prompt_mask"],
                               b["completion_tokens"], b["completion_mask"], table)
    assert np.all((np.asarray(scores) > 0) == np.asarray(ends))
    # config errors name the key
    bad = _stage_config(tmp_path, prm_stage())
    with pytest.raises(ConfigError, match=r"config.prm.data.source='jsonl' needs config.prm.data.path"):
        validate(bad)
    bad.prm.data.path, bad.prm.data.shepherd_n = "x.jsonl", 4
    with pytest.raises(ConfigError, match=r"config.prm.data.shepherd_n=4 is not read with data.source='jsonl'"):
        validate(bad)
    bad.prm.data.shepherd_n, bad.prm.data.source = 8, "tasks"
    with pytest.raises(ConfigError, match=r"data.source='tasks' is not a step-label source.*did you mean 'task'"):
        validate(bad)
    bad.prm.data.source, bad.prm.data.path = "task", ""
    validate(bad)
    from jaxrl_llm.tasks import get_task
    from jaxrl_llm.train.stages.prm import PRMStage
    with pytest.raises(ConfigError, match=r"data.source='task': task 'arithmetic' has no split_steps, step_separator, "
                                          r"grade_steps \(the StepGradedTask ability"):
        PRMStage.check_data(bad, "prm", get_task("arithmetic"))


def test_prm_stage_labels_sampled_solutions(tmp_path):
    """data.source="shepherd": the stage samples chain_arithmetic solutions from the policy it starts from (here a
    random one), cuts them with task.split_steps, labels the training steps by Math-Shepherd rollouts and the
    held-out steps by the task's grades (what data.source="task" trains on)."""
    from jaxrl_llm.tasks import registered_tasks
    from jaxrl_llm.train.config import prm_stage
    from jaxrl_llm.train.trainer import train
    if "chain_arithmetic" not in registered_tasks():
        pytest.skip("needs the chain_arithmetic task")
    s = prm_stage(steps=2, batch_size=8, learning_rate=1e-3, max_prompt_len=12, max_response_len=12)
    s.data.source, s.data.num_examples, s.data.samples_per_example, s.data.eval_rows = "shepherd", 16, 4, 8
    s.data.sampling.max_new_tokens, s.data.shepherd_n = 8, 2
    cfg = _stage_config(tmp_path, s, task="chain_arithmetic")
    summary = train(cfg)
    assert summary["prm/solutions/train"] + summary["prm/solutions/train_unusable"] + \
        summary["prm/solutions/dropped"] == 64
    assert summary["prm/steps/train"] >= summary["prm/solutions/train"] >= 8
    assert summary["prm/solutions/held_out"] > 0 and 0.0 <= summary["prm/accuracy_after"] <= 1.0
    assert 0.0 <= summary["prm/steps/label_mean"] <= 1.0
