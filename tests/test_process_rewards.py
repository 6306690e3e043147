"""Process rewards in RL: DeepSeekMath's process-supervision advantages, PRIME's leave-one-out returns and PPO's
per-step rewards (hand-computed), then GRPO stages with a trained PRM and with an online implicit PRM (runs,
metrics, exact resume) and a source="none" run identical to a run without the section.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxrl_llm.algos import ppo
from jaxrl_llm.algos.process_rewards import (group_step_advantages, prime_advantages, step_metrics,
                                             step_token_rewards)

# ----------------------------------------------------------------------------- DeepSeekMath process supervision

MASK = np.array([[1, 1, 1, 1, 0],
                 [1, 1, 1, 0, 0],
                 [1, 1, 0, 1, 1],     # a masked gap at t = 2
                 [0, 0, 0, 0, 0]], bool)  # an empty completion
ENDS = np.array([[0, 1, 0, 1, 0],
                 [1, 0, 1, 0, 0],
                 [0, 1, 0, 0, 1],
                 [0, 0, 0, 0, 0]], bool)
STEP_R = np.array([[99, .9, 99, .3, 99],  # 99: not a step end, never read
                   [.6, 99, .2, 99, 99],
                   [99, 1., 99, 99, 0.],
                   [99, 99, 99, 99, 99]], np.float32)


def test_group_step_advantages_by_hand():
    adv = np.asarray(jax.jit(group_step_advantages, static_argnums=3)(STEP_R, ENDS, MASK, 2))
    # group 0: steps .9 .3 | .6 .2, mean .5, unbiased std sqrt(.3 / 3); normalised 1.2649 -.6325 | .3162 -.9487
    s = np.sqrt(0.1) + 1e-6
    n = np.array([0.4, -0.2, 0.1, -0.3]) / s
    want0 = [n[0] + n[1], n[0] + n[1], n[1], n[1], 0]
    want1 = [n[2] + n[3], n[3], n[3], 0, 0]
    # group 1: steps 1, 0 (the empty row has none), mean .5, std sqrt(.5); the gap at t = 2 stays 0
    g = 0.5 / (np.sqrt(0.5) + 1e-6)
    want2 = [0.0, 0.0, 0.0, -g, -g]
    np.testing.assert_allclose(adv, [want0, want1, want2, [0] * 5], atol=1e-6)
    pop = np.asarray(group_step_advantages(STEP_R, ENDS, MASK, 2, std_ddof=0))  # population std
    np.testing.assert_allclose(pop[0, 2], -0.2 / (np.sqrt(0.3 / 4) + 1e-6), rtol=1e-6)


def test_group_step_advantages_constant_or_empty_groups_are_exactly_zero():
    r = np.where(ENDS, np.float32(0.1), np.float32(7.0))
    assert np.all(np.asarray(group_step_advantages(r, ENDS, MASK, 2)) == 0.0)  # every step 0.1: no signal
    assert np.all(np.asarray(group_step_advantages(STEP_R, np.zeros_like(ENDS), MASK, 2)) == 0.0)
    one = np.asarray(group_step_advantages(STEP_R, ENDS, MASK, 1))  # G = 1: normalised within the completion
    assert np.isfinite(one).all() and np.all(one[3] == 0)
    with pytest.raises(ValueError, match=r"do not split into groups of 3"):
        group_step_advantages(STEP_R, ENDS, MASK, 3)


# ----------------------------------------------------------------------------- PRIME


def _prime_reference(r, m, g, gamma):
    """Eq. 5 of arXiv 2502.01456 written out with loops (process part)."""
    b, n = r.shape
    out = np.zeros((b, n))
    means = [r[i][m[i]].mean() if m[i].any() else 0.0 for i in range(b)]
    for i in range(b):
        grp = range(i - i % g, i - i % g + g)
        base = sum(means[j] for j in grp if j != i) / (g - 1)
        real = np.flatnonzero(m[i])
        for k, t in enumerate(real):
            out[i, t] = sum(gamma ** q * (r[i, s] - base) for q, s in enumerate(real[k:]))
    return out


def test_prime_advantages_by_hand_and_against_loops():
    r = np.array([[0.1, -0.2, 0.4, 9.0], [0.3, 0.5, 9.0, 9.0]], np.float32)
    m = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    # row means .1 and .4: baselines .4 and .1; centred -.3 -.6 0 | .2 .4; returns-to-go
    np.testing.assert_allclose(prime_advantages(r, m, 2), [[-0.9, -0.6, 0.0, 0.0], [0.6, 0.4, 0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(prime_advantages(r, m, 2, gamma=0.5), [[-0.6, -0.6, 0.0, 0], [0.4, 0.4, 0, 0]],
                               atol=1e-6)
    rng = np.random.default_rng(0)
    r6 = rng.normal(size=(6, 7)).astype(np.float32)
    m6 = rng.random((6, 7)) < 0.7
    m6[4] = False  # an empty row counts with mean 0 in its group's baseline
    for gamma in (1.0, 0.9):
        got = np.asarray(jax.jit(prime_advantages, static_argnums=(2, 3))(r6, m6, 3, gamma))
        np.testing.assert_allclose(got, _prime_reference(r6, m6, 3, gamma), atol=1e-5)
    with pytest.raises(ValueError, match=r"group_size=1 must be an int >= 2"):
        prime_advantages(r, m, 1)


def test_verl_prime_token_values_differ_by_a_zero_mean_term():
    """verl's masked_rloo writes r_t G/(G-1) - sum_j mean_j / (G-1) per token; the docstring's claim: that is
    the paper's r_t - b_i plus (r_t - mean_i) / (G-1), which sums to 0 over each row's tokens."""
    rng = np.random.default_rng(1)
    g, r = 3, rng.normal(size=(3, 5))
    means = r.mean(-1)
    verl = r * g / (g - 1) - means.sum() / (g - 1)
    paper = r - ((means.sum() - means) / (g - 1))[:, None]
    np.testing.assert_allclose(verl - paper, (r - means[:, None]) / (g - 1), atol=1e-12)
    np.testing.assert_allclose((verl - paper).sum(-1), 0.0, atol=1e-12)


# ----------------------------------------------------------------------------- PPO


def test_ppo_step_rewards_sit_at_step_ends_and_none_is_unchanged():
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)
    ends = np.array([[0, 1, 0, 1, 1], [1, 1, 0, 0, 0]], bool)  # the end at t = 4 of row 0 is masked
    step_r = np.array([[5, .7, 5, .2, 3], [.4, .9, 5, 5, 5]], np.float32)
    dense = np.asarray(step_token_rewards(step_r, ends, mask))
    np.testing.assert_array_equal(dense, np.array([[0, .7, 0, .2, 0], [.4, .9, 0, 0, 0]], np.float32))
    cfg = ppo.PPOConfig(gamma=1.0, lam=1.0, whiten_advantages=False)
    z = jnp.zeros(mask.shape)
    scores = jnp.array([1.0, 0.0])
    base = ppo.compute_targets(cfg, scores, z, z, z, mask, 0.0)
    none = ppo.compute_targets(cfg, scores, z, z, z, mask, 0.0, process_rewards_bn=None)
    for k in base:
        np.testing.assert_array_equal(np.asarray(base[k]), np.asarray(none[k]))
    t = ppo.compute_targets(cfg, scores, z, z, z, mask, 0.0, process_rewards_bn=0.5 * dense)
    np.testing.assert_allclose(t["token_rewards"], [[0, .35, 0, 1.1, 0], [.2, .45, 0, 0, 0]], atol=1e-6)
    # gamma = lambda = 1, V = 0: the advantage is the return-to-go of the token rewards
    np.testing.assert_allclose(t["advantages"], [[1.45, 1.45, 1.1, 1.1, 0], [.65, .45, 0, 0, 0]], atol=1e-6)
    m = step_metrics(step_r, ends, mask, 0.5)
    np.testing.assert_allclose([m["process/step_reward"], m["process/good_steps"], m["process/steps"]],
                               [(0.7 + 0.2 + 0.4 + 0.9) / 4, 0.5, 2.0], rtol=1e-6)


# ----------------------------------------------------------------------------- the stages


def _config(tmp_path, name, **process):
    import ml_collections as mc

    from jaxrl_llm.train.config import base_config, grpo_stage
    c = base_config()
    c.name, c.run_root, c.model.preset, c.task.name = name, str(tmp_path / "runs"), "dummy", "arithmetic"
    c.task.kwargs = mc.ConfigDict(dict(min_digits=1, max_digits=1, operators=("+",)))
    c.eval.every, c.log.every, c.log.progress, c.log.tensorboard, c.log.samples_every = 0, 1, False, False, 0
    c.checkpoint.every = 2
    c.stages = ("rl",)
    c.rl = grpo_stage("rloo", iterations=4, prompts_per_iter=2, group_size=4, learning_rate=1e-3, max_new_tokens=6)
    c.rl.max_prompt_len = 8
    c.rl.process_reward.update(process)
    return c


def _metrics(cfg):
    from pathlib import Path
    path = Path(cfg.run_root) / cfg.name / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def _final(cfg, step):
    from pathlib import Path
    state = ocp.StandardCheckpointer().restore(Path(cfg.run_root) / cfg.name / "checkpoints" / "rl" / str(step)
                                               / "state")
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def test_source_none_is_the_run_without_the_section(tmp_path):
    from jaxrl_llm.train.trainer import train
    with_section = _config(tmp_path, "none")
    with_section.rl.iterations = 2
    train(with_section)
    without = _config(tmp_path, "without")
    without.rl.iterations = 2
    del without.rl["process_reward"]
    train(without)
    a, b = _final(with_section, 2), _final(without, 2)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    drop = ("time/step_s",)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop and not k.startswith("time")}  # noqa: E731
                          for r in rows]
    assert strip(_metrics(with_section)) == strip(_metrics(without))
    assert not any(k.startswith("process/") for r in _metrics(with_section) for k in r)


def test_implicit_prm_online_logs_and_resumes_exactly(tmp_path):
    from jaxrl_llm.train.trainer import train
    cfg = _config(tmp_path, "implicit", source="implicit", estimator="prime", learning_rate=1e-3, update_steps=2)
    cfg.rl.iterations = 3
    train(cfg)
    rows = [r for r in _metrics(cfg) if "loss" in r]
    assert len(rows) == 3
    for key in ("process/step_reward", "process/good_steps", "process/steps", "implicit_prm/loss",
                "implicit_prm/accuracy", "implicit_prm/grad_norm"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[0]["process/step_reward"] == 0.0  # pi_phi == pi_ref before its first update
    assert any(r["process/step_reward"] != 0.0 for r in rows[1:])  # ... and not after
    final = _final(cfg, 3)
    assert any("implicit_prm_params" in k for k in final) and any("implicit_prm_opt_state" in k for k in final)
    from pathlib import Path
    shutil.rmtree(Path(cfg.run_root) / cfg.name / "checkpoints" / "rl" / "3")  # as if killed during step 3
    train(cfg)  # resumes from step 2
    again = _final(cfg, 3)
    for k in final:
        np.testing.assert_array_equal(final[k], again[k], err_msg=k)


def test_trained_prm_as_dense_reward(tmp_path):
    from jaxrl_llm.train.config import ConfigError, ppo_stage, prm_stage, validate
    from jaxrl_llm.train.trainer import train
    cfg = _config(tmp_path, "prm", source="prm", prm_stage="prm", coef=0.5)
    cfg.rl.iterations, cfg.checkpoint.every = 2, 0
    path = tmp_path / "steps.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "steps": [f"{a}+{b}", f"{a + b}"],
                                        "labels": [1, int((a + b) % 3 > 0)]}) + "\n"
                            for a in range(4) for b in range(4)))
    cfg.prm = prm_stage(steps=2, batch_size=8, learning_rate=1e-3, max_prompt_len=8, max_response_len=8)
    cfg.prm.data.path, cfg.prm.data.eval_rows = str(path), 0
    cfg.ppo = ppo_stage(iterations=1, prompts_per_iter=4, samples_per_prompt=2, learning_rate=1e-4, max_new_tokens=6,
                        epochs=1)
    cfg.ppo.max_prompt_len = 8
    cfg.ppo.process_reward.update(dict(source="prm", prm_stage="prm", coef=0.1))
    cfg.stages = ("prm", "rl", "ppo")
    train(cfg)
    for stage, n in (("rl", 2), ("ppo", 1)):
        rows = [r for r in _metrics(cfg) if r["stage"] == stage and "loss" in r]
        assert len(rows) == n and all(0 <= r["process/good_steps"] <= 1 and r["process/steps"] >= 1 for r in rows)
        assert all(0.0 < r["process/step_reward"] < 1.0 for r in rows)  # probabilities
    # config errors name the key
    bad = _config(tmp_path, "bad", source="prm", prm_stage="nope")
    with pytest.raises(ConfigError, match=r"config.rl.process_reward.prm_stage='nope' must name a prm stage"):
        validate(bad)
    for overrides, message in [
            (dict(source="implicit", estimator="prime", online=False), r"config.rl.process_reward.online=False keeps"),
            (dict(source="prm", prm_stage="prm", estimator="prime"), r"process_reward.estimator='prime' needs token"),
            (dict(source="tree"), r"config.rl.process_reward.source='tree' is not a process-reward source"),
            (dict(coef=2.0), r"config.rl.process_reward.coef=2.0 is not read with source='none'"),
            (dict(source="implicit", prm_stage="prm"), r"process_reward.prm_stage='prm' is not read with source='impl"),
            (dict(source="prm", prm_stage="prm", beta=0.1), r"process_reward.beta=0.1 is not read with source='prm'")]:
        bad = _config(tmp_path, "bad", **overrides)
        bad.prm, bad.stages = cfg.prm, ("prm", "rl")
        with pytest.raises(ConfigError, match=message):
            validate(bad)
