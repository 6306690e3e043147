"""Experiment configs: `get_config()` files, the base schema, and command-line overrides.

An experiment is a Python file exporting `get_config(preset=None)` that
returns an `ml_collections.ConfigDict` (start from `base_config()`). The
loader calls it, locks the result (no new keys), then applies overrides:

    jaxrl-llm train experiments/grpo.py:smoke --set rl.algo.loss.kl_coef=0.0 --set seed=3

An unknown key is an error naming the nearest valid key; a value of the
wrong type is an error naming the key and the expected type.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import pathlib
import sys
from typing import Any, Iterable

import ml_collections as mc

STAGE_KINDS = ("sft", "grpo", "ppo", "dpo", "reward_model")


class ConfigError(ValueError):
    """A config, an experiment file or an override is wrong; the message says where and how to fix it."""


# ----------------------------------------------------------------------------- schema


def optimizer_config(learning_rate: float = 1e-6, **kw) -> mc.ConfigDict:
    from jaxrl_llm.algos.train_state import OptimizerConfig
    return from_dataclass(OptimizerConfig(learning_rate=learning_rate, **kw))


def from_dataclass(obj: Any) -> mc.ConfigDict:
    """A ConfigDict from a (nested) frozen config dataclass; None fields become typed optional fields."""
    out = mc.ConfigDict()
    hints = {f.name: f for f in dataclasses.fields(obj)}
    for name in hints:
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            out[name] = from_dataclass(value)
        elif value is None:
            out[name] = mc.FieldReference(None, field_type=_optional_type(hints[name].type))
        elif isinstance(value, tuple):
            out[name] = tuple(value)
        else:
            out[name] = value
    return out


def _optional_type(annotation: Any) -> type:
    text = str(annotation)
    for name, typ in (("float", float), ("int", int), ("str", str), ("bool", bool)):
        if name in text:
            return typ
    return object


def to_dataclass(cls: type, cfg: mc.ConfigDict | dict, where: str):
    """Builds a config dataclass from a ConfigDict section; unknown keys name the section and the nearest field."""
    data = cfg.to_dict() if isinstance(cfg, mc.ConfigDict) else dict(cfg)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}.{key} is not a field of {cls.__name__}{_nearest(key, fields)}")
        sub = fields[key].default
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            value = to_dataclass(type(sub), value, f"{where}.{key}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def base_config() -> mc.ConfigDict:
    """Every top-level key an experiment may set, with defaults. Stage sections are added by the
    stage helpers (`sft_stage`, `grpo_stage`, ...) and listed in `stages`."""
    c = mc.ConfigDict()
    c.name = ""                      # run name; default: the experiment file's stem (+ "-" + preset)
    c.run_root = "runs"
    c.seed = 0
    c.stages = ()                    # names of the stage sections to run, in order
    c.model = mc.ConfigDict(dict(preset="tiny", path="", dtype="float32", param_dtype="float32",
                                 matmul_dtype="",  # "" = the compute dtype; "bfloat16": bf16 matmul operands
                                 remat="none",
                                 scan_unroll=0))  # 0 = the preset's / checkpoint config's own
    c.tokenizer = mc.ConfigDict(dict(path=""))  # "" = the model directory, or the tiny tokenizer
    c.mesh = mc.ConfigDict(dict(axes=mc.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}),
                                max_replicated_fraction=1.0,
                                preset="",              # a topology from sharding/presets.py (then leave axes)
                                device_memory_gb=0.0,   # GiB per device for the memory check; 0 = ask the device
                                memory_headroom=0.9,    # fraction of it the estimated peak may use
                                check_memory=True))     # estimate per-device memory before building
    c.task = mc.ConfigDict(dict(name="arithmetic", kwargs=mc.ConfigDict(), chat=False))
    c.eval = mc.ConfigDict(dict(num_examples=256, every=50, max_new_tokens=16, n_samples=1, ks=(1,),
                                temperature=0.0))
    c.log = mc.ConfigDict(dict(every=10, samples_every=50, num_samples=8, progress=True, tensorboard=True))
    c.checkpoint = mc.ConfigDict(dict(every=100, keep=3, async_save=True))
    c.max_consecutive_skips = 5      # non-finite steps in a row before the run stops
    return c


def digit_addition_config(eval_every: int = 50) -> mc.ConfigDict:
    """`base_config()` on 1-2 digit addition in the format small models learn it in (one token per digit,
    operands zero-padded, answer reversed; arXiv 2307.03381), greedy accuracy on 256 held-out problems
    every `eval_every` steps: the setting of the tiny-model experiment files."""
    c = base_config()
    c.task.kwargs = mc.ConfigDict(dict(min_digits=1, max_digits=2, operators=("+",), spaced=True,
                                       pad_operands=True, reverse_answer=True))
    c.eval.num_examples, c.eval.max_new_tokens, c.eval.every = 256, 6, eval_every
    return c


def addition_warm_start() -> mc.ConfigDict:
    """The SFT warm start the tiny-model experiments share: 200 steps of 128 gold answers, lr 1e-3 with 30
    warm-up steps, prompts up to 12 tokens, answers up to 6."""
    s = sft_stage(steps=200, batch_size=128, learning_rate=1e-3, max_prompt_len=12, max_response_len=6)
    s.optimizer.warmup_steps = 30
    return s


def sft_stage(steps: int = 200, batch_size: int = 64, learning_rate: float = 1e-3, **kw) -> mc.ConfigDict:
    s = mc.ConfigDict(dict(kind="sft", steps=steps, batch_size=batch_size, max_prompt_len=16,
                           max_response_len=16, num_micro_batches=1, loss_agg="token-mean",
                           data=mc.ConfigDict(dict(source="task", path="", num_examples=20000)),
                           optimizer=optimizer_config(learning_rate)))
    s.update(kw)
    return s


def grpo_stage(variant: str = "grpo", iterations: int = 200, prompts_per_iter: int = 32, group_size: int = 8,
               learning_rate: float = 1e-6, max_new_tokens: int = 16, **variant_kw) -> mc.ConfigDict:
    """An RL stage of the GRPO family; `variant` picks the paper's settings (grpo.VARIANTS)."""
    from jaxrl_llm.algos import grpo
    if variant not in grpo.VARIANTS:
        raise ConfigError(f"grpo_stage(variant={variant!r}){_nearest(variant, grpo.VARIANTS)}")
    if variant == "dr_grpo":
        algo = grpo.dr_grpo(max_new_tokens, group_size=group_size, **variant_kw)
    else:
        algo = grpo.VARIANTS[variant](group_size=group_size, **variant_kw)
    return mc.ConfigDict(dict(
        kind="grpo", variant=variant, iterations=iterations, prompts_per_iter=prompts_per_iter,
        max_prompt_len=16,
        sampling=mc.ConfigDict(dict(max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                                         split_layer_weights=True, cache_segments=4)),
        algo=from_dataclass(algo),
        optimizer=optimizer_config(learning_rate),
        reward=mc.ConfigDict(dict(in_jit=True, timeout_s=30.0, on_error="score", error_score=0.0))))


