"""KTO: the loss against a numpy reimplementation of TRL's KTOTrainer, the KL rows, the update step against full
logits, exact accumulation, the unpaired data format and its errors, config errors, and a stage that resumes."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxrl_llm.algos.kto import (KTOConfig, kl_rows, kto_loss, kto_reference_point, make_kto_step,
                                 make_reference_logps_fn)
from jaxrl_llm.algos.train_state import TrainState, jit_update
from jaxrl_llm.data.loaders import (PreferencePair, encode_preferences, encode_unpaired, load_unpaired, unpair)
from jaxrl_llm.errors import DataError
from jaxrl_llm.models import ModelConfig, create_model
from jaxrl_llm.sharding import ShardingEnv, make_mesh
from jaxrl_llm.train.config import ConfigError, load_experiment, validate
from jaxrl_llm.train.stages import kto as kto_stage_module


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def trl_kto_loss(logps, ref_logps, labels, kl_logps, ref_kl_logps, beta, w_d, w_u):
    """TRL's KTOTrainer._compute_loss (loss_type="kto"), in float64: rows split by label, kl =
    mean(KL_logps - ref_KL_logps).clamp(min=0), losses = cat(w_d * chosen, w_u * rejected), loss = mean."""
    kl = max(float(np.mean(kl_logps - ref_kl_logps)), 0.0)
    chosen = labels.astype(bool)
    ch = (logps - ref_logps)[chosen]
    rj = (logps - ref_logps)[~chosen]
    losses = np.concatenate([w_d * (1 - sig(beta * (ch - kl))), w_u * (1 - sig(beta * (kl - rj)))])
    return float(np.mean(losses)), kl


@pytest.mark.parametrize("labels", ["mixed", "only_desirable", "only_undesirable", "negative_kl"])
def test_loss_matches_trl_on_random_inputs(labels):
    rng = np.random.default_rng({"mixed": 0, "only_desirable": 1, "only_undesirable": 2, "negative_kl": 3}[labels])
    b = 9
    logps, ref, kl_lp, ref_kl = (rng.normal(-8, 3, b) for _ in range(4))
    # a positive KL estimate, or a negative one (clamped to 0)
    kl_lp = ref_kl + (-1 if labels == "negative_kl" else 1) * np.abs(rng.normal(1.0, 0.5, b))
    lab = {"mixed": rng.random(b) < 0.5, "only_desirable": np.ones(b, bool), "only_undesirable": np.zeros(b, bool),
           "negative_kl": rng.random(b) < 0.5}[labels]
    beta, w_d, w_u = 0.3, 1.0, 1.7
    expect, kl = trl_kto_loss(logps, ref, lab, kl_lp, ref_kl, beta, w_d, w_u)
    assert (kl == 0.0) == (labels == "negative_kl")
    z0 = kto_reference_point(jnp.asarray(kl_lp, jnp.float32), jnp.asarray(ref_kl, jnp.float32))
    assert float(z0) == pytest.approx(kl, rel=1e-5, abs=1e-6)
    losses, rewards = kto_loss(jnp.asarray(logps, jnp.float32), jnp.asarray(ref, jnp.float32), jnp.asarray(lab), z0,
                               beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    assert float(jnp.mean(losses)) == pytest.approx(expect, rel=1e-5)
    np.testing.assert_allclose(rewards, beta * (logps - ref), rtol=1e-5)


def test_reference_point_is_detached():
    g = jax.grad(lambda x: kto_reference_point(x, jnp.zeros(3)))(jnp.array([1.0, 2.0, 0.5]))
    np.testing.assert_array_equal(g, 0.0)
    # and the loss's gradient in the log-probs is the hand formula: d/dr (1 - sig(beta (r - z0)))
    beta, z0, r = 0.5, 0.4, np.array([0.3, -1.2])
    g = jax.grad(lambda x: jnp.sum(kto_loss(x, jnp.zeros(2), jnp.array([True, False]), z0, beta=beta)[0]))(
        jnp.asarray(r, jnp.float32))
    s_d, s_u = sig(beta * (r[0] - z0)), sig(beta * (z0 - r[1]))
    np.testing.assert_allclose(g, [-beta * s_d * (1 - s_d), beta * s_u * (1 - s_u)], rtol=1e-5)


def test_kl_rows_shift_completions_by_one_as_trl():
    comp = np.arange(12, dtype=np.int32).reshape(4, 3)
    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], bool)
    batch = {"prompt_tokens": np.arange(8).reshape(4, 2), "prompt_mask": np.ones((4, 2), bool),
             "completion_tokens": comp, "completion_mask": mask}
    out = kl_rows(batch)
    trl = [comp[-1]] + list(comp[:-1])  # TRL: [completions[-1]] + completions[:-1]
    np.testing.assert_array_equal(out["completion_tokens"], np.stack(trl))
    np.testing.assert_array_equal(out["completion_mask"], np.stack([mask[-1]] + list(mask[:-1])))
    np.testing.assert_array_equal(out["prompt_tokens"], batch["prompt_tokens"])  # prompts stay


# ----------------------------------------------------------------------------- the step on a tiny model

V = 32
CFG = ModelConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def lm():
    module, params, _ = create_model(CFG, jax.random.key(0), ShardingEnv(make_mesh({"data": 1},
                                                                                   devices=jax.devices()[:1])))
    params = jax.device_get(params)
    rng = np.random.default_rng(3)
    ref = jax.tree.map(lambda x: (x + 0.3 * rng.standard_normal(x.shape)).astype(x.dtype), params)
    return module, params, ref


def row_batch(b=6, p=3, n=4):
    rng = np.random.default_rng(0)
    pm = np.arange(p)[None] >= (p - rng.integers(1, p + 1, b))[:, None]
    cm = np.arange(n)[None] < rng.integers(1, n + 1, b)[:, None]
    return {"prompt_tokens": np.where(pm, rng.integers(1, V, (b, p)), 0).astype(np.int32), "prompt_mask": pm,
            "completion_tokens": np.where(cm, rng.integers(1, V, (b, n)), 0).astype(np.int32), "completion_mask": cm,
            "label": np.array([True, False, False, True, True, False])}


def full_sums(module, params, prompt, pmask, comp, cmask):
    """float64 summed completion log-probs from full logits."""
    t, m = np.concatenate([prompt, comp], 1), np.concatenate([pmask, cmask], 1)
    logits = np.asarray(jax.jit(lambda p, t, m: module.apply({"params": p}, t, None, m)[0])(params, t, m), np.float64)
    p, n = prompt.shape[1], comp.shape[1]
    z = logits[:, p - 1:p - 1 + n]
    lse = np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1)) + z.max(-1)
    return np.sum((np.take_along_axis(z, comp[..., None], -1)[..., 0] - lse) * cmask, -1)


def _update(module, params, batch, cfg, num_micro):
    state = TrainState.create(jax.device_put(jax.device_get(params)), optax.sgd(0.5))
    update = jit_update(make_kto_step(module, CFG, cfg, num_micro), state, batch)
    new, metrics = update(state, batch, jax.random.key(0))
    return jax.device_get(new.params), jax.device_get(metrics)


def test_step_matches_trl_from_full_logits_and_accumulation_is_exact(lm):
    module, params, ref = lm
    cfg = KTOConfig(beta=0.5, desirable_weight=1.0, undesirable_weight=1.5, logprob_chunk=2)
    batch = row_batch()
    batch = {**batch, **jax.device_get(jax.jit(make_reference_logps_fn(module, CFG, 2, num_micro=2))(ref, batch))}
    pt, pm, ct, cm = (batch[k] for k in ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask"))
    kl_ct, kl_cm = np.roll(ct, 1, 0), np.roll(cm, 1, 0)
    ref_sums, ref_kl = full_sums(module, ref, pt, pm, ct, cm), full_sums(module, ref, pt, pm, kl_ct, kl_cm)
    np.testing.assert_allclose(batch["ref_logps"], ref_sums, rtol=1e-4)
    np.testing.assert_allclose(batch["ref_kl_logps"], ref_kl, rtol=1e-4)
    pol, pol_kl = full_sums(module, params, pt, pm, ct, cm), full_sums(module, params, pt, pm, kl_ct, kl_cm)
    expect, kl = trl_kto_loss(pol, ref_sums, batch["label"], pol_kl, ref_kl, 0.5, 1.0, 1.5)
    assert kl > 0.1  # the reference differs: z0 is not clamped to 0 here
    p1, m1 = _update(module, params, batch, cfg, 1)
    p3, m3 = _update(module, params, batch, cfg, 3)
    assert float(m1["loss"]) == pytest.approx(expect, rel=1e-4)
    assert float(m1["kl"]) == pytest.approx(kl, rel=1e-4)
    lab = batch["label"]
    assert float(m1["rewards/chosen"]) == pytest.approx(0.5 * np.mean((pol - ref_sums)[lab]), rel=1e-4)
    assert float(m1["rewards/rejected"]) == pytest.approx(0.5 * np.mean((pol - ref_sums)[~lab]), rel=1e-4)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)))
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p3)))
    assert moved > 1e-4 and diff < 1e-6 * max(1.0, moved) + 1e-7, (moved, diff)
    for k in m1:
        if k not in ("grad_norm", "update_norm"):
            np.testing.assert_allclose(m1[k], m3[k], rtol=1e-5, atol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------- data


def _write(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_unpaired_file_text_and_chat(tmp_path):
    path = _write(tmp_path, [{"prompt": "1 + 1 =", "completion": " 2", "label": True, "id": 7},
                             {"prompt": [{"role": "user", "content": "hi"}], "completion": "hello", "label": False}])
    a, b = load_unpaired(path)
    assert (a.prompt, a.completion, a.label, a.meta, a.where) == ("1 + 1 =", " 2", True, {"id": 7}, f"{path}:1")
    assert b.prompt == [{"role": "user", "content": "hi"}] and b.label is False
    assert b.completion == [{"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize("record, match", [
    ({"prompt": "a", "completion": "b"}, r"data\.jsonl:2: missing field 'label' .*expected true"),
    ({"prompt": "a", "completion": "b", "label": "yes"}, r"data\.jsonl:2: field 'label' is a string .*true or false"),
    ({"prompt": "a", "completion": "b", "label": 1}, r"data\.jsonl:2: field 'label' is a number .*true or false"),
    ({"completion": "b", "label": True}, r"data\.jsonl:2: missing field 'prompt'"),
    ({"prompt": "a", "completion": 3, "label": True}, r"data\.jsonl:2: field 'completion' is a number"),
])
def test_unpaired_file_errors_name_file_and_line(tmp_path, record, match):
    path = _write(tmp_path, [{"prompt": "a", "completion": "b", "label": True}, record])
    with pytest.raises(DataError, match=match) as e:
        load_unpaired(path)
    assert "\n" not in str(e.value)


def test_pairs_unpair_and_encode_like_the_chosen_side():
    from jaxrl_llm.tokenizer import load_tokenizer
    tok = load_tokenizer("tiny")
    pairs = [PreferencePair("1 2 + 3 =", "1 5", "1 6"), PreferencePair("4 + 4 =", "8", "9 9 9 9 9 9 9 9")]
    rows = unpair(pairs)
    assert [(r.completion, r.label) for r in rows] == [("1 5", True), ("1 6", False), ("8", True),
                                                       ("9 9 9 9 9 9 9 9", False)]
    arrays, stats = encode_unpaired(tok, rows, 8, 4)
    ref, _ = encode_preferences(tok, pairs, 8, 4)
    np.testing.assert_array_equal(arrays["label"], [True, False, True, False])
    np.testing.assert_array_equal(arrays["completion_tokens"][0::2], ref["chosen_tokens"])
    np.testing.assert_array_equal(arrays["completion_tokens"][1::2], ref["rejected_tokens"])
    np.testing.assert_array_equal(arrays["prompt_tokens"][0::2], ref["prompt_tokens"])
    assert stats.responses_truncated == 1  # the long rejected completion, counted once


# ----------------------------------------------------------------------------- config and the stage


def _config(tmp_path, *sets):
    return load_experiment("experiments/kto.py:smoke", [f"run_root={tmp_path}", *sets])


@pytest.mark.parametrize("key, value, match", [
    ("batch_size", 1, r"^config\.kto\.batch_size=1 is out of range: expected an integer >= 2"),
    ("data.source", "jsonl", r"^config\.kto\.data\.source='jsonl' needs config\.kto\.data\.path"),
    ("data.eval_examples", 3, r"^config\.kto\.data\.eval_examples=3 is not read with data\.source='task'"),
    ("algo.desirable_weight", 0.0, r"desirable_weight=0\.0 must be > 0"),
    ("data.source", "pair", r"^config\.kto\.data\.source='pair' is not a kto data source.*'pairs'"),
])
def test_config_errors_are_one_line(tmp_path, key, value, match):
    c = _config(tmp_path)
    node, _, leaf = f"kto.{key}".rpartition(".")
    target = c
    for part in node.split("."):
        target = target[part]
    target[leaf] = value
    with pytest.raises((ConfigError, ValueError), match=match) as e:
        validate(c)
    assert "\n" not in str(e.value)


def test_memory_estimate_has_the_reference_and_its_forward(tmp_path):
    from jaxrl_llm.train.memory import estimate_memory
    from jaxrl_llm.models import get_preset
    c = _config(tmp_path)
    est = estimate_memory(c, get_preset(c.model.preset), {"data": 1, "fsdp": 1, "tensor": 1})
    terms = est.stage("kto").terms
    assert terms["reference"] > 0 and terms["score_work"] > 0 and terms["activations"] > 0


def _final_params(run_dir: pathlib.Path) -> dict:
    ck = run_dir / "checkpoints" / "kto"
    last = max(int(p.name) for p in ck.iterdir() if p.name.isdigit())
    assert last == 4
    state = ocp.StandardCheckpointer().restore(ck / str(last) / "state")
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def test_stage_on_a_pairs_file_resumes_to_the_same_result(tmp_path, monkeypatch):
    from jaxrl_llm.train.trainer import train
    pairs = [{"prompt": f"{a} + {b} =", "chosen": f"{a + b}", "rejected": f"{a + b + 1}"}
             for a in range(4) for b in range(5)]
    path = _write(tmp_path, pairs, "pairs.jsonl")
    sets = ["stages=('kto',)", "kto.steps=4", "checkpoint.every=2", "eval.every=0", "log.progress=False",
            "kto.batch_size=4", "kto.data.source=pairs", f"kto.data.path={path}", "kto.data.eval_pairs=0",
            "kto.data.num_pairs=20000", "log.tensorboard=False"]
    whole = train(_config(tmp_path / "a", *sets))
    assert whole["kto/examples/train"] == 40 and whole["kto/examples/desirable"] == 20
    real_step = kto_stage_module.KTOStage.step

    def stop_at_3(self, i):
        if i == 3:
            raise RuntimeError("stopped")
        return real_step(self, i)
    monkeypatch.setattr(kto_stage_module.KTOStage, "step", stop_at_3)
    with pytest.raises(RuntimeError, match="stopped"):
        train(_config(tmp_path / "b", *sets))
    monkeypatch.setattr(kto_stage_module.KTOStage, "step", real_step)
    train(_config(tmp_path / "b", *sets))  # resumes from the checkpoint of step 2
    a, b = _final_params(pathlib.Path(whole["run_dir"])), _final_params(tmp_path / "b" / "kto-smoke")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    metrics = [json.loads(x) for x in (tmp_path / "b" / "kto-smoke" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(m["step"] for m in metrics if m.get("stage") == "kto" and "loss" in m) == [1, 2, 3, 4]
