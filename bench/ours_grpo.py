"""Our side of the reference workload "tiny-qwen2 GRPO": one GRPO iteration as our trainer runs it, timed.

    .venv/bin/python bench/ours_grpo.py                        # >= 10 timed iterations, one JSON line
    .venv/bin/python bench/ours_grpo.py --iters 20 --detail    # plus where the time goes (prefill, steps, ...)

Reads the artifacts of bench/workload.py (built when missing): the HF
directory is loaded with `load_hf`, the 8 prompts are left-padded to the
longest, and each iteration runs the trainer's own code for a GRPO stage
(`train.experience.collect`, then `train.stages.grpo.GRPOLearner`), timing
its phases:

    generation  jitted KV-cache sampler, 64 rows x 64 new tokens, T=1, top-p 1
    reward      decode the completions on the host and score them with the Python reward
                -abs(len(text)-20)/20 (`rewards.RolloutScorer`, the trainer's host-reward path)
    old         the old-policy log-prob forward, when the algorithm needs one (several updates per rollout;
                here one epoch of one minibatch, so none: the step uses stop_gradient(new log-probs))
    reference   reference log-prob forward (beta 0.04)
    update      group advantages and the GRPO step: one AdamW step (lr 1e-5, no clipping, no weight decay)
                over 64 rows

Every piece ends with `block_until_ready`; medians over --iters iterations
after --warmup. `decode_s` times the sampler alone (64 x 64, like
`transformers.generate`), and `matmuls_only_step_ms` one decode step's float32 matmuls alone (median of
--matmul-repeats calls; bench/peers/hf_generate.py times the same chain in torch). `--old-forward`
forces the separate old-policy forward; `--scan-unroll N`, `--remat POLICY`, `--dtype DTYPE` (compute; params stay
float32) and `--matmul-dtype DTYPE` (the dense layers' matmul operands, float32 accumulation)
override `load_hf`'s config; `--cache-segments K` the sampler's KV-cache segments;
`--micro-batches M` sets `algo.num_micro_batches` (the gradient of all 64 rows summed over M row
chunks, and the reference forward over the same chunks: still one AdamW step, as GRPOStage runs it);
`--cpu-devices N` splits the CPU into N XLA devices and shards the batch over them (mesh data=N, what
`jaxrl-llm train --cpu-devices N` does with the default mesh); `--logprob-chunk C` sets
`algo.logprob_chunk`. `--workload smollm2` runs the real-shape workload (bench/workload.py: SmolLM2-135M,
8 prompts x 4 samples x 64 tokens, no EOS); `--detail-repeats R` keeps its --detail pass short.
Prints one JSON line (and writes it to --json); `host_median` has the page faults and kernel CPU seconds of
each piece, and `host_malloc` the host allocator setting (jaxrl_llm.host_memory, JAXRL_LLM_HOST_MALLOC).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import pathlib
import re
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import workload as workload_lib

from jaxrl_llm import host_memory
from jaxrl_llm.algos import grpo
from jaxrl_llm.algos.policy_loss import PolicyLossConfig
from jaxrl_llm.algos.train_state import OptimizerConfig, TrainState
from jaxrl_llm.models import CausalLM, KVCache, load_hf, positions_from_mask
from jaxrl_llm.models.transformer import unembedding, unstack_layers
from jaxrl_llm.rewards import RolloutScorer
from jaxrl_llm.rollout import SamplingConfig, make_sampler
from jaxrl_llm.sharding import ShardingEnv, make_mesh, set_cpu_devices
from jaxrl_llm.tasks import Example
from jaxrl_llm.tokenizer import decode_completions, encode_prompts, load_tokenizer, tokenizer_info
from jaxrl_llm.train.experience import PromptBatch, collect
from jaxrl_llm.train.stages.grpo import GRPOLearner

PIECES = ("generation", "reward", "old", "reference", "update")


class CompileCounter(logging.Handler):
    """Counts XLA compilations (jax_log_compiles) while attached: recompiles in the timed loop show up here."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.count = 0
        self.names: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Compiling "):
            self.count += 1
            self.names.append(msg.split(" ")[1])


def _sync(x):
    return jax.block_until_ready(x)