def ppo_stage(iterations: int = 200, prompts_per_iter: int = 32, samples_per_prompt: int = 1,
              learning_rate: float = 1e-6, value_learning_rate: float = 1e-5, max_new_tokens: int = 16,
              kl_coef: float = 0.05, kl_target: float | None = None, **algo_kw) -> mc.ConfigDict:
    """A PPO stage (train/ppo_stage.py). `kl_target` makes the KL-in-reward coefficient adaptive (Ziegler et al.
    2019) with that target; `algo_kw` sets other `ppo.PPOConfig` fields (gamma, lam, vf_coef, epochs, ...).

    value_init: "policy" (the policy's backbone, zero head) or "reward_model" (the final params of the
    reward_model stage named by `reward_model_stage`); reward.source: "task" or "reward_model" (same stage)."""
    from jaxrl_llm.algos import ppo
    from jaxrl_llm.algos.kl import KLControllerConfig
    kl = (KLControllerConfig(kind="adaptive", init_coef=kl_coef, target=kl_target) if kl_target is not None
          else KLControllerConfig(kind="fixed", init_coef=kl_coef))
    return mc.ConfigDict(dict(
        kind="ppo", iterations=iterations, prompts_per_iter=prompts_per_iter,
        samples_per_prompt=samples_per_prompt, max_prompt_len=16,
        sampling=mc.ConfigDict(dict(max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                                         split_layer_weights=True, cache_segments=4)),
        algo=from_dataclass(ppo.PPOConfig(kl=kl, **algo_kw)),
        optimizer=optimizer_config(learning_rate),
        value_optimizer=optimizer_config(value_learning_rate),  # unused with algo.shared_backbone
        value_init="policy", reward_model_stage="",
        reward=mc.ConfigDict(dict(source="task", in_jit=True, timeout_s=30.0, on_error="score", error_score=0.0))))


def preference_data() -> mc.ConfigDict:
    """Where DPO and reward-model stages get pairs: generated from the task (train split; held-out pairs from
    its test split), or a preference file (source="jsonl", path; eval_path, or `eval_pairs` held out of it)."""
    return mc.ConfigDict(dict(source="task", path="", eval_path="", num_pairs=20000, eval_pairs=256))


def dpo_stage(loss_type: str = "sigmoid", steps: int = 200, batch_size: int = 32, learning_rate: float = 1e-6,
              max_prompt_len: int = 16, max_response_len: int = 16, **algo_kw) -> mc.ConfigDict:
    """A DPO-family stage (train/pref_stage.py): `loss_type` sigmoid | ipo | hinge | robust | simpo | orpo;
    `algo_kw` sets other `dpo.DPOConfig` fields (beta, label_smoothing, simpo_gamma, orpo_lambda, ...)."""
    from jaxrl_llm.algos.dpo import DPOConfig
    return mc.ConfigDict(dict(
        kind="dpo", steps=steps, batch_size=batch_size, max_prompt_len=max_prompt_len,
        max_response_len=max_response_len, num_micro_batches=1,
        algo=from_dataclass(DPOConfig(loss_type=loss_type, **algo_kw)),
        data=preference_data(), optimizer=optimizer_config(learning_rate)))


