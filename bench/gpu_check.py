"""A one-shot check of the library on one GPU: decode speed and HBM bandwidth, GRPO update MFU, bf16 parity, memory.

    python bench/gpu_check.py                          # on one GPU (H100 / H200 / A100), all parts, < 8 minutes
    python bench/gpu_check.py --parts decode,update    # some parts only
    python bench/gpu_check.py --shrink --out /tmp/gc   # the same code paths at tiny shapes (CPU, seconds)

Random-init weights at the real shapes of Qwen2.5-0.5B and Qwen2.5-1.5B (the library's presets; nothing is
downloaded). The parts:

  decode   the library's jitted sampler (`rollout.make_sampler`, bf16 weights and compute, T=1, EOS never
           sampled so every row decodes every step), prompts of 128 tokens + 256 new tokens, batch 64 and
           256, for both shapes. Timed after a warm-up call (the compile), median of 3 calls. tokens/s =
           rows x new tokens / sampler seconds. The prefill (the same layer split, cache and forward as the
           sampler's, jitted alone) is timed too; decode seconds = sampler - prefill, and the HBM fraction =
           the bytes the decode forwards must read (`decode_bytes`: every weight per step + the KV cache
           filled so far) / decode seconds / the device's peak bandwidth (`PEAKS`; null when unknown).
  update   the library's GRPO update (`algos.grpo.make_grpo_step` in `make_epoch_runner` under `jit_update`,
           as `train.stages.grpo.GRPOLearner` builds it): GRPO (beta 0.04, k3 KL), AdamW, float32
           parameters and optimizer state, bf16 compute, 64 rows x (128 prompt + 384 completion) tokens at
           the 1.5B shape. The remat policy and micro-batch count are the first of `UPDATE_CANDIDATES`
           whose estimate (`train.memory.Sizes`) fits 75% of the device's memory; an out-of-memory error
           moves to the next. MFU = 6 x parameters x tokens / seconds / peak bf16 dense FLOP/s (`mfu`).
  parity   the same weights in float32 (matmul precision "highest": no TF32) and in bf16 (0.5B shape),
           8 rows of 64 prompt + 192 completion tokens: log-probs of the same completion tokens
           (`algos.logprobs.completion_logprobs`), max / mean absolute difference, and the fraction of
           positions where the two greedy next tokens (argmax of the logits, teacher-forced on the same
           sequence) agree, with the median float32 top-1 margin (random weights give nearly flat logits).
  memory   each measuring job's peak device memory (`memory_stats()["peak_bytes_in_use"]`) against the
           analytic estimate from `train.memory.Sizes` (weights, optimizer state, gradients, activations,
           KV cache, logits), and their ratio. Null where the backend reports no memory statistics (CPU).
           Asked for alone (`--parts memory`), it runs the parity and 0.5B decode jobs to have peaks.

Each job runs in its own child process (so each peak is its own, and a crash or an out-of-memory error in
one is recorded in the JSON with its error line while the others still run). `--budget-s` (default 420)
bounds the whole run: a job not started in time is recorded as skipped, a job still running at the budget
is stopped (what it measured until then is kept). Writes bench/results/gpu-check-<date>.json (device
kind, jax version, every figure, the config of each part) and the markdown table beside it (.md; with
--shrink gpu-check-<date>-shrunk.*), and prints the table. On a GPU the children get
XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 unless it is set; the parent never touches a device.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the library beside bench/
    sys.path.insert(0, str(ROOT))

PARTS = ("decode", "update", "parity", "memory")
GIB = 2 ** 30

# Peak HBM bandwidth (bytes/s) and bf16 dense matmul FLOP/s (no sparsity) by `device_kind`, first match wins:
# each entry's words must all appear in the device kind (case-insensitive). Vendor data sheets.
PEAKS: tuple[tuple[tuple[str, ...], float, float], ...] = (
    (("h200",), 4.8e12, 989e12),
    (("h100", "pcie"), 2.0e12, 756e12),
    (("h100", "hbm3"), 3.35e12, 989e12),   # JAX names the SXM part "NVIDIA H100 80GB HBM3"
    (("h100", "sxm"), 3.35e12, 989e12),
    (("a100", "80gb"), 2.0e12, 312e12),
)

# (remat, micro-batches) of the update, in order of preference (less recompute first).
UPDATE_CANDIDATES: tuple[tuple[str, int], ...] = (("dots", 1), ("dots", 2), ("dots", 4), ("full", 1), ("full", 4))
MEMORY_FIT = 0.75  # a candidate is chosen when its estimate is below this share of the device's memory


@dataclasses.dataclass(frozen=True)
class Plan:
    """The shapes of every part: the real one for a GPU, a tiny one with the same code paths (`--shrink`)."""

    models: tuple[str, ...] = ("qwen2.5-0.5b", "qwen2.5-1.5b")
    decode_batches: tuple[int, ...] = (64, 256)
    decode_prompt: int = 128
    decode_new: int = 256
    update_model: str = "qwen2.5-1.5b"
    update_rows: int = 64
    update_group: int = 8
    update_prompt: int = 128
    update_completion: int = 384
    parity_model: str = "qwen2.5-0.5b"
    parity_rows: int = 8
    parity_prompt: int = 64
    parity_completion: int = 192
    repeats: int = 3


REAL = Plan()
SHRUNK = Plan(decode_batches=(4,), decode_prompt=8, decode_new=16, update_rows=4, update_group=2,
              update_prompt=8, update_completion=16, parity_rows=2, parity_prompt=8, parity_completion=16,
              repeats=1)

# The tiny stand-ins of the two shapes under --shrink (2 layers, the tiny tokenizer's 512 ids).
_SHRUNK_SHAPES = {
    "qwen2.5-0.5b": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=512),
    "qwen2.5-1.5b": dict(vocab_size=512, hidden_size=96, intermediate_size=192, num_layers=2, num_heads=6,
                         num_kv_heads=2, max_position_embeddings=512),
}


# ----------------------------------------------------------------------------- formulas (unit-tested)


def device_peaks(device_kind: str) -> tuple[float | None, float | None]:
    """(peak HBM bytes/s, peak bf16 dense FLOP/s) of a device kind from `PEAKS`; (None, None) when unknown."""
    kind = device_kind.lower()
    for words, bandwidth, flops in PEAKS:
        if all(w in kind for w in words):
            return bandwidth, flops
    return None, None


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes of keys and values one token holds in the KV cache, over all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * itemsize


def decode_bytes(weight_bytes: int, kv_token_bytes: int, rows: int, prompt_len: int, steps: int) -> int:
    """Bytes the decode forwards must read: every weight once per step, and at step s (0-based) the keys and
    values of the prompt_len + s + 1 tokens filled so far (the new one included) for each row."""
    filled = steps * prompt_len + steps * (steps + 1) // 2  # sum over s of (prompt_len + s + 1)
    return steps * weight_bytes + kv_token_bytes * rows * filled


def bandwidth_fraction(num_bytes: float, seconds: float, peak_bytes_per_s: float | None) -> float | None:
    """Achieved bytes/s over the peak; None when the peak is unknown."""
    if peak_bytes_per_s is None or seconds <= 0:
        return None
    return num_bytes / seconds / peak_bytes_per_s


def mfu(num_params: int, tokens: int, seconds: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation of a training step: 6 x parameters x tokens / seconds / peak (None if unknown).
    Counts no attention FLOPs and no rematerialised forward (the model's FLOPs, not the hardware's)."""
    if peak_flops is None or seconds <= 0:
        return None
    return 6.0 * num_params * tokens / seconds / peak_flops


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