def _host_usage() -> dict:
    """The process's minor page faults and kernel CPU seconds so far (getrusage)."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return {"minor_faults": u.ru_minflt, "system_s": u.ru_stime}


def _median(xs):
    return statistics.median(xs) if xs else None


class _WorkloadReward:
    """The workload's Python reward as a reward function of the trainer (RewardInputs -> scores)."""

    __name__ = "workload_reward"

    def __call__(self, inputs):
        return np.asarray([workload_lib.reward(s) for s in inputs.completions], np.float32)


class Ours:
    """The pieces of one GRPO iteration, built once."""

    def __init__(self, wl: dict, *, old_forward: bool = False, scan_unroll: int | None = None, remat: str | None = None,
                 dtype: str | None = None, matmul_dtype: str | None = None, micro_batches: int = 1, seed: int = 0,
                 cache_segments: int | None = None, devices: int = 1, logprob_chunk: int | None = None,
                 share_prompt: bool = True):
        self.wl = wl
        self.env = ShardingEnv(make_mesh({"data": devices}, devices=jax.devices()[:devices]))
        overrides = {"scan_unroll": scan_unroll} if scan_unroll else {}
        if remat:
            overrides["remat"] = remat
        if dtype:
            overrides["dtype"] = dtype
        if matmul_dtype:
            overrides["matmul_dtype"] = matmul_dtype
        self.cfg, params = load_hf(wl["model_dir"], self.env, **overrides)
        self.module = CausalLM(self.cfg)
        self.tok = load_tokenizer(wl["tokenizer_dir"], vocab_size=self.cfg.vocab_size)
        info = tokenizer_info(self.tok)
        # eos_id null (the smollm2 workload): no end-of-sequence id, every row decodes max_new_tokens
        eos_ids = () if wl["eos_id"] is None else (wl["eos_id"],)
        assert info.pad_id == wl["pad_id"] and (not eos_ids or info.eos_ids == eos_ids), info
        p_len = max(wl["prompt_tokens"])  # left-padded to the longest prompt, as TRL does
        enc = encode_prompts(self.tok, wl["prompts"], p_len, truncation="error")
        if "prompt_ids" in wl:  # the token ids the workload recorded (TRL checks its own against them too)
            got = [row[m].tolist() for row, m in zip(enc.tokens, enc.mask)]
            assert got == wl["prompt_ids"], "prompt token ids differ from workload.json's prompt_ids"
        self.prompt_tokens, self.prompt_mask = jnp.asarray(enc.tokens), jnp.asarray(enc.mask)
        g = wl["num_generations"]
        self.sampling = SamplingConfig(max_new_tokens=wl["max_new_tokens"], temperature=wl["temperature"],
                                       top_k=wl["top_k"], top_p=wl["top_p"], n_samples=g,
                                       eos_token_ids=eos_ids, pad_token_id=info.pad_id)
        if cache_segments:
            self.sampling = self.sampling.replace(cache_segments=cache_segments)
        self.sampler = make_sampler(self.module, self.cfg, self.sampling, env=self.env)
        self.algo = grpo.grpo(group_size=g, beta=wl["beta"]).replace(
            loss=PolicyLossConfig(clip_eps_low=wl["epsilon"], clip_eps_high=wl["epsilon"], kl_coef=wl["beta"],
                                  kl_estimator="k3"),
            temperature=wl["temperature"], epochs=wl["epochs"], num_minibatches=1, num_micro_batches=micro_batches,
            share_prompt_forward=share_prompt)
        if logprob_chunk:
            self.algo = self.algo.replace(logprob_chunk=logprob_chunk)
        self.opt = OptimizerConfig(name="adamw", learning_rate=wl["learning_rate"], b1=wl["adam_b1"],
                                   b2=wl["adam_b2"], eps=wl["adam_eps"], weight_decay=wl["weight_decay"],
                                   max_grad_norm=wl["max_grad_norm"])
        # The GRPO stage's own pieces: the host reward through the trainer's scorer, the model side of an
        # iteration (a separate old-policy forward only when the algorithm needs one, or with --old-forward).
        self.examples = [Example(prompt=p, answer="") for p in wl["prompts"]]
        self.scorer = RolloutScorer(_WorkloadReward(), self.tok, self.env, in_jit=False, timeout_s=None)
        self.learner = GRPOLearner(self.module, self.cfg, self.algo, self.env,
                                   old_logprobs=True if old_forward else None, rows=len(wl["prompts"]) * g)
        self.need_old = self.learner.need_old
        self.logp_fn = self.learner.logp_fn
        self.state = TrainState.create(jax.tree.map(jnp.copy, params), self.opt)
        self.ref = params
        self.key = jax.random.key(seed)
        self.host: list[dict] = []  # per iteration: page faults and kernel time of each piece

    # ------------------------------------------------------------------ one iteration

    def iteration(self, i: int) -> dict:
        key = jax.random.fold_in(self.key, i)
        marks = [("start", time.perf_counter())]
        host = [("start", _host_usage())]

        def phase(name, value):  # block on what the phase produced, then stamp its end
            _sync(value)
            marks.append((name, time.perf_counter()))
            host.append((name, _host_usage()))

        prompts = PromptBatch(self.prompt_tokens, self.prompt_mask, self.examples, 0)
        exp = collect(self.sampler, self.state.params, prompts, jax.random.fold_in(key, 0), self.scorer,
                      self.sampling.n_samples, on_phase=phase)
        self.state, metrics = self.learner(self.state, self.ref, exp, jax.random.fold_in(key, 1), on_phase=phase)
        loss = float(jax.device_get(metrics["loss"]))  # the trainer fetches metrics on log steps
        t = {name: end - start for (_, start), (name, end) in zip(marks, marks[1:])}
        t["total"] = marks[-1][1] - marks[0][1]
        self.host.append({name: {k: end[k] - start[k] for k in end} for (_, start), (name, end) in zip(host, host[1:])})
        texts = decode_completions(self.tok, exp.rollout.tokens[:1], exp.rollout.mask[:1])
        self.last = {"loss": loss, "num_steps": int(exp.rollout.num_steps),
                     "mean_len": float(jnp.mean(exp.rollout.lengths)), "reward_mean": float(jnp.mean(exp.rewards)),
                     "sample": texts[0]}
        return t

    def decode_only(self, i: int) -> float:
        t0 = time.perf_counter()
        _sync(self.sampler(self.state.params, self.prompt_tokens, self.prompt_mask,
                           jax.random.fold_in(self.key, 10_000 + i)).tokens)
        return time.perf_counter() - t0


