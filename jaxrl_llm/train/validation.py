"""What a run is checked for before anything is built or trained.

`config.load_experiment` runs both passes after the overrides; `config.validate` runs the first one:

* `check_config(cfg)`: every key of `base_config()` and of each stage section, alone and against the keys it
  depends on (counts, every-N intervals, batch sizes and their divisors, learning rates, coefficients, clip
  ranges, sampling temperature / top_p / top_k / samples, lengths, checkpoint.every / keep, eval.*, names of
  dtypes, presets, variants, estimators, ...). The stage sections are checked by their Stage classes
  (`Stage.check_config`), which read their sections through the same checks when they are built.
* `preflight(cfg)`: the model's vocabulary against the tokenizer (`errors.ModelError`), the task
  (`errors.TaskError`) and each stage's data files (`errors.DataError`, with file:line), without creating a
  parameter. What cannot be resolved yet (a model path not given, a task file path left empty) is left to
  `build`, which says what is missing.

Every error is one line: the key with its value, the valid range or choices (a misspelt name gets the
nearest valid one), and how to fix it. Impossible values are errors; so is a non-default value of a key the
stage would not read (e.g. `optimizer.end_lr_ratio` with a constant schedule): no knob is silently ignored.

What is legal but suspicious while a stage trains (every reward call failing, rewards without variance) is
watched by the RL stages (`stages.rl.RewardWatch`).
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Iterable

import ml_collections as mc

from jaxrl_llm.errors import ConfigError, DataError, MeshError, ModelError, TaskError, UserError


# ----------------------------------------------------------------------------- one key


def short(key: str) -> str:
    """'config.rl.iterations' -> 'rl.iterations' (what --set takes)."""
    return key[len("config."):] if key.startswith("config.") else key


def fix_hint(key: str, example: Any = None) -> str:
    value = "..." if example is None else repr(example) if isinstance(example, str) else example
    return f"fix it in the experiment file or with --set {short(key)}={value}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _range(lo, hi, lo_open=False, hi_open=False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return "finite"


def integer(value: Any, key: str, lo: int | None = 1, hi: int | None = None, *, means: str = "",
            example: Any = None) -> int:
    """`value` as an int in [lo, hi], else a ConfigError naming `key`, the range and a fix."""
    if not _is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        what = f"an integer {_range(lo, hi)}" + (f" ({means})" if means else "")
        raise ConfigError(f"{key}={value!r} is out of range: expected {what}; "
                          f"{fix_hint(key, example if example is not None else lo)}")
    return value


def number(value: Any, key: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, means: str = "", example: Any = None, optional: bool = False) -> float | None:
    """`value` as a finite float in the range (None allowed with `optional`), else a ConfigError."""
    if value is None and optional:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        what = f"a number {_range(lo, hi, lo_open, hi_open)}" + (" or None" if optional else "")
        what += f" ({means})" if means else ""
        raise ConfigError(f"{key}={value!r} is out of range: expected {what}; {fix_hint(key, example)}")
    return float(value)


def choice(value: Any, key: str, choices: Iterable[str], *, means: str = "") -> str:
    """`value` if it is one of `choices`, else a ConfigError naming the nearest."""
    from jaxrl_llm.train.config import nearest
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not {means or 'a valid choice'}{nearest(str(value), choices)} "
                          f"(choices: {', '.join(map(repr, choices))})")
    return value


def flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be True or False; {fix_hint(key, True)}")
    return value


def unread(section: Any, name: str, where: str, default: Any, why: str) -> None:
    """A key the stage does not read in this configuration must keep its default: a non-default value would
    be silently ignored."""
    value = section[name] if isinstance(section, (dict, mc.ConfigDict)) else getattr(section, name)
    if value != default and not (isinstance(value, (list, tuple)) and tuple(value) == tuple(default or ())):
        raise ConfigError(f"{where}.{name}={value!r} is not read {why}, so it would be ignored; remove it (leave "
                          f"it at {default!r}) or change what makes it apply")


def divides(n: int, n_key: str, d: int, d_key: str, what: str) -> None:
    if d and n % d:
        raise ConfigError(f"{n_key}={n} is not divisible by {d_key}={d} ({what}); make {short(n_key)} a multiple "
                          f"of {d} or change {short(d_key)}")


def run_steps(s: mc.ConfigDict, key: str, where: str, means: str) -> int:
    return integer(s[key], f"{where}.{key}", 1, means=means, example=200)


def lengths(s: mc.ConfigDict, where: str, keys: Iterable[str]) -> None:
    for k in keys:
        integer(s[k], f"{where}.{k}", 1, means="tokens", example=16)


def supervised_batches(s: mc.ConfigDict, where: str, steps_means: str, rows: str, example: int) -> None:
    """The keys of a stage that takes `steps` optimiser steps over batches of `batch_size` `rows`, split into
    `num_micro_batches` parts, with prompt and response length limits (sft, dpo, reward_model)."""
    run_steps(s, "steps", where, steps_means)
    integer(s.batch_size, f"{where}.batch_size", 1, means=f"{rows} per step", example=example)
    lengths(s, where, ("max_prompt_len", "max_response_len"))
    integer(s.num_micro_batches, f"{where}.num_micro_batches", 1, means="gradient-accumulation parts", example=1)
    divides(s.batch_size, f"{where}.batch_size", s.num_micro_batches, f"{where}.num_micro_batches",
            f"each step splits its {rows} into num_micro_batches equal parts")


# ----------------------------------------------------------------------------- the whole config


def check_config(cfg: mc.ConfigDict) -> None:
    """Every top-level key and every stage section (see the module docstring); raises on the first problem."""
    check_base(cfg)
    from jaxrl_llm.train.stages import STAGE_KINDS
    for name in cfg.stages:
        check = getattr(STAGE_KINDS[cfg[name].kind].stage, "check_config", None)
        if check is not None:
            check(cfg, name)


def check_model_numerics(m: mc.ConfigDict) -> None:
    """The `model` section's dtype names, remat policy and scan_unroll (also checked by `build` for a config
    that did not come through `config.check`, e.g. a saved run's)."""
    from jaxrl_llm.models.config import DTYPE_NAMES, REMAT_POLICIES
    for key in ("dtype", "param_dtype"):
        choice(m[key], f"config.model.{key}", DTYPE_NAMES, means="a dtype name")
    if m.get("matmul_dtype", ""):
        choice(m.matmul_dtype, "config.model.matmul_dtype", DTYPE_NAMES,
               means='a dtype name ("" for the compute dtype)')
    choice(m.remat, "config.model.remat", REMAT_POLICIES, means="a remat policy")
    from jaxrl_llm.models.config import DENSE_BACKWARDS
    choice(m.get("dense_backward", "custom"), "config.model.dense_backward", DENSE_BACKWARDS,
           means="the dense layers' backward (custom: the hand-written one; xla: XLA's autodiff)")
    integer(m.get("scan_unroll", 0), "config.model.scan_unroll", 0,
            means="0: the model's own; N: unroll N layers per step of the layer scan", example=0)
    lora_config(m)