# ----------------------------------------------------------------------------- progress


_T0 = time.time()


def log(msg: str) -> None:
    now = dt.datetime.now(dt.timezone.utc).strftime("%H:%M:%S")
    print(f"[{now} +{time.time() - _T0:6.1f}s] {msg}", flush=True)


def _error_line(e: BaseException) -> str:
    """The first line of an exception that says what went wrong (XLA messages are long)."""
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:400]


def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


# ----------------------------------------------------------------------------- the jobs (run in a child)


def model_config(name: str, shrink: bool, **overrides):
    """A preset's config (random weights are created from it), or its tiny stand-in under --shrink."""
    from jaxrl_llm.models import get_preset
    cfg = get_preset(name)
    if shrink:
        cfg = cfg.replace(head_dim=None, **_SHRUNK_SHAPES[name])  # head_dim: hidden / heads again
    return cfg.replace(**overrides) if overrides else cfg


def _env():
    import jax
    from jaxrl_llm.sharding import ShardingEnv, make_mesh
    return ShardingEnv(make_mesh({"data": 1}, devices=jax.devices()[:1]))


def _sizes(cfg):
    """`train.memory.Sizes` of a model on one device (the library's memory arithmetic)."""
    from jaxrl_llm.sharding.rules import DEFAULT_RULES, normalize_rules
    from jaxrl_llm.train.memory import Sizes
    return Sizes(cfg, {"data": 1}, normalize_rules(DEFAULT_RULES))


def _memory_stats() -> dict:
    import jax
    try:
        return jax.local_devices()[0].memory_stats() or {}
    except (AttributeError, NotImplementedError, RuntimeError):
        return {}


def _peak_bytes() -> int | None:
    v = _memory_stats().get("peak_bytes_in_use")
    return int(v) if v is not None else None


def _bytes_limit() -> int | None:
    v = _memory_stats().get("bytes_limit")
    return int(v) if v else None


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    """(seconds of the first call, with its compile; the later calls' seconds; the last output), each call
    timed to block_until_ready."""
    import jax
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        del out
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, times, out


def decode_estimate(cfg, rows: int, p: int, n: int, sampling) -> dict[str, int]:
    """Bytes a decode run holds: the weights, and the sampler's terms (`Sizes.rollout_terms`: KV cache, its
    growth between segments, the prefill's working set and logits, the split layer weights)."""
    z = _sizes(cfg)
    terms = {"params": z.params("policy")}
    terms.update(z.rollout_terms(rows, rows, p, n, {"split_layer_weights": sampling.split_layer_weights,
                                                     "cache_segments": sampling.cache_segments}))
    return terms