# ---------------------------------------------------------------------- detail: where the time goes


def _time(fn, repeats: int) -> float:
    _sync(fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _sync(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _kv_copies(hlo: str, layer_shape: tuple[int, ...]) -> dict:
    """Cache-sized copies per decode step in a compiled sampler.

    Counts the instructions of the decode `while` loops' bodies whose output holds at least one layer's
    K or V (`layer_shape`, float32, the smallest cache a loop carries) and that are not the in-place
    dynamic-update-slice writes of the new slots: transposes, slices or copies of the cache, each run
    once per step.
    """
    n = int(np.prod(layer_shape))
    bodies = set(re.findall(r"body=(%[\w.\-]+)", hlo))
    comp, copies, elems = None, 0, 0
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            comp = line.split()[0]
            continue
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = f32\[([\d,]*)\]\S* (\w[\w\-]*)\(", line)
        if comp not in bodies or not m or "dynamic-update-slice" in m.group(1):
            continue
        size = int(np.prod([int(x) for x in m.group(2).split(",") if x]))
        if size >= n and m.group(3) in ("copy", "fusion", "transpose", "slice", "dynamic-slice", "concatenate"):
            copies += 1
            elems += size
    return {"layer_cache_shape": list(layer_shape), "cache_mb_k_or_v": 4 * n / 2**20,
            "cache_sized_copies_per_step": copies, "copied_mb_per_decode_step": 4 * elems / 2**20,
            "while_loops": hlo.count(" while(")}


def matmul_chain(o: Ours, steps: int | None = None):
    """One decode step's float32 matmuls alone (q, k, v, o projections, the MLP, the head; no attention, cache,
    norms or sampling) for every row, from the per-layer weights split once as the sampler does, `steps`
    (default max_new_tokens) steps in one compiled loop: (jitted fn, its arguments). bench/peers/hf_generate.py
    runs the same chain in torch with the same weights (tests/test_bench_smollm2.py: the same result), so
    the two timings say whether a decode gap lies in the matmul kernels or around them."""
    cfg, params = o.cfg, o.state.params
    rows, n_new = o.prompt_tokens.shape[0] * o.sampling.n_samples, steps or o.sampling.max_new_tokens

    def chain(prm, w_head, x):
        def step(_, h):
            for layer in range(cfg.num_layers):
                a = prm["model"]["layers"][str(layer)]
                q = jnp.einsum("be,ehd->bhd", h, a["self_attn"]["q_proj"]["kernel"])
                k = jnp.einsum("be,ehd->bhd", h, a["self_attn"]["k_proj"]["kernel"])
                v = jnp.einsum("be,ehd->bhd", h, a["self_attn"]["v_proj"]["kernel"])
                h = h + jnp.einsum("bhd,hde->be", q, a["self_attn"]["o_proj"]["kernel"]) + 0 * (k.sum() + v.sum())
                gt = h @ a["mlp"]["gate_proj"]["kernel"]
                up = h @ a["mlp"]["up_proj"]["kernel"]
                h = h + (jax.nn.silu(gt) * up) @ a["mlp"]["down_proj"]["kernel"]
            return h + 1e-3 * (h @ w_head)[:, :1]  # keep the head
        return jax.lax.fori_loop(0, n_new, step, x)

    x = jnp.ones((rows, cfg.hidden_size), jnp.float32)
    return jax.jit(chain), (unstack_layers(params), unembedding(params, cfg), x)


def matmuls_only_step_ms(o: Ours, repeats: int) -> float:
    """ms per decode step of `matmul_chain` (median of `repeats` calls after one)."""
    fn, args = matmul_chain(o)
    return 1e3 * _time(lambda: fn(*args), repeats) / o.sampling.max_new_tokens


def detail(o: Ours, repeats: int, matmuls_ms: float | None = None) -> dict:
    """Where the time goes: prefill vs decode steps (vs their matmul floor), KV-cache copies in the compiled
    sampler, the log-prob and plain forwards, the trunk's forward vs backward (as loaded and unrolled), and
    the update's parts (loss+grad, optimizer). Each figure is a median of `repeats` calls after a warm-up."""
    cfg, env, module = o.cfg, o.env, o.module
    params = o.state.params
    g, n_new = o.sampling.n_samples, o.sampling.max_new_tokens
    b, p = o.prompt_tokens.shape
    rows = b * g
    out = {"rows": rows, "prompts": b, "prompt_len": p, "cache_len": p + n_new}

    def traced(f):
        def g_(*a):
            with env.activate():
                return f(*a)
        return g_

    @jax.jit
    @traced
    def prefill(params, tokens, mask):  # as the sampler: the distinct prompts, their cache repeated per sample
        cache = KVCache.zeros(cfg, b, p + n_new)
        hidden, cache = module.apply({"params": params}, tokens, positions_from_mask(mask), mask, cache,
                                     return_hidden=True)
        logits = module.apply({"params": params}, hidden[:, -1:], method="logits")
        return jnp.repeat(logits, g, axis=0), cache.repeat(g)

    out["prefill_s"] = _time(lambda: prefill(params, o.prompt_tokens, o.prompt_mask), repeats)
    key = jax.random.key(123)
    out["sampler_s"] = _time(lambda: o.sampler(params, o.prompt_tokens, o.prompt_mask, key).tokens, repeats)
    out["decode_loop_s"] = out["sampler_s"] - out["prefill_s"]
    out["per_decode_step_in_loop_ms"] = 1e3 * out["decode_loop_s"] / n_new

    _, cache0 = prefill(params, o.prompt_tokens, o.prompt_mask)
    tok = jnp.zeros((rows, 1), jnp.int32) + 5
    pos = jnp.full((rows, 1), p, jnp.int32)
    live = jnp.ones((rows, 1), jnp.bool_)

    def one_step(params, tok, pos, live, cache):
        hidden, cache = module.apply({"params": params}, tok, pos, live, cache, return_hidden=True)
        return module.apply({"params": params}, hidden, method="logits")[:, 0].astype(jnp.float32), cache

    step_nodonate = jax.jit(traced(one_step))
    out["isolated_decode_step_ms"] = 1e3 * _time(lambda: step_nodonate(params, tok, pos, live, cache0), repeats)

    # the run's own figure when it timed one (run(): --matmul-repeats), else timed here
    out["matmuls_only_step_ms"] = matmuls_ms if matmuls_ms is not None else matmuls_only_step_ms(o, repeats)

    # The decode step's per-token work outside the layers, over the full vocabulary: the head matmul alone,
    # and the draw (log-softmax, per-row Gumbel noise from one key per row, argmax, log-prob picks).
    from jaxrl_llm.rollout.sampling import process_logits, sample_tokens
    w_ev = unembedding(params, cfg)

    def head_only(w, x):
        def step(_, h):
            return h + 1e-3 * (h @ w)[:, :cfg.hidden_size]
        return jax.lax.fori_loop(0, n_new, step, x)

    def draw_only(logits, key):
        def step(t, carry):
            lg, acc = carry
            keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), t))(jnp.arange(rows))
            logp, raw = process_logits(lg, o.sampling.temperature, o.sampling.top_k, o.sampling.top_p)
            tok_ = sample_tokens(keys, logp, raw, o.sampling.greedy, per_row=True)
            picked = jnp.take_along_axis(raw, tok_[:, None], axis=-1)[:, 0]
            return lg + 1e-6 * picked[:, None], acc + tok_
        return jax.lax.fori_loop(0, n_new, step, (logits, jnp.zeros((rows,), jnp.int32)))
    head_jit, draw_jit = jax.jit(head_only), jax.jit(draw_only)
    logits0 = jax.random.normal(jax.random.key(1), (rows, cfg.vocab_size), jnp.float32)
    x = jnp.ones((rows, cfg.hidden_size), jnp.float32)
    out["decode_head_matmul_step_ms"] = 1e3 * _time(lambda: head_jit(w_ev, x), repeats) / n_new
    out["decode_draw_step_ms"] = 1e3 * _time(lambda: draw_jit(logits0, key), repeats) / n_new

    lowered = o.sampler.jitted_for(tuple(o.prompt_tokens.shape)).lower(params, o.prompt_tokens, o.prompt_mask, key)
    # The smallest cache any decode loop carries (the first segment's): copies of any layer's k or v count.
    first = p + o.sampling.segment_ends[0]
    out["sampler_hlo"] = _kv_copies(lowered.compile().as_text(), (rows, cfg.num_kv_heads, first, cfg.head_dim))

    # Forwards: the log-prob forward (chunked head) and a plain full-logits forward on 64 x (P + 64).
    ro = o.sampler(params, o.prompt_tokens, o.prompt_mask, key)
    batch = {"prompt_tokens": ro.prompt_tokens, "prompt_mask": ro.prompt_mask,
             "completion_tokens": ro.tokens, "completion_mask": ro.mask}
    out["logprob_forward_s"] = _time(lambda: o.logp_fn(o.ref, batch), repeats)
    seq, seq_mask = ro.sequences()
    plain = jax.jit(traced(lambda prm, t, m: module.apply({"params": prm}, t, None, m.astype(bool))[0]))
    out["plain_forward_s"] = _time(lambda: plain(o.ref, seq, seq_mask), repeats)

    # The trunk alone (no head, no loss): forward vs forward+backward, as loaded and with the layers unrolled.
    def trunk_of(mod):
        def trunk(prm, t, m):
            h, _ = mod.apply({"params": prm}, t, None, m.astype(bool), return_hidden=True)
            return jnp.mean(h ** 2)
        return jax.jit(traced(trunk)), jax.jit(traced(jax.grad(trunk)))

    variants = {"": module}
    if cfg.scan_unroll < cfg.num_layers:
        variants["_unrolled"] = CausalLM(cfg.replace(scan_unroll=cfg.num_layers))
    for suffix, mod in variants.items():
        fwd, fwd_bwd = trunk_of(mod)
        out[f"trunk_forward{suffix}_s"] = _time(lambda f=fwd: f(params, seq, seq_mask), repeats)
        out[f"trunk_fwd_bwd{suffix}_s"] = _time(lambda f=fwd_bwd: f(params, seq, seq_mask), repeats)

    # The head and log-probs alone on the completion positions' hidden states [rows, N, E] (chunked, as the
    # loss computes them): forward, and forward+backward (to hidden and the tied embedding).
    from jaxrl_llm.algos.logprobs import logprobs_from_hidden
    hid = jax.random.normal(jax.random.key(2), (rows, n_new, cfg.hidden_size), jnp.float32)

    def head_loss(w, h, with_entropy):
        lp, ent = logprobs_from_hidden(h, w, ro.tokens, temperature=o.algo.temperature, chunk=o.algo.logprob_chunk,
                                       with_entropy=with_entropy)
        return jnp.sum(lp) + (0.0 if ent is None else 0.0 * jnp.sum(jax.lax.stop_gradient(ent)))
    for ent_flag, suffix in ((False, ""), (True, "_with_entropy")):
        hf = jax.jit(functools.partial(head_loss, with_entropy=ent_flag))
        hg = jax.jit(jax.grad(functools.partial(head_loss, with_entropy=ent_flag), argnums=(0, 1)))
        out[f"head_logprobs_forward{suffix}_s"] = _time(lambda f=hf: f(w_ev, hid), repeats)
        out[f"head_logprobs_fwd_bwd{suffix}_s"] = _time(lambda f=hg: f(w_ev, hid), repeats)
    out["logprob_chunk"] = o.algo.logprob_chunk

    # The update's parts: loss+grad alone vs the whole jitted update (optimizer, metrics, finite checks).
    full = dict(batch, sampler_logprobs=ro.raw_logprobs, ref_logprobs=o.logp_fn(o.ref, batch),
                advantages=grpo.compute_advantages(o.algo, jnp.linspace(-1, 0, rows), ro.mask))
    if o.need_old:
        full["old_logprobs"] = o.logp_fn(params, batch)
    from jaxrl_llm.algos.aggregation import token_mean_weights
    from jaxrl_llm.algos.policy_loss import policy_loss
    lc = o.algo.loss

    def loss_fn(prm, mb, group=1):
        logp, ent = grpo.policy_logprobs(module, prm, cfg, mb, temperature=o.algo.temperature,
                                         chunk=o.algo.logprob_chunk, with_entropy=True, prompt_group=group)
        old = mb.get("old_logprobs", jax.lax.stop_gradient(logp))
        m = mb["completion_mask"]
        loss, _ = policy_loss(lc, logp, old, mb["advantages"], lc.token_weights(m),
                              token_mean_weights(m), ref_logp_bt=mb["ref_logprobs"], entropy_bt=ent,
                              sampler_logp_bt=mb["sampler_logprobs"], mask_bt=m)
        return loss
    # one forward per row, and each prompt's forward shared by its samples (what the learner runs by default)
    for group, suffix in ((1, ""), (o.learner.prompt_unit, "_shared_prompt")):
        if suffix and group == 1:
            continue
        grad_jit = jax.jit(traced(jax.value_and_grad(functools.partial(loss_fn, group=group))))
        out[f"loss_and_grad{suffix}_s"] = _time(lambda f=grad_jit: f(params, full), repeats)
        fwd_jit = jax.jit(traced(functools.partial(loss_fn, group=group)))
        out[f"loss_forward_only{suffix}_s"] = _time(lambda f=fwd_jit: f(params, full), repeats)
    out["prompt_unit"] = o.learner.prompt_unit

    state_copy = TrainState.create(jax.tree.map(jnp.copy, params), o.opt)
    grads = jax.tree.map(jnp.zeros_like, params)
    opt_jit = jax.jit(lambda s, gr: s.tx.update(gr, s.opt_state, s.params))
    out["optimizer_only_s"] = _time(lambda: opt_jit(state_copy, grads), repeats)

    # Arithmetic (matmul FLOPs, 2*m*n*k) for the record.
    e, m_, v_, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    per_tok = 2 * (layers * (e * e * 2 + 2 * e * cfg.num_kv_heads * cfg.head_dim + 3 * e * m_) + e * v_)
    out["gflop_per_decode_step_matmuls"] = rows * per_tok / 1e9
    out["gflop_plain_forward_matmuls"] = rows * (p + n_new) * per_tok / 1e9
    return out


