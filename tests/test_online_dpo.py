"""Online DPO: pair selection, the loss on sampled pairs == make_dpo_step's on the same pairs by hand, all-tied
batches, a stage run that resumes to the same result, config errors."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxrl_llm.algos import dpo
from jaxrl_llm.algos.train_state import TrainState, jit_update
from jaxrl_llm.models import ModelConfig, create_model
from jaxrl_llm.sharding import ShardingEnv, make_mesh
from jaxrl_llm.tasks import Example, register_task, registered_tasks
from jaxrl_llm.tasks.arithmetic import ArithmeticTask
from jaxrl_llm.train.config import ConfigError, digit_addition_config, online_dpo_stage, reward_model_stage, validate
from jaxrl_llm.train.stages.online_dpo import make_online_dpo_step, pair_scores, select_pairs
from jaxrl_llm.train.trainer import train

V = 32
CFG = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)


def _rollout(rng, b, n, p=4, t=5):
    """A prompt-major rollout batch of b prompts x n completions (each prompt's rows share its tokens)."""
    prompt = np.repeat(rng.integers(1, V, (b, p)), n, axis=0).astype(np.int32)
    pmask = np.ones((b * n, p), np.int32)
    pmask[:, 0] = np.repeat(rng.integers(0, 2, b), n)  # some prompts left-padded
    tokens = rng.integers(1, V, (b * n, t)).astype(np.int32)
    lengths = rng.integers(1, t + 1, b * n)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
    return {"prompt_tokens": prompt, "prompt_mask": pmask, "completion_tokens": tokens * mask,
            "completion_mask": mask}


# ----------------------------------------------------------------------------- pair selection


def test_pairs_are_best_and_worst_of_each_group_and_ties_are_skipped():
    rng = np.random.default_rng(0)
    b, n = 4, 3
    batch = _rollout(rng, b, n)
    scores = np.array([0.0, 1.0, 0.5,     # best row 1, worst row 0
                       1.0, 1.0, 0.0,     # two best: the first (row 3); worst row 5
                       2.0, 2.0, 2.0,     # tied: weight 0, masks zeroed
                       -1.0, 3.0, -1.0],  # best row 10, two worst: the first (row 9)
                      np.float32)
    pairs, w, m = jax.jit(lambda bt, s: select_pairs(bt, s, n))(batch, scores)
    chosen, rejected = [1, 3, 6, 10], [0, 5, 6, 9]
    np.testing.assert_array_equal(w, [1, 1, 0, 1])
    np.testing.assert_array_equal(pairs["prompt_tokens"], batch["prompt_tokens"][::n])
    np.testing.assert_array_equal(pairs["prompt_mask"], batch["prompt_mask"][::n])
    np.testing.assert_array_equal(pairs["chosen_tokens"], batch["completion_tokens"][chosen])
    np.testing.assert_array_equal(pairs["rejected_tokens"], batch["completion_tokens"][rejected])
    keep = np.array([1, 1, 0, 1])[:, None]
    np.testing.assert_array_equal(pairs["chosen_mask"], batch["completion_mask"][chosen] * keep)
    np.testing.assert_array_equal(pairs["rejected_mask"], batch["completion_mask"][rejected] * keep)
    assert float(m["pairs/tied"]) == 1 and float(m["pairs/tied_fraction"]) == 0.25
    assert float(m["pairs/all_tied"]) == 0
    assert float(m["scores/chosen"]) == pytest.approx((1 + 1 + 3) / 3)
    assert float(m["scores/rejected"]) == pytest.approx((0 + 0 - 1) / 3)
    assert float(m["scores/margin"]) == pytest.approx((1 + 1 + 4) / 3)
    again, w2, _ = jax.jit(lambda bt, s: select_pairs(bt, s, n))(batch, scores)  # deterministic
    for k in pairs:
        np.testing.assert_array_equal(again[k], pairs[k])
    _, w_all, m_all = select_pairs(batch, np.ones(b * n, np.float32), n)
    assert float(jnp.sum(w_all)) == 0 and float(m_all["pairs/all_tied"]) == 1 and float(m_all["pairs/tied"]) == b


def test_missing_eos_penalty_lowers_unfinished_completions():
    rewards = jnp.asarray([1.0, 1.0, 0.0, 0.0])
    finished = jnp.asarray([True, False, True, False])
    np.testing.assert_allclose(pair_scores(rewards, finished, 0.0), [1, 1, 0, 0])
    np.testing.assert_allclose(pair_scores(rewards, finished, 0.5), [1, 0.5, 0, -0.5])
    # a tie broken by the penalty: the finished completion is chosen
    _, w, m = select_pairs(_rollout(np.random.default_rng(1), 2, 2), pair_scores(rewards, finished, 0.5), 2)
    np.testing.assert_array_equal(w, [1, 1])
    assert float(m["scores/margin"]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- the loss on sampled pairs


@pytest.fixture(scope="module")
def lm():
    env = ShardingEnv(make_mesh({"data": 1}, devices=jax.devices()[:1]))
    module, params, _ = create_model(CFG, jax.random.key(0), env)
    params = jax.device_get(params)
    rng = np.random.default_rng(7)
    ref = jax.tree.map(lambda x: (x + 0.02 * rng.standard_normal(x.shape)).astype(x.dtype), params)
    return module, params, ref


def _sgd_state(params):
    return TrainState.create(jax.device_put(jax.device_get(params)), optax.sgd(1.0))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_on_sampled_pairs_equals_make_dpo_step_on_the_pairs_by_hand(lm, loss_type):
    module, params, ref = lm
    b, n = 4, 2
    batch = _rollout(np.random.default_rng(3), b, n)
    scores = np.array([0, 1, 1, 1, 1, 0, 0, 1], np.float32)  # prompt 1 ties
    cfg = dpo.DPOConfig(loss_type=loss_type, beta=0.5)
    ref_fn = jax.jit(dpo.make_reference_logps_fn(module, CFG))

    pairs, w, _ = select_pairs(batch, scores, n)
    pairs = {**pairs, **ref_fn(ref, pairs), "pair_weight": w}
    online = jit_update(make_online_dpo_step(module, CFG, cfg), _sgd_state(params), pairs)
    st_online, m_online = online(_sgd_state(params), pairs, jax.random.key(0))

    rows, chosen, rejected = [0, 2, 3], [1, 4, 7], [0, 5, 6]  # the untied prompts' pairs, by hand
    by_hand = {"prompt_tokens": batch["prompt_tokens"][[r * n for r in rows]],
               "prompt_mask": batch["prompt_mask"][[r * n for r in rows]],
               "chosen_tokens": batch["completion_tokens"][chosen], "chosen_mask": batch["completion_mask"][chosen],
               "rejected_tokens": batch["completion_tokens"][rejected],
               "rejected_mask": batch["completion_mask"][rejected]}
    by_hand.update(ref_fn(ref, by_hand))
    plain = jit_update(dpo.make_dpo_step(module, CFG, cfg), _sgd_state(params), by_hand)
    st_hand, m_hand = plain(_sgd_state(params), by_hand, jax.random.key(0))

    for k in ("loss", "pref_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(m_online[k], m_hand[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # an independent float64 DPO loss from per-pair log-prob sums
    lc, lr = jax.jit(lambda p, bt: dpo.pair_logprobs(module, p, CFG, bt))(params, by_hand)
    h = (np.asarray(lc, np.float64).sum(-1) - np.asarray(by_hand["ref_chosen_logps"], np.float64)
         - np.asarray(lr, np.float64).sum(-1) + np.asarray(by_hand["ref_rejected_logps"], np.float64))
    want = np.mean(np.log1p(np.exp(-0.5 * h)) if loss_type == "sigmoid" else (h - 1 / (2 * 0.5)) ** 2)
    assert float(m_online["pref_loss"]) == pytest.approx(want, rel=1e-4)
    # the tied pair adds nothing to the gradient: the SGD update is (untied / B) x the hand-built batch's
    d_online = jax.tree.map(lambda a, p: np.asarray(a, np.float64) - np.asarray(p, np.float64),
                            jax.device_get(st_online.params), params)
    d_hand = jax.tree.map(lambda a, p: np.asarray(a, np.float64) - np.asarray(p, np.float64),
                          jax.device_get(st_hand.params), params)
    for x, y in zip(jax.tree.leaves(d_online), jax.tree.leaves(d_hand)):
        # the deltas are differences of float32 parameters (up to ~1): a few of their ulps (~1.2e-7) apart
        np.testing.assert_allclose(x, 3 / 4 * y, rtol=1e-3, atol=5e-7)
    assert max(float(np.abs(y).max()) for y in jax.tree.leaves(d_hand)) > 1e-4


def test_an_all_tied_batch_skips_the_update(lm):
    module, params, ref = lm
    batch = _rollout(np.random.default_rng(4), 2, 2)
    pairs, w, m = select_pairs(batch, np.zeros(4, np.float32), 2)
    pairs = {**pairs, **jax.jit(dpo.make_reference_logps_fn(module, CFG))(ref, pairs), "pair_weight": w}
    state = TrainState.create(jax.device_put(params), optax.adam(1e-2))
    step = jit_update(make_online_dpo_step(module, CFG, dpo.DPOConfig()), state, pairs, donate=False)
    new, metrics = step(state, pairs, jax.random.key(0))
    assert int(new.step) == 0 and float(m["pairs/all_tied"]) == 1
    for x, y in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(x, y)
    assert float(metrics["pref_loss"]) == 0.0 and float(metrics["rewards/accuracies"]) == 0.0


# ----------------------------------------------------------------------------- the stage


@dataclasses.dataclass(frozen=True)
class _EvenLength(ArithmeticTask):
    """Arithmetic whose (host) verifier accepts a completion of even length: the dummy model's samples of a
    prompt then often score differently, so the stage trains on untied pairs."""

    def is_correct(self, completion: str, example: Example) -> bool:
        return len(completion) % 2 == 0


if "arithmetic_even_odpo" not in registered_tasks():
    register_task("arithmetic_even_odpo")(_EvenLength)


def _config(run_root) -> mc.ConfigDict:
    c = digit_addition_config(eval_every=0)
    c.name, c.run_root, c.model.preset, c.seed = "odpo", str(run_root), "dummy", 3
    c.task.name = "arithmetic_even_odpo"
    c.log.every, c.log.progress, c.log.tensorboard, c.log.samples_every = 1, False, False, 0
    c.checkpoint.every, c.checkpoint.async_save = 1, False
    c.stages = ("rl",)  # from the random dummy model: its samples' lengths differ, so do their rewards
    c.rl = online_dpo_stage(iterations=2, prompts_per_iter=8, samples_per_prompt=2, learning_rate=1e-3,
                            max_new_tokens=4, missing_eos_penalty=0.5)
    c.rl.max_prompt_len, c.rl.reward.in_jit = 12, False  # the host reward: the task's is_correct
    return c


def _final(run_dir):
    state = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / "rl" / "2" / "state")
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def _rl_metrics(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows if r.get("stage") == "rl"]


def test_stage_runs_and_resumes_to_the_same_result(tmp_path):
    summary = train(_config(tmp_path))
    run = tmp_path / "odpo"
    metrics, final = _rl_metrics(run), _final(run)
    trained = [r for r in metrics if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2]
    for r in trained:
        for k in ("rewards/accuracies", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                  "logps/rejected", "scores/chosen", "scores/rejected", "pairs/tied", "pairs/tied_fraction"):
            assert k in r and np.isfinite(r[k]), k
        assert 0 <= r["pairs/tied"] <= 8 and r["pairs/all_tied"] == (r["pairs/tied"] == 8)
        assert r["scores/chosen"] >= r["scores/rejected"] + 0.5 * (r["pairs/tied"] < 8)  # gaps of 0.5 or 1
    assert any(r["pairs/tied"] < 8 and r["grad_norm"] > 0 for r in trained)  # untied pairs were trained on
    assert summary.get("rl/all_tied_iterations", 0) == sum(r["pairs/all_tied"] for r in trained)
    shutil.rmtree(run / "checkpoints" / "rl" / "2")  # back to iteration 1's checkpoint
    train(_config(tmp_path))
    again = _final(run)
    assert set(again) == set(final)
    for k in final:
        np.testing.assert_array_equal(again[k], final[k], err_msg=k)
    assert _rl_metrics(run) == metrics


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("key, value, match", [
    ("samples_per_prompt", 1, r"^config\.rl\.samples_per_prompt=1 .*2"),
    ("missing_eos_penalty", -1.0, r"^config\.rl\.missing_eos_penalty=-1\.0 "),
    ("algo.loss_type", "simpo", r"^config\.rl\.algo\.loss_type='simpo' is not supported by kind 'online_dpo' "
                                r".*'sigmoid'"),
    ("num_micro_batches", 3, r"^config\.rl\.prompts_per_iter=8 pairs are not divisible by "
                             r"config\.rl\.num_micro_batches=3"),
    ("sampling.temperature", 0.0, r"^config\.rl\.sampling\.temperature=0\.0 \(greedy\) with "
                                  r"config\.rl\.samples_per_prompt=2"),
    ("reward_model_stage", "rm", r"^config\.rl\.reward_model_stage='rm' is not read with reward\.source='task'"),
    ("reward.source", "reward_model", r"^config\.rl\.reward_model_stage='' must name a reward_model stage that runs "
                                      r"before 'rl'"),
    ("algo.simpo_gamma", 1.0, r"^config\.rl\.algo\.simpo_gamma=1\.0 is not read by loss_type='sigmoid'"),
])
def test_config_errors_are_one_line_naming_the_key(tmp_path, key, value, match):
    c = _config(tmp_path)
    section, _, leaf = f"rl.{key}".rpartition(".")
    target = c
    for part in section.split("."):
        target = target[part]
    target[leaf] = value
    with pytest.raises(ConfigError, match=match) as e:
        validate(c)
    assert "\n" not in str(e.value)


def test_unsupported_sections_are_refused(tmp_path):
    c = _config(tmp_path)
    c.rl.overlap = mc.ConfigDict(dict(staleness=1, rollout_devices=0))
    with pytest.raises(ConfigError, match=r"^config\.rl\.overlap: not supported by kind 'online_dpo'"):
        validate(c)


def test_reward_model_source_names_an_earlier_reward_model_stage(tmp_path):
    c = _config(tmp_path)
    c.stages = ("rm", "rl")
    c.rm = reward_model_stage(steps=1, batch_size=4)
    c.rl.reward.source, c.rl.reward_model_stage = "reward_model", "rm"
    validate(c)
    c.rl.reward_model_stage = "sft"
    with pytest.raises(ConfigError, match=r"reward_model_stage='sft' must name .*earlier reward_model stages: "
                                          r"\['rm'\]$"):
        validate(c)