def update_estimate(cfg, rows: int, p: int, n: int, num_micro: int, chunk: int) -> dict[str, int]:
    """Bytes the GRPO update holds (as `train.stages.grpo.memory`'s update terms): float32 parameters, AdamW's
    two moments, gradients, one micro-batch's activations and its chunked log-prob head."""
    z = _sizes(cfg)
    trained = z.trained("policy")
    micro = rows // num_micro
    return {"params": z.params("policy"), "optimizer": 2 * trained, "gradients": z.gradients(trained, num_micro),
            "activations": z.activations(micro, p + n), "logprob_chunks": z.head(micro, n, chunk, True)}


def parity_estimate(cfg32, cfg16, rows: int, t: int, n: int, chunk: int) -> dict[str, int]:
    """Bytes the parity job holds: both copies of the weights, the larger no-grad forward (`score_terms`) and
    the full float32 logits of the greedy comparison (two at a time: the compute dtype's and float32)."""
    z32, z16 = _sizes(cfg32), _sizes(cfg16)
    fwd = max(sum(z.score_terms(rows, t, n, chunk).values()) for z in (z32, z16))
    return {"params_float32": z32.params("policy"), "params_bfloat16": z16.params("policy"),
            "forward": fwd, "logits": z32.logits(rows, t, 2)}


class Recorder:
    """A child's result, rewritten to its file after every measurement (a stopped child keeps what it had)."""

    def __init__(self, path: str, job: str):
        self.path = pathlib.Path(path)
        self.data: dict[str, Any] = {"job": job, "status": "running", "runs": [], "config": {}}
        self.write()

    def write(self) -> None:
        self.data["peak_bytes"] = _peak_bytes() if "jax" in sys.modules else None
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def job_decode(rec: Recorder, plan: Plan, shrink: bool, deadline: float, model: str) -> None:
    import jax
    import jax.numpy as jnp
    from jaxrl_llm.models import KVCache, create_model, positions_from_mask
    from jaxrl_llm.models.layers import matmul_weights
    from jaxrl_llm.models.transformer import unstack_layers
    from jaxrl_llm.rollout import SamplingConfig, make_sampler

    cfg = model_config(model, shrink, param_dtype="bfloat16", dtype="bfloat16")
    env = _env()
    p, n = plan.decode_prompt, plan.decode_new
    sampling = SamplingConfig(max_new_tokens=n, temperature=1.0, eos_token_ids=(), pad_token_id=0)
    rec.data["config"] = {"model": model, "num_params": cfg.num_params(), "param_dtype": cfg.param_dtype,
                          "dtype": cfg.dtype, "prompt_len": p, "new_tokens": n, "temperature": 1.0,
                          "eos_token_ids": [], "cache_segment_ends": list(sampling.segment_ends),
                          "split_layer_weights": sampling.split_layer_weights, "repeats": plan.repeats}
    log(f"decode {model}: creating {cfg.num_params():,} random bf16 parameters")
    module, params, _ = create_model(cfg, jax.random.key(0), env)
    sampler = make_sampler(module, cfg, sampling, env=env)

    @jax.jit
    def prefill(params, tokens, mask):  # the sampler's work before its decode loops
        with env.activate():
            prm = unstack_layers(params) if sampling.split_layer_weights else params
            prm = matmul_weights(prm, cfg)
            cache = KVCache.zeros(cfg, tokens.shape[0], p + sampling.segment_ends[0])
            hidden, cache = module.apply({"params": prm}, tokens, positions_from_mask(mask), mask.astype(jnp.bool_),
                                         cache, return_hidden=True)
            return module.apply({"params": prm}, hidden[:, -1:], method="logits"), cache

    bandwidth, _ = device_peaks(jax.devices()[0].device_kind)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    kv_token = kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, jnp.dtype(cfg.jnp_dtype).itemsize)
    estimate_so_far = 0
    for batch in plan.decode_batches:
        if time.time() > deadline:
            rec.data["runs"].append({"batch": batch, "status": "skipped", "error": "time budget spent"})
            rec.write()
            continue
        run: dict[str, Any] = {"batch": batch, "status": "running"}
        rec.data["runs"].append(run)
        try:
            key = jax.random.key(batch)
            tokens = jnp.asarray(np.random.default_rng(batch).integers(1, cfg.vocab_size, (batch, p)), jnp.int32)
            mask = jnp.ones((batch, p), jnp.int32)
            log(f"decode {model} batch {batch}: compiling and timing the sampler")
            first, times, out = _timed(lambda: sampler(params, tokens, mask, key), plan.repeats)
            steps_run = int(out.num_steps)
            lengths_ok = bool(jnp.all(out.lengths == n))
            del out
            sampler_s = statistics.median(times)
            log(f"decode {model} batch {batch}: sampler {sampler_s:.3f} s (first call {first:.1f} s); "
                "timing the prefill alone")
            p_first, p_times, _ = _timed(lambda: prefill(params, tokens, mask), plan.repeats)
            prefill_s = statistics.median(p_times)
            decode_s = sampler_s - prefill_s
            forwards = max(steps_run - 1, 0)  # the last step only samples
            nbytes = decode_bytes(weight_bytes, kv_token, batch, p, forwards)
            est = decode_estimate(cfg, batch, p, n, sampling)
            estimate_so_far = max(estimate_so_far, sum(est.values()))
            peak = _peak_bytes()
            run.update({
                "status": "ok", "rows": batch, "steps": steps_run, "every_row_full_length": lengths_ok,
                "sampler_s": sampler_s, "sampler_times_s": times, "first_call_s": first,
                "prefill_s": prefill_s, "prefill_first_call_s": p_first, "decode_s": decode_s,
                "tokens_per_s": batch * n / sampler_s,
                "decode_tokens_per_s": batch * forwards / decode_s if decode_s > 0 else None,
                "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_token,
                "bytes_per_decode_step": nbytes / forwards if forwards else None,
                "decode_bytes": nbytes,
                "hbm_bytes_per_s": nbytes / decode_s if decode_s > 0 else None,
                "hbm_fraction": bandwidth_fraction(nbytes, decode_s, bandwidth),
                "estimate_terms": est, "estimate_bytes": sum(est.values()),
                "peak_bytes_so_far": peak, "peak_over_estimate": ratio(peak, estimate_so_far)})
            frac = run["hbm_fraction"]
            log(f"decode {model} batch {batch}: {run['tokens_per_s']:,.0f} tokens/s, prefill {prefill_s:.3f} s, "
                f"HBM fraction {'n/a' if frac is None else f'{frac:.2f}'}")
        except Exception as e:  # noqa: BLE001 (recorded; the next batch still runs)
            run.update({"status": "error", "error": _error_line(e)})
            log(f"decode {model} batch {batch}: ERROR {run['error']}")
        gc.collect()
        rec.data["estimate_bytes"] = estimate_so_far or None
        rec.write()


