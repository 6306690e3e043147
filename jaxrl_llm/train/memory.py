"""Per-device memory of a run, estimated from its config before anything is allocated.

    est = estimate_memory(cfg, model_cfg, {"data": 1, "fsdp": 8, "tensor": 1})
    print(est.table())                    # GiB per device, by term and stage
    check_memory(cfg, model_cfg, axes)    # raises MemoryBudgetError (with fixes that fit) when over budget

The run planner: it reads the same resolved stage configs as the stages
(`train.stages`: each kind's `algo` says what the stage computes, e.g.
`needs_reference`, `needs_old_logprobs`, and its `memory` function gives its
terms from the `Sizes` below), and the sharding rules of the run
(`mesh.rules`), so the estimate and the run cannot disagree on what exists.

Every figure is bytes on one device. A stage's peak is its persistent state
plus the largest of its phases (rollout, eval, score, update): the KV cache
of a rollout is freed before the update runs, so the two never add up.

Persistent terms (exact: computed from the real parameter shapes)
-----------------------------------------------------------------
Parameter bytes are summed array by array over the model's abstract
parameters (`jax.eval_shape` of the init, as `sharding.params` does); each
array is divided by the mesh axes `rules.logical_to_spec` gives its dims, so
a dim the axis size does not divide stays replicated exactly as in the run:

    bytes(tree) = sum over arrays of prod_i(shape_i / shards_i) x itemsize(param_dtype)

With DEFAULT_RULES embed is split over fsdp and heads/kv_heads/mlp/vocab over
tensor: roughly param_dtype bytes x num_params / (fsdp x tensor); data does
not divide parameters at all.

* params: the trained tree: the policy (`CausalLM`); a reward_model stage's
  `ScalarHeadModel`; PPO with `algo.shared_backbone` a `PolicyValueModel`.
* input_params: the policy the stage started from. The trainer loop keeps it
  referenced while the stage runs (`params = stage.run_stage(params, ...)`)
  and the stage trains a copy, so it is a second full policy.
* reference: a frozen copy of the policy. grpo: when `algo.loss.kl_coef > 0`,
  or reinforce_pp with `algo.reward_kl_coef > 0`; ppo: when the KL controller
  is adaptive or its `init_coef > 0`, or `algo.loss.kl_coef > 0`; dpo: unless
  the loss is reference-free (simpo, orpo).
* value: PPO's separate value model (`ScalarHeadModel`: a decoder and a
  scalar head; with `shared_backbone` the head is part of params instead).
* reward_model: PPO scored by a trained reward model (`reward.source`).
* optimizer: moments in the parameters' dtype (optax keeps mu and nu in the
  dtype of the parameters; there is no float32 master copy):
  2 x bytes(trained) for adam/adamw, 1 x for lion, 0 for sgd.
* LoRA (model.lora.rank > 0, docs/lora.md): params is the frozen base in
  model.lora.base_dtype plus the adapters (and new heads) in param_dtype;
  "trained" (optimizer, gradients) is the adapters and heads only;
  input_params and reference are 0 (the frozen base is the stage's input
  and, with the adapters off, its reference); PPO's separate value model with
  value_init="policy" shares the policy's base and adds its adapters and head.

Phase terms
-----------
rows_dev(n) is the per-device share of n rows: n / (data x fsdp), by the same
rule resolution (a batch the axes do not divide keeps fewer shards).
Shapes: L layers, E hidden, H / K heads / kv heads (per device: / tensor when
divisible), D head_dim, M mlp width (/ tensor), V vocab (/ tensor), b the
compute dtype's bytes. P prompt length (max_prompt_len), N response length
(max_new_tokens or max_response_len), T = P + N.

* kv_cache (rollout, exact): L x 2 x rows_dev x (P + N) x K x D x b with
  rows = prompts_per_iter x group_size (grpo) or x samples_per_prompt (ppo).
  With continuous batching (0 < sampling.slots < rows): slots x (P + N)
  plus each distinct prompt's prefilled P, and no growth term.
* kv_cache_growth (rollout, exact): with sampling.cache_segments > 1 (and
  N >= 32) the cache grows between decode segments by copying into a longer
  buffer; at the last boundary the previous one, P + (the last segment's
  first step) slots, is alive beside the full one.
* rollout_work (rollout, approximate): one layer's prefill working set for
  prompts_dev x P tokens (see layer_work; the sampler prefills each distinct
  prompt once and repeats its cache for the samples) plus the decode step's
  float32 logits 3 x rows_dev x V x 4.
* decode_weights (rollout, exact): the policy's parameters once more, when
  sampling.split_layer_weights (the default) splits the stacked layer weights
  into one array per layer before the decode loop (a slight overcount: the
  embedding is not copied), at least as wide as the compute dtype: a base
  stored narrower (a bfloat16 LoRA base under float32 compute) is converted
  once, before the loop, split or not.
* eval_kv_cache / eval_work / eval_weights (eval): the same for the
  evaluator's sampler (which always splits the layer weights),
  rows = eval.num_examples x eval.n_samples, length max_prompt_len +
  eval.max_new_tokens, when eval.every > 0 (not in reward_model stages),
  with eval_kv_cache_growth as kv_cache_growth (default segments).
* score_work / score_logits (score, approximate): forwards without gradients
  over a rollout batch (grpo old/reference log-probs; ppo old log-probs,
  values, reference and reward-model scores), one update micro-batch of rows
  at a time, rows / num_minibatches / num_micro_batches; dpo the reference
  over one micro-batch of pairs at a time, 2 x batch_size / num_micro_batches
  rows: one layer's working set plus the hidden
  states 2 x rows_dev x T x E x b, and one chunk of float32 logits
  rows_dev x min(chunk, N) x V x 4 (log-probs are computed `chunk` positions
  at a time, algos/logprobs.py: [B, T, V] logits never exist).
* gradients (update): bytes(trained) in the parameters' dtype; twice that with
  num_micro_batches > 1 (the accumulator and one micro-batch's gradients).
  The optimizer update's per-leaf temporaries are not counted.
* activations (update, approximate): for one micro-batch of rows_dev rows,

      rows_dev x T x (L x saved + extra x layer_work)

  with, per token of one layer,
      layer_work = max(b (4E + 2HD + 2KD) + H x T x (4 + b),    attention (weights in float32 and b)
                       b (4E + 3M))                               MLP
      saved      = b (6E + 2HD + 2KD + 5M) + H x T x (8 + b)    remat "none"  (extra = 1)
                   b (3E + HD + 2KD + 2M)                       remat "dots"  (extra = 2)
                   b E                                          remat "full"  (extra = 2)
  "dots" keeps the outputs of the projections (matmuls without batch
  dimensions) and recomputes attention; "full" keeps each layer's input.
  b is the compute dtype's size; with model.matmul_dtype set, the matmuls'
  saved operands are smaller than this counts (an overestimate).
  PPO with a separate value model runs two backbones in the loss: x 2.
  Micro-batch rows: grpo/ppo prompts x samples / num_minibatches /
  num_micro_batches; sft batch_size / num_micro_batches; dpo and
  reward_model 2 x batch_size / num_micro_batches (chosen and rejected rows).
* logprob_chunks (update, approximate): rows_dev x min(chunk, N) x V x 4 x k
  (k = 3 with entropy: logits, probabilities and their gradient; 2 without)
  plus the hidden states the head reads, 2 x rows_dev x N x E x b. The
  reward model has no LM head: 0.

How the approximate terms compare with XLA's own accounting: docs/scaling.md.

Rows are global: prompts_per_iter and batch_size count every process's rows together.

Not counted: the rollout batch itself (tokens, masks, advantages: [B, T]
int32/float32, small next to the terms above), XLA's scratch buffers and
fragmentation, host memory. `check_memory` leaves `mesh.memory_headroom` of
the device for them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxrl_llm.errors import ConfigError
from jaxrl_llm.models.api import init_fn_for
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.transformer import CACHE_AXES, CausalLM, PolicyValueModel, reward_model, value_model
from jaxrl_llm.rollout.sampling import SamplingConfig
from jaxrl_llm.sharding.params import abstract_params
from jaxrl_llm.sharding.rules import Rules, logical_to_spec, normalize_rules

GIB = 2 ** 30

# (term, phase or None for state that lives through the whole stage, what it is)
TERMS: tuple[tuple[str, str | None, str], ...] = (
    ("params", None, "trained parameters"),
    ("input_params", None, "the policy the stage started from (held by the trainer)"),
    ("reference", None, "frozen reference policy"),
    ("value", None, "PPO value model"),
    ("reward_model", None, "frozen reward model (PPO)"),
    ("optimizer", None, "optimizer moments"),
    ("stale_policies", None, "policy copies the pending rollouts sample with (overlap.staleness)"),
    ("kv_cache", "rollout", "rollout KV cache"),
    ("kv_cache_growth", "rollout", "rollout KV cache while it grows"),
    ("rollout_work", "rollout", "prefill layer + decode logits"),
    ("decode_weights", "rollout", "layer weights split once for the decode loop"),
    ("eval_kv_cache", "eval", "evaluator KV cache"),
    ("eval_kv_cache_growth", "eval", "evaluator KV cache while it grows"),
    ("eval_work", "eval", "evaluator prefill layer + logits"),
    ("eval_weights", "eval", "layer weights split once for the evaluator's decode loop"),
    ("score_work", "score", "no-grad forward over the rollout batch"),
    ("score_logits", "score", "one float32 logits chunk of that forward"),
    ("gradients", "update", "gradients (+ accumulator)"),
    ("activations", "update", "saved activations of one micro-batch"),
    ("logprob_chunks", "update", "chunked LM head: logits chunk + hidden"),
)
PHASES = ("rollout", "eval", "score", "update")
_PHASE_OF = {name: phase for name, phase, _ in TERMS}
_OPT_MOMENTS = {"adamw": 2, "adam": 2, "lion": 1, "sgd": 0}


class MemoryBudgetError(ConfigError):
    """The estimated per-device peak exceeds the budget; `suggestions` are changes re-estimated to fit."""

    def __init__(self, message: str, estimate: "MemoryEstimate", suggestions: tuple["Suggestion", ...] = ()):
        super().__init__(message)
        self.estimate = estimate
        self.suggestions = suggestions


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class StageMemory:
    """Bytes per device of one stage, by term (every name of TERMS is present)."""

    name: str
    kind: str
    terms: Mapping[str, int]

    @property
    def persistent_bytes(self) -> int:
        return sum(v for k, v in self.terms.items() if _PHASE_OF[k] is None)

    def phase_bytes(self, phase: str) -> int:
        return sum(v for k, v in self.terms.items() if _PHASE_OF[k] == phase)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_bytes)

    @property
    def total_bytes(self) -> int:
        """Persistent state plus the largest phase: the stage's peak."""
        return self.persistent_bytes + self.phase_bytes(self.peak_phase)

    def peak_terms(self) -> list[tuple[str, int]]:
        """The terms that make up the peak (persistent + peak phase), largest first."""
        phase = self.peak_phase
        items = [(k, v) for k, v in self.terms.items() if v and _PHASE_OF[k] in (None, phase)]
        return sorted(items, key=lambda kv: -kv[1])


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Per-stage, per-term bytes per device on a mesh; `budget_bytes` is set by `check_memory`."""

    mesh_axes: Mapping[str, int]
    stages: tuple[StageMemory, ...]
    device_bytes: int | None = None
    budget_bytes: int | None = None

    @property
    def peak_stage(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.peak_stage.total_bytes

    def stage(self, name: str) -> StageMemory:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def table(self) -> str:
        """A text table in GiB: one row per term (rows that are zero everywhere left out), one column per stage."""
        names = [f"{s.name} ({s.kind})" for s in self.stages]
        width = max([16] + [len(n) for n in names])
        tw = max(len(term) for term, _, _ in TERMS) + 1
        rows = [f"per-device memory (GiB), mesh {_axes_text(self.mesh_axes)}",
                f"{'term':<{tw}}{'phase':<9}" + "".join(f"{n:>{width + 2}}" for n in names)]
        for term, phase, _ in TERMS:
            values = [s.terms[term] for s in self.stages]
            if any(values):
                rows.append(f"{term:<{tw}}{phase or '-':<9}" + "".join(f"{_gib(v):>{width + 2}.3f}" for v in values))
        totals = "".join(f"{f'{_gib(s.total_bytes):.3f} ({s.peak_phase})':>{width + 2}}" for s in self.stages)
        rows.append(f"{'peak':<{tw + 9}}" + totals)
        peak = self.peak_stage
        rows.append(f"peak stage: {peak.name!r} ({peak.kind}), {_gib(peak.total_bytes):.2f} GiB in its "
                    f"{peak.peak_phase} phase")
        if self.budget_bytes is not None:
            rows.append(f"budget: {_gib(self.budget_bytes):.2f} GiB of {_gib(self.device_bytes):.2f} GiB per device"
                        f" -> {'fits' if self.peak_bytes <= self.budget_bytes else 'DOES NOT FIT'}")
        return "\n".join(rows)


@dataclasses.dataclass(frozen=True)
class Suggestion:
    """Config overrides (dotted keys, as for --set) and the estimated peak before and after them."""

    overrides: tuple[tuple[str, Any], ...]
    before_bytes: int
    after_bytes: int

    def as_overrides(self) -> list[str]:
        """'key=value' strings for --set (strings bare when they are plain words, as the loader reads them)."""
        return [f"{k}={v}" if not isinstance(v, str) or v.isidentifier() else f"{k}={v!r}" for k, v in self.overrides]

    def __str__(self) -> str:
        sets = " ".join(f"--set {o}" for o in self.as_overrides())
        return f"{sets}: {_size(self.before_bytes)} -> {_size(self.after_bytes)}"


def _gib(n: int | None) -> float:
    return (n or 0) / GIB


def _size(n: int | None) -> str:
    """A readable amount: GiB with one decimal, or MiB below 1 GiB."""
    return f"{_gib(n):.1f} GiB" if (n or 0) >= GIB else f"{(n or 0) / 2 ** 20:.1f} MiB"


def _axes_text(axes: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in axes.items())


# ----------------------------------------------------------------------------- sharding arithmetic


class _AxisSizes:
    """What `logical_to_spec` reads of a Mesh (its axis sizes), for meshes with no devices behind them."""

    def __init__(self, axes: Mapping[str, int]):
        self.shape = dict(axes)


@functools.lru_cache(maxsize=64)
def _param_arrays(model_cfg: ModelConfig, which: str) -> tuple[tuple[tuple[int, ...], int, tuple, bool], ...]:
    """(shape, itemsize, logical axes, trained under LoRA) of every parameter array of a model of the family
    (no allocation; with `model_cfg.lora` the adapters are among them)."""
    from jaxrl_llm.models.lora import is_trainable
    module = {"policy": CausalLM, "value": value_model, "reward": reward_model,
              "policy_value": PolicyValueModel}[which](model_cfg)
    shapes, logical = abstract_params(init_fn_for(module), jax.random.key(0))
    out = []
    jax.tree_util.tree_map_with_path(
        lambda path, spec, s: out.append((tuple(s.shape), jnp.dtype(s.dtype).itemsize, tuple(spec),
                                          is_trainable(path))),
        logical, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return tuple(out)


def with_lora(cfg, model_cfg: ModelConfig) -> ModelConfig:
    """`model_cfg` with the run's `model.lora` (a planner's model config is the base's)."""
    if model_cfg.lora is not None or cfg.get("model") is None:
        return model_cfg
    from jaxrl_llm.train.validation import lora_config
    lora = lora_config(cfg.model)
    return model_cfg if lora is None else model_cfg.replace(lora=lora)


