"""The `jaxrl-llm` command line.

    jaxrl-llm train EXP.py[:preset] [--set key=value ...] [--fresh]   # run (or resume) an experiment
    jaxrl-llm demo                      # build the tiny default model and sample from it
    jaxrl-llm sample --model DIR_OR_PRESET --prompt "12+34=" [--chat] [--n 4] ...
    jaxrl-llm presets                   # model presets and their parameter counts
    jaxrl-llm plot RUN_DIR [RUN_DIR ...] # plots/<stage>.png per run; with several runs an overlay too
    jaxrl-llm sweep EXP.py[:preset] --grid key=v1,v2 [--grid ...] --seeds 3 [--jobs 2 | --vectorise] [--set ...]
    jaxrl-llm eval RUN_DIR_OR_EXP [--split test] [--k 1,4] [--n-samples 4] [--temperature 1.0] [--stage sft]

A mistake in what you gave (config, data, model, task, mesh, run directory) prints one `error:` line and
exits with its kind's code (docs/troubleshooting.md); --debug shows the traceback as well.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import pathlib
import sys
import time

from jaxrl_llm import host_memory
from jaxrl_llm.errors import (FULL_DISK_ERRNOS, FULL_DISK_TEXT, ConfigError, ModelPresetError, ResumeError,
                              StorageError, UserError)


def _parse_mesh(text: str) -> dict[str, int]:
    axes = {}
    for part in filter(None, text.split(",")):
        name, sep, size = part.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--mesh: {part!r} is not NAME=SIZE (example: --mesh data=-1 or fsdp=4,tensor=2)")
        try:
            axes[name.strip()] = int(size)
        except ValueError:
            raise ConfigError(f"--mesh: size of {name!r} must be an integer, got {size!r}") from None
    return axes


def _load_model(model: str, dtype: str, env, seed: int):
    """(cfg, module, params) from an HF directory or a preset name (random weights)."""
    import jax

    from jaxrl_llm.models import CausalLM, create_model, get_preset
    from jaxrl_llm.tokenizer import is_gguf_path

    if pathlib.Path(model).is_dir():
        from jaxrl_llm.models.hf import load_hf
        cfg, params = load_hf(model, env, dtype=dtype)
        return cfg, CausalLM(cfg), params
    if is_gguf_path(model):
        from jaxrl_llm.models.gguf import load_gguf
        cfg, params = load_gguf(model, env, dtype=dtype)
        return cfg, CausalLM(cfg), params
    try:
        cfg = get_preset(model, dtype=dtype)
    except ModelPresetError as e:
        raise ModelPresetError(f"--model {model!r}: not a directory and {e}") from None
    module, params, _ = create_model(cfg, jax.random.key(seed), env)
    return cfg, module, params


def cmd_sample(args) -> int:
    import jax
    import numpy as np

    from jaxrl_llm.rollout import SamplingConfig, make_sampler
    from jaxrl_llm.sharding import ShardingEnv, make_mesh
    from jaxrl_llm.tokenizer import decode_completions, encode_prompts, is_gguf_path, load_tokenizer, tokenizer_info

    env = ShardingEnv(make_mesh(_parse_mesh(args.mesh)))
    cfg, module, params = _load_model(args.model, args.dtype, env, args.seed)
    local = pathlib.Path(args.model).is_dir() or is_gguf_path(args.model)
    tok_path = args.tokenizer or (args.model if local else "tiny")
    tokenizer = load_tokenizer(tok_path, vocab_size=cfg.vocab_size)
    info = tokenizer_info(tokenizer)
    prompts = args.prompt
    if args.chat:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    enc = encode_prompts(tokenizer, prompts, args.max_prompt_len, chat=args.chat)
    try:
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, n_samples=args.n,
                                  eos_token_ids=tuple(info.eos_ids), pad_token_id=info.pad_id)
    except ConfigError as e:  # name the flag, not the dataclass field
        flags = {"max_new_tokens": "--max-new-tokens", "n_samples": "--n", "top_k": "--top-k", "top_p": "--top-p",
                 "temperature": "--temperature"}
        field = str(e).split("=", 1)[0].removeprefix("SamplingConfig.")
        raise ConfigError(str(e).replace(f"SamplingConfig.{field}", flags.get(field, field), 1)) from None
    sampler = make_sampler(module, cfg, sampling, env=env)
    key = jax.random.key(args.seed)

    t0 = time.perf_counter()
    out = jax.block_until_ready(sampler(params, enc.tokens, enc.mask, key))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(sampler(params, enc.tokens, enc.mask, key))
    timed = time.perf_counter() - t0

    texts = decode_completions(tokenizer, np.asarray(out.tokens), np.asarray(out.mask))
    lengths = np.asarray(out.lengths)
    means = mean_logprobs(out.logprobs, out.mask)
    for i, text in enumerate(texts):
        p = args.prompt[i // args.n]
        print(f"[{i // args.n}.{i % args.n}] {p!r} -> {text!r}  ({int(lengths[i])} tokens, "
              f"mean logprob {means[i]:.3f})")
    n_tokens = int(lengths.sum())
    steps = int(out.num_steps)
    rows = len(texts)
    print(f"\nmodel {args.model} ({cfg.num_params():,} params, {cfg.dtype}) on "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}; mesh {dict(env.mesh.shape)}")
    print(f"first call (compile + run) {first:.2f} s; second call {timed * 1e3:.1f} ms: {steps} decode steps "
          f"x {rows} rows = {rows * steps / timed:,.0f} tokens/s ({n_tokens} tokens before EOS)")
    return 0


def mean_logprobs(logprobs, mask):
    """Each row's mean sampled-token log-prob over its completion tokens (mask: 1/True on them, any dtype)."""
    import numpy as np
    lp, m = np.asarray(logprobs, np.float64), np.asarray(mask).astype(bool)
    return [float(lp[i][m[i]].mean()) if m[i].any() else float("nan") for i in range(len(lp))]


