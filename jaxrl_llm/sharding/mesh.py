"""Device mesh from config: named axes with sizes, one of them may be -1 (auto)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxrl_llm.errors import ConfigError, MeshError

DEFAULT_AXES: dict[str, int] = {"data": -1, "fsdp": 1, "tensor": 1}


def set_cpu_devices(n: int) -> None:
    """Splits the host CPU into `n` XLA devices (`jax_num_cpu_devices`); call before any JAX operation.

    On a CPU-only machine the default mesh (data: -1) then shards the batch over the `n` devices: with one
    device per core, each core runs its own rows' ops instead of every small op being split across the
    cores (docs/performance.md has the measurements). Accelerator backends
    are unaffected. Runs stay deterministic for a given `n`; different `n` reduce in a different order.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"--cpu-devices (set_cpu_devices): the CPU device count must be an integer >= 1, got {n!r}")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as e:
        raise RuntimeError(
            f"cannot split the CPU into {n} devices: JAX has already started its backends (a JAX operation "
            "ran before); set the CPU device count first thing, e.g. `jaxrl-llm train --cpu-devices "
            f"{n} ...` or `set_cpu_devices({n})` right after `import jax`") from e
    from jaxrl_llm.sharding.multihost import cpu_thread_headroom
    cpu_thread_headroom(min_devices=2)  # sized from the device count just set


def resolve_axis_sizes(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fills in the one -1 axis and checks that the sizes multiply to `num_devices`."""
    axes = dict(axes)
    if not axes:
        raise MeshError("mesh.axes is empty; give at least one named axis, e.g. {'data': -1}")
    auto = [k for k, v in axes.items() if v == -1]
    for k, v in axes.items():
        if not isinstance(v, int) or (v < 1 and v != -1):
            raise MeshError(f"mesh.axes.{k}={v!r}: sizes must be positive integers or -1 (auto)")
    if len(auto) > 1:
        raise MeshError(f"mesh.axes: at most one axis may be -1 (auto), got {auto}")
    fixed = math.prod(v for v in axes.values() if v != -1)
    if auto:
        if num_devices % fixed:
            raise MeshError(
                f"mesh.axes={axes}: the fixed sizes multiply to {fixed}, which does not divide the "
                f"{num_devices} available devices; choose sizes whose product divides {num_devices}")
        axes[auto[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(
            f"mesh.axes={axes}: sizes multiply to {fixed} but there are {num_devices} devices; "
            "make the product equal the device count or set one axis to -1 (auto)")
    return axes


def make_mesh(axes: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a mesh over `devices` (default: all) with named axes, in the given order.

    Axes are `Auto` (GSPMD propagation between the explicit constraints).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(axes if axes is not None else DEFAULT_AXES, len(devices))
    names, shape = tuple(sizes), tuple(sizes.values())
    try:
        return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)
    except Exception:  # topologies make_mesh cannot lay out (e.g. a subset of devices)
        return Mesh(np.asarray(devices).reshape(shape), names, axis_types=(AxisType.Auto,) * len(names))
