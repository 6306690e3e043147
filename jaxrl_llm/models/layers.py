"""Building blocks of the decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`);
activations are constrained by logical names through `sharding.constrain`.
No mesh axis name appears here.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.kernels import dense
from jaxrl_llm.models.config import ModelConfig, dtype_of
from jaxrl_llm.sharding.rules import constrain

_NEG_INF = -1e30  # finite, so fully-masked rows (left padding) give a uniform softmax, not NaN


def _init(cfg: ModelConfig, names):
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), names)


def _matmul_op_dtype(cfg: ModelConfig):
    """The dense layers' matmul operand dtype when it differs from the compute dtype, else None."""
    if cfg.matmul_dtype is None or dtype_of(cfg.matmul_dtype) == cfg.jnp_dtype:
        return None
    return dtype_of(cfg.matmul_dtype)


def matmul_fn(cfg: ModelConfig):
    """The `dot_general` of the model's dense layers (`kernels.dense`): operands in `cfg.matmul_dtype` when
    set (forward and backward), float32 accumulation, results in the compute dtype."""
    return dense.dot_general(_matmul_op_dtype(cfg), backward=cfg.dense_backward)


def matmul_weights(params, cfg: ModelConfig):
    """`params` with the decoder layers' matmul kernels already in `cfg.matmul_dtype` (unchanged when it is
    unset): a decode loop casts them once, before the loop, instead of at every step."""
    op_dtype = _matmul_op_dtype(cfg)
    if op_dtype is None:
        return params
    return dense.cast_kernels(params, op_dtype, where=lambda names: "layers" in names)


def _lora_delta(mod: nn.Module, cfg: ModelConfig, x, n_in: int, out_shape: tuple[int, ...], kernel_axes):
    """The adapter term (alpha / rank) * dropout(x) A B of projection `mod` (None when it has none: LoRA off,
    not a target, or a params tree without this layer's adapters, i.e. the base model). A holds the kernel's
    input axes and rank columns, B rank rows and its output axes; both are multiplied as 2-D matmuls (x A
    first), so nothing of the kernel's [in, out] size is formed."""
    spec = None if cfg is None else cfg.lora
    if spec is None or mod.name not in spec.targets:
        return None
    if not (mod.is_initializing() or mod.has_variable("params", "lora_a")):
        return None
    dt, pdt, r = cfg.jnp_dtype, cfg.jnp_param_dtype, spec.rank
    in_shape = tuple(x.shape[x.ndim - n_in:])
    in_axes, out_axes = tuple(kernel_axes[:n_in]), tuple(kernel_axes[n_in:])
    # PEFT's default for A: kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(n_in)),
                                              out_axis=-1)
    a = mod.param("lora_a", nn.with_logical_partitioning(a_init, in_axes + (None,)), in_shape + (r,), pdt)
    b = mod.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (None,) + out_axes),
                  (r,) + tuple(out_shape), pdt)
    if spec.dropout > 0 and mod.has_rng("dropout"):  # training forwards only (train_state.accumulate)
        keep = jax.random.bernoulli(mod.make_rng("dropout"), 1.0 - spec.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - spec.dropout), 0).astype(x.dtype)
    lead = x.shape[:x.ndim - n_in]
    fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
    op = _matmul_op_dtype(cfg)
    xa = dense.matmul(x.reshape(-1, fan_in).astype(dt), a.reshape(fan_in, r).astype(dt), op)
    y = dense.matmul(xa, b.reshape(r, fan_out).astype(dt), op) * jnp.asarray(spec.scale, dt)
    return y.reshape(*lead, *out_shape)


class Projection(nn.DenseGeneral):
    """DenseGeneral (the kernel and bias exactly as before) plus the LoRA term when `cfg.lora` targets it."""

    cfg: ModelConfig | None = None
    kernel_axes: tuple = ()

    @nn.compact
    def __call__(self, inputs):
        y = super().__call__(inputs)
        axis = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        feats = self.features if isinstance(self.features, tuple) else (self.features,)
        delta = _lora_delta(self, self.cfg, inputs, len(axis), feats, self.kernel_axes)
        return y if delta is None else y + delta.astype(y.dtype)