def update_order(estimates: dict[tuple[str, int], int], limit: int | None) -> list[tuple[str, int]]:
    """The update's (remat, micro-batches) candidates in the order they are tried: those whose estimate is at
    most MEMORY_FIT x the device's memory (all, when it is unknown) in `UPDATE_CANDIDATES` order, then the
    rest (tried only after an out-of-memory error)."""
    fits = [c for c in UPDATE_CANDIDATES if limit is None or estimates[c] <= MEMORY_FIT * limit]
    return fits + [c for c in UPDATE_CANDIDATES if c not in fits]


def _update_batch(cfg, plan: Plan, seed: int = 0) -> dict:
    """A GRPO batch on the host (numpy: no device work before the update): random prompts and completions,
    every token real, group-normalised advantages of random rewards, reference and sampler log-probs near
    the uniform distribution's (what random weights give)."""
    rows, p, n, g = plan.update_rows, plan.update_prompt, plan.update_completion, plan.update_group
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(rows // g, g))
    adv = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, ddof=1, keepdims=True) + 1e-6)
    base = -math.log(cfg.vocab_size)
    return {
        "prompt_tokens": rng.integers(1, cfg.vocab_size, (rows, p)).astype(np.int32),
        "prompt_mask": np.ones((rows, p), np.int32),
        "completion_tokens": rng.integers(1, cfg.vocab_size, (rows, n)).astype(np.int32),
        "completion_mask": np.ones((rows, n), np.int32),
        "advantages": np.repeat(adv.reshape(rows, 1), n, axis=1).astype(np.float32),
        "ref_logprobs": (base + 0.01 * rng.normal(size=(rows, n))).astype(np.float32),
        "sampler_logprobs": np.full((rows, n), base, np.float32),
    }