class Sizes:
    """Per-device sizes of arrays and model dimensions on one mesh: what a stage kind's `memory` function
    adds up (see the module docstring for every term)."""

    def __init__(self, model_cfg: ModelConfig, axes: Mapping[str, int], rules: Rules):
        self.m, self.rules, self.mesh = model_cfg, rules, _AxisSizes(axes)
        self.lora = model_cfg.lora  # LoRA: frozen base in lora.base_dtype, trained adapters (models/lora.py)
        self.base_itemsize = jnp.dtype(model_cfg.lora.base_dtype or model_cfg.param_dtype).itemsize \
            if model_cfg.lora is not None else None
        self.b = jnp.dtype(model_cfg.jnp_dtype).itemsize
        m = model_cfg
        self.H, self.K = self.dim(m.num_heads, "heads"), self.dim(m.num_kv_heads, "kv_heads")
        self.M, self.V = self.dim(m.intermediate_size, "mlp"), self.dim(m.vocab_size, "vocab")

    def elems(self, shape, logical) -> int:
        """Elements of one device's shard of an array with these logical axes."""
        spec = logical_to_spec(logical, self.rules, self.mesh, shape)
        n = 1
        for i, size in enumerate(shape):
            entry = spec[i] if i < len(spec) else None
            axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
            n *= size // math.prod(self.mesh.shape[a] for a in axes)
        return n

    def dim(self, size: int, logical: str) -> int:
        return self.elems((size,), (logical,))

    def rows(self, n: int) -> int:
        return self.dim(n, "batch")

    def params(self, which: str, min_itemsize: int = 0) -> int:
        """Bytes of one device's share of a model's parameters: "policy", "value", "reward", "policy_value".
        Under LoRA: the frozen base in base_dtype plus the adapters (and heads) in param_dtype. Each array
        counts at least `min_itemsize` bytes per element (`compute_params`)."""
        key = self.m.replace(remat="none", dtype="float32", scan_unroll=1)  # shapes depend on none of these
        return sum(self.elems(shape, logical) * max(min_itemsize, itemsize if self.lora is None or trained
                                                   else self.base_itemsize)
                   for shape, itemsize, logical, trained in _param_arrays(key, which))

    def compute_params(self, which: str) -> int:
        """`params(which)` with every array at least as wide as the compute dtype: the weights a decode loop
        holds, where XLA converts a narrower stored base (a bfloat16 LoRA base under float32 compute) once,
        before the loop."""
        return self.params(which, min_itemsize=self.b)

    def trained(self, which: str) -> int:
        """Bytes of the parameters the optimiser updates: all of them, or under LoRA the adapters and the
        heads the base does not have (what gradients and optimizer moments are sized by)."""
        if self.lora is None:
            return self.params(which)
        key = self.m.replace(remat="none", dtype="float32", scan_unroll=1)
        return sum(self.elems(shape, logical) * itemsize
                   for shape, itemsize, logical, trained in _param_arrays(key, which) if trained)

    def copy(self, which: str) -> int:
        """A second copy of the stage's input model (the trained copy's input, a frozen reference): the model's
        bytes; 0 under LoRA, whose frozen base is the input itself and the reference (adapters off)."""
        return self.params(which) if self.lora is None else 0

    def kv_cache(self, rows: int, length: int) -> int:
        m = self.m
        shape = (rows, m.num_kv_heads, length, m.head_dim)  # per layer
        return 2 * m.num_layers * self.elems(shape, CACHE_AXES) * self.b

    def kv_cache_growth(self, rows: int, p: int, n: int, segments: int) -> int:
        """The previous buffer, alive beside the full one while the cache grows into its last segment."""
        ends = SamplingConfig(max_new_tokens=n, cache_segments=segments).segment_ends
        return self.kv_cache(rows, p + ends[-2]) if len(ends) > 1 else 0

    def layer_work(self, t: int) -> int:
        """Per token: the larger of one layer's attention and MLP blocks, attending over t positions."""
        b, e, d = self.b, self.m.hidden_size, self.m.head_dim
        attention = b * (4 * e + 2 * self.H * d + 2 * self.K * d) + self.H * t * (4 + b)
        return max(attention, b * (4 * e + 3 * self.M))

    def saved(self, t: int, remat: str) -> int:
        """Per token: what one layer keeps for the backward pass."""
        b, e, d = self.b, self.m.hidden_size, self.m.head_dim
        if remat == "none":  # also the norms' and SwiGLU's elementwise intermediates, softmax's exp
            return b * (6 * e + 2 * self.H * d + 2 * self.K * d + 5 * self.M) + self.H * t * (8 + b)
        if remat == "dots":
            return b * (3 * e + self.H * d + 2 * self.K * d + 2 * self.M)
        return b * e

    def activations(self, rows_dev: int, t: int) -> int:
        extra = 1 if self.m.remat == "none" else 2
        return rows_dev * t * (self.m.num_layers * self.saved(t, self.m.remat) + extra * self.layer_work(t))

    def forward_work(self, rows_dev: int, q: int, t: int) -> int:
        """A no-grad forward of q new positions attending over t: one layer at a time plus the hidden states."""
        return rows_dev * q * (self.layer_work(t) + 2 * self.m.hidden_size * self.b)

    def logits(self, rows_dev: int, positions: int, copies: int) -> int:
        return rows_dev * positions * self.V * 4 * copies

    def head(self, rows_dev: int, n: int, chunk: int, with_entropy: bool) -> int:
        """Update-time chunked LM head: one logits chunk (+ probabilities, + gradient) and the hidden it reads."""
        c = max(1, min(chunk, n))
        return self.logits(rows_dev, c, 3 if with_entropy else 2) + 2 * rows_dev * n * self.m.hidden_size * self.b

    # --- terms a stage kind's memory function combines

    @staticmethod
    def optimizer(opt: Any, trained: int) -> int:
        """Optimizer moments of `trained` parameter bytes for an `optimizer` config section."""
        return _OPT_MOMENTS.get(str(opt.get("name", "adamw")), 2) * trained

    @staticmethod
    def gradients(trained: int, num_micro: int) -> int:
        return trained * (2 if num_micro > 1 else 1)

    def eval_terms(self, cfg, s) -> dict[str, int]:
        """The evaluator's sampler (eval.every > 0), prompts of the stage's max_prompt_len."""
        ev = cfg.get("eval")
        if ev is None or int(ev.get("every", 0)) <= 0:
            return {}
        rows = int(ev.num_examples) * int(ev.get("n_samples", 1))
        p, n = int(s.max_prompt_len), int(ev.max_new_tokens)
        rd = self.rows(rows)
        return {"eval_kv_cache": self.kv_cache(rows, p + n),
                "eval_kv_cache_growth": self.kv_cache_growth(rows, p, n, SamplingConfig.cache_segments),
                "eval_work": self.forward_work(rd, p, p + n) + self.logits(rd, 1, 3),
                "eval_weights": self.compute_params("policy")}

    def rollout_terms(self, rows: int, prompts: int, p: int, n: int, sampling) -> dict[str, int]:
        """A rollout of `rows` completions of `prompts` distinct prompts (P prompt, N new tokens) with the
        stage's `sampling` section."""
        rd = self.rows(rows)
        split = bool(sampling.get("split_layer_weights", SamplingConfig.split_layer_weights))
        segments = int(sampling.get("cache_segments", SamplingConfig.cache_segments))
        slots = int(sampling.get("slots", SamplingConfig.slots))
        # the sampler prefills each distinct prompt once and repeats its cache for the samples
        decode = self.compute_params("policy")  # converted once before the loop even unsplit, when narrower
        if 0 < slots < rows:  # continuous batching: the slots' caches of P + N and each prompt's of P
            cache = {"kv_cache": self.kv_cache(slots, p + n) + self.kv_cache(prompts, p), "kv_cache_growth": 0}
        else:
            cache = {"kv_cache": self.kv_cache(rows, p + n),
                     "kv_cache_growth": self.kv_cache_growth(rows, p, n, segments)}
        return {**cache,
                "rollout_work": self.forward_work(self.rows(prompts), p, p + n) + self.logits(rd, 1, 3),
                "decode_weights": decode if split or decode > self.params("policy") else 0}

    def score_terms(self, rows: int, t: int, n: int, chunk: int) -> dict[str, int]:
        """A no-grad forward over `rows` rows of length t (log-probs of n positions, `chunk` at a time)."""
        rd = self.rows(rows)
        return {"score_work": self.forward_work(rd, t, t), "score_logits": self.logits(rd, max(1, min(chunk, n)), 1)}