def reward_model_stage(steps: int = 200, batch_size: int = 32, learning_rate: float = 1e-5,
                       max_prompt_len: int = 16, max_response_len: int = 16, **algo_kw) -> mc.ConfigDict:
    """A Bradley-Terry reward-model stage (train/pref_stage.py). Its params are a ScalarHeadModel tree, not a
    policy: the next stage gets the policy this stage started from; a PPO stage reads them by stage name."""
    from jaxrl_llm.algos.reward_model import RewardModelConfig
    return mc.ConfigDict(dict(
        kind="reward_model", steps=steps, batch_size=batch_size, max_prompt_len=max_prompt_len,
        max_response_len=max_response_len, num_micro_batches=1,
        algo=from_dataclass(RewardModelConfig(**algo_kw)),
        data=preference_data(), optimizer=optimizer_config(learning_rate)))


# ----------------------------------------------------------------------------- loading


def _nearest(key: str, choices: Iterable[str]) -> str:
    near = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else ""


def flat_keys(cfg: mc.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        path = f"{prefix}{k}"
        out.append(path)
        if isinstance(v, mc.ConfigDict):
            out.extend(flat_keys(v, path + "."))
    return out


def parse_spec(spec: str) -> tuple[pathlib.Path, str | None]:
    """'experiments/grpo.py:smoke' -> (path, 'smoke')."""
    path, _, preset = spec.partition(":")
    p = pathlib.Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment file {path!r} does not exist (give a path like experiments/grpo.py[:preset])")
    return p, (preset or None)


def load_experiment(spec: str, overrides: Iterable[str] = ()) -> mc.ConfigDict:
    """Imports the experiment file, calls get_config(preset), locks the result and applies overrides."""
    path, preset = parse_spec(spec)
    name = f"jaxrl_llm_experiment_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"{path}: importing the experiment failed: {type(e).__name__}: {e}") from e
    get_config = getattr(module, "get_config", None)
    if get_config is None:
        raise ConfigError(f"{path} does not define get_config(); an experiment file must export it")
    accepts = len(inspect.signature(get_config).parameters) > 0
    if preset is not None and not accepts:
        raise ConfigError(f"{path}: preset {preset!r} given but get_config() takes no argument")
    presets = getattr(module, "PRESETS", None)
    if preset is not None and presets is not None and preset not in presets:
        raise ConfigError(f"{path}: unknown preset {preset!r}{_nearest(preset, presets)} (presets: {presets})")
    cfg = get_config(preset) if accepts else get_config()
    if not isinstance(cfg, mc.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict (start from "
                          f"jaxrl_llm.train.config.base_config()), got {type(cfg).__name__}")
    if not cfg.name:
        cfg.name = path.stem + (f"-{preset}" if preset else "")
    cfg.lock()
    apply_overrides(cfg, overrides)
    validate(cfg, where=str(path))
    return cfg


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string: --set task.name=knights_knaves


def apply_overrides(cfg: mc.ConfigDict, overrides: Iterable[str]) -> None:
    """Applies 'dotted.key=value' overrides; values are Python literals (bare words are strings)."""
    keys = flat_keys(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key.startswith("--config."):
            key = key[len("--config."):]
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (example: --set rl.algo.loss.kl_coef=0.0)")
        parts = key.split(".")
        node = cfg
        for i, part in enumerate(parts):
            here = ".".join(parts[:i + 1])
            if not isinstance(node, mc.ConfigDict) or part not in node:
                raise ConfigError(f"override {item!r}: unknown key {here!r}{_nearest(here, keys)}")
            if i < len(parts) - 1:
                node = node[part]
        value = _parse_value(raw)
        old = node[parts[-1]]
        if isinstance(old, mc.ConfigDict):
            raise ConfigError(f"override {item!r}: {key!r} is a section; set one of its keys "
                              f"({', '.join(old.keys())})")
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(old, tuple) and not isinstance(value, tuple):
            value = (value,)
        try:
            node[parts[-1]] = value
        except TypeError:
            expected = type(old).__name__ if old is not None else node.get_ref(parts[-1]).get_type().__name__
            raise ConfigError(f"override {item!r}: {key!r} expects {expected}, got {type(value).__name__} "
                              f"{value!r}") from None


def validate(cfg: mc.ConfigDict, where: str = "config") -> None:
    """Checks what can be checked before anything is built: stages exist and have known kinds."""
    if not cfg.stages:
        raise ConfigError(f"{where}: config.stages is empty; list the stage sections to run, e.g. ('sft', 'rl')")
    for name in cfg.stages:
        if name not in cfg:
            raise ConfigError(f"{where}: stage {name!r} is listed in config.stages but config.{name} does not "
                              "exist")
        kind = cfg[name].get("kind")
        if kind not in STAGE_KINDS:
            raise ConfigError(f"{where}: config.{name}.kind={kind!r}; expected one of {STAGE_KINDS}")