# ---------------------------------------------------------------------- main


def run(args) -> dict:
    wl = workload_lib.load(workload_lib.build(args.workload))
    t_setup = time.perf_counter()
    o = Ours(wl, old_forward=args.old_forward, scan_unroll=args.scan_unroll, remat=args.remat, dtype=args.dtype,
             matmul_dtype=args.matmul_dtype, micro_batches=args.micro_batches,
             seed=args.seed, cache_segments=args.cache_segments, devices=args.cpu_devices,
             logprob_chunk=args.logprob_chunk, share_prompt=not args.per_row_forward)
    setup_s = time.perf_counter() - t_setup
    t0 = time.perf_counter()
    o.iteration(0)
    first_s = time.perf_counter() - t0
    for i in range(1, args.warmup):
        o.iteration(i)

    counter = CompileCounter()
    jax.config.update("jax_log_compiles", True)
    logging.getLogger("jax").addHandler(counter)  # child loggers propagate here
    times = [o.iteration(args.warmup + i) for i in range(args.iters)]
    decode = [o.decode_only(i) for i in range(args.iters)]
    jax.config.update("jax_log_compiles", False)
    matmuls_ms = matmuls_only_step_ms(o, args.matmul_repeats) if args.matmul_repeats else None

    res = {
        "framework": "jaxrl_llm",
        "ok": True,
        "versions": {"jax": jax.__version__, "python": sys.version.split()[0]},
        "host_malloc": dict(host_memory.STATE),
        "device": jax.devices()[0].device_kind,
        "iters": args.iters, "warmup": args.warmup,
        "setup_s": setup_s, "first_iteration_s": first_s,
        "median": {k: _median([t[k] for t in times]) for k in PIECES + ("total",)},
        # page faults and kernel time per piece (the host allocator's work: jaxrl_llm.host_memory)
        "host_median": {k: {q: _median([h[k][q] for h in o.host[-args.iters:]]) for q in ("minor_faults", "system_s")}
                        for k in PIECES},
        "decode_s": _median(decode),
        "matmuls_only_step_ms": matmuls_ms,
        "all_total_s": [t["total"] for t in times],
        "compiles_in_timed_loop": counter.count,
        "compiled_in_timed_loop": sorted(set(counter.names))[:20],
        "options": {"old_logprob_forward": o.need_old, "scan_unroll": o.cfg.scan_unroll, "remat": o.cfg.remat,
                    "dtype": o.cfg.dtype, "matmul_dtype": o.cfg.matmul_dtype,
                    "num_micro_batches": o.algo.num_micro_batches, "prompt_len": int(o.prompt_tokens.shape[1]),
                    "logprob_chunk": o.algo.logprob_chunk, "workload": o.wl["name"],
                    "prompt_unit": o.learner.prompt_unit,
                    "cache_segment_ends": o.sampling.segment_ends, "devices": len(o.env.mesh.devices.flat)},
        "last": o.last,
    }
    res["median"]["other"] = res["median"]["total"] - sum(res["median"][k] for k in ("generation", "reference",
                                                                                        "update"))
    if args.detail:
        res["detail"] = detail(o, repeats=args.detail_repeats or max(5, args.iters // 2), matmuls_ms=matmuls_ms)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default=str(workload_lib.DEFAULT_OUT))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--old-forward", action="store_true", help="force a separate old-policy log-prob forward")
    ap.add_argument("--scan-unroll", type=int, default=None, help="override the layer scan unroll")
    ap.add_argument("--remat", default=None, help="override the remat policy (none, full, dots)")
    ap.add_argument("--dtype", default=None, help="compute dtype (params stay float32), e.g. bfloat16")
    ap.add_argument("--matmul-dtype", default=None,
                    help="dtype of the dense layers' matmul operands (float32 accumulation), e.g. bfloat16")
    ap.add_argument("--micro-batches", type=int, default=1,
                    help="algo.num_micro_batches: the update's gradient (and the reference forward) computed over "
                         "this many row chunks in turn; still one AdamW step over all rows")
    ap.add_argument("--per-row-forward", action="store_true",
                    help="algo.share_prompt_forward=False: every row its own prompt forward in the reference "
                         "forward and the update")
    ap.add_argument("--cache-segments", type=int, default=None, help="override SamplingConfig.cache_segments")
    ap.add_argument("--cpu-devices", type=int, default=1,
                    help="split the CPU into this many XLA devices, the batch sharded over them (mesh data=N)")
    ap.add_argument("--detail", action="store_true", help="also time prefill, decode steps, forwards, update parts")
    ap.add_argument("--detail-repeats", type=int, default=None,
                    help="timed calls per --detail figure (default max(5, iters / 2); 1-2 at the smollm2 shape)")
    ap.add_argument("--logprob-chunk", type=int, default=None,
                    help="algo.logprob_chunk: positions per block of the chunked head in the log-prob forwards")
    ap.add_argument("--matmul-repeats", type=int, default=3,
                    help="timed calls of the decode step's matmuls alone (matmuls_only_step_ms; 0: skip)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.cpu_devices != 1:
        set_cpu_devices(args.cpu_devices)  # before any JAX operation
    res = run(args)
    line = json.dumps(res)
    if args.json:
        pathlib.Path(args.json).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