def stage_kinds():
    """The registry of stage kinds (`train.stages.STAGE_KINDS`)."""
    from jaxrl_llm.train.stages import STAGE_KINDS
    return STAGE_KINDS


def estimate_memory(cfg, model_cfg: ModelConfig, mesh_axes: Mapping[str, int],
                    rules: Rules | None = None) -> MemoryEstimate:
    """Bytes per device of every stage in `cfg.stages` on a mesh of `mesh_axes` (sizes resolved, no -1).

    rules: the logical-axis rules (default: the run's, `mesh.rules`, as `build` places the parameters)."""
    axes = dict(mesh_axes)
    if any(not isinstance(v, int) or v < 1 for v in axes.values()):
        raise ValueError(f"estimate_memory: mesh axes {axes} must be resolved sizes >= 1 "
                         "(resolve -1 with sharding.resolve_axis_sizes(axes, num_devices))")
    if rules is None:
        from jaxrl_llm.train.config import mesh_rules
        rules = mesh_rules(cfg)
    z = Sizes(with_lora(cfg, model_cfg), axes, normalize_rules(rules))
    kinds = stage_kinds()
    stages = []
    for name in cfg.stages:
        s = cfg[name]
        kind = s.get("kind")
        if kind not in kinds:
            raise ValueError(f"estimate_memory: config.{name}.kind={kind!r}; expected one of {tuple(kinds)}")
        terms = {term: 0 for term, _, _ in TERMS} | kinds[kind].memory(cfg, s, z)
        stages.append(StageMemory(name, kind, terms))
    return MemoryEstimate(axes, tuple(stages))