def job_update(rec: Recorder, plan: Plan, shrink: bool, deadline: float) -> None:
    import jax
    from jaxrl_llm.algos import grpo
    from jaxrl_llm.algos.train_state import OptimizerConfig, TrainState, jit_update, make_epoch_runner
    from jaxrl_llm.models import create_model

    base = model_config(plan.update_model, shrink, param_dtype="float32", dtype="bfloat16")
    rows, p, n = plan.update_rows, plan.update_prompt, plan.update_completion
    chunk = grpo.GRPOConfig().logprob_chunk
    limit = _bytes_limit()
    estimates = {c: sum(update_estimate(base.replace(remat=c[0]), rows, p, n, c[1], chunk).values())
                 for c in UPDATE_CANDIDATES}
    order = update_order(estimates, limit)
    estimates = {f"{r}/{m}": v for (r, m), v in estimates.items()}
    opt = OptimizerConfig(name="adamw", learning_rate=1e-6)
    bf16_flops = device_peaks(jax.devices()[0].device_kind)[1]
    rec.data["config"] = {"model": plan.update_model, "num_params": base.num_params(), "param_dtype": "float32",
                          "dtype": "bfloat16", "rows": rows, "prompt_len": p, "completion_len": n,
                          "tokens_per_step": rows * (p + n),
                          "algo": f"grpo (group {plan.update_group}, beta 0.04, k3 KL, clip 0.2)",
                          "optimizer": "adamw lr 1e-6, max_grad_norm 1.0", "logprob_chunk": chunk,
                          "bytes_limit": limit, "candidate_estimates_bytes": estimates,
                          "memory_fit": MEMORY_FIT, "repeats": plan.repeats}
    log(f"update: candidates (remat/micro-batches, estimate GiB): "
        + ", ".join(f"{k} {v / GIB:.1f}" for k, v in estimates.items())
        + ("" if limit is None else f"; device limit {limit / GIB:.1f} GiB"))
    for remat, micro in order:
        if time.time() > deadline:
            rec.data["runs"].append({"remat": remat, "num_micro_batches": micro, "status": "skipped",
                                     "error": "time budget spent"})
            break
        run: dict[str, Any] = {"remat": remat, "num_micro_batches": micro, "status": "running"}
        rec.data["runs"].append(run)
        rec.write()
        state = update = batch = params = None
        try:
            cfg = base.replace(remat=remat)
            env = _env()
            algo = grpo.grpo(group_size=plan.update_group, beta=0.04).replace(num_micro_batches=micro)
            log(f"update: remat={remat}, {micro} micro-batch(es): creating {cfg.num_params():,} float32 parameters")
            module, params, _ = create_model(cfg, jax.random.key(1), env)
            state = TrainState.create(params, opt)
            params = None  # the state owns (and the update donates) them
            batch = _update_batch(cfg, plan)
            update = jit_update(make_epoch_runner(grpo.make_grpo_step(module, cfg, algo), 1, 1), state, batch, env)
            key = jax.random.key(2)
            log("update: compiling and running the first step")
            t0 = time.perf_counter()
            state, metrics = jax.block_until_ready(update(state, batch, key))
            first = time.perf_counter() - t0
            times, losses = [], [float(metrics["loss"][-1])]
            for i in range(plan.repeats):
                t0 = time.perf_counter()
                state, metrics = jax.block_until_ready(update(state, batch, jax.random.fold_in(key, i)))
                times.append(time.perf_counter() - t0)
                losses.append(float(metrics["loss"][-1]))
            step_s = statistics.median(times)
            tokens = rows * (p + n)
            est = update_estimate(cfg, rows, p, n, micro, chunk)
            peak = _peak_bytes()
            run.update({"status": "ok", "first_call_s": first, "step_s": step_s, "step_times_s": times,
                        "tokens": tokens, "tokens_per_s": tokens / step_s,
                        "model_flops_per_s": 6.0 * cfg.num_params() * tokens / step_s,
                        "mfu": mfu(cfg.num_params(), tokens, step_s, bf16_flops), "losses": losses,
                        "losses_finite": all(math.isfinite(x) for x in losses),
                        "estimate_terms": est, "estimate_bytes": sum(est.values()), "peak_bytes_so_far": peak,
                        "peak_over_estimate": ratio(peak, sum(est.values()))})
            rec.data["estimate_bytes"] = sum(est.values())
            log(f"update: {step_s:.3f} s per step ({tokens:,} tokens), MFU {_fmt(run['mfu'], '.3f')}")
            rec.write()
            break
        except Exception as e:  # noqa: BLE001 (an OOM moves to the next candidate; anything else is final)
            run.update({"status": "error", "error": _error_line(e)})
            log(f"update: remat={remat}, {micro} micro-batch(es): ERROR {run['error']}")
            rec.write()
            if not _is_oom(e):
                break
        finally:
            state = update = batch = params = None
            gc.collect()