def cmd_demo(args) -> int:
    """The smallest real thing: the tiny default model (random weights) sampling arithmetic prompts."""
    ns = argparse.Namespace(
        model="tiny", tokenizer="tiny", dtype="float32", mesh=args.mesh, seed=args.seed,
        prompt=["72+4=", "7+7737=", "3439+7=", "6+9952=", "7+738=", "75+5=", "0+8=", "6+54="],
        chat=False, n=args.n, max_prompt_len=8, max_new_tokens=args.max_new_tokens,
        temperature=1.0, top_k=0, top_p=1.0)
    print("Sampling from the tiny default model (Qwen2 shape, random weights: the text is noise;"
          " RL training comes in the experiments).\n")
    return cmd_sample(ns)


def start_distributed(args) -> None:
    """--cpu-devices, then JAX's multi-process runtime from --distributed/--coordinator/--num-processes/
    --process-id (before any device is touched); see docs/scaling.md."""
    from jaxrl_llm.sharding import multihost, set_cpu_devices
    try:
        if args.cpu_devices is not None:
            set_cpu_devices(args.cpu_devices)
        multihost.initialize(args.distributed, args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def add_distributed_flags(p) -> None:
    g = p.add_argument_group("multi-process (TPU pods, GPU clusters; see docs/scaling.md)")
    g.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                   help="auto (default): start JAX's distributed runtime on a TPU pod slice, under SLURM/mpirun "
                        "with several tasks, or when a coordinator is given; on: always; off: never")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0 (default: $JAX_COORDINATOR_ADDRESS, or detected)")
    g.add_argument("--num-processes", type=int, default=None, help="default: $JAX_NUM_PROCESSES, or detected")
    g.add_argument("--process-id", type=int, default=None, help="0..N-1 (default: $JAX_PROCESS_ID, or detected)")
    p.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                   help="split the CPU into N XLA devices (one per core: each core runs its own rows; the default "
                        "mesh shards the batch over them); CPU runs only, see docs/performance.md")


def cmd_train(args) -> int:
    start_distributed(args)
    import jax

    from jaxrl_llm.train.config import load_experiment
    from jaxrl_llm.train.trainer import train

    cfg = load_experiment(args.experiment, args.set)
    summary = train(cfg, fresh=args.fresh)
    if jax.process_index() == 0:
        print_summary(summary)
    return 0


