"""The DPO step's TRL-style metrics (rewards/*, logps/*, per-token log-probs) and the stage's held-out log-prob
metrics, against float64 numpy recomputations from the model's full logits on a tiny batch."""

import jax
import numpy as np
import optax
import pytest

from jaxrl_llm.algos.dpo import DPOConfig, make_dpo_step
from jaxrl_llm.algos.train_state import TrainState
from jaxrl_llm.models import ModelConfig, create_model
from jaxrl_llm.sharding import ShardingEnv, make_mesh
from jaxrl_llm.train.stages.preference import held_out_logps

V = 32
CFG = ModelConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)

# 3 pairs: left-padded prompts, right-padded responses of 3/1/2 (chosen) and 2/2/1 (rejected) tokens
BATCH = {
    "prompt_tokens": np.array([[0, 5, 6], [7, 8, 9], [0, 0, 4]], np.int32),
    "prompt_mask": np.array([[0, 1, 1], [1, 1, 1], [0, 0, 1]], bool),
    "chosen_tokens": np.array([[3, 4, 5], [10, 0, 0], [11, 12, 0]], np.int32),
    "chosen_mask": np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], bool),
    "rejected_tokens": np.array([[3, 9], [13, 14], [15, 0]], np.int32),
    "rejected_mask": np.array([[1, 1], [1, 1], [1, 0]], bool),
    "ref_chosen_logps": np.array([-9.0, -3.0, -7.0], np.float32),
    "ref_rejected_logps": np.array([-6.5, -6.0, -3.5], np.float32),
}


@pytest.fixture(scope="module")
def lm():
    module, params, _ = create_model(CFG, jax.random.key(3), ShardingEnv(make_mesh({"data": 1},
                                                                                  devices=jax.devices()[:1])))
    return module, jax.device_get(params)


def summed_logps(module, params, side):
    """float64 (summed log-prob [B], length [B]) of the `side` responses, from full logits."""
    tokens = np.concatenate([BATCH["prompt_tokens"], BATCH[f"{side}_tokens"]], 1)
    mask = np.concatenate([BATCH["prompt_mask"], BATCH[f"{side}_mask"]], 1)
    logits = np.asarray(module.apply({"params": params}, tokens, None, mask)[0], np.float64)
    p = BATCH["prompt_tokens"].shape[1]
    logits = logits[:, p - 1:-1]  # the positions that predict the response tokens
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, BATCH[f"{side}_tokens"][..., None], -1)[..., 0]
    m = BATCH[f"{side}_mask"]
    return ((picked - lse) * m).sum(-1), m.sum(-1).astype(np.float64)


def step_metrics(module, params, cfg, num_micro=1):
    state = TrainState.create(jax.tree.map(np.array, params), optax.sgd(0.0))
    _, metrics = jax.jit(make_dpo_step(module, CFG, cfg, num_micro))(state, BATCH, jax.random.key(0))
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


@pytest.mark.parametrize("num_micro", [1, 3])
def test_sigmoid_metrics_match_float64(lm, num_micro):
    module, params = lm
    beta = 0.3
    m = step_metrics(module, params, DPOConfig(beta=beta), num_micro)
    sc, lc = summed_logps(module, params, "chosen")
    sr, lr = summed_logps(module, params, "rejected")
    r_c, r_r = beta * (sc - BATCH["ref_chosen_logps"]), beta * (sr - BATCH["ref_rejected_logps"])
    want = {"logps/chosen": sc.mean(), "logps/rejected": sr.mean(),
            "logps/chosen_per_token": (sc / lc).mean(), "logps/rejected_per_token": (sr / lr).mean(),
            "rewards/chosen": r_c.mean(), "rewards/rejected": r_r.mean(), "rewards/margins": (r_c - r_r).mean(),
            "rewards/accuracies": (r_c > r_r).mean(), "loss": np.mean(np.log1p(np.exp(-(r_c - r_r))))}
    assert 0 < want["rewards/accuracies"] < 1  # the batch has pairs ranked either way
    for k, v in want.items():
        assert m[k] == pytest.approx(v, rel=1e-5, abs=1e-5), k
    # per token differs from summed / mean length: the average is over pairs of each pair's own average
    assert abs(want["logps/chosen_per_token"] - sc.mean() / lc.mean()) > 1e-3


def test_simpo_metrics_are_averages(lm):
    module, params = lm
    m = step_metrics(module, params, DPOConfig(loss_type="simpo", beta=2.0, simpo_gamma=0.4))
    sc, lc = summed_logps(module, params, "chosen")
    sr, lr = summed_logps(module, params, "rejected")
    for k, v in {"logps/chosen": (sc / lc).mean(), "logps/chosen_per_token": (sc / lc).mean(),
                 "logps/rejected_per_token": (sr / lr).mean(), "rewards/chosen": 2.0 * (sc / lc).mean(),
                 "rewards/margins": 2.0 * (sc / lc - sr / lr).mean()}.items():
        assert m[k] == pytest.approx(v, rel=1e-5, abs=1e-5), k


def test_held_out_logps_by_hand():
    arrays = {"chosen_mask": np.array([[1, 1, 0], [1, 1, 1]]), "rejected_mask": np.array([[1, 0], [1, 1]])}
    out = held_out_logps(np.array([-2.0, -6.0]), np.array([-1.0, -8.0]), arrays,
                         np.array([0.5, -0.1]), np.array([0.2, 0.3]))
    assert out == pytest.approx({
        "eval/logps/chosen": -4.0, "eval/logps/rejected": -4.5,
        "eval/logps/chosen_per_token": (-1.0 - 2.0) / 2, "eval/logps/rejected_per_token": (-1.0 - 4.0) / 2,
        "eval/rewards/chosen": 0.2, "eval/rewards/rejected": 0.25})
