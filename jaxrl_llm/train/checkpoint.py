"""Checkpoints that resume a run exactly: pytrees of (sharded) arrays plus a JSON dict, written by orbax.

    ckpt = Checkpointer(run_dir / "checkpoints", max_to_keep=3, save_every=100)
    restored = ckpt.restore_latest(abstract_like(state_tree))      # None on a fresh run
    if restored: start, tree, meta = restored; iterator.restore(meta["data"]) ...
    for step in range(start, total):
        ...                                                           # donated, jitted update
        if ckpt.should_save(step + 1):
            ckpt.save(step + 1, {"params": ..., "opt_state": ...}, {"data": iterator.state(), ...})
    ckpt.close()

One checkpoint is a step directory holding two orbax items: "state" (`StandardSave`: tensorstore/OCDBT
arrays, no pickle) and "meta" (`JsonSave`). What this module adds to `ocp.CheckpointManager`:

* Donation safety. `save` returns once orbax has copied every array to host memory (its default,
  synchronous device-to-host transfer; no `save_device_host_concurrent_gb` limit is set, which would
  make transfers lazy), so the caller may donate the buffers to the next step at once; the files are
  written by a background thread.
* Only complete checkpoints count. Orbax writes `<step>.orbax-checkpoint-tmp` and renames it when every
  file is written (on GCS it writes a commit file instead); a process killed mid-write leaves the
  temporary directory, which is never listed and is removed when the next `Checkpointer` opens the
  directory. The step being written in the background is not reported by `latest_step` either.
  Old checkpoints are first renamed into `_to_delete/` (atomic) and removed from there, so a kill
  while pruning never leaves a half-deleted step directory that looks complete.
* A checkpoint of another structure (another model config, optimiser, or a missing `ref_params`) is
  refused before reading any array, with the mismatching paths, shapes and dtypes in the message.

Multi-process: every process calls every method with the same arguments (save is collective);
orbax decides who writes what. See docs/checkpoints.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxrl_llm.errors import ResumeError
from jaxrl_llm.train.signals import finish_first

STATE, META = "state", "meta"
TRASH = "_to_delete"  # orbax renames pruned steps here (todelete_subdir); we delete them


class CheckpointError(ResumeError):
    """A checkpoint cannot be written or restored as asked (missing step, other structure, bad meta)."""


def abstract_like(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct` (shape, dtype and sharding) for every array leaf of `tree`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    """Saves and restores `{name: pytree of arrays}` + a JSON-able meta dict at integer steps.

    directory: local path or gs://...; created if missing.
    max_to_keep: newest complete checkpoints kept (None: all).
    save_every: `should_save(step)` is `step % save_every == 0`; `save` skips other steps unless force.
    async_save: write files in a background thread (`save` returns after the device-to-host copy).
    before_commit: called in the writing thread after every file is written and before the checkpoint
        is made visible (renamed). For tests that kill a run mid-write; needs async_save.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3, save_every: int = 1,
                 async_save: bool = True, before_commit: Callable[[], None] | None = None):
        if not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"save_every={save_every!r} must be an int >= 1")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep!r} must be >= 1 (or None to keep every checkpoint)")
        if before_commit is not None and not async_save:
            raise ValueError("before_commit needs async_save=True (orbax runs it in the writing thread)")
        text = os.fspath(directory)
        self.directory = epath.Path(text if "://" in text else os.path.abspath(text))
        self.save_every, self.async_save = save_every, async_save
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # temporary dirs of writes killed midway
            todelete_subdir=TRASH,
            create=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=before_commit) if before_commit else None,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()})
        self._in_flight: int | None = None  # step whose files the background thread is still writing
        self._purge_trash()

    # ------------------------------------------------------------------ listing

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first (a step still being written is left out)."""
        if self._in_flight is not None and not self._manager.is_saving_in_progress():
            self._in_flight = None
        if self._in_flight is None:
            self._manager.reload()  # what is on disk, after a failed write or another writer
        return sorted(s for s in self._manager.all_steps() if s != self._in_flight)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0

    # ------------------------------------------------------------------ save

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any] | None = None,
             *, force: bool = False) -> bool:
        """Starts writing checkpoint `step`; returns False (and writes nothing) when it is not a save step.

        state: {name: pytree of jax/numpy arrays}, e.g. {"params": ..., "opt_state": ...}.
        meta: JSON-able dict (iterator state, counters, config hash); identical on every process.
        When this returns, the arrays have been copied to host: they may be donated right away.
        A previous write still in flight is waited for first.
        """
        if not (force or self.should_save(step)):
            return False
        if not isinstance(state, dict) or not state:
            raise CheckpointError(f"checkpoint state must be a non-empty dict of pytrees, got {type(state).__name__}")
        meta = {} if meta is None else meta
        text = _meta_json(meta)
        if jax.process_count() > 1:  # only the primary process writes the JSON: all must agree on it
            from jax.experimental import multihost_utils
            digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
            multihost_utils.assert_equal(digest, f"checkpoint meta of step {step} differs between processes; "
                                                 "keep per-process values (e.g. process_index) out of meta")
        if step in self._manager.all_steps():
            raise CheckpointError(f"a checkpoint for step {step} already exists in {self.directory}; resume from "
                                  f"the latest step ({self.latest_step()}) or write to a new directory")
        # A second Ctrl-C must not cut this call short: orbax's writer threads would wait for ever for what it
        # had not done yet (a third one still does; `jaxrl-llm` then ends with os._exit, see errors.Interrupted).
        with finish_first(f"checkpoint {step} has been handed to its writer"):
            self._manager.save(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                                                META: ocp.args.JsonSave(meta)}), force=True)
            if self.async_save:
                self._in_flight = step
        self._purge_trash()
        return True

    def wait(self) -> None:
        """Blocks until the write in flight (if any) is complete and visible."""
        self._manager.wait_until_finished()
        self._in_flight = None

    def close(self) -> None:
        self._manager.close()
        self._in_flight = None
        self._purge_trash()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ restore

    def restore(self, step: int, abstract_state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state, meta) of checkpoint `step`, arrays placed as `abstract_state` says.

        abstract_state: the state's pytree of `jax.ShapeDtypeStruct` with `.sharding` (see `abstract_like`;
            arrays are accepted too). Each array is read directly into its sharding. A leaf without a
            sharding goes to the first local device.
        """
        steps = self.all_steps()
        if step not in steps:
            raise CheckpointError(f"no complete checkpoint for step {step} in {self.directory}; complete steps: "
                                  f"{steps or 'none'}")
        abstract = jax.tree.map(_as_abstract, abstract_state)
        self._check_structure(step, abstract)
        out = self._manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract),
                                                                     META: ocp.args.JsonRestore()}))
        return out[STATE], out[META]

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON meta of checkpoint `step` alone (no array is read)."""
        steps = self.all_steps()
        if step not in steps:
            raise CheckpointError(f"no complete checkpoint for step {step} in {self.directory}; complete steps: "
                                  f"{steps or 'none'}")
        return self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]

    def restore_latest(self, abstract_state: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
        """(step, state, meta) of the latest complete checkpoint, or None when there is none."""
        step = self.latest_step()
        if step is None:
            return None
        return (step, *self.restore(step, abstract_state))

    def _check_structure(self, step: int, abstract: Any) -> None:
        saved_md = self._manager.item_metadata(step)[STATE]
        saved = _flat(getattr(saved_md, "tree", saved_md))
        wanted = _flat(abstract)
        missing = [k for k in wanted if k not in saved]
        extra = [k for k in saved if k not in wanted]
        diff = []
        for k in wanted.keys() & saved.keys():
            s_shape, s_dtype = tuple(getattr(saved[k], "shape", ())), getattr(saved[k], "dtype", None)
            w = wanted[k]
            if s_shape != tuple(w.shape) or (s_dtype is not None and np.dtype(s_dtype) != np.dtype(w.dtype)):
                diff.append(f"{k}: saved {np.dtype(s_dtype).name if s_dtype is not None else '?'}{list(s_shape)}, "
                            f"expected {np.dtype(w.dtype).name}{list(w.shape)}")
        if not (missing or extra or diff):
            return
        parts = []
        for title, items in (("not in the checkpoint", missing), ("in the checkpoint but not expected", extra),
                             ("different shape/dtype", sorted(diff))):
            if items:
                shown = "\n    ".join(items[:12]) + (f"\n    ... and {len(items) - 12} more" if len(items) > 12 else "")
                parts.append(f"  {title} ({len(items)}):\n    {shown}")
        raise CheckpointError(
            f"checkpoint {self.directory / str(step)} does not match the state to restore into:\n"
            + "\n".join(parts) + "\nIt was written by a run with another model/optimiser config or state layout; "
            "resume with the same config, or start in a new directory.")

    def _purge_trash(self) -> None:
        trash = self.directory / TRASH
        if jax.process_index() != 0 or not trash.exists():
            return
        for p in trash.iterdir():  # complete renames only: a rename is atomic
            try:
                p.rmtree()
            except OSError:  # a concurrent purge got it first
                pass


def _meta_json(meta: Any) -> str:
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint meta must be a dict, got {type(meta).__name__}")
    try:
        return json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint meta is not JSON-able ({e}); store plain numbers, strings, lists and "
                              "dicts (convert arrays with .tolist(), numpy scalars with int()/float())") from None


def _as_abstract(x: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flat(tree: Any) -> dict[str, Any]:
    """{"opt_state/1/0/mu/w": leaf}: one path spelling for pytrees and for orbax's metadata trees, in which
    tuples are lists, namedtuples are dicts and empty nodes are absent."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}
