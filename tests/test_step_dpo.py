"""Step-level DPO on MCTS sibling pairs: the pair arrays, config errors, and the pairs a run trains on."""

from __future__ import annotations

import numpy as np
import pytest

from jaxrl_llm.train.config import ConfigError, load_experiment, validate
from jaxrl_llm.train.validation import preflight
from jaxrl_llm.train.stages.step_dpo import _arrays


def test_pairs_are_left_padded_prefixes_and_right_padded_steps():
    rows = {"prompt": [np.array([5, 6, 7]), np.array([9])], "chosen": [np.array([1, 2]), np.array([3])],
            "rejected": [np.array([4]), np.array([8, 8, 2])]}
    a = _arrays(rows, p_len=4, n_resp=3, pad=0)
    np.testing.assert_array_equal(a["prompt_tokens"], [[0, 5, 6, 7], [0, 0, 0, 9]])
    np.testing.assert_array_equal(a["prompt_mask"], [[0, 1, 1, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(a["chosen_tokens"], [[1, 2, 0], [3, 0, 0]])
    np.testing.assert_array_equal(a["chosen_mask"], [[1, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(a["rejected_tokens"], [[4, 0, 0], [8, 8, 2]])
    np.testing.assert_array_equal(a["rejected_mask"], [[1, 0, 0], [1, 1, 1]])


def _config(tmp_path):
    return load_experiment("experiments/step_dpo_chain.py:smoke", [f"run_root={tmp_path}"])


@pytest.mark.parametrize("key, value, match", [
    ("search.value", "sft", r"^config\.step\.search\.value='sft': not 'verifier' nor a prm stage before 'step'"),
    ("search.min_q_gap", 0.0, r"^config\.step\.search\.min_q_gap=0\.0"),
    ("search.expansions", 1, r"^config\.step\.search\.expansions=1"),
    ("max_response_len", 2, r"^config\.step\.max_response_len=2 is shorter than one step"),
    ("search.temperature", 0.0, r"^config\.step\.search\.temperature=0\.0"),
])
def test_config_errors_are_one_line_naming_the_key(tmp_path, key, value, match):
    c = _config(tmp_path)
    node, _, leaf = f"step.{key}".rpartition(".")
    target = c
    for part in node.split("."):
        target = target[part]
    target[leaf] = value
    with pytest.raises(ConfigError, match=match) as e:
        validate(c)
    assert "\n" not in str(e.value)


def test_a_task_without_steps_is_refused(tmp_path):
    c = _config(tmp_path)
    c.task.name, c.stages, c.step.search.value = "arithmetic", ("sft", "step"), "verifier"
    with pytest.raises(ConfigError, match=r"config\.step: task 'arithmetic' has no step_separator"):
        preflight(c)