def job_parity(rec: Recorder, plan: Plan, shrink: bool, deadline: float) -> None:
    import jax
    import jax.numpy as jnp
    from jaxrl_llm.algos.logprobs import completion_logprobs
    from jaxrl_llm.models import CausalLM, create_model

    cfg32 = model_config(plan.parity_model, shrink, param_dtype="float32", dtype="float32")
    cfg16 = cfg32.replace(param_dtype="bfloat16", dtype="bfloat16")
    rows, p, n = plan.parity_rows, plan.parity_prompt, plan.parity_completion
    chunk = 128
    env = _env()
    rec.data["config"] = {"model": plan.parity_model, "num_params": cfg32.num_params(), "rows": rows,
                          "prompt_len": p, "completion_len": n,
                          "float32": "param_dtype/dtype float32, matmul precision highest (no TF32)",
                          "bfloat16": "the float32 weights cast to bfloat16, param_dtype/dtype bfloat16",
                          "greedy": "argmax of the logits at each completion position, teacher-forced"}
    log(f"parity {plan.parity_model}: creating {cfg32.num_params():,} float32 parameters")
    module32, params32, _ = create_model(cfg32, jax.random.key(3), env)
    module16 = CausalLM(cfg16)
    params16 = jax.jit(lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16), t))(params32)
    rng = np.random.default_rng(4)
    prompt = jnp.asarray(rng.integers(1, cfg32.vocab_size, (rows, p)), jnp.int32)
    completion = jnp.asarray(rng.integers(1, cfg32.vocab_size, (rows, n)), jnp.int32)
    pmask, cmask = jnp.ones((rows, p), jnp.int32), jnp.ones((rows, n), jnp.int32)

    def measure(module, cfg):
        @jax.jit
        def fn(params):
            with env.activate():
                logp, _ = completion_logprobs(module, params, cfg, prompt, pmask, completion, cmask,
                                              chunk=chunk, with_entropy=False)
                seq = jnp.concatenate([prompt, completion], axis=1)
                logits, _ = module.apply({"params": params}, seq, None, jnp.ones(seq.shape, jnp.bool_))
                logits = logits[:, p - 1:p - 1 + n].astype(jnp.float32)
                top2 = jax.lax.top_k(logits, 2)[0]
                return logp, jnp.argmax(logits, axis=-1), top2[..., 0] - top2[..., 1]
        return fn

    run: dict[str, Any] = {"status": "running"}
    rec.data["runs"].append(run)
    log("parity: float32 forward")
    with jax.default_matmul_precision("highest"):  # a float32 reference, not TF32 (a GPU's default for float32)
        lp32, g32, margin32 = jax.block_until_ready(measure(module32, cfg32)(params32))
    log("parity: bfloat16 forward")
    lp16, g16, _ = jax.block_until_ready(measure(module16, cfg16)(params16))
    diff = jnp.abs(lp32 - lp16)
    est = parity_estimate(cfg32, cfg16, rows, p + n, n, chunk)
    peak = _peak_bytes()
    run.update({"status": "ok", "positions": rows * n,
                "logprob_max_abs_diff": float(jnp.max(diff)), "logprob_mean_abs_diff": float(jnp.mean(diff)),
                "logprob_mean_float32": float(jnp.mean(lp32)),
                "greedy_agreement": float(jnp.mean((g32 == g16).astype(jnp.float32))),
                "float32_top1_margin_median": float(jnp.median(margin32)),
                "estimate_terms": est, "estimate_bytes": sum(est.values()), "peak_bytes_so_far": peak,
                "peak_over_estimate": ratio(peak, sum(est.values()))})
    rec.data["estimate_bytes"] = sum(est.values())
    log(f"parity: log-prob |diff| max {run['logprob_max_abs_diff']:.4g} mean {run['logprob_mean_abs_diff']:.4g}, "
        f"greedy agreement {run['greedy_agreement']:.3f}")


JOBS: dict[str, Callable[..., None]] = {"decode": job_decode, "update": job_update, "parity": job_parity}


def child_main(args) -> int:
    """Runs one job (`--child decode:MODEL | update | parity`) and writes its result to --child-out."""
    name, _, arg = args.child.partition(":")
    rec = Recorder(args.child_out, args.child)
    plan = SHRUNK if args.shrink else REAL
    try:
        import jax
        rec.data["device_kind"] = jax.devices()[0].device_kind
        rec.data["platform"] = jax.devices()[0].platform
        JOBS[name](rec, plan, args.shrink, args.deadline, *([arg] if arg else []))
        runs = rec.data["runs"]
        ok = [r for r in runs if r.get("status") == "ok"]
        rec.data["status"] = ("ok" if runs and len(ok) == len(runs) else "partial" if ok
                              else "skipped" if runs and all(r.get("status") == "skipped" for r in runs)
                              else "error")
        if not ok and runs:
            rec.data["error"] = runs[-1].get("error", "no run finished")
    except Exception as e:  # noqa: BLE001 (the parent records the line and runs the other jobs)
        rec.data.update(status="error", error=_error_line(e))
        log(f"{args.child}: ERROR {rec.data['error']}")
    rec.write()
    log(f"{args.child}: done")
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter's teardown of the compiled programs (seconds on a loaded CPU)


# ----------------------------------------------------------------------------- the parent


def _run_child(job: str, out_dir: pathlib.Path, shrink: bool, deadline: float, grace_s: float) -> dict:
    """Runs one job in a child process, relaying its output; stops it `grace_s` after the deadline."""
    path = out_dir / f".gpu-check-{job.replace(':', '-')}.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, "-u", str(pathlib.Path(__file__).resolve()), "--child", job, "--child-out", str(path),
           "--deadline", repr(deadline)] + (["--shrink"] if shrink else [])
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # one job per GPU: more than JAX's default 0.75
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    tail: list[str] = []

    def relay():
        for line in proc.stdout:
            sys.stdout.write("    " + line)
            sys.stdout.flush()
            tail.append(line.rstrip())
            del tail[:-30]

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    stopped = False
    try:
        proc.wait(timeout=max(1.0, deadline + grace_s - time.time()))
    except subprocess.TimeoutExpired:
        stopped = True
        proc.kill()
        proc.wait()
    reader.join(timeout=5)
    result = json.loads(path.read_text()) if path.exists() else {"job": job, "runs": [], "config": {}}
    path.unlink(missing_ok=True)
    if stopped:
        result.update(status="error" if not any(r.get("status") == "ok" for r in result["runs"]) else "partial",
                      error="stopped at the time budget (--budget-s)")
        for r in result["runs"]:
            if r.get("status") == "running":
                r.update(status="error", error="stopped at the time budget (--budget-s)")
    elif proc.returncode != 0 or result.get("status") == "running":
        lines = [t for t in tail if t.strip()]
        result.update(status="error", error=f"child exited with code {proc.returncode}: "
                      + (lines[-1][:400] if lines else "no output"))
    return result