# ----------------------------------------------------------------------------- the check


def device_memory_bytes() -> int | None:
    """The memory limit of one local device (GPU/TPU `memory_stats()["bytes_limit"]`); None when unknown (CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):  # backends without memory statistics
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def check_memory(cfg, model_cfg: ModelConfig, mesh_axes: Mapping[str, int],
                 device_bytes: int | None = None) -> MemoryEstimate:
    """The estimate, checked against `mesh.memory_headroom` x the device's memory.

    Device memory: `device_bytes`, else `cfg.mesh.device_memory_gb` (GiB) when > 0, else the device's own
    limit (`device_memory_bytes()`). When none is known (CPU) the estimate is returned unchecked. Over budget:
    `MemoryBudgetError` naming the peak stage, its largest terms and changes re-estimated to fit.
    """
    est = estimate_memory(cfg, model_cfg, mesh_axes)
    mesh_cfg = cfg.get("mesh") or {}
    source = "device_bytes"
    if device_bytes is None:
        configured = float(mesh_cfg.get("device_memory_gb", 0.0) or 0.0)
        if configured > 0:
            device_bytes, source = int(configured * GIB), "mesh.device_memory_gb"
        else:
            device_bytes, source = device_memory_bytes(), "the device's memory_stats bytes_limit"
    if device_bytes is None:
        return est
    headroom = float(mesh_cfg.get("memory_headroom", 0.9))
    est = dataclasses.replace(est, device_bytes=int(device_bytes), budget_bytes=int(device_bytes * headroom))
    if est.peak_bytes <= est.budget_bytes:
        return est
    suggestions = suggest_fixes(cfg, model_cfg, est)
    peak = est.peak_stage
    top = ", ".join(f"{k} {_size(v)}" for k, v in peak.peak_terms()[:4])
    lines = [(f"estimated peak memory {_size(peak.total_bytes)} per device (stage {peak.name!r}, {peak.kind}, "
              f"{peak.peak_phase} phase) exceeds the budget of {_size(est.budget_bytes)} "
              f"(mesh.memory_headroom={headroom} x {_size(device_bytes)} from {source}) on mesh "
              f"{_axes_text(est.mesh_axes)}."),
             f"Largest terms: {top}."]
    if suggestions:
        lines.append("Changes that fit (each re-estimated):")
        lines += [f"  {sug}" for sug in suggestions]
    else:
        lines.append("No change tried here fits (mesh shapes, micro-batches, remat, log-prob chunk, bfloat16 "
                     "params): use more devices, a smaller model or shorter sequences.")
    lines.append("The full table: jaxrl_llm.train.memory.estimate_memory(cfg, model_cfg, axes).table(); skip the "
                 "check with --set mesh.check_memory=False.")
    raise MemoryBudgetError("\n".join(lines), est, suggestions)


# ----------------------------------------------------------------------------- suggestions


def _set_dotted(cfg, key: str, value: Any) -> None:
    node, parts = cfg, key.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def _apply(cfg, model_cfg: ModelConfig, axes: Mapping[str, int], overrides) -> tuple[Any, ModelConfig, dict]:
    """(cfg, model_cfg, mesh axes) with `overrides` (dotted keys as for --set) applied to copies."""
    cfg, axes = copy.deepcopy(cfg), dict(axes)
    for key, value in overrides:
        if key.startswith("mesh.axes."):
            axes[key[len("mesh.axes."):]] = value
        elif key.startswith("model.") and key[len("model."):] in ("remat", "param_dtype", "dtype"):
            model_cfg = model_cfg.replace(**{key[len("model."):]: value})
        if key.startswith("mesh."):
            continue  # the mesh section may hold a preset; the axes above are what the estimate reads
        _set_dotted(cfg, key, value)
    return cfg, model_cfg, axes


def _mesh_candidates(cfg, axes: Mapping[str, int]) -> list[tuple[tuple[str, Any], ...]]:
    """Other (data, fsdp, tensor) shapes of the same devices; tensor stays within a host (<= 8)."""
    if not set(axes) <= {"data", "fsdp", "tensor"}:
        return []
    n = math.prod(axes.values())
    preset = (("mesh.preset", ""),) if (cfg.get("mesh") or {}).get("preset") else ()
    out = []
    for tensor in (1, 2, 4, 8):
        if n % tensor:
            continue
        for fsdp in range(1, n // tensor + 1):
            if (n // tensor) % fsdp:
                continue
            shape = {"data": n // tensor // fsdp, "fsdp": fsdp, "tensor": tensor}
            if shape != {k: axes.get(k, 1) for k in shape}:
                out.append(preset + tuple((f"mesh.axes.{k}", v) for k, v in shape.items()))
    # fewest parameter all-gathers first: no tensor, then as much data parallelism as fits
    out.sort(key=lambda o: (dict(o)["mesh.axes.tensor"], -dict(o)["mesh.axes.data"]))
    return out


def _get_dotted(section, key: str) -> Any:
    for part in key.split("."):
        section = section[part]
    return section


def _micro_options(cfg, stage: StageMemory, limit: int = 64) -> list[tuple[str, int]]:
    """(key, count) for more micro-batches in a stage: multiples of the current count that divide its rows."""
    kind = stage_kinds()[stage.kind]
    s, key = cfg[stage.name], kind.micro_batch_key
    rows, current = kind.update_rows(s), int(_get_dotted(s, key))
    counts = (current * 2 ** k for k in range(1, 8))
    return [(f"{stage.name}.{key}", m) for m in counts if m <= min(rows, limit) and rows % m == 0]


_REMAT_ORDER = ("none", "dots", "full")


def suggest_fixes(cfg, model_cfg: ModelConfig, est: MemoryEstimate, max_suggestions: int = 4) -> tuple[Suggestion, ...]:
    """Changes to the config that bring the estimated peak under `est.budget_bytes`, each re-estimated.

    Single changes first, each at its mildest level that fits: another mesh shape of the same devices (no
    tensor and the most data parallelism first), more micro-batches in every stage over budget, more
    rematerialisation, a smaller log-prob chunk, bfloat16 parameters. When none fits alone: a combination
    built greedily from the mesh with the smallest peak, adding one level of whichever change lowers the
    peak most until it fits (reported only if it does).
    """
    budget, before, axes = est.budget_bytes, est.peak_bytes, est.mesh_axes
    over = [st for st in est.stages if st.total_bytes > budget]

    def peak(overrides) -> int:
        return estimate_memory(*_apply(cfg, model_cfg, axes, overrides)).peak_bytes

    # each family: its levels, mildest first; a level is a list of overrides
    micro = [_micro_options(cfg, st) for st in over]
    depth = max((len(o) for o in micro), default=0)
    chunk_keys = {st.name: stage_kinds()[st.kind].logprob_chunk_key for st in over}
    chunks = {f"{name}.{key}": int(_get_dotted(cfg[name], key)) for name, key in chunk_keys.items() if key}
    families = {
        "mesh": [list(o) for o in _mesh_candidates(cfg, axes)],
        "micro": [[o[min(i, len(o) - 1)] for o in micro if o] for i in range(depth)] if all(micro) else [],
        "remat": [[("model.remat", m)] for m in _REMAT_ORDER[_REMAT_ORDER.index(model_cfg.remat) + 1:]],
        "chunk": [lv for lv in ([(k, c) for k, now in chunks.items() if c < now] for c in (64, 32, 16)) if lv],
        "param_dtype": [[("model.param_dtype", "bfloat16")]] if model_cfg.param_dtype == "float32" else [],
    }
    found = []
    for levels in families.values():
        for level in levels:
            p = peak(level)
            if p <= budget:
                found.append(Suggestion(tuple(level), before, p))
                break
    if found:
        return tuple(found[:max_suggestions])

    combo = min(families["mesh"], key=peak) if families["mesh"] else []
    level = {name: -1 for name in families if name != "mesh"}
    while True:
        options = []
        for name, i in level.items():
            if i + 1 < len(families[name]):
                trial = combo + [o for n, j in level.items() if j >= 0 and n != name for o in families[n][j]]
                trial += families[name][i + 1]
                options.append((peak(trial), name, trial))
        if not options:
            return ()
        p, name, trial = min(options, key=lambda o: o[0])
        level[name] += 1
        if p <= budget:
            return (Suggestion(tuple(trial), before, p),)
