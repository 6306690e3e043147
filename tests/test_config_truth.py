"""One source of truth per value: what a config says is what the stage, the planner and the checks use.

Each test here failed on the tree before the change it guards: the algorithm temperature silently
overwritten by the sampler's, Dr. GRPO's norm_length frozen at config-building time, RLOO's reward KL
ignored, the planner deciding on its own which forwards a stage runs, the replication check naming config
keys that do not exist (and off by default), sharding rules that no config could change, and a docstring
pointing at a page that does not exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.algos import grpo
from jaxrl_llm.algos.kl import kl_estimate
from jaxrl_llm.algos.policy_loss import PolicyLossConfig
from jaxrl_llm.models import CausalLM, ModelConfig, get_preset, init_fn_for
from jaxrl_llm.sharding import make_mesh
from jaxrl_llm.sharding.params import param_shardings
from jaxrl_llm.train.config import ConfigError, base_config, flat_keys, load_experiment, mesh_env, mesh_rules
from jaxrl_llm.train.memory import estimate_memory
from jaxrl_llm.train.stages import STAGE_KINDS

ROOT = Path(__file__).resolve().parent.parent


def _algo(cfg, name="rl"):
    return STAGE_KINDS[cfg[name].kind].algo(cfg[name], f"config.{name}")


# ----------------------------------------------------------------------------- temperature


@pytest.mark.parametrize("exp", ["grpo", "ppo"])
def test_algo_temperature_is_the_samplers(exp):
    cfg = load_experiment(f"experiments/{exp}.py:smoke", ["rl.sampling.temperature=0.7"])
    assert cfg.rl.algo.temperature is None  # unset: the stage takes the sampler's
    assert _algo(cfg).temperature == 0.7
    one_sample = {"grpo": ["rl.algo.advantage_estimator=reinforce_pp", "rl.algo.group_size=1"],
                  "ppo": ["rl.samples_per_prompt=1"]}[exp]  # greedy sampling of several per prompt is an error
    greedy = load_experiment(f"experiments/{exp}.py:smoke", ["rl.sampling.temperature=0.0", *one_sample])
    assert _algo(greedy).temperature == 1.0  # greedy sampling: the training forward's logits are unscaled
    same = load_experiment(f"experiments/{exp}.py:smoke", ["rl.sampling.temperature=0.7", "rl.algo.temperature=0.7"])
    assert _algo(same).temperature == 0.7


@pytest.mark.parametrize("exp", ["grpo", "ppo"])
def test_a_different_algo_temperature_is_an_error(exp):
    with pytest.raises(ConfigError, match=r"config.rl.algo.temperature=0.5 differs from .*"
                                          r"config.rl.sampling.temperature=1.0.*set config.rl.sampling.temperature"):
        load_experiment(f"experiments/{exp}.py:smoke", ["rl.algo.temperature=0.5"])


# ----------------------------------------------------------------------------- Dr. GRPO's length


def test_dr_grpo_norm_length_follows_max_new_tokens():
    cfg = load_experiment("experiments/dr_grpo.py:smoke", ["rl.sampling.max_new_tokens=12"])
    assert cfg.rl.algo.loss.loss_agg == "seq-mean-token-sum-norm"
    assert _algo(cfg).loss.norm_length == 12.0
    full = load_experiment("experiments/dr_grpo.py", [])
    assert _algo(full).loss.norm_length == float(full.rl.sampling.max_new_tokens)
    explicit = load_experiment("experiments/dr_grpo.py:smoke", ["rl.sampling.max_new_tokens=12",
                                                                "rl.algo.loss.norm_length=30.0"])
    assert _algo(explicit).loss.norm_length == 30.0


# ----------------------------------------------------------------------------- reward KL of group estimators


@pytest.mark.parametrize("estimator", ["rloo", "group_norm"])
def test_reward_kl_is_applied_by_group_estimators(estimator):
    rng = np.random.default_rng(0)
    g, n = 4, 5
    rewards = jnp.asarray(rng.normal(size=2 * g), jnp.float32)
    mask = jnp.asarray(rng.random((2 * g, n)) < 0.8, jnp.int32).at[:, 0].set(1)
    old = jnp.asarray(-rng.random((2 * g, n)), jnp.float32)
    ref = jnp.asarray(-rng.random((2 * g, n)), jnp.float32)
    base = grpo.GRPOConfig(group_size=g, advantage_estimator=estimator, scale_rewards="none",
                           loss=PolicyLossConfig(kl_coef=0.0))
    cfg = base.replace(reward_kl_coef=0.3)
    assert cfg.needs_reference and cfg.needs_old_logprobs and not base.needs_reference
    got = grpo.compute_advantages(cfg, rewards, mask, old_logprobs_bn=old, ref_logprobs_bn=ref)
    # by hand: the rewards minus 0.3 x the summed k1 KL of each completion, then the estimator without KL
    k1 = np.where(np.asarray(mask) > 0, np.asarray(old) - np.asarray(ref), 0.0).sum(-1)
    want = grpo.compute_advantages(base, jnp.asarray(np.asarray(rewards) - 0.3 * k1, jnp.float32), mask)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not np.allclose(got, grpo.compute_advantages(base, rewards, mask), atol=1e-3)
    with pytest.raises(ValueError, match="needs old_logprobs_bn and ref_logprobs_bn"):
        grpo.compute_advantages(cfg, rewards, mask)


def test_kl_estimate_matches_k1_used_above():
    np.testing.assert_allclose(kl_estimate(jnp.asarray([-1.0]), jnp.asarray([-1.5]), "k1"), [0.5])


# ----------------------------------------------------------------------------- the planner reads the stage's facts


@pytest.mark.parametrize("overrides,reference,score", [
    ([], False, False),                                                    # grpo smoke: beta 0, one update
    (["rl.algo.loss.kl_coef=0.04"], True, True),                           # KL in the loss: reference forward
    (["rl.algo.advantage_estimator=rloo", "rl.algo.reward_kl_coef=0.1"], True, True),  # KL in the rewards
    (["rl.algo.epochs=2"], False, True),                                   # old log-probs only
])
def test_memory_planner_counts_what_the_stage_runs(overrides, reference, score):
    cfg = load_experiment("experiments/grpo.py:smoke", ["rl.algo.loss.kl_coef=0.0", *overrides])
    algo = _algo(cfg)
    assert algo.needs_reference == reference
    assert (algo.needs_reference or algo.needs_old_logprobs) == score
    terms = estimate_memory(cfg, get_preset("tiny"), {"data": 1, "fsdp": 1, "tensor": 1}).stage("rl").terms
    assert (terms["reference"] > 0) == reference
    assert (terms["score_work"] > 0) == score


# ----------------------------------------------------------------------------- sharding rules and replication


SMALL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def test_sharding_rules_come_from_the_config(devices):
    cfg = load_experiment("experiments/grpo.py:smoke", ["mesh.rules.mlp=fsdp"])
    assert dict(mesh_rules(cfg))["mlp"] == ("fsdp",)
    env = mesh_env(cfg, make_mesh({"data": 1, "fsdp": 8, "tensor": 1}))
    _, shardings = param_shardings(init_fn_for(CausalLM(SMALL)), env)
    down = shardings["model"]["layers"]["mlp"]["down_proj"]["kernel"]  # [layers, mlp, embed]
    assert down.spec[1] == "fsdp"  # default rules: mlp -> tensor (size 1 here), embed takes fsdp instead
    default_env = mesh_env(load_experiment("experiments/grpo.py:smoke"), make_mesh({"data": 1, "fsdp": 8, "tensor": 1}))
    _, default = param_shardings(init_fn_for(CausalLM(SMALL)), default_env)
    assert tuple(default["model"]["layers"]["mlp"]["down_proj"]["kernel"].spec)[1:] == (None, "fsdp")
    bad = load_experiment("experiments/grpo.py:smoke", ["mesh.rules.mlp=model"])
    with pytest.raises(ConfigError, match=r"config.mesh.rules: .*mesh axis 'model'"):
        mesh_env(bad, make_mesh({"data": 8, "fsdp": 1, "tensor": 1}))


def test_replication_check_is_on_and_names_real_keys(devices):
    from jaxrl_llm.train.build import build
    nothing_sharded = [f"mesh.rules.{a}=()" for a in ("vocab", "embed", "heads", "kv_heads", "mlp")]
    cfg = load_experiment("experiments/grpo.py:smoke", ["model.preset=dummy", "mesh.axes.data=1", "mesh.axes.fsdp=8",
                                                        *nothing_sharded])
    with pytest.raises(ConfigError, match=r"100.0% of parameter bytes are fully replicated") as e:
        build(cfg)
    keys = set(flat_keys(base_config()))
    named = set(re.findall(r"\b(mesh\.[a-z_]+)", str(e.value)))
    assert named and named <= keys, f"{named - keys} are not config keys"
    # a pure data-parallel mesh replicates every parameter by design: nothing to check
    build(load_experiment("experiments/grpo.py:smoke", ["model.preset=dummy", "mesh.axes.data=8"]))


# ----------------------------------------------------------------------------- docs the library points at


def test_docs_named_in_the_library_exist():
    missing = []
    for path in sorted((ROOT / "jaxrl_llm").rglob("*.py")):
        for m in re.finditer(r"docs/[\w./-]+?\.md", path.read_text()):
            if not (ROOT / m.group(0)).is_file():
                missing.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not missing, missing
