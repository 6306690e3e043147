"""Logical axis names -> mesh axes.

Model code names logical axes only ("batch", "embed", "heads", ...). An ordered
rule list maps each logical axis to zero, one or several mesh axes. Resolution
of one array's logical axes to a `PartitionSpec`:

* every logical axis must have a rule (an unmatched name is an error, so a
  new parameter can never be silently replicated);
* a mesh axis is used at most once per array: a later dimension that asks for
  an axis already taken by an earlier one drops it (activations
  ("batch", "length", "embed") get batch over data+fsdp and embed unsharded,
  while the parameter ("vocab", "embed") gets embed over fsdp);
* a mesh axis absent from the mesh or of size 1, or one whose size does not divide the dimension, is
  dropped for that dimension (the bytes left replicated show up in
  `replication_report`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# (logical axis, mesh axes). None = never sharded.
Rules = tuple[tuple[str, tuple[str, ...] | str | None], ...]

STANDARD_MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
)


def _as_tuple(mesh_axes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    if isinstance(mesh_axes, str):
        return (mesh_axes,)
    return tuple(mesh_axes)


def normalize_rules(rules) -> Rules:
    """Accepts rules as a dict or a sequence of pairs (from config/JSON) and checks them."""
    items = rules.items() if isinstance(rules, dict) else rules
    out = []
    for pair in items:
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"sharding rule {pair!r} must be a pair (logical_axis, mesh_axes)")
        out.append((pair[0], _as_tuple(pair[1]) or None))
    return tuple(out)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """Resolves one array's logical axis names to a PartitionSpec on `mesh`."""
    table = {}
    for name, axes in rules:
        table.setdefault(name, _as_tuple(axes))
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(
                f"logical axis {name!r} has no sharding rule; add ({name!r}, <mesh axes or None>) "
                f"to the sharding rules (known: {sorted(table)})")
        chosen = []
        size = 1
        for ax in table[name]:
            n = mesh.shape.get(ax, 1)  # the standard axes may be left out of a mesh
            if ax in used or n == 1:
                continue
            if shape is not None and shape[i] % (size * n):
                continue
            chosen.append(ax)
            size *= n
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def logical_to_sharding(logical_tree, shapes_tree, mesh: Mesh, rules: Rules):
    """Maps a tree of logical PartitionSpecs (+ matching shapes) to NamedShardings."""
    def one(logical, shaped):
        return NamedSharding(mesh, logical_to_spec(tuple(logical), rules, mesh, shaped.shape))
    return jax.tree.map(one, logical_tree, shapes_tree,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


@dataclasses.dataclass(frozen=True)
class ShardingEnv:
    """A mesh plus logical rules: everything model code needs to place activations."""

    mesh: Mesh
    rules: Rules = DEFAULT_RULES

    def __post_init__(self):
        object.__setattr__(self, "rules", normalize_rules(self.rules))
        known = set(self.mesh.shape) | set(STANDARD_MESH_AXES)
        for name, axes in self.rules:
            for ax in _as_tuple(axes):
                if ax not in known:
                    raise KeyError(f"sharding rule ({name!r}, {axes!r}) names mesh axis {ax!r}, which is "
                                   f"neither in the mesh {tuple(self.mesh.shape)} nor a standard axis "
                                   f"{STANDARD_MESH_AXES}")

    def spec(self, logical_axes, shape=None) -> PartitionSpec:
        return logical_to_spec(logical_axes, self.rules, self.mesh, shape)

    def sharding(self, logical_axes, shape=None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes, shape))

    def activate(self):
        """While active (at trace time), `constrain` places activations on this mesh."""
        return _current(self)

    @staticmethod
    def deactivate():
        """No environment while inside (e.g. in a `shard_map` body, where arrays are per device)."""
        return _current(None)


@contextlib.contextmanager
def _current(env: "ShardingEnv | None"):
    token = _CURRENT.set(env)
    try:
        yield env
    finally:
        _CURRENT.reset(token)


_CURRENT: contextvars.ContextVar[ShardingEnv | None] = contextvars.ContextVar("jaxrl_llm_sharding", default=None)


def current_env() -> ShardingEnv | None:
    return _CURRENT.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside `ShardingEnv.activate()`."""
    env = _CURRENT.get()
    if env is None or env.mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, env.sharding(logical_axes, x.shape))


# The data-parallel mesh axis: it splits the batch and keeps a whole copy of the parameters per group.
DATA_AXIS = "data"


def parameter_axes(env: ShardingEnv) -> tuple[str, ...]:
    """The mesh axes of size > 1 meant to split parameters: all but the data-parallel axis (fsdp, tensor,
    any other). () on a pure data-parallel mesh, where every parameter is replicated by design."""
    return tuple(ax for ax, n in env.mesh.shape.items() if n > 1 and ax != DATA_AXIS)


@dataclasses.dataclass(frozen=True)
class ReplicationReport:
    """Parameter bytes left whole on every device of a multi-device mesh.

    parameter_axes: the mesh axes meant to split parameters (None: not known, every multi-device mesh counts;
    (): none, i.e. pure data parallelism, where every parameter is replicated by design).
    """

    total_bytes: int
    replicated_bytes: int
    largest: tuple[tuple[str, int], ...]  # (parameter path, bytes) of the biggest replicated ones
    parameter_axes: tuple[str, ...] | None = None

    @property
    def fraction(self) -> float:
        return self.replicated_bytes / max(self.total_bytes, 1)

    def __str__(self) -> str:
        top = ", ".join(f"{p} ({b / 2**20:.2f} MiB)" for p, b in self.largest)
        over = f" over mesh axes {self.parameter_axes}" if self.parameter_axes else ""
        return (f"{self.fraction:.1%} of parameter bytes are fully replicated{over} "
                f"({self.replicated_bytes / 2**20:.2f} of {self.total_bytes / 2**20:.2f} MiB)"
                + (f"; largest: {top}" if top else ""))


def replication_report(shapes_tree, shardings_tree, env: ShardingEnv | None = None, top: int = 5) -> ReplicationReport:
    """Counts parameter bytes whose sharding is fully replicated on a multi-device mesh. With `env`, only
    meshes with an axis meant to split parameters (`parameter_axes`) count replication at all."""
    total = replicated = 0
    rep = []
    axes = parameter_axes(env) if env is not None else None
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes_tree)[0]
    flat_shard = jax.tree.leaves(shardings_tree)
    for (path, shaped), sharding in zip(flat_shapes, flat_shard):
        nbytes = int(np.prod(shaped.shape)) * np.dtype(shaped.dtype).itemsize
        total += nbytes
        if axes != () and sharding.is_fully_replicated and len(sharding.device_set) > 1:
            replicated += nbytes
            rep.append((jax.tree_util.keystr(path), nbytes))
    rep.sort(key=lambda t: -t[1])
    return ReplicationReport(total, replicated, tuple(rep[:top]), axes)


def check_replication(report: ReplicationReport, max_fraction: float) -> None:
    """Fails when more than `max_fraction` of parameter bytes are replicated (see `replication_report`)."""
    if report.fraction > max_fraction:
        raise ValueError(
            f"{report}. The limit is mesh.max_replicated_fraction={max_fraction}. "
            "Shard more parameters (give the mesh an fsdp or tensor axis that divides the parameters' dimensions, "
            "or map more logical axes to mesh axes with mesh.rules, e.g. --set mesh.rules.mlp=fsdp) or raise "
            "the limit (--set mesh.max_replicated_fraction=1.0).")