def lora_config(m: mc.ConfigDict):
    """The `model.lora` section as a `models.lora.LoraConfig`, or None when rank is 0 (off); every key
    checked (a ConfigError of one line naming the key)."""
    from jaxrl_llm.models.config import DTYPE_NAMES
    from jaxrl_llm.models.lora import TARGETS, LoraConfig, resolve_targets
    s = m.get("lora")
    if s is None:
        return None
    w = "config.model.lora"
    rank = integer(s.rank, f"{w}.rank", 0, means="the adapters' rank; 0 = LoRA off", example=16)
    number(s.alpha, f"{w}.alpha", 0.0, lo_open=True, means="adapter scale = alpha / rank", example=32.0)
    number(s.dropout, f"{w}.dropout", 0.0, 1.0, hi_open=True, means="dropout on the adapters' input", example=0.05)
    targets = s.targets
    if isinstance(targets, str):
        targets = (targets,)
    if isinstance(targets, (tuple, list)):  # --set model.lora.targets=q_proj,v_proj gives one string
        parts = (p for t in targets for p in (t.split(",") if isinstance(t, str) else [t]))
        targets = tuple(p.strip() if isinstance(p, str) else p for p in parts if not isinstance(p, str) or p.strip())
    else:
        raise ConfigError(f"{w}.targets={targets!r} must be a list of projection names; valid names: "
                          f"{', '.join(TARGETS)} (or attention, mlp, all, or a regex over them)")
    try:
        resolved = resolve_targets(tuple(targets), f"{w}.targets")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if s.base_dtype:
        choice(s.base_dtype, f"{w}.base_dtype", DTYPE_NAMES, means='a dtype name ("" for model.param_dtype)')
    if rank == 0:
        return None
    return LoraConfig(rank=rank, alpha=float(s.alpha), dropout=float(s.dropout), targets=resolved,
                      base_dtype=s.base_dtype or None)


