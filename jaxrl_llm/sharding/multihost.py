"""Several processes, one program: JAX's multi-controller runtime, and moving rows between hosts and meshes.

Every process runs the same Python program; a jitted function called with the same (global) arrays runs
as one SPMD program over all devices of all processes. What differs per process is only host data:

    initialize(mode="auto")                   # once, before anything touches a device
    rows = batch_rows(env, global_rows=64)    # the rows of a global batch this process feeds
    x = to_global(env, local_np, 64)          # this process's rows -> one global jax.Array
    mine = local_rows(x)                      # a global array's rows held by this process, as numpy
    whole = to_host(x)                        # the whole value, on every process (an all-gather)

A global batch has the same rows whatever the number of processes: process p feeds the rows its
devices hold under the batch sharding (a contiguous block; see `batch_rows`), so a run on 2 processes x 2
devices computes what a run on 1 process x 4 devices computes.

With one process every function here is a plain device_put / np.asarray.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Sequence

import jax
import numpy as np

_INITIALIZED_BY_US = False


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v in (None, ""):
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} must be an integer") from None


def detect_cluster() -> str | None:
    """The multi-process launcher this process runs under, or None: "slurm" (srun with more than one task),
    "tpu" (a Cloud TPU VM; JAX asks the metadata server for the slice), "mpi" (mpirun with more than one
    rank) or "env" (JAX_COORDINATOR_ADDRESS is set)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "env"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in os.environ for k in slurm) and (_env_int("SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "mpi"
    tpu_device = any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0"))
    if tpu_device and importlib.util.find_spec("libtpu") is not None:
        return "tpu"
    return None


def _slurm_node_gpus() -> list[int] | None:
    """All GPUs of the node when SLURM runs one task per node (JAX's SLURM detection would otherwise give
    each process only the GPU numbered by its local task id: right for one task per GPU, wrong here)."""
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "")
    gpus = os.environ.get("SLURM_GPUS_ON_NODE")
    if per_node.split("(")[0] == "1" and gpus and gpus.isdigit() and int(gpus) > 1:
        return list(range(int(gpus)))
    return None


def initialize(mode: str = "auto", coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None) -> bool:
    """Starts JAX's distributed runtime; returns True when this is (now) a multi-process run.

    mode: "off" never initialises; "on" always does (explicit flags, environment, or JAX's own cluster
        detection); "auto" does when `coordinator` is given or `detect_cluster()` finds a launcher.
    coordinator / num_processes / process_id: explicit values ("host:port", N, i); each falls back to
        JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, then to JAX's detection (TPU pods,
        SLURM, Open MPI, Kubernetes).
    On CPU the collectives go through gloo (set here, before the backend starts).
    Must run before anything creates a device array (even `jax.devices()`).
    """
    global _INITIALIZED_BY_US
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode {mode!r}: expected 'auto', 'on' or 'off'")
    cpu_thread_headroom(min_devices=2)  # one process with several CPU devices needs it as well
    if mode == "off":
        return False
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if mode == "auto" and coordinator is None and detect_cluster() is None:
        return False
    if coordinator is not None and detect_cluster() in (None, "env") and (num_processes is None or process_id is None):
        raise ValueError(
            f"--coordinator {coordinator} needs --num-processes and --process-id (or JAX_NUM_PROCESSES and "
            "JAX_PROCESS_ID): every process is started with the same coordinator and count and its own id "
            "0..N-1")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} must be in [0, --num-processes={num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    cpu_thread_headroom()
    kwargs: dict[str, Any] = {}
    if coordinator is not None:
        kwargs["coordinator_address"] = coordinator
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        kwargs["process_id"] = process_id
    if local_device_ids is None and detect_cluster() == "slurm" and not os.environ.get("JAX_LOCAL_DEVICE_IDS"):
        local_device_ids = _slurm_node_gpus()
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        raise RuntimeError(
            f"jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: {e}. "
            "Check that every process got the same coordinator address and process count, that process 0 "
            "runs on the coordinator host, and that its port is reachable from every host "
            "(see docs/scaling.md, 'Troubleshooting hangs')") from e
    _INITIALIZED_BY_US = True
    return jax.process_count() > 1


def _local_cpu_devices() -> int:
    """CPU devices this process will have (jax_num_cpu_devices, XLA_FLAGS'
    --xla_force_host_platform_device_count, or 1)."""
    if jax.config.jax_num_cpu_devices > 0:
        return jax.config.jax_num_cpu_devices
    n = 1
    for flag in os.environ.get("XLA_FLAGS", "").split():
        if flag.startswith("--xla_force_host_platform_device_count="):
            try:
                n = int(flag.split("=", 1)[1])
            except ValueError:
                pass
    return max(n, 1)


def cpu_thread_headroom(min_devices: int = 1) -> None:
    """Gives XLA's CPU client more threads than local devices, before the backend starts.

    The CPU client runs each local device's part of a program on a thread pool of max(cores, local devices)
    threads, and a part that reaches a collective holds its thread until every other part arrives. With as
    many threads as devices, one program's parts blocked in a collective while the next program's parts wait
    for a thread is a deadlock: across processes (seen with 2 processes x 2 devices on 2 cores) and within one
    (seen with 8 CPU devices on 2 cores: an eager reduction after a jitted step waited for ever). XLA sizes
    the pool from NPROC when it is set; a value the user set is kept. `initialize` (which the CLI always
    calls; for one process only with `min_devices=2`) and `set_cpu_devices` call this; a program that makes CPU devices with XLA_FLAGS calls it itself
    before JAX starts its backend (tests/conftest.py does).
    """
    if os.environ.get("NPROC") or os.environ.get("PORTABLE_NPROC"):
        return
    devices = _local_cpu_devices()
    if devices < min_devices:  # one device in one process: no collective, the pool stays as it is
        return
    want = 4 * devices
    if (os.cpu_count() or 1) < want:
        os.environ["NPROC"] = str(want)


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def topology() -> dict[str, Any]:
    """What a checkpoint records about where it was written (compared on restore)."""
    return {"process_count": jax.process_count(), "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(), "platform": jax.devices()[0].platform}


def barrier(name: str) -> None:
    """Waits until every process reaches `name` (no-op with one process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------ rows of a global batch


def _row_sharding(env, shape: Sequence[int]):
    names = ("batch", "length") if len(shape) == 2 else ("batch",) + (None,) * (len(shape) - 1)
    return env.sharding(names[:len(shape)], tuple(shape))


def row_range(sharding, shape: Sequence[int]) -> tuple[int, int]:
    """[start, stop) of dim 0 held by this process's devices; they must form one contiguous block."""
    blocks = set()
    for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
        s = index[0] if index else slice(None)
        blocks.add((s.start or 0, shape[0] if s.stop is None else s.stop))
    blocks = sorted(blocks)
    for (a0, a1), (b0, _) in zip(blocks, blocks[1:]):
        if b0 != a1:
            raise ValueError(f"this process's devices hold rows {blocks} of a batch of {shape[0]}, which are not one "
                             "contiguous block; order the mesh so that each process's devices are adjacent along "
                             "the batch axes (jax.make_mesh does this)")
    return blocks[0][0], blocks[-1][1]


def batch_rows(env, global_rows: int, row_shape: Sequence[int] = ()) -> slice:
    """The rows [start, stop) of a [global_rows, *row_shape] batch that this process feeds (all of them with
    one process, or when the batch axes do not split across processes)."""
    start, stop = row_range(_row_sharding(env, (global_rows, *row_shape)), (global_rows, *row_shape))
    return slice(start, stop)


def data_shard(env, global_rows: int) -> tuple[int, int]:
    """(shard index, shard count) of this process's rows: for `PromptIterator(process_index=, process_count=)`."""
    rows = batch_rows(env, global_rows)
    n = rows.stop - rows.start
    return rows.start // n, global_rows // n


def to_global(env, local: Any, global_rows: int | None = None) -> jax.Array:
    """One global array, rows over the batch axes, from this process's rows (`batch_rows`).

    global_rows: rows of the whole batch (default: local rows x process count, for evenly split batches).
    """
    local = np.asarray(local)
    if not is_multiprocess():
        return jax.device_put(local, _row_sharding(env, local.shape))
    if global_rows is None:
        global_rows = local.shape[0] * jax.process_count()
    shape = (global_rows, *local.shape[1:])
    sharding = _row_sharding(env, shape)
    start, stop = row_range(sharding, shape)
    if stop - start != local.shape[0]:
        raise ValueError(f"this process holds rows [{start}, {stop}) of a batch of {global_rows} but was given "
                         f"{local.shape[0]} rows")
    return jax.make_array_from_process_local_data(sharding, local, shape)


def to_global_tree(env, tree: Any, global_rows: int | None = None) -> Any:
    return jax.tree.map(lambda x: to_global(env, x, global_rows), tree)


def replicated_rows(env, full: Any) -> jax.Array:
    """A global array, rows over the batch axes, from a host array every process holds whole."""
    full = np.asarray(full)
    return jax.device_put(full, _row_sharding(env, full.shape))


def local_rows(x: Any) -> np.ndarray:
    """The rows of a global array held by this process (all rows when fully addressable), in order."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    pieces: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        s = shard.index[0] if shard.index else slice(None)
        pieces.setdefault(s.start or 0, np.asarray(shard.data))
    starts = sorted(pieces)
    return np.concatenate([pieces[s] for s in starts]) if len(starts) > 1 else pieces[starts[0]]


def to_host(x: Any) -> np.ndarray:
    """The whole value of a (global) array on every process; an all-gather when it spans processes."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def process_mean(metrics: dict[str, float]) -> dict[str, float]:
    """Host metrics (the same keys on every process, each over an equal share of rows) averaged over processes."""
    if not is_multiprocess() or not metrics:
        return metrics
    from jax.experimental import multihost_utils
    keys = sorted(metrics)
    values = np.asarray([float(metrics[k]) for k in keys], np.float64)
    mean = np.mean(multihost_utils.process_allgather(values), axis=0)
    return {k: float(v) for k, v in zip(keys, mean)}


def process_sum(value: float | int) -> float:
    """Sum of a host number over processes (each process gives its own)."""
    if not is_multiprocess():
        return value
    from jax.experimental import multihost_utils
    return float(np.sum(multihost_utils.process_allgather(np.asarray(value, np.float64))))


def _host_value(x: jax.Array):
    """A fully addressable array as numpy (PRNG keys as their key data), to be placed anew."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_impl(x), np.asarray(jax.random.key_data(x))
    return None, np.asarray(x)


def place(tree: Any, shardings: Any) -> Any:
    """`jax.device_put(tree, shardings)` that also works across processes for leaves every process holds
    locally with the same value (a key made with jax.random.key, a counter made with jnp.zeros): they are
    placed from host memory. Leaves already on their sharding are left as they are."""
    if not is_multiprocess():
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if isinstance(x, jax.Array) and (x.sharding == sharding or not x.is_fully_addressable
                                         or sharding.is_fully_addressable):
            return jax.device_put(x, sharding)
        if not isinstance(x, jax.Array):
            return jax.device_put(np.asarray(x), sharding)
        impl, value = _host_value(x)
        placed = jax.device_put(value, sharding)
        return placed if impl is None else jax.random.wrap_key_data(placed, impl=impl)
    return jax.tree.map(one, tree, shardings)


def replicated(env, x: Any) -> Any:
    """`x` (the same on every process) replicated over the mesh of `env`."""
    from jax.sharding import NamedSharding, PartitionSpec
    sharding = NamedSharding(env.mesh, PartitionSpec())
    return place(x, jax.tree.map(lambda _: sharding, x))
