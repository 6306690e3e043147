"""One RL iteration's data side (`train.experience.collect`) and the GRPO stage's model side (`GRPOLearner`):
what the stages run and what bench/ours_grpo.py times, on a dummy model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.algos import grpo
from jaxrl_llm.algos.policy_loss import PolicyLossConfig
from jaxrl_llm.algos.train_state import OptimizerConfig, TrainState
from jaxrl_llm.models import ModelConfig, create_model
from jaxrl_llm.rollout import SamplingConfig, make_sampler
from jaxrl_llm.sharding import ShardingEnv, make_mesh
from jaxrl_llm.tasks import Example
from jaxrl_llm.train.experience import PromptBatch, collect
from jaxrl_llm.train.stages.grpo import GRPOLearner

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
G = 4


class FixedScores:
    """A scorer: prompt i's completions get rewards from a fixed table; group 1 is constant (no signal)."""

    def __init__(self):
        self.seen = []

    def __call__(self, ro, examples, n):
        self.seen.append((ro.tokens.shape, [e.answer for e in examples], n))
        table = jnp.asarray([0.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5], jnp.float32)
        return table, table > 0.75, {"reward/extra": 3.0}


@pytest.fixture(scope="module")
def setup():
    env = ShardingEnv(make_mesh({"data": 1}, devices=jax.devices()[:1]))
    module, params, _ = create_model(CFG, jax.random.key(0), env)
    sc = SamplingConfig(max_new_tokens=5, temperature=1.0, n_samples=G, eos_token_ids=(1,), pad_token_id=0)
    tokens = jnp.asarray([[0, 5, 6], [7, 8, 9]], jnp.int32)
    prompts = PromptBatch(tokens, tokens > 0, [Example("a", "x"), Example("b", "y")], 0)
    return env, module, params, make_sampler(module, CFG, sc, env=env), prompts


def test_collect_scores_the_rollout_and_drops_groups_without_signal(setup):
    env, module, params, sampler, prompts = setup
    scorer, phases = FixedScores(), []
    exp = collect(sampler, params, prompts, jax.random.key(3), scorer, G, keep_groups_with_signal=True,
                  on_phase=lambda name, value: phases.append(name))
    assert phases == ["generation", "reward"]
    assert scorer.seen == [((2 * G, 5), ["x", "y"], G)]
    ro = exp.rollout
    np.testing.assert_array_equal(exp.batch["completion_tokens"], ro.tokens)
    np.testing.assert_array_equal(exp.batch["sampler_logprobs"], ro.raw_logprobs)
    mask = np.asarray(exp.batch["completion_mask"])
    np.testing.assert_array_equal(mask[:G], np.asarray(ro.mask)[:G])  # group 0 has signal: kept
    assert mask[G:].sum() == 0 and np.asarray(ro.mask)[G:].sum() > 0   # group 1 is constant: no loss
    m = jax.device_get(exp.metrics)
    assert m["groups_kept_fraction"] == 0.5 and m["reward/extra"] == 3.0
    np.testing.assert_allclose(m["reward/mean"], 0.5)
    np.testing.assert_allclose(m["accuracy"], 0.25)
    np.testing.assert_allclose(m["response_length"], np.asarray(ro.lengths).mean())
    same = collect(sampler, params, prompts, jax.random.key(3), FixedScores(), G)
    np.testing.assert_array_equal(same.rollout.tokens, ro.tokens)  # a function of its key
    np.testing.assert_array_equal(same.batch["completion_mask"], ro.mask)  # no filter asked for
    assert "groups_kept_fraction" not in same.metrics


@pytest.mark.parametrize("epochs,beta,phases_with_values", [
    (1, 0.0, ()),                        # on-policy, no KL: neither forward runs
    (2, 0.04, ("old", "reference")),     # two updates per rollout, KL in the loss: both forwards
])
def test_learner_runs_the_forwards_the_algorithm_needs(setup, epochs, beta, phases_with_values):
    env, module, params, sampler, prompts = setup
    algo = grpo.GRPOConfig(group_size=G, epochs=epochs, loss=PolicyLossConfig(kl_coef=beta))
    learner = GRPOLearner(module, CFG, algo, env)
    exp = collect(sampler, params, prompts, jax.random.key(3), FixedScores(), G)
    state = TrainState.create(jax.tree.map(jnp.copy, params), OptimizerConfig(name="sgd", learning_rate=0.1))
    seen = []
    new, metrics = learner(state, params if algo.needs_reference else None, exp, jax.random.key(4),
                           on_phase=lambda name, value: seen.append((name, value is not None)))
    assert [name for name, _ in seen] == ["old", "reference", "update"]
    assert {name for name, has in seen if has} - {"update"} == set(phases_with_values)
    assert int(new.step) == epochs and np.isfinite(float(metrics["loss"]))