SUMMARY_LABELS = {"pref_accuracy": "preference accuracy", "env_accuracy": "accuracy with the environment (episodes)"}
# (others: the metric name with spaces)


def print_summary(summary: dict) -> None:
    print(f"\nrun {summary['name']}: {summary['run_dir']} ({summary['wall_time_s']:.0f} s)")
    for k, v in summary.items():
        if (k.endswith("accuracy_before") or k.endswith("accuracy_after")) and v is not None:
            print(f"  {k}: {v:.3f}")
    for k in summary:
        if k.endswith("accuracy_before"):
            after = summary.get(k[:-len("_before")] + "_after")  # the same metric of the same stage
            if after is not None and summary[k] is not None:
                stage, metric = k[:-len("_before")].rsplit("/", 1)
                label = SUMMARY_LABELS.get(metric, metric.replace("_", " "))
                print(f"  {stage}: held-out {label} {summary[k]:.3f} -> {after:.3f} "
                      f"({100 * (after - summary[k]):+.1f} points)")
    for p in summary.get("plots", []):
        print(f"  plot: {p}")


def cmd_plot(args) -> int:
    import json
    import os

    from jaxrl_llm.train.plots import plot_overlay, plot_run

    dirs = [pathlib.Path(d) for d in args.run_dirs]
    for d in dirs:
        if not ((d / "metrics.jsonl").is_file() or (d / "results.json").is_file()):
            raise ConfigError(f"{d} has no metrics.jsonl (a run) or results.json (a sweep); give "
                              "run directories (runs/<name>) or sweep directories")
    runs = [d for d in dirs if (d / "metrics.jsonl").is_file()]
    for d in dirs:
        if d not in runs:  # a sweep: its overlay again, variants as groups, seeds averaged
            res = json.loads((d / "results.json").read_text())
            groups = {v["variant"]: [r["run_dir"] for r in res["runs"] if r["variant"] == v["variant"] and r["ok"]]
                      for v in res["variants"]}
            for p in plot_overlay({k: v for k, v in groups.items() if v}, d / "plots"):
                print(p)
    for d in runs:
        for p in plot_run(d):
            print(p)
    if len(runs) > 1:
        out = pathlib.Path(args.out) if args.out else (
            pathlib.Path(os.path.commonpath([str(d.absolute()) for d in runs])) / "plots" / "compare")
        names = [d.name for d in runs]
        labels = names if len(set(names)) == len(names) else [str(d) for d in runs]
        for p in plot_overlay({label: [d] for label, d in zip(labels, runs)}, out):
            print(p)
    return 0


def cmd_sweep(args) -> int:
    from jaxrl_llm.train.sweep import parse_grid, sweep

    result = sweep(args.experiment, parse_grid(args.grid), args.seeds, args.set, jobs=args.jobs,
                   run_root=args.run_root, name=args.name, fresh=args.fresh,
                   compile_cache=not args.no_compile_cache, vectorise=args.vectorise)
    return 1 if result.failed else 0


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise ConfigError(f"--k {text!r}: give comma-separated integers, e.g. --k 1,4") from None
    if not ks or min(ks) < 1:
        raise ConfigError(f"--k {text!r}: every k must be >= 1")
    return ks


def _run_config(run_dir: pathlib.Path):
    """The resolved config a run saved in config.json (JSON lists back to the tuples they were)."""
    import json

    import ml_collections as mc

    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        return tuple(tuples(v) for v in x) if isinstance(x, list) else x

    return mc.ConfigDict(tuples(json.loads((run_dir / "config.json").read_text())))


