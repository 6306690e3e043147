"""Mesh presets for common topologies: `--set mesh.preset=8xh100` instead of hand-written axes.

A preset names a machine shape (devices, hosts, memory per device) and the
mesh axes that suit it. The rule behind every choice:

* fsdp spans the fast interconnect domain (a TPU slice's ICI, the NVLink of
  one GPU node): parameters, gradients and optimizer state are divided by it,
  at the cost of all-gathers / reduce-scatters every layer, which that
  interconnect carries well.
* data spans the slow links (between GPU nodes over InfiniBand/Ethernet, or
  between TPU slices over DCN): it costs one gradient all-reduce per step and
  divides nothing but the batch.
* tensor stays 1: it all-reduces activations twice per layer and only pays
  when a model does not fit even with fsdp over the whole fast domain, or
  when the per-device batch would be too small to split further. Set it by
  hand (within one host) for those cases.

`mesh.preset` and `mesh.axes` are alternatives: a preset is used only while
`mesh.axes` is left at its default {"data": -1, "fsdp": 1, "tensor": 1}; a
preset together with other axes is an error (it cannot be told which one was
meant). A preset's device count must equal the devices present.

JAX sees one device per chip on TPU v4 and v5p (a "megacore" chip has two
TensorCores): v4-8 is 4 devices and v5p-64 is 32, as the accelerator type
counts TensorCores. Memory figures are the vendors' HBM per chip (Cloud TPU
system architecture pages; NVIDIA's H100 SXM 80 GB); the usable limit the
runtime reports is a little lower (and on GPUs, XLA preallocates a fraction
of it), which is why the memory check keeps `mesh.memory_headroom`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

from jaxrl_llm.errors import MeshError
from jaxrl_llm.sharding.mesh import DEFAULT_AXES


@dataclasses.dataclass(frozen=True)
class MeshPreset:
    """A topology and the mesh axes for it (sizes multiply to `num_devices`; axes in data, fsdp, tensor order)."""

    name: str
    num_devices: int
    num_hosts: int
    device_memory_gib: float | None   # HBM per device; None: host memory (CPU)
    axes: tuple[tuple[str, int], ...]
    interconnect: str
    rationale: str

    @property
    def axes_dict(self) -> dict[str, int]:
        return dict(self.axes)

    def __post_init__(self):
        if math.prod(v for _, v in self.axes) != self.num_devices:
            raise ValueError(f"mesh preset {self.name!r}: axes {self.axes_dict} do not multiply to "
                             f"{self.num_devices} devices")


def _preset(name, devices, hosts, memory, data, fsdp, tensor, interconnect, rationale) -> MeshPreset:
    return MeshPreset(name, devices, hosts, memory, (("data", data), ("fsdp", fsdp), ("tensor", tensor)),
                      interconnect, " ".join(rationale.split()))


MESH_PRESETS: dict[str, MeshPreset] = {p.name: p for p in (
    _preset("v4-8", 4, 1, 32.0, 1, 4, 1, "ICI (3D mesh), one host",
            """Four v4 chips (two TensorCores each, one JAX device per chip) on one host, all on ICI: fsdp over
            the four divides parameters, gradients and Adam state by 4 at ICI bandwidth; with 32 GiB per chip
            there is rarely a reason for data parallelism inside one host."""),
    _preset("v5e-8", 8, 1, 16.0, 1, 8, 1, "ICI (2D torus), one host",
            """Eight v5e chips on one host (v5litepod-8). 16 GiB per chip is the tightest memory of these
            presets, so every parameter byte is divided by all eight chips over ICI."""),
    _preset("v5p-64", 32, 8, 95.0, 1, 32, 1, "ICI (3D torus) across 8 hosts of one slice",
            """32 v5p chips (64 TensorCores) on 8 hosts of one slice. Hosts of a slice share the ICI torus,
            so there is no slow link inside it: fsdp spans all 32 chips (as MaxText does for one slice).
            Data parallelism belongs between slices (multislice over DCN). The batch must divide by 32."""),
    _preset("v6e-8", 8, 1, 32.0, 1, 8, 1, "ICI (2D torus), one host",
            """Eight v6e (Trillium) chips on one host with 32 GB each: fsdp over all eight on ICI."""),
    _preset("8xh100", 8, 1, 80.0, 1, 8, 1, "NVLink/NVSwitch, one node",
            """One node of 8 H100 80 GB GPUs joined by NVLink through NVSwitch: fsdp=8 keeps the all-gathers
            and reduce-scatters on NVLink and divides parameters and optimizer state by 8."""),
    _preset("2x8xh100", 16, 2, 80.0, 2, 8, 1, "NVLink within a node, InfiniBand between the 2 nodes",
            """Two 8xH100 nodes: fsdp=8 within each node's NVLink, data=2 across the nodes, so only one
            gradient all-reduce per step crosses InfiniBand (the data axis is the outer one of the mesh,
            which puts each fsdp group on one node)."""),
    _preset("cpu-8", 8, 1, None, 2, 4, 1, "host memory (fake CPU devices)",
            """Eight fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, as the tests set):
            data=2 x fsdp=4 exercises both batch axes and parameter sharding on a laptop."""),
)}

ALIASES = {"v5litepod-8": "v5e-8"}


def get_mesh_preset(name: str) -> MeshPreset:
    """The preset called `name` (case-insensitive; aliases such as v5litepod-8 accepted)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in MESH_PRESETS:
        known = list(MESH_PRESETS) + list(ALIASES)
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.4)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise MeshError(f"unknown mesh.preset {name!r}{hint} (presets: {', '.join(known)})")
    return MESH_PRESETS[key]


def _get(section: Any, key: str, default: Any) -> Any:
    return section.get(key, default) if hasattr(section, "get") else getattr(section, key, default)


def mesh_axes_for(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
    """The mesh axes a run uses: `mesh_cfg.axes` when `mesh_cfg.preset` is "", else the preset's.

    `mesh_cfg` is the config's `mesh` section (a ConfigDict or a dict). The result may hold a -1 (auto) axis
    when it comes from `mesh.axes`; `make_mesh` / `resolve_axis_sizes` fill it in.
    """
    axes = _get(mesh_cfg, "axes", None)
    axes = dict(axes.to_dict() if hasattr(axes, "to_dict") else axes or DEFAULT_AXES)
    name = _get(mesh_cfg, "preset", "") or ""
    if not name:
        return axes
    preset = get_mesh_preset(name)
    if axes != DEFAULT_AXES:
        raise MeshError(f"mesh.preset={name!r} and mesh.axes={axes} are both given; give one or the other: "
                         f"the preset alone (its axes are {preset.axes_dict}), or mesh.axes with mesh.preset=''")
    if preset.num_devices != num_devices:
        listing = ", ".join(f"{p.name} ({p.num_devices})" for p in MESH_PRESETS.values())
        raise MeshError(f"mesh.preset={name!r} is for {preset.num_devices} devices but {num_devices} are present; "
                         f"pick the preset of this machine or set mesh.axes (presets and their device counts: "
                         f"{listing})")
    return preset.axes_dict