def check_base(cfg: mc.ConfigDict) -> None:
    """The keys of `base_config()` (the stage list itself is checked by `config.validate`)."""
    if not isinstance(cfg.name, str) or not cfg.name.strip():
        raise ConfigError(f"config.name={cfg.name!r} is empty: it names the run directory (run_root/name); "
                          f"{fix_hint('config.name', 'my-run')}")
    if not isinstance(cfg.run_root, str) or not cfg.run_root.strip():
        raise ConfigError(f"config.run_root={cfg.run_root!r} is empty; {fix_hint('config.run_root', 'runs')}")
    integer(cfg.seed, "config.seed", 0, means="the run's random seed", example=0)
    dup = sorted({n for n in cfg.stages if list(cfg.stages).count(n) > 1})
    if dup:
        raise ConfigError(f"config.stages={tuple(cfg.stages)} lists {dup} more than once; a stage section runs "
                          "once (its checkpoints are under its name): add another section for a second run of it")

    if cfg.model.preset:
        _check_preset(cfg.model.preset)
    check_model_numerics(cfg.model)

    _check_mesh(cfg.mesh)

    flag(cfg.task.chat, "config.task.chat")
    ev = cfg.eval
    integer(ev.every, "config.eval.every", 0, means="steps between held-out evaluations; 0 = off", example=50)
    if ev.every > 0:  # the other eval keys are read only when evaluation is on
        off = "; to turn evaluation off set eval.every=0"
        try:
            integer(ev.num_examples, "config.eval.num_examples", 1, means="held-out examples", example=256)
            integer(ev.max_new_tokens, "config.eval.max_new_tokens", 1, means="tokens per answer", example=16)
            integer(ev.n_samples, "config.eval.n_samples", 1, means="samples per held-out example", example=1)
            number(ev.temperature, "config.eval.temperature", 0.0, means="0.0 = greedy", example=0.0)
        except ConfigError as e:
            raise ConfigError(f"{e}{off}") from None
        if ev.n_samples > 1 and ev.temperature == 0:
            raise ConfigError(f"config.eval.n_samples={ev.n_samples} with config.eval.temperature=0.0 (greedy) draws "
                              f"{ev.n_samples} identical samples of each example; set eval.temperature > 0 (e.g. "
                              "--set eval.temperature=1.0) or eval.n_samples=1")
    unread(ev, "ks", "config.eval", (1,), "during training (the held-out evaluation logs the accuracy over "
           "eval.n_samples samples); pass@k/maj@k come from `jaxrl-llm eval RUN --k 1,4`")

    lg = cfg.log
    integer(lg.every, "config.log.every", 1, means="steps between metric records", example=10)
    integer(lg.samples_every, "config.log.samples_every", 0,
            means="RL iterations between samples.jsonl records; 0 = off", example=50)
    if lg.samples_every > 0:
        integer(lg.num_samples, "config.log.num_samples", 1, means="completions per samples.jsonl record", example=8)
    flag(lg.progress, "config.log.progress")
    flag(lg.tensorboard, "config.log.tensorboard")

    ck = cfg.checkpoint
    integer(ck.every, "config.checkpoint.every", 0,
            means="steps between checkpoints; 0 = only the final one", example=100)
    integer(ck.keep, "config.checkpoint.keep", 1, means="newest checkpoints kept per stage", example=3)
    flag(ck.async_save, "config.checkpoint.async_save")
    integer(cfg.max_consecutive_skips, "config.max_consecutive_skips", 1,
            means="non-finite steps in a row before the run stops", example=5)