def evaluate_run(run_dir, split: str = "test", ks=(1,), n_samples: int | None = None, temperature: float = 1.0,
                 num_examples: int | None = None, max_new_tokens: int | None = None, batch_size: int = 0,
                 seed: int = 0, stage: str | None = None):
    """Scores the final params of a run (latest checkpoint of its last stage) on `split` of its task; with
    `stage`, the latest checkpoint of that stage instead (e.g. "sft": the model before RL).

    Returns (EvalResult, info) and writes `eval_path(run_dir, stage)` (the result's dict plus info)."""
    import json

    from jaxrl_llm.eval.evaluator import Evaluator
    from jaxrl_llm.train.build import build
    from jaxrl_llm.train.trainer import load_stage_policy

    run_dir = pathlib.Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir} has no config.json; give a run directory or the experiment it ran")
    cfg = _run_config(run_dir)
    stages = tuple(cfg.stages)
    name = stages[-1] if stage is None else eval_stage(run_dir, stages, stage)
    ck_dir = run_dir / "checkpoints" / name
    if not ck_dir.is_dir():
        which = "its last stage" if stage is None else "stage"
        raise ResumeError(f"{run_dir} has no checkpoints of {which} {name!r} ({ck_dir})")
    n = n_samples or max(ks)
    if n < max(ks):
        raise ConfigError(f"--k {max(ks)} needs --n-samples >= {max(ks)} (got {n})")

    comp, params = build(cfg)
    params, step, done = load_stage_policy(comp, cfg, run_dir, name, params)
    if not done:
        print(f"warning: {ck_dir}/{step} is not the final checkpoint of stage {name!r} (the run did not finish)")

    examples = comp.task.examples(split, int(num_examples or cfg.eval.num_examples), int(cfg.seed))
    mnt = int(max_new_tokens or cfg.eval.max_new_tokens)
    evaluator = Evaluator(comp.module, comp.model_cfg, comp.env, comp.tokenizer, comp.task, examples,
                          max_prompt_len=int(cfg[name].get("max_prompt_len", 256)), max_new_tokens=mnt,
                          n_samples=n, temperature=float(temperature), chat=comp.chat, batch_size=batch_size,
                          param_shardings=comp.shardings)
    result = evaluator.evaluate(params, ks, seed=seed)
    info = {"run_dir": str(run_dir), "stage": name, "step": int(step), "final": done,
            "split": split, "n_samples": n, "temperature": float(temperature), "max_new_tokens": mnt, "seed": seed}
    eval_path(run_dir, stage).write_text(json.dumps({**info, **result.to_dict()}, indent=1, default=str) + "\n")
    return result, info


def eval_stage(run_dir: pathlib.Path, stages: tuple[str, ...], stage: str) -> str:
    """`stage` if the run has a stage of that name, else a ConfigError naming the run's stages."""
    if stage not in stages:
        from jaxrl_llm.train.config import nearest
        raise ConfigError(f"--stage {stage!r}: the run {run_dir} has no stage of that name{nearest(stage, stages)}; "
                          f"give one of its stages {', '.join(stages)} (or leave --stage out for the last one)")
    return stage


def eval_path(run_dir: pathlib.Path, stage: str | None = None) -> pathlib.Path:
    """Where `jaxrl-llm eval` writes: <run_dir>/eval.json, or eval-<stage>.json with --stage."""
    return pathlib.Path(run_dir) / ("eval.json" if stage is None else f"eval-{stage}.json")


def cmd_eval(args) -> int:
    target = pathlib.Path(args.target)
    if target.is_dir():
        run_dir = target
    elif not args.target.split(":")[0].endswith(".py"):
        what = "is not a directory" if target.exists() else "does not exist"
        raise ConfigError(f"{target} {what}; give a run directory (runs/<name>) or the experiment file the "
                          "run came from (EXP.py[:preset])")
    else:
        from jaxrl_llm.train.config import load_experiment
        cfg = load_experiment(args.target, args.set)
        run_dir = pathlib.Path(cfg.run_root) / cfg.name
    result, info = evaluate_run(run_dir, args.split, _parse_ks(args.k), args.n_samples, args.temperature,
                                args.num_examples, args.max_new_tokens, args.batch_size, args.seed, args.stage)
    print(f"eval of {run_dir}: stage {info['stage']!r} step {info['step']}, split {info['split']!r}, "
          f"{info['n_samples']} sample(s) per prompt at temperature {info['temperature']}\n")
    print(result.table())
    print(f"\nwritten: {eval_path(run_dir, args.stage)}")
    return 0


