"""The dense layers' matmul: 2-D, float32 accumulation, optional low-precision operands, a CPU-friendly backward.

    dot = dot_general(op_dtype=None)          # a `dot_general` for nn.Dense / nn.DenseGeneral
    params = cast_kernels(params, jnp.bfloat16, where=lambda names: "layers" in names)

Why a kernel of its own: XLA:CPU's fast matmul kernels take row-major 2-D operands only. The weight
gradient of a dense layer, lhs.T @ grad, is a contraction over both operands' first (token) axis; left to
XLA it runs on the generic dot kernel. `weight_grad` writes it as a row-major matmul of a transposed copy
of the narrower operand instead (docs/performance.md has the measurements). On other backends the
contraction is left as it is (`jax.lax.platform_dependent`). `dot_general(..., backward="xla")` (the model's
`dense_backward`) keeps the forward and leaves the backward to XLA's autodiff (`plain_matmul`), for CPUs where
bench/cpu_choices.py finds that faster.

With `op_dtype` set (e.g. bfloat16 with float32 parameters and activations), both matmul operands are cast
to it in the forward and in the backward (the incoming gradient too), products accumulate in float32 and
the result is returned in the inputs' dtype: the residual stream, norms and log-probs keep their precision.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def _mm(a, b, contract):
    """2-D a @ b (contract=((1,), (0,))) and its transposed forms, float32 accumulation."""
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _row_major_t(a):
    """a.T [m, n] of a 2-D a, materialised: the transpose is written as a swap with a unit axis, which XLA
    does not fold into the consuming dot (a plain `a.T` would be folded back into a dot over a's first axis)."""
    n, m = a.shape
    return jnp.swapaxes(a.reshape(n, m, 1), 0, 2).reshape(m, n)


def weight_grad(lo, go):
    """lo.T @ go ([N, I] x [N, O] -> [I, O], float32): the weight gradient of a dense layer.

    On CPU as a row-major matmul of a transposed copy of the narrower operand (see the module docstring);
    XLA:CPU's fast kernels are float32-only there, so low-precision operands are multiplied as float32.
    Other backends take the dot as it is.
    """
    def cpu(lo, go):
        if lo.shape[1] <= go.shape[1]:
            return _mm(_row_major_t(lo), go, ((1,), (0,)))
        return _row_major_t(_mm(_row_major_t(go), lo, ((1,), (0,))))

    return jax.lax.platform_dependent(lo, go, cpu=cpu, default=lambda lo, go: _mm(lo, go, ((0,), (0,))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(lhs, rhs, op_dtype):
    """2-D lhs @ rhs, operands in `op_dtype` (None: as given), float32 accumulation, result in the inputs' dtype."""
    return _matmul_fwd(lhs, rhs, op_dtype)[0]


def _matmul_fwd(lhs, rhs, op_dtype):
    lo, ro = (lhs, rhs) if op_dtype is None else (lhs.astype(op_dtype), rhs.astype(op_dtype))
    # Residuals: the operands as multiplied (half the bytes of float32 ones when low-precision); zero-size
    # arrays carry the input dtypes to the backward.
    res = (lo, ro, jnp.zeros((0,), lhs.dtype), jnp.zeros((0,), rhs.dtype))
    return _mm(lo, ro, ((1,), (0,))).astype(jnp.result_type(lhs, rhs)), res


def _matmul_bwd(op_dtype, res, g):
    lo, ro, ldt, rdt = res
    go = g if op_dtype is None else g.astype(op_dtype)
    return _mm(go, ro, ((1,), (1,))).astype(ldt.dtype), weight_grad(lo, go).astype(rdt.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


BACKWARDS = ("custom", "xla")  # the dense layers' backward: `matmul`'s hand-written one, or XLA's autodiff


def plain_matmul(lhs, rhs, op_dtype):
    """`matmul`'s forward (operands in `op_dtype`, float32 accumulation, result in the inputs' dtype) with the
    backward left to JAX's autodiff: the weight gradient as XLA lays it out, a dot over the token axis."""
    lo, ro = (lhs, rhs) if op_dtype is None else (lhs.astype(op_dtype), rhs.astype(op_dtype))
    return _mm(lo, ro, ((1,), (0,))).astype(jnp.result_type(lhs, rhs))


def dot_general(op_dtype=None, backward: str = "custom"):
    """A `dot_general` for flax's Dense / DenseGeneral: the contraction as one 2-D `matmul` (free dims of
    the input flattened into rows, the kernel's contracting dims into its rows), operands in `op_dtype`
    (None: as given). Only a dense layer's contraction is accepted (no batch dims; the input's last dims
    against the kernel's first). `backward`: "custom" (`matmul`'s hand-written backward) or "xla"
    (`plain_matmul`: the same forward, XLA's own backward)."""
    if backward not in BACKWARDS:
        raise ValueError(f"dense backward={backward!r}; expected one of {BACKWARDS}")
    mm = matmul if backward == "custom" else plain_matmul

    def dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
        (lc, rc), (lb, rb) = dimension_numbers
        k = len(lc)
        if lb or rb or tuple(lc) != tuple(range(lhs.ndim - k, lhs.ndim)) or tuple(rc) != tuple(range(k)):
            raise NotImplementedError(f"dot_general {dimension_numbers} is not a dense layer's")
        free, out = lhs.shape[:lhs.ndim - k], rhs.shape[k:]
        y = mm(lhs.reshape(math.prod(free), -1), rhs.reshape(-1, math.prod(out)), op_dtype)
        return y.reshape(*free, *out)

    return dot


def cast_kernels(params, op_dtype, where):
    """`params` with every leaf named "kernel" whose path names satisfy `where(names)` cast to `op_dtype`:
    a decode loop casts its matmul weights once, before the loop, instead of at every step."""
    def cast(path, x):
        names = [getattr(k, "key", None) for k in path]
        return x.astype(op_dtype) if names and names[-1] == "kernel" and where(names) else x
    return jax.tree_util.tree_map_with_path(cast, params)