def _check_preset(name: str) -> None:
    from jaxrl_llm.models.config import PRESETS, get_preset
    from jaxrl_llm.train.config import nearest
    try:
        get_preset(name)
    except KeyError as e:
        cls = type(e) if isinstance(e, UserError) else ConfigError
        raise cls(f"config.model.preset={name!r} is not a model preset{nearest(name.lower(), PRESETS)} (presets: "
                  f"{', '.join(PRESETS)}; or give weights with model.path and model.preset='')") from None


def _check_mesh(mesh: mc.ConfigDict) -> None:
    import math as _math
    from jaxrl_llm.sharding.mesh import resolve_axis_sizes
    from jaxrl_llm.sharding.presets import get_mesh_preset, mesh_axes_for
    try:
        if mesh.get("preset"):
            mesh_axes_for(mesh, get_mesh_preset(mesh.preset).num_devices)  # the name; not both preset and axes
        else:  # sizes: positive or one -1; the device count is checked when the mesh is made
            axes = mesh.axes.to_dict()
            resolve_axis_sizes(axes, _math.prod(v for v in axes.values() if _is_int(v) and v > 0) or 1)
    except ValueError as e:
        text = str(e)
        if text.startswith("unknown mesh.preset"):
            text = f"mesh.preset={mesh.preset!r}: {text}"
        text = f"config.{text}" if text.startswith("mesh.") else f"config.mesh: {text}"
        raise (type(e) if isinstance(e, UserError) else MeshError)(text) from None
    number(mesh.max_replicated_fraction, "config.mesh.max_replicated_fraction", 0.0, 1.0,
           means="the largest fraction of parameter bytes that may stay replicated", example=0.5)
    number(mesh.memory_headroom, "config.mesh.memory_headroom", 0.0, 1.0, lo_open=True,
           means="fraction of device memory the estimated peak may use", example=0.9)
    number(mesh.device_memory_gb, "config.mesh.device_memory_gb", 0.0,
           means="GiB per device; 0 = ask the device", example=0.0)
    flag(mesh.check_memory, "config.mesh.check_memory")


# ----------------------------------------------------------------------------- model, tokenizer, task, data


def preflight(cfg: mc.ConfigDict) -> None:
    """The model's vocabulary against the tokenizer, the task and every stage's data (see the module
    docstring). Reads config.json, the tokenizer and the data files; creates no parameter."""
    model_cfg, model_desc = model_shape(cfg)
    tokenizer, tok_desc = _tokenizer(cfg)
    if model_cfg is not None and tokenizer is not None:
        check_vocab(model_cfg.vocab_size, tokenizer, model_desc, tok_desc)
    task = _task(cfg)
    from jaxrl_llm.train.stages import STAGE_KINDS
    for name in cfg.stages:
        check = getattr(STAGE_KINDS[cfg[name].kind].stage, "check_data", None)
        if check is not None:
            check(cfg, name, task)