class DenseProjection(nn.Dense):
    """nn.Dense plus the LoRA term when `cfg.lora` targets it (the MLP's projections)."""

    cfg: ModelConfig | None = None
    kernel_axes: tuple = ()

    @nn.compact
    def __call__(self, inputs):
        y = super().__call__(inputs)
        delta = _lora_delta(self, self.cfg, inputs, 1, (self.features,), self.kernel_axes)
        return y if delta is None else y + delta.astype(y.dtype)


class RMSNorm(nn.Module):
    """RMSNorm as in Llama/Qwen: normalise in float32, cast back, then scale."""

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(self.dtype) * x32.astype(self.dtype)).astype(self.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim/2], with Llama-3 / linear scaling as in HF."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    sc = cfg.rope_scaling
    if not sc:
        return inv.astype(np.float32)
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        lo_wavelen, hi_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, T, head_dim/2] (float32) for integer positions [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    return jnp.cos(angles), jnp.sin(angles)


def rope_tables_below(cfg: ModelConfig, positions: jax.Array, limit: int) -> tuple[jax.Array, jax.Array]:
    """`rope_tables(cfg, positions)` for positions known to lie in [0, limit): the `limit` rows of cos/sin
    computed once and gathered. Computed per position instead, XLA fuses the cos/sin into every fusion
    that applies them (each layer's q and k, forward and backward) and evaluates them once per head there."""
    cos, sin = rope_tables(cfg, jnp.arange(limit, dtype=jnp.int32))
    return jnp.take(cos, positions, axis=0), jnp.take(sin, positions, axis=0)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF 'rotate_half' convention: x [B, T, H, D], first half paired with second half."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def write_slots(buf: jax.Array, new: jax.Array, index: jax.Array, axis: int = 2) -> jax.Array:
    """`new` written into `buf` (both [B, ...]) at slots [index, index + T) of `axis` (2: keys/values
    [B, heads, S, head_dim]; 1: the cache mask [B, S]): one index [] for every row (a slice update in
    place), or one per row [B] (a row's own position, as a continuous-batching decode needs: its slots
    hold requests at different steps)."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(buf, new, tuple(index if a == axis else 0 for a in range(buf.ndim)))
    starts = lambda i: tuple(i if a == axis - 1 else 0 for a in range(buf.ndim - 1))  # noqa: E731
    return jax.vmap(lambda b, n, i: jax.lax.dynamic_update_slice(b, n, starts(i)))(buf, new, index)


class Attention(nn.Module):
    """Grouped-query attention with an optional KV cache.

    `kv` is None (keys are the current tokens) or this layer's (k, v), each [B, kv_heads, S, head_dim]:
    the new keys/values are written in place at slots [index, index + T) (`index` [] or one per row [B])
    and attention reads the updated buffers directly (one buffer per layer: a slice of a stacked cache
    would be copied before every decode step's dot).
    `bias` is an additive float32 mask [B, 1, 1, T, S].
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, bias, kv, index):
        cfg = self.cfg
        dt, pdt = cfg.jnp_dtype, cfg.jnp_param_dtype
        h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        b, t = x.shape[:2]
        x2 = x.reshape(b * t, x.shape[-1])  # tokens x embed: the dense kernels take 2-D operands

        def proj(name, heads, heads_axis):
            y = Projection(
                (heads, d), use_bias=cfg.qkv_bias, dtype=dt, param_dtype=pdt, name=name,
                dot_general=matmul_fn(cfg), cfg=cfg, kernel_axes=("embed", heads_axis, "head_dim"),
                kernel_init=_init(cfg, ("embed", heads_axis, "head_dim")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (heads_axis, "head_dim")))(x2)
            return y.reshape(b, t, heads, d)

        q = proj("q_proj", h, "heads")
        kx = proj("k_proj", k, "kv_heads")
        vx = proj("v_proj", k, "kv_heads")
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, dt, pdt, axis_name="head_dim", name="q_norm")(q)
            kx = RMSNorm(cfg.rms_norm_eps, dt, pdt, axis_name="head_dim", name="k_norm")(kx)
        q = constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim"))
        kx = constrain(apply_rope(kx, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
        vx = constrain(vx, ("batch", "length", "kv_heads", "head_dim"))

        def softmax(scores):
            return jax.nn.softmax(scores / math.sqrt(d) + bias, axis=-1).astype(dt)

        if kv is None:  # keys/values of the T tokens fed now, [B, T, kv_heads, head_dim]
            qg = q.reshape(b, t, k, h // k, d)
            probs = softmax(jnp.einsum("btkgd,bskd->bkgts", qg, kx.astype(dt), preferred_element_type=jnp.float32))
            out = jnp.einsum("bkgts,bskd->btkgd", probs, vx.astype(dt)).reshape(b, t, h, d)
        else:
            # This layer's cache, heads-major [B, kv_heads, S, head_dim]: the T new slots are written in place
            # and each (row, kv head) reads a contiguous [S, head_dim] block, so the batched dots below need no
            # transposed copy of the cache.
            kc, vc = kv
            kc = write_slots(kc, kx.transpose(0, 2, 1, 3).astype(kc.dtype), index)
            vc = write_slots(vc, vx.transpose(0, 2, 1, 3).astype(vc.dtype), index)
            kv = (kc, vc)
            qg = q.reshape(b, t, k, h // k, d).transpose(0, 2, 3, 1, 4)  # [B, kv_heads, group, T, head_dim]
            probs = softmax(jnp.einsum("bkgtd,bksd->bkgts", qg, kc.astype(dt), preferred_element_type=jnp.float32))
            out = jnp.einsum("bkgts,bksd->bkgtd", probs, vc.astype(dt)).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
        out = constrain(out, ("batch", "length", "heads", "head_dim")).reshape(b * t, h, d)
        out = Projection(cfg.hidden_size, axis=(-2, -1), use_bias=False, dtype=dt, param_dtype=pdt,
                              dot_general=matmul_fn(cfg), cfg=cfg, kernel_axes=("heads", "head_dim", "embed"),
                              kernel_init=_init(cfg, ("heads", "head_dim", "embed")), name="o_proj")(out)
        return out.reshape(b, t, cfg.hidden_size), kv


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dt, pdt = cfg.jnp_dtype, cfg.jnp_param_dtype

        def dense(name, feats, names):
            return DenseProjection(feats, use_bias=False, dtype=dt, param_dtype=pdt, name=name,
                                   dot_general=matmul_fn(cfg), kernel_init=_init(cfg, names), cfg=cfg,
                                   kernel_axes=names)

        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # [tokens, embed]: see Attention
        g = dense("gate_proj", cfg.intermediate_size, ("embed", "mlp"))(x2)
        u = dense("up_proj", cfg.intermediate_size, ("embed", "mlp"))(x2)
        hmid = constrain(nn.silu(g) * u, ("batch", "mlp"))
        return dense("down_proj", cfg.hidden_size, ("mlp", "embed"))(hmid).reshape(*lead, cfg.hidden_size)


class DecoderLayer(nn.Module):
    """Pre-norm block; the signature fits `nn.scan`: carry (x, this layer's (k, v) cache or None)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, cos, sin, bias, index):
        x, kv = carry
        cfg = self.cfg
        dt, pdt = cfg.jnp_dtype, cfg.jnp_param_dtype
        hdn = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="input_layernorm")(x)
        attn, kv = Attention(cfg, name="self_attn")(hdn, cos, sin, bias, kv, index)
        x = constrain(x + attn, ("batch", "length", "embed"))
        hdn = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x)
        x = constrain(x + MLP(cfg, name="mlp")(hdn), ("batch", "length", "embed"))
        return (x, kv), None