def cmd_presets(args) -> int:
    from jaxrl_llm.models import PRESETS
    print(f"{'preset':<16}{'family':<8}{'params':>16}  layers  hidden  heads/kv  vocab")
    for name, cfg in PRESETS.items():
        print(f"{name:<16}{cfg.family:<8}{cfg.num_params():>16,}  {cfg.num_layers:>6}  {cfg.hidden_size:>6}  "
              f"{cfg.num_heads:>4}/{cfg.num_kv_heads:<3}  {cfg.vocab_size}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jaxrl-llm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debug", action="store_true", help=f"show the traceback of a user error too (anywhere on the "
                    f"command line; or set {DEBUG_ENV}=1)")
    sub = ap.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="run or resume an experiment file")
    tr.add_argument("experiment", help="experiment file, optionally with a preset: experiments/grpo.py:smoke")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set rl.algo.loss.kl_coef=0.0 (repeatable)")
    tr.add_argument("--fresh", action="store_true", help="delete the run directory and start over")
    add_distributed_flags(tr)
    tr.set_defaults(func=cmd_train)

    demo = sub.add_parser("demo", help="build the tiny default model and sample from it")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--n", type=int, default=2, help="samples per prompt")
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.add_argument("--mesh", default="data=-1", help="mesh axes, e.g. data=-1 or fsdp=4,tensor=2")
    demo.set_defaults(func=cmd_demo)

    s = sub.add_parser("sample", help="generate from an HF checkpoint directory, a .gguf file or a preset (random "
                       "weights)")
    s.add_argument("--model", required=True, help="local HF directory (config.json + safetensors), .gguf file or "
                   "preset name")
    s.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory or .gguf file, "
                   "or 'tiny')")
    s.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    s.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    s.add_argument("--n", type=int, default=1, help="samples per prompt")
    s.add_argument("--max-prompt-len", type=int, default=256)
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    s.add_argument("--mesh", default="data=-1")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_sample)

    p = sub.add_parser("presets", help="list model presets")
    p.set_defaults(func=cmd_presets)

    pl = sub.add_parser("plot", help="plot runs' metrics (plots/<stage>.png); several runs: also an overlay")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, or sweep directories "
                    "(their mean ± std overlay is drawn again)")
    pl.add_argument("--out", default=None, help="overlay of several runs (default: <common parent>/plots/compare)")
    pl.set_defaults(func=cmd_plot)

    sw = sub.add_parser("sweep", help="run a grid of overrides x seeds as separate processes; table + plots")
    sw.add_argument("experiment", help="experiment file, optionally with a preset: experiments/demo.py:smoke")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="values to sweep (Python literals, comma-separated); repeat for a cartesian product")
    sw.add_argument("--seeds", default="1", help="a count (3 = seeds 0,1,2) or a list (0,1,2; one seed: 7,)")
    sw.add_argument("--jobs", type=int, default=None, help="runs at a time (default: half the CPU cores)")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    sw.add_argument("--name", default=None, help="sweep name (default: <experiment name>-sweep)")
    sw.add_argument("--run-root", default=None, help="default: the experiment's run_root")
    sw.add_argument("--fresh", action="store_true", help="restart runs that exist (default: resume or skip)")
    sw.add_argument("--no-compile-cache", action="store_true",
                    help="do not share JAX's compilation cache (<run_root>/.jax_cache) between the runs")
    sw.add_argument("--vectorise", action="store_true",
                    help="one process; the last (grpo) stage of every run as one program per iteration, vmapped "
                    "over the runs (seeds, or a --grid of its optimizer.learning_rate; docs/ablations.md)")
    sw.set_defaults(func=cmd_sweep)

    ev = sub.add_parser("eval", help="pass@k / maj@k of a finished run's final params (or a stage's: --stage) "
                        "on held-out data")
    ev.add_argument("target", metavar="RUN_DIR_OR_EXP", help="runs/<name>, or the experiment[:preset] that ran")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="with an experiment: the overrides it ran with (they decide the run name)")
    ev.add_argument("--split", default="test")
    ev.add_argument("--k", default="1", help="comma-separated k of pass@k and maj@k, e.g. 1,4")
    ev.add_argument("--n-samples", type=int, default=None, help="samples per prompt (default: the largest k)")
    ev.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ev.add_argument("--num-examples", type=int, default=None, help="default: the run's eval.num_examples")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval.max_new_tokens")
    ev.add_argument("--batch-size", type=int, default=0, help="prompts per sampler call (0: all at once)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--stage", default=None, help="evaluate the latest checkpoint of this stage (e.g. sft: the "
                    "model before RL; written to eval-<stage>.json); default: the last stage (eval.json)")
    ev.set_defaults(func=cmd_eval)
    return ap