def model_shape(cfg: mc.ConfigDict):
    """(ModelConfig, how it was found) from model.preset or model.path's config.json; (None, "") when neither
    is there yet (build says what is missing)."""
    from jaxrl_llm.models.config import get_preset
    from jaxrl_llm.train.build import model_numerics
    m = cfg.model
    if not m.path:
        return (get_preset(m.preset, **model_numerics(m)), f"model.preset={m.preset!r}") if m.preset else (None, "")
    config_json = pathlib.Path(m.path) / "config.json"
    if not config_json.is_file():
        return None, ""
    from jaxrl_llm.models.hf_config import config_at
    return config_at(m.path, **model_numerics(m)), f"{config_json}"  # an unusable config.json: a ModelError


def _tokenizer(cfg: mc.ConfigDict):
    from jaxrl_llm.tokenizer import TINY, load_tokenizer
    path = cfg.tokenizer.path or cfg.model.path or TINY
    if path != TINY and not pathlib.Path(path).expanduser().is_dir():
        return None, ""  # build says what is missing
    key = "tokenizer.path" if cfg.tokenizer.path else "model.path" if cfg.model.path else "tokenizer.path (default)"
    return load_tokenizer(path), f"{key}={path!r}"


def check_vocab(vocab_size: int, tokenizer, model_desc: str, tok_desc: str) -> None:
    """Every id the tokenizer can produce (and its pad and EOS ids) must have a row in the model's embedding."""
    from jaxrl_llm.tokenizer import tokenizer_info
    info = tokenizer_info(tokenizer)
    vocab = tokenizer.get_vocab()
    top = max(len(tokenizer), (max(vocab.values()) + 1) if vocab else 0, info.pad_id + 1, max(info.eos_ids) + 1)
    if top > vocab_size:
        raise ModelError(
            f"config.model: the model's vocab_size={vocab_size} ({model_desc}) is smaller than the tokenizer's "
            f"{top} token ids ({tok_desc}): ids >= {vocab_size} have no embedding row, so every step would be "
            "non-finite and skipped. Use the tokenizer that belongs to the model (--set tokenizer.path=<the "
            f"model's directory>) or a model whose vocab_size is >= {top}")


def _task(cfg: mc.ConfigDict):
    """The run's task, or None while a file-path kwarg is left empty (build names it)."""
    from jaxrl_llm.tasks import get_task
    kwargs = cfg.task.kwargs.to_dict()
    if any(k.endswith("path") and v == "" for k, v in kwargs.items()):
        return None
    try:
        return get_task(cfg.task.name, **kwargs)
    except UserError:
        raise
    except (KeyError, ValueError, TypeError) as e:
        raise TaskError(f"config.task (name={cfg.task.name!r}): {e.args[0] if e.args else e}") from None


def enough_rows(n: int, what: str, batch: int, batch_key: str) -> None:
    if n < batch:
        raise DataError(f"{what}: {n} examples are fewer than one batch of {short(batch_key)}={batch}; give more "
                        f"data or lower {short(batch_key)} (--set {short(batch_key)}={max(n, 1)})")


# ----------------------------------------------------------------------------- warnings


def record_warning(stage, kind: str, step: int, message: str, detail: str = "") -> None:
    """Records warning `kind` of `stage` at `step` in `stage.summary["warnings"]` (kind, message, first_step,
    last_step, count): printed on stderr (process 0, with `detail`) the first time in the stage, counted after."""
    import sys

    import jax
    warnings = stage.summary.setdefault("warnings", [])
    entry = next((w for w in warnings if w["kind"] == kind), None)
    if entry is not None:
        entry["count"] += 1
        entry["last_step"] = step
        return
    warnings.append({"kind": kind, "message": message, "first_step": step, "last_step": step, "count": 1})
    if jax.process_index() == 0:
        detail = f". {detail}" if detail else ""
        print(f"warning: stage {stage.name!r} step {step}: {message}{detail} (printed once; counted in the stage "
              "summary's warnings)", file=sys.stderr, flush=True)