def _part_status(results: list[dict]) -> str:
    statuses = {r.get("status") for r in results}
    if statuses == {"ok"}:
        return "ok"
    if statuses == {"skipped"}:
        return "skipped"
    if statuses & {"ok", "partial"}:
        return "partial"
    return "error"


def memory_part(jobs: dict[str, dict]) -> dict:
    """Each measuring job's peak against its estimate (the largest configuration it ran)."""
    rows = []
    for name, res in jobs.items():
        if res.get("status") == "skipped":
            continue
        ok = [r for r in res.get("runs", []) if r.get("status") == "ok"]
        if not ok:
            continue
        est = max(r["estimate_bytes"] for r in ok)
        peak = res.get("peak_bytes")
        terms = max(ok, key=lambda r: r["estimate_bytes"])["estimate_terms"]
        rows.append({"job": name, "config": _run_label(name, max(ok, key=lambda r: r["estimate_bytes"])),
                     "peak_bytes": peak, "estimate_bytes": est, "estimate_terms": terms,
                     "peak_over_estimate": ratio(peak, est),
                     # an attempt that ran out of memory first also counts in the process's peak
                     "failed_attempts_before": sum(r.get("status") == "error" for r in res.get("runs", []))})
    if not rows:
        return {"status": "skipped", "error": "no measuring part ran to completion", "rows": []}
    return {"status": "ok", "rows": rows,
            "note": "peak_bytes_in_use of each job's own process (null where the backend has no memory "
                    "statistics); the estimate is the library's train.memory.Sizes arithmetic"}


def _run_label(job: str, run: dict) -> str:
    if job.startswith("decode"):
        return f"batch {run.get('batch')}"
    if job == "update":
        return f"remat {run.get('remat')}, {run.get('num_micro_batches')} micro-batch(es)"
    return f"{run.get('positions', '?')} positions"


def _fmt(x, spec: str = ".3g") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    return format(x, spec)


def _size(n: int | None) -> str:
    """Bytes as GiB (or MiB below 1 GiB: the shrunk shapes' figures)."""
    if n is None:
        return "n/a"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2 ** 20:.2f} MiB"


