"""No knob silently ignored, no nonsense silently trained.

Before anything is built, `load_experiment` checks every key of the config (ranges, names with the nearest
valid one, keys a stage would not read), the model's vocabulary against the tokenizer and the data files;
each error is one line naming the key. While an RL stage trains, a reward that always fails stops the run
(RewardFailureError) and rewards without variance are warned about once, in the log and the summary.

Every test here failed before these checks existed: the configs below trained (or failed deep inside, with
a ZeroDivisionError or a NaN every step) without a word.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import ml_collections as mc
import numpy as np
import pytest

from jaxrl_llm.errors import (ConfigError, DataError, MeshError, ModelError, RewardFailureError, UserError)
from jaxrl_llm.train.config import base_config, load_experiment, validate

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "experiments"


def _load(name: str, overrides=(), preset: str | None = None):
    return load_experiment(f"{EXP / name}.py" + (f":{preset}" if preset else ""), list(overrides))


# ----------------------------------------------------------------------------- the issue's examples


@pytest.mark.parametrize("exp", ["demo", "grpo"])
def test_unknown_rl_variant_names_the_nearest(exp):
    with pytest.raises(ConfigError, match=r"config\.rl\.variant='grpoo' is not a GRPO variant; did you mean 'grpo'"):
        _load(exp, ["rl.variant=grpoo"])


def test_a_variant_override_does_not_leave_the_algo_of_another_variant():
    with pytest.raises(ConfigError, match=r"config\.rl\.variant='dapo': an override does not rebuild config\.rl\.algo"
                                          r".*grpo_stage\('dapo'"):
        _load("grpo", ["rl.variant=dapo"])
    assert _load("grpo", ["rl.variant=grpo"]).rl.variant == "grpo"  # unchanged: fine


def _model_dir(tmp_path: Path, vocab_size: int) -> Path:
    """A Hugging Face model directory (config.json, no weights) holding the tiny tokenizer (512 tokens; 513 when
    read with the model's config.json beside it, which adds a pad token)."""
    from jaxrl_llm.models import get_preset
    from jaxrl_llm.models.hf_config import config_to_hf
    from jaxrl_llm.tokenizer import tiny_tokenizer_dir
    d = tmp_path / "model"
    shutil.copytree(tiny_tokenizer_dir(), d)
    (d / "config.json").write_text(json.dumps(config_to_hf(get_preset("dummy").replace(vocab_size=vocab_size))))
    return d


def test_model_vocab_smaller_than_the_tokenizer_is_a_model_error(tmp_path):
    d = _model_dir(tmp_path, 256)
    with pytest.raises(ModelError, match=r"config\.model: the model's vocab_size=256 \(.*config\.json\) is smaller "
                                         r"than the tokenizer's 51\d token ids .*--set tokenizer\.path="):
        _load("grpo", ["model.preset=''", f"model.path={d}"], "smoke")
    tiny = str(ROOT / "jaxrl_llm" / "assets" / "tiny_tokenizer")  # the same with the tokenizer given apart
    with pytest.raises(ModelError, match=r"vocab_size=256 .*smaller than the tokenizer's 512"):
        _load("grpo", ["model.preset=''", f"model.path={d}", f"tokenizer.path={tiny}"], "smoke")


def test_a_model_vocab_that_covers_the_tokenizer_loads(tmp_path):
    cfg = _load("grpo", ["model.preset=''", f"model.path={_model_dir(tmp_path, 640)}"], "smoke")
    assert cfg.model.path


@pytest.mark.parametrize("exp,overrides,key", [
    ("grpo", ["rl.sampling.temperature=0"], r"config\.rl\.algo\.group_size=8"),
    ("dapo", ["rl.sampling.temperature=0.0"], r"config\.rl\.algo\.group_size=8"),
    ("ppo", ["rl.sampling.temperature=0.0"], r"config\.rl\.samples_per_prompt=4"),
])
def test_greedy_sampling_of_several_completions_per_prompt_is_an_error(exp, overrides, key):
    with pytest.raises(ConfigError, match=rf"config\.rl\.sampling\.temperature=0\.0 \(greedy\) with {key}: .*identical"
                                          r".*set rl\.sampling\.temperature > 0"):
        _load(exp, overrides)


def test_greedy_sampling_of_one_completion_per_prompt_is_fine():
    assert _load("ppo", ["rl.sampling.temperature=0.0", "rl.samples_per_prompt=1"]).rl.sampling.temperature == 0.0


def _pairs_file(path: Path, same_at: int | None, n: int = 40) -> Path:
    rows = [{"prompt": f"{i} + 1 =", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(n)]
    if same_at is not None:
        rows[same_at]["rejected"] = rows[same_at]["chosen"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("exp,stage", [("dpo", "pref"), ("reward_model", "rm")])
def test_preference_file_with_chosen_equal_to_rejected_names_the_line(tmp_path, exp, stage):
    path = _pairs_file(tmp_path / "pairs.jsonl", same_at=6)
    sets = [f"{stage}.data.source=jsonl", f"{stage}.data.path={path}", f"{stage}.data.num_pairs=20000"]
    with pytest.raises(DataError, match=rf"pairs\.jsonl:7: 'chosen' and 'rejected' are the same response \('7'\)"):
        _load(exp, sets, "smoke")
    ok = _pairs_file(tmp_path / "ok.jsonl", same_at=None)
    assert _load(exp, [*sets[:1], f"{stage}.data.path={ok}", sets[2]], "smoke")[stage].data.path == str(ok)


def test_generated_pairs_with_chosen_equal_to_rejected_are_a_data_error():
    from jaxrl_llm.tasks.base import Example
    from jaxrl_llm.train.pref_data import task_pairs

    class SameTwice:
        name = "same_twice"

        def examples(self, split, num, seed):
            return [Example(f"{i} + 1 =", str(i + 1)) for i in range(num)]

        def preference_pair(self, example, rng: random.Random):
            return example.answer, (example.answer if example.prompt.startswith("3 ") else "0")

        def reward(self, inputs): ...

        def extract_answer(self, completion): ...

        def is_correct(self, completion, example): ...

    with pytest.raises(DataError, match=r"task 'same_twice' generated 1 of 5 preference pairs \(train split, seed 0; "
                                        r"the first: example 3.*are the same \('4'\)"):
        task_pairs(SameTwice(), "train", 5, seed=0)


@pytest.mark.parametrize("override,message", [
    ("rl.iterations=-5", r"config\.rl\.iterations=-5 is out of range: expected an integer >= 1 .*"
                         r"--set rl\.iterations="),
    ("log.every=0", r"config\.log\.every=0 is out of range: expected an integer >= 1 .*--set log\.every="),
    ("rl.prompts_per_iter=0", r"config\.rl\.prompts_per_iter=0 is out of range: expected an integer >= 1"),
    ("eval.num_examples=0", r"config\.eval\.num_examples=0 is out of range: expected an integer >= 1 .*"
                            r"to turn evaluation off set eval\.every=0"),
])
def test_the_issues_impossible_counts_name_their_key(override, message):
    with pytest.raises(ConfigError, match=message):
        _load("grpo", [override])


def test_eval_keys_are_free_while_evaluation_is_off():
    assert _load("grpo", ["eval.every=0", "eval.num_examples=0"]).eval.num_examples == 0


# ----------------------------------------------------------------------------- every category


CASES = [  # (experiment, overrides, error class, message)
    # base_config(): names, counts, intervals, ranges
    ("grpo", ["seed=-1"], ConfigError, r"config\.seed=-1 is out of range: expected an integer >= 0"),
    ("grpo", ["name=''"], ConfigError, r"config\.name='' is empty"),
    ("grpo", ["stages=('sft', 'rl', 'rl')"], ConfigError, r"config\.stages=.* lists \['rl'\] more than once"),
    ("grpo", ["model.dtype=bf16"], ConfigError, r"config\.model\.dtype='bf16' is not a dtype name; did you mean "
                                                r"'bfloat16'"),
    ("grpo", ["model.param_dtype=float23"], ConfigError, r"config\.model\.param_dtype='float23'.*did you mean"),
    ("grpo", ["model.matmul_dtype=bfloat"], ConfigError, r"config\.model\.matmul_dtype='bfloat'.*'bfloat16'"),
    ("grpo", ["model.remat=ful"], ConfigError, r"config\.model\.remat='ful' is not a remat policy; did you mean "
                                               r"'full'"),
    ("grpo", ["model.scan_unroll=-1"], ConfigError, r"config\.model\.scan_unroll=-1 is out of range"),
    ("grpo", ["model.preset=tinny"], UserError, r"config\.model\.preset='tinny' is not a model preset; did you mean "
                                                r"'tiny'"),
    ("grpo", ["mesh.axes.data=0"], MeshError, r"config\.mesh\.axes\.data=0: sizes must be positive integers or -1"),
    ("grpo", ["mesh.preset=v5e-9"], MeshError, r"config\.mesh\.preset='v5e-9'.*did you mean 'v5e-8'"),
    ("grpo", ["mesh.max_replicated_fraction=1.5"], ConfigError, r"config\.mesh\.max_replicated_fraction=1\.5 .*in "
                                                                r"\[0\.0, 1\.0\]"),
    ("grpo", ["mesh.memory_headroom=0.0"], ConfigError, r"config\.mesh\.memory_headroom=0\.0 .*in \(0\.0, 1\.0\]"),
    ("grpo", ["mesh.device_memory_gb=-1.0"], ConfigError, r"config\.mesh\.device_memory_gb=-1\.0 .*>= 0"),
    ("grpo", ["eval.every=-1"], ConfigError, r"config\.eval\.every=-1 .*0 = off"),
    ("grpo", ["eval.max_new_tokens=0"], ConfigError, r"config\.eval\.max_new_tokens=0 is out of range"),
    ("grpo", ["eval.n_samples=0"], ConfigError, r"config\.eval\.n_samples=0 is out of range"),
    ("grpo", ["eval.temperature=-0.5"], ConfigError, r"config\.eval\.temperature=-0\.5 .*>= 0\.0"),
    ("grpo", ["eval.n_samples=4"], ConfigError, r"config\.eval\.n_samples=4 with config\.eval\.temperature=0\.0 "
                                                r"\(greedy\) draws 4 identical samples"),
    ("grpo", ["eval.ks=(1, 4)"], ConfigError, r"config\.eval\.ks=\(1, 4\) is not read during training"),
    ("grpo", ["log.samples_every=-1"], ConfigError, r"config\.log\.samples_every=-1 is out of range"),
    ("grpo", ["log.samples_every=5", "log.num_samples=0"], ConfigError, r"config\.log\.num_samples=0 is out of range"),
    ("grpo", ["checkpoint.every=-1"], ConfigError, r"config\.checkpoint\.every=-1 .*0 = only the final one"),
    ("grpo", ["checkpoint.keep=0"], ConfigError, r"config\.checkpoint\.keep=0 is out of range"),
    ("grpo", ["max_consecutive_skips=0"], ConfigError, r"config\.max_consecutive_skips=0 is out of range"),
    # RL sections: lengths, sampling, rewards
    ("grpo", ["rl.max_prompt_len=0"], ConfigError, r"config\.rl\.max_prompt_len=0 is out of range"),
    ("grpo", ["rl.sampling.max_new_tokens=0"], ConfigError, r"config\.rl\.sampling\.max_new_tokens=0: must be an "
                                                            r"integer >= 1"),
    ("grpo", ["rl.sampling.top_p=0.0"], ConfigError, r"config\.rl\.sampling\.top_p=0\.0: must be in \(0, 1\]"),
    ("grpo", ["rl.sampling.top_k=-1"], ConfigError, r"config\.rl\.sampling\.top_k=-1: must be an integer >= 0"),
    ("grpo", ["rl.sampling.temperature=-1.0"], ConfigError, r"config\.rl\.sampling\.temperature=-1\.0: must be"),
    ("grpo", ["rl.sampling.cache_segments=0"], ConfigError, r"config\.rl\.sampling\.cache_segments=0: must be"),
    ("ppo", ["rl.samples_per_prompt=1", "rl.sampling.temperature=0.0", "rl.sampling.top_k=5"], ConfigError,
     r"config\.rl\.sampling\.top_k=5 is not read with sampling\.temperature=0\.0"),
    ("grpo", ["rl.reward.in_jit=False", "rl.reward.timeout_s=0.0"], ConfigError,
     r"config\.rl\.reward\.timeout_s=0\.0; expected a positive number of seconds"),
    ("grpo", ["rl.reward.in_jit=False", "rl.reward.on_error=abrt"], ConfigError,
     r"config\.rl\.reward\.on_error='abrt' is not a reward failure policy.*did you mean 'abort'"),
    ("grpo", ["rl.reward.on_error=abort"], ConfigError,
     r"config\.rl\.reward\.on_error='abort' is not read with the in-jit reward of task 'arithmetic'"),
    # GRPO family: the algorithm's keys
    ("grpo", ["rl.algo.group_size=0"], ConfigError, r"config\.rl\.algo\.group_size=0: group baselines need"),
    ("grpo", ["rl.algo.epochs=0"], ConfigError, r"config\.rl\.algo\.epochs=0: must be >= 1"),
    ("grpo", ["rl.algo.num_minibatches=3"], ConfigError, r"config\.rl\.prompts_per_iter x rl\.algo\.group_size = 32 x "
                                                         r"8 = 256 rollout rows are not divisible by .* = 3"),
    ("grpo", ["rl.algo.loss.clip_eps_low=1.5"], ConfigError, r"config\.rl\.algo\.loss\.clip_eps_low=1\.5: must be in "
                                                             r"\[0, 1\).*--set rl\.algo\.loss\.clip_eps_low="),
    ("grpo", ["rl.algo.loss.kl_coef=-0.1"], ConfigError, r"config\.rl\.algo\.loss\.kl_coef=-0\.1: must be >= 0"),
    ("grpo", ["rl.algo.loss.loss_agg=token_mean"], ConfigError,
     r"config\.rl\.algo\.loss\.loss_agg='token_mean' is not a known aggregation mode\. Did you mean 'token-mean'"),
    ("grpo", ["rl.algo.loss.kl_estimator=k4"], ConfigError, r"config\.rl\.algo\.loss\.kl_estimator='k4' is not "
                                                            r"supported\. Choose one of \('k1', 'k2', 'k3', 'abs'\)"),
    ("grpo", ["rl.algo.advantage_estimator=rlo"], ConfigError, r"config\.rl\.algo\.advantage_estimator='rlo' .*Did "
                                                               r"you mean 'rloo'"),
    ("grpo", ["rl.algo.scale_rewards=grop"], ConfigError, r"config\.rl\.algo\.scale_rewards='grop' .*'group'"),
    ("grpo", ["rl.algo.loss.ratio_level=seq"], ConfigError, r"config\.rl\.algo\.loss\.ratio_level='seq'"),
    ("grpo", ["rl.algo.gamma=0.9"], ConfigError, r"config\.rl\.algo\.gamma=0\.9 is not read by "
                                                 r"advantage_estimator='group_norm'"),
    ("grpo", ["rl.algo.reward_kl_coef=-1.0"], ConfigError, r"config\.rl\.algo\.reward_kl_coef=-1\.0 is out of range"),
    ("grpo", ["rl.algo.loss.norm_length=10.0"], ConfigError, r"config\.rl\.algo\.loss\.norm_length=10\.0 is not read "
                                                             r"by loss_agg='seq-mean-token-mean'"),
    ("grpo", ["rl.algo.std_ddof=2"], ConfigError, r"config\.rl\.algo\.std_ddof=2 is out of range"),
    ("dr_grpo", ["rl.algo.std_eps=0.1"], ConfigError, r"config\.rl\.algo\.std_eps=0\.1 is not read .*scale_rewards="
                                                      r"'none'"),
    ("rloo", ["rl.algo.scale_rewards=batch"], ConfigError, r"config\.rl\.algo\.scale_rewards='batch' is not read by "
                                                           r"advantage_estimator='rloo'"),
    ("grpo", ["rl.algo.reward_kl_estimator=k3"], ConfigError, r"config\.rl\.algo\.reward_kl_estimator='k3' is not "
                                                              r"read with reward_kl_coef=0\.0"),
    # optimizers
    ("grpo", ["rl.optimizer.learning_rate=0.0"], ConfigError, r"config\.rl\.optimizer\.learning_rate=0\.0 is out of "
                                                              r"range: expected a number > 0\.0"),
    ("grpo", ["rl.optimizer.name=adan"], ConfigError, r"config\.rl\.optimizer\.name='adan' \(did you mean 'adam'\?\)"),
    ("sft", ["sft.optimizer.schedule=cosin"], ConfigError, r"config\.sft\.optimizer\.schedule='cosin' \(did you mean "
                                                           r"'cosine'\?\)"),
    ("grpo", ["rl.optimizer.b2=1.0"], ConfigError, r"config\.rl\.optimizer\.b2=1\.0: must be in \[0, 1\)"),
    ("grpo", ["rl.optimizer.max_grad_norm=0.0"], ConfigError, r"config\.rl\.optimizer\.max_grad_norm=0\.0: must be"),
    ("grpo", ["rl.optimizer.end_lr_ratio=0.1"], ConfigError, r"config\.rl\.optimizer\.end_lr_ratio=0\.1 is not read "
                                                             r"by the constant schedule"),
    ("grpo", ["rl.optimizer.name=adam", "rl.optimizer.weight_decay=0.1"], ConfigError,
     r"config\.rl\.optimizer\.weight_decay=0\.1 is not read by optimizer name='adam' \(adamw"),
    ("grpo", ["rl.optimizer.name=sgd", "rl.optimizer.b1=0.5"], ConfigError, r"config\.rl\.optimizer\.b1=0\.5 is not "
                                                                            r"read by optimizer name='sgd'"),
    # PPO
    ("ppo", ["rl.samples_per_prompt=0"], ConfigError, r"config\.rl\.samples_per_prompt=0 is out of range"),
    ("ppo", ["rl.algo.lam=1.5"], ConfigError, r"config\.rl\.algo\.lam=1\.5: must be in \[0, 1\]"),
    ("ppo", ["rl.algo.vf_coef=-1.0"], ConfigError, r"config\.rl\.algo\.vf_coef=-1\.0: must be >= 0"),
    ("ppo", ["rl.algo.kl.kind=adaptve"], ConfigError, r"config\.rl\.algo\.kl\.kind='adaptve' \(did you mean "
                                                      r"'adaptive'\?\)"),
    ("ppo", ["rl.algo.kl.target=1.0"], ConfigError, r"config\.rl\.algo\.kl\.target=1\.0 is not read by the fixed KL"),
    ("ppo", ["rl.value_init=polic"], ConfigError, r"config\.rl\.value_init='polic' .*did you mean 'policy'"),
    ("ppo", ["rl.reward.source=reward"], ConfigError, r"config\.rl\.reward\.source='reward' .*did you mean"),
    ("ppo", ["rl.reward_model_stage=sft"], ConfigError, r"config\.rl\.reward_model_stage='sft' is not read with "
                                                        r"value_init='policy'"),
    ("ppo", ["rl.value_init=reward_model"], ConfigError, r"config\.rl\.reward_model_stage='' must name a reward_model "
                                                         r"stage that runs before 'rl'"),
    ("ppo", ["rl.algo.shared_backbone=True"], ConfigError, r"config\.rl\.value_optimizer\.learning_rate=0\.0003 is not "
                                                           r"read with algo\.shared_backbone=True"),
    # SFT
    ("sft", ["sft.steps=0"], ConfigError, r"config\.sft\.steps=0 is out of range"),
    ("sft", ["sft.batch_size=0"], ConfigError, r"config\.sft\.batch_size=0 is out of range"),
    ("sft", ["sft.max_response_len=0"], ConfigError, r"config\.sft\.max_response_len=0 is out of range"),
    ("sft", ["sft.num_micro_batches=3"], ConfigError, r"config\.sft\.batch_size=128 is not divisible by "
                                                      r"config\.sft\.num_micro_batches=3"),
    ("sft", ["sft.data.source=json"], ConfigError, r"config\.sft\.data\.source='json' .*did you mean 'jsonl'"),
    ("sft", ["sft.data.source=jsonl"], ConfigError, r"config\.sft\.data\.source='jsonl' needs config\.sft\.data\.path"),
    ("sft", ["sft.data.path=x.jsonl"], ConfigError, r"config\.sft\.data\.path='x\.jsonl' is not read with "
                                                    r"data\.source='task'"),
    ("sft", ["sft.data.num_examples=10"], ConfigError, r"config\.sft\.data\.num_examples=10 is out of range: expected "
                                                       r"an integer >= 128"),
    ("sft", ["sft.loss_agg=token_mean"], ConfigError, r"config\.sft\.loss_agg='token_mean' .*Did you mean"),
    ("sft", ["sft.norm_length=5.0"], ConfigError, r"config\.sft\.norm_length is only used by loss_agg in"),
    # preference stages
    ("dpo", ["pref.steps=0"], ConfigError, r"config\.pref\.steps=0 is out of range"),
    ("dpo", ["pref.batch_size=7", "pref.num_micro_batches=2"], ConfigError, r"config\.pref\.batch_size=7 is not "
                                                                            r"divisible by config\.pref\.num_micro_"),
    ("dpo", ["pref.max_prompt_len=0"], ConfigError, r"config\.pref\.max_prompt_len=0 is out of range"),
    ("dpo", ["pref.algo.beta=0.0"], ConfigError, r"config\.pref\.algo\.beta=0\.0 must be > 0"),
    ("dpo", ["pref.algo.loss_type=sigmod"], ConfigError, r"config\.pref\.algo\.loss_type='sigmod' is not supported\. "
                                                         r"Did you mean 'sigmoid'"),
    ("dpo", ["pref.algo.label_smoothing=0.7"], ConfigError, r"config\.pref\.algo\.label_smoothing=0\.7 must be in"),
    ("dpo", ["pref.algo.simpo_gamma=1.0"], ConfigError, r"config\.pref\.algo\.simpo_gamma=1\.0 is not read by "
                                                        r"loss_type='sigmoid'"),
    ("orpo", ["orpo.algo.beta=0.5"], ConfigError, r"config\.orpo\.algo\.beta=0\.5 is not read by loss_type='orpo'"),
    ("dpo", ["pref.algo.nll_coef=0.0", "pref.algo.loss_agg=seq-mean-token-mean"], ConfigError,
     r"config\.pref\.algo\.loss_agg=.* is not read with nll_coef=0\.0"),
    ("dpo", ["pref.data.source=jsnl"], ConfigError, r"config\.pref\.data\.source='jsnl' .*did you mean 'jsonl'"),
    ("dpo", ["pref.data.path=x.jsonl"], ConfigError, r"config\.pref\.data\.path='x\.jsonl' is not read with "
                                                     r"data\.source='task'"),
    ("dpo", ["pref.data.num_pairs=10"], ConfigError, r"config\.pref\.data\.num_pairs=10 is out of range: expected an "
                                                     r"integer >= 64"),
    ("dpo", ["pref.data.eval_pairs=-1"], ConfigError, r"config\.pref\.data\.eval_pairs=-1 is out of range"),
    ("reward_model", ["rm.algo.center_rewards_coef=-1.0"], ConfigError, r"config\.rm\.algo\.center_rewards_coef=-1\.0 "
                                                                        r"must be >= 0"),
    ("reward_model", ["rm.data.source=jsonl"], ConfigError, r"config\.rm\.data\.source='jsonl' needs "
                                                            r"config\.rm\.data\.path"),
]


@pytest.mark.parametrize("exp,overrides,error,message", CASES, ids=[" ".join(c[1]) for c in CASES])
def test_impossible_or_unread_value_is_an_error_naming_its_key(exp, overrides, error, message):
    with pytest.raises(error, match=message) as e:
        _load(exp, overrides)
    assert "\n" not in str(e.value), "the CLI prints one line"


def test_validate_checks_a_config_built_by_hand():
    c = base_config()
    from jaxrl_llm.train.config import grpo_stage
    c.name, c.stages, c.rl = "by-hand", ("rl",), grpo_stage("grpo", iterations=-5)
    with pytest.raises(ConfigError, match=r"^config\.rl\.iterations=-5 is out of range"):
        validate(c)
    c.rl.iterations, c.log.every = 3, 0
    with pytest.raises(ConfigError, match=r"^config\.log\.every=0 is out of range"):
        validate(c)
    c.log.every = 1
    validate(c)


def test_train_checks_a_config_changed_after_loading(tmp_path):
    """train() checks what load_experiment checked when the config changed since (a notebook user's edit),
    before the run directory is made; the same config is not checked twice."""
    from jaxrl_llm.train import config as config_module
    from jaxrl_llm.train.trainer import train
    cfg = _load("demo", [f"run_root={tmp_path}"], "smoke")
    assert cfg.to_json() in config_module._CHECKED
    cfg.rl.iterations = -5
    with pytest.raises(ConfigError, match=r"config\.rl\.iterations=-5 is out of range"):
        train(cfg)
    cfg.rl.iterations, cfg.model.preset = 2, "no-such-preset"
    with pytest.raises(ModelError, match=r"no-such-preset. is not a model preset"):
        train(cfg)
    assert not (tmp_path / cfg.name).exists()


# ----------------------------------------------------------------------------- while a stage trains


FAST_RL = ["stages=('rl',)", "rl.iterations=6", "rl.prompts_per_iter=4", "rl.algo.group_size=2",
           "rl.sampling.max_new_tokens=2", "rl.reward.in_jit=False", "rl.algo.loss.kl_coef=0.0", "eval.every=0",
           "log.every=1", "checkpoint.every=0", "log.progress=False", "log.tensorboard=False", "log.samples_every=0"]


def _run(tmp_path, monkeypatch, reward):
    from jaxrl_llm.tasks.arithmetic import ArithmeticTask
    from jaxrl_llm.train.trainer import train
    monkeypatch.setattr(ArithmeticTask, "reward", reward)
    return train(_load("grpo", FAST_RL + [f"run_root={tmp_path}"], "smoke"))


def test_a_reward_that_always_fails_stops_the_run(tmp_path, monkeypatch, capfd):
    def reward(self, inputs):
        raise ZeroDivisionError("no denominator")
    with pytest.raises(RewardFailureError, match=r"stage 'rl': every call of the reward function 'arithmetic' failed "
                                                 r"in 3 iteration\(s\) in a row .*the first failure: reward term "
                                                 r"'arithmetic' raised ZeroDivisionError: no denominator") as e:
        _run(tmp_path, monkeypatch, reward)
    assert e.value.exit_code == 9 and "\n" not in str(e.value)
    err = capfd.readouterr().err
    assert err.count("warning: stage 'rl' step 1: every call of the reward 'arithmetic' failed") == 1  # printed once
    rows = [json.loads(x) for x in (tmp_path / "grpo-smoke" / "metrics.jsonl").read_text().splitlines()]
    assert [r["warn/reward_calls_failed"] for r in rows] == [1.0, 1.0]  # the third iteration raised before its log


def test_rewards_without_variance_are_warned_about_once(tmp_path, monkeypatch, capfd):
    from jaxrl_llm.tasks.base import RewardOutput
    from jaxrl_llm.train.stages.rl import ZERO_VARIANCE_PATIENCE
    summary = _run(tmp_path, monkeypatch, lambda self, inputs: RewardOutput(np.full(len(inputs), 0.5, np.float32)))
    (w,) = summary["rl/warnings"]
    assert w["kind"] == "zero_reward_variance" and w["first_step"] == ZERO_VARIANCE_PATIENCE == 5
    assert "every group of 2 completions got identical rewards" in w["message"] and w["count"] == 1
    assert json.loads((tmp_path / "grpo-smoke" / "summary.json").read_text())["rl/warnings"] == [w]
    assert capfd.readouterr().err.count("warning: stage 'rl' step 5: for 5 iterations in a row") == 1
    rows = [json.loads(x) for x in (tmp_path / "grpo-smoke" / "metrics.jsonl").read_text().splitlines()]
    assert [r["warn/zero_variance_streak"] for r in rows] == [1, 2, 3, 4, 5, 6]


class _Scorer:
    name = "answer"

    def __init__(self):
        self.last_calls, self.last_failed, self.last_failure = 2, 0, None


class _Stage:
    name, total_steps = "rl", 10

    def __init__(self):
        self.summary, self.scorer = {}, _Scorer()
        self.section = mc.ConfigDict(dict(reward=dict(error_score=0.0)))


def _exp(rewards, n=2):
    import jax.numpy as jnp
    from types import SimpleNamespace
    return SimpleNamespace(rewards=jnp.asarray(rewards, jnp.float32), n=n)


@pytest.mark.parametrize("history,aborts_at", [
    ("FFF", 3),          # every call failed from the start: stop after 3 iterations
    ("SFFFF", None),     # a call succeeded before: warn, go on
    ("PFFF", None),      # some calls of the first iteration succeeded
    ("FF", 2),           # a stage of 2 iterations that never got a reward: stop at its end
])
def test_reward_watch_stops_only_when_no_reward_call_ever_succeeded(history, aborts_at, capfd):
    from jaxrl_llm.train.stages.rl import RewardWatch, zero_variance
    stage = _Stage()
    stage.total_steps = len(history)
    watch = RewardWatch(stage)
    for i, h in enumerate(history):
        s = stage.scorer
        s.last_failed = {"F": 2, "P": 1, "S": 0}[h]
        s.last_failure = None if h == "S" else "reward term 'answer' raised KeyError: 'x' (on a batch of 4)\ntraceback"
        exp = _exp([0.0, 1.0])
        if aborts_at == i + 1:
            with pytest.raises(RewardFailureError, match=r"'answer' failed .*first failure: reward term 'answer' "
                                                         r"raised KeyError: 'x' \(on a batch of 4\)\. Fix"):
                watch(i, exp, zero_variance(exp.rewards, exp.n))
            return
        watch(i, exp, zero_variance(exp.rewards, exp.n))
    assert aborts_at is None
    (w,) = stage.summary["warnings"]
    assert w["kind"] == "reward_all_failed" and w["count"] == history.count("F")
    assert capfd.readouterr().err.count("warning:") == 1


def test_zero_variance_is_per_group_or_over_the_batch_of_single_samples():
    import jax.numpy as jnp
    from jaxrl_llm.train.stages.rl import zero_variance
    assert bool(zero_variance(jnp.asarray([1.0, 1.0, 0.0, 0.0]), 2))
    assert not bool(zero_variance(jnp.asarray([1.0, 1.0, 0.0, 1.0]), 2))
    assert not bool(zero_variance(jnp.asarray([1.0, 0.0]), 1))  # PPO with one sample: over the batch
    assert bool(zero_variance(jnp.asarray([0.5, 0.5]), 1))


def _pairs_differing_late(path, n_same_start):
    """40 text pairs; the first `n_same_start` differ only after their first token ("1 2" / "1 3")."""
    rows = []
    for i in range(40):
        a, b = (f"1 {i % 10}", f"1 {(i + 1) % 10}") if i < n_same_start else (f"{i % 5}", f"{i % 5 + 5}")
        rows.append(json.dumps({"prompt": f"{i}+0=", "chosen": a, "rejected": b}))
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("n_same_start", [40, 20])
def test_pairs_that_max_response_len_makes_identical(tmp_path, n_same_start):
    """A cut that leaves chosen == rejected is an error when it hits every pair and a warning otherwise."""
    from jaxrl_llm.train.trainer import train
    f = _pairs_differing_late(tmp_path / "pairs.jsonl", n_same_start)
    cfg = _load("dpo", [f"run_root={tmp_path}", "pref.data.source=jsonl", f"pref.data.path={f}",
                        "pref.data.num_pairs=20000", "pref.max_response_len=1", "stages=('pref',)",
                        "eval.every=0", "log.progress=False", "log.tensorboard=False"], "smoke")
    if n_same_start == 40:
        with pytest.raises(DataError, match=r"of \d+ training pairs \(the first: .*pairs\.jsonl:\d+\) have the "
                                            r"same chosen and rejected tokens once config\.pref\.max_response_len=1"):
            train(cfg)
        return
    (w,) = train(cfg)["pref/warnings"]
    assert w["kind"] == "pairs_identical_after_truncation" and "raise pref.max_response_len" in w["message"]