def config_flags_to_sets(argv: list[str]) -> list[str]:
    """`--config.key=value` and `--config.key value` (ml_collections' flag spelling) as `--set key=value`."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config.") and len(a) > len("--config."):
            key = a[len("--config."):]
            if "=" not in key and i + 1 < len(argv):
                i += 1
                key = f"{key}={argv[i]}"
            out += ["--set", key]
        else:
            out.append(a)
        i += 1
    return out


DEBUG_ENV = "JAXRL_LLM_DEBUG"
UNWRITABLE = (*FULL_DISK_ERRNOS, errno.EROFS)  # an OSError that is a storage problem, not a bug


def report(e: BaseException) -> int:
    """Prints a user error as one `error:` line (a message may add a few lines of context) on stderr and
    returns its exit code (jaxrl_llm.errors); see docs/troubleshooting.md."""
    if isinstance(e, OSError) and not isinstance(e, UserError):
        fix = ("write elsewhere (--set run_root=...)" if e.errno == errno.EROFS else
               "free some space (or pick another run_root with --set run_root=...)")
        e = StorageError(f"cannot write {e.filename or 'a file'}: {e.strerror}; {fix} and run the same command "
                         "again to resume")
    print(f"error: {e}", file=sys.stderr, flush=True)
    return e.exit_code


class _NoBackgroundTracebacks(logging.Filter):
    """Drops the error records (with tracebacks) that orbax's writing threads log, and asyncio's "exception was
    never retrieved" records of the writes a full disk cut short: the same error is raised again in the main
    thread, where it is reported once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if f"{os.sep}orbax{os.sep}" in record.pathname:
            return False
        text = record.getMessage()
        return not (record.name == "asyncio" and "never retrieved" in text
                    and any(t in text for t in ("RESOURCE_EXHAUSTED", *FULL_DISK_TEXT)))


def _quiet_unraisable(unraisable) -> None:
    """After a failed checkpoint write, tensorstore's callbacks of the writes still pending reach orbax's
    closed event loop, each printing a traceback; the write's own error is reported once instead."""
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def _exit_now(code: int) -> None:
    """Ends the process without Python's shutdown. After a third Ctrl-C (a second one waits for a save to be
    handed over, `train.signals.finish_first`) the checkpoint writer's threads may wait for signals from a save
    that was cut short, and the interpreter's exit would join them for ever; after a second it would wait for
    the write in flight, which "at once" does not."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = config_flags_to_sets(sys.argv[1:] if argv is None else list(argv))
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    if not debug:
        from absl import logging as absl_logging  # orbax logs through absl's own logger object
        quiet = _NoBackgroundTracebacks()
        absl_logging.get_absl_logger().addFilter(quiet)
        logging.getLogger("asyncio").addFilter(quiet)
        sys.unraisablehook = _quiet_unraisable
    try:
        host_memory.check()
        return args.func(args)
    except UserError as e:
        if debug:
            raise
        code = report(e)
        if getattr(e, "at_once", False):
            _exit_now(code)
        return code
    except OSError as e:
        if debug or e.errno not in UNWRITABLE:
            raise
        return report(e)
    except KeyboardInterrupt:  # outside a training loop (which saves a checkpoint and raises Interrupted)
        if debug:
            raise
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