def markdown_table(report: dict) -> str:
    """One row per figure: | part | model | setting | figure | value |."""
    rows: list[tuple[str, str, str, str, str]] = []
    parts = report["parts"]
    dec = parts.get("decode", {})
    for job in dec.get("jobs", []):
        model = job.get("config", {}).get("model", job.get("job", "").partition(":")[2])
        c = job.get("config", {})
        if job.get("status") in ("skipped", "error") and not job.get("runs"):
            rows.append(("decode", model, "", job["status"], job.get("error", "")))
        for r in job.get("runs", []):
            setting = f"batch {r['batch']}, prompt {c.get('prompt_len')}, {c.get('new_tokens')} new, bf16"
            if r.get("status") != "ok":
                rows.append(("decode", model, setting, r.get("status", "error"), r.get("error", "")))
                continue
            rows.append(("decode", model, setting, "tokens/s (sampler, prefill included)",
                         _fmt(r["tokens_per_s"], ",.0f")))
            rows.append(("decode", model, setting, "prefill s / decode s",
                         f"{_fmt(r['prefill_s'], '.3f')} / {_fmt(r['decode_s'], '.3f')}"))
            rows.append(("decode", model, setting, "HBM GB/s (decode)", _fmt(
                None if r["hbm_bytes_per_s"] is None else r["hbm_bytes_per_s"] / 1e9, ",.0f")))
            rows.append(("decode", model, setting, "HBM fraction", _fmt(r["hbm_fraction"], ".3f")))
            rows.append(("decode", model, setting, "first call s (compile)", _fmt(r["first_call_s"], ".1f")))
    up = parts.get("update", {})
    c = up.get("config", {})
    model = c.get("model", "")
    if up.get("status") in ("skipped", "error") and not any(r.get("status") == "ok" for r in up.get("runs", [])):
        rows.append(("update", model, "", up.get("status", "error"), up.get("error", "")))
    for r in up.get("runs", []):
        setting = (f"{c.get('rows')} x {c.get('prompt_len', 0) + c.get('completion_len', 0)} tokens, "
                   f"remat {r.get('remat')}, {r.get('num_micro_batches')} micro-batch(es)")
        if r.get("status") != "ok":
            rows.append(("update", model, setting, r.get("status", "error"), r.get("error", "")))
            continue
        rows.append(("update", model, setting, "s / step", _fmt(r["step_s"], ".3f")))
        rows.append(("update", model, setting, "tokens/s", _fmt(r["tokens_per_s"], ",.0f")))
        rows.append(("update", model, setting, "MFU", _fmt(r["mfu"], ".3f")))
        rows.append(("update", model, setting, "first call s (compile)", _fmt(r["first_call_s"], ".1f")))
    par = parts.get("parity", {})
    c = par.get("config", {})
    model = c.get("model", "")
    ok = [r for r in par.get("runs", []) if r.get("status") == "ok"]
    if "parity" in parts and not ok:
        rows.append(("parity", model, "", par.get("status", "error"), par.get("error", "")))
    for r in ok:
        setting = f"{c.get('rows')} x {c.get('completion_len')} completion tokens, float32 vs bf16"
        rows.append(("parity", model, setting, "log-prob max abs diff", _fmt(r["logprob_max_abs_diff"], ".4g")))
        rows.append(("parity", model, setting, "log-prob mean abs diff", _fmt(r["logprob_mean_abs_diff"], ".4g")))
        rows.append(("parity", model, setting, "greedy agreement", _fmt(r["greedy_agreement"], ".3f")))
        rows.append(("parity", model, setting, "float32 top-1 margin (median)",
                     _fmt(r["float32_top1_margin_median"], ".3g")))
    mem = parts.get("memory", {})
    if "memory" in parts and mem.get("status") != "ok":
        rows.append(("memory", "", "", mem.get("status", "skipped"), mem.get("error", "")))
    for r in mem.get("rows", []):
        rows.append(("memory", r["job"], r["config"], "peak / estimate (ratio)",
                     f"{_size(r['peak_bytes'])} / {_size(r['estimate_bytes'])} "
                     f"({_fmt(r['peak_over_estimate'], '.2f')})"))
    head = (f"GPU check on {report['device_kind']} (jax {report['jax_version']}, {report['created']}"
            f"{', shrunk shapes' if report['shrink'] else ''})\n\n")
    lines = ["| part | model | setting | figure | value |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(x).replace("|", "/") for x in row) + " |" for row in rows]
    return head + "\n".join(lines) + "\n"


def parse_parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise SystemExit(f"--parts {text!r}: unknown part(s) {bad}; use a comma-separated subset of "
                         f"{','.join(PARTS)}")
    return parts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder of the JSON and markdown")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--shrink", action="store_true", help="tiny shapes, the same code paths (CPU, tests)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="seconds for the whole run: later jobs are skipped, a running one stopped")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=math.inf, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args)
    parts = parse_parts(args.parts)
    if not args.budget_s > 0:
        raise SystemExit(f"--budget-s {args.budget_s}: must be > 0 seconds (default 420)")
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = SHRUNK if args.shrink else REAL
    start = time.time()
    deadline = start + args.budget_s
    grace = 5.0 if args.shrink else 15.0

    # The parent never touches a device (a CUDA context here would take GPU memory from the children): the
    # device kind comes from the children's results.
    import jax
    log(f"gpu_check (jax {jax.__version__}), parts {','.join(parts)}, budget {args.budget_s:.0f} s"
        + (", shrunk shapes" if args.shrink else ""))

    # parity first (cheapest), then the 0.5B decode, the update, the 1.5B decode
    jobs: list[tuple[str, str]] = []
    if "parity" in parts:
        jobs.append(("parity", "parity"))
    if "decode" in parts:
        jobs.append(("decode", f"decode:{plan.models[0]}"))
    if "update" in parts:
        jobs.append(("update", "update"))
    if "decode" in parts:
        jobs += [("decode", f"decode:{m}") for m in plan.models[1:]]
    if "memory" in parts and not jobs:
        jobs = [("parity", "parity"), ("decode", f"decode:{plan.models[0]}")]  # something to measure

    results: dict[str, dict] = {}
    for part, job in jobs:
        if time.time() >= deadline:
            results[job] = {"job": job, "status": "skipped", "error": "time budget spent before it started",
                            "runs": [], "config": {}}
            log(f"{job}: skipped (time budget spent)")
            continue
        log(f"{job}: starting ({deadline - time.time():.0f} s of budget left)")
        t0 = time.time()
        results[job] = _run_child(job, out_dir, args.shrink, deadline, grace)
        results[job]["wall_s"] = time.time() - t0  # the child's start, imports and compiles included
        log(f"{job}: {results[job].get('status')}" + (f" ({results[job]['error']})" if results[job].get("error")
                                                      else ""))

    kinds = [r["device_kind"] for r in results.values() if r.get("device_kind")]
    device_kind = kinds[0] if kinds else "unknown (no job started)"
    bandwidth, flops = device_peaks(device_kind)
    report: dict[str, Any] = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device_kind": device_kind, "platform": next((r["platform"] for r in results.values() if r.get("platform")),
                                                     None), "jax_version": jax.__version__,
        "python": sys.version.split()[0], "shrink": args.shrink, "parts_requested": list(parts),
        "budget_s": args.budget_s, "peak_hbm_bytes_per_s": bandwidth, "peak_bf16_flops": flops,
        "plan": dataclasses.asdict(plan), "parts": {}}
    if "decode" in parts:
        dj = [results[j] for p, j in jobs if p == "decode"]
        report["parts"]["decode"] = {"status": _part_status(dj), "jobs": dj,
                                     "errors": [j["error"] for j in dj if j.get("error")]}
    for name in ("update", "parity"):
        if name in parts:
            report["parts"][name] = results[name]
    if "memory" in parts:
        report["parts"]["memory"] = memory_part(results)
    report["elapsed_s"] = time.time() - start

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    stem = out_dir / f"gpu-check-{stamp}{'-shrunk' if args.shrink else ''}"
    table = markdown_table(report)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(table)
    print(table, flush=True)
    log(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')} ({report['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
