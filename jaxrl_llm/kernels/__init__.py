"""Kernels the model calls: backend-specific ways of computing a standard operation.

    from jaxrl_llm.kernels import dense
    y = nn.Dense(..., dot_general=dense.dot_general(op_dtype))(x)

`dense`: the matmul of the dense layers, with a backward written for XLA:CPU's fast matmul kernels and
optional low-precision operands. The model code names what it computes; how it is computed on each
backend lives here.
`platform` (imported on its own): the host CPU's model and features from /proc/cpuinfo, which
bench/cpu_choices.py prints next to its measurements.
"""

from jaxrl_llm.kernels import dense

__all__ = ["dense"]
