"""Generated task examples published as TFDS datasets (array_record) and read back without TensorFlow.

    path = build_task_dataset("arithmetic", {"digits": 2}, data_dir="~/datasets",
                              splits={"train": 100_000, "test": 1_000}, seed=0)
    train = load_task_split(path, "train")                  # or load_task_split("arithmetic", "train", "~/datasets")
    len(train), train[17]                                     # random access: Example

Layout: `{data_dir}/{task}/{config hash}/{version}/` with array_record shards, dataset_info.json,
features.json and metadata.json, i.e. an ordinary TFDS dataset directory:
`tfds.builder_from_directory(path).as_data_source()` reads it, and it can be copied or shared as is.
Each record is one feature "example": the JSON of `Example.to_json()`; order is the task's order.

The config (task name, task kwargs, split sizes, seed, record format) is stored in metadata.json and
hashed into the directory name, so a different config never reuses an old dataset, and building
again with the same arguments finds (or, on another machine, regenerates byte-identically) the same
data. `version` is the place to record a change in a task's code that keeps its kwargs.

TensorFlow is not needed: tensorflow-datasets 4.9.10 builds a `GeneratorBasedBuilder` with
file_format="array_record" and reads it with `as_data_source` on numpy alone. With several hosts,
build on process 0 and call `load_task_split` on all after a barrier.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from jaxrl_llm.records import DataError
from jaxrl_llm.tasks.base import Example, get_task

log = logging.getLogger(__name__)

RECORD_FORMAT = "jaxrl_llm.Example/json-v1"  # bump when the record encoding changes
_FEATURE = "example"


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def dataset_name(task_name: str) -> str:
    """The TFDS dataset name for a task: lowercase letters, digits and underscores, starting with a letter."""
    name = re.sub(r"\W+", "_", task_name.lower()).strip("_")
    return name if re.match(r"[a-z]", name) else f"task_{name}"


def task_config(task_name: str, task_kwargs: Mapping[str, Any] | None, splits: Mapping[str, int], seed: int) -> dict:
    """Everything that determines a dataset's records; hashed into its directory name."""
    config = {"task": task_name, "task_kwargs": dict(task_kwargs or {}), "splits": dict(splits), "seed": seed,
              "format": RECORD_FORMAT}
    try:
        return json.loads(_canonical(config))  # as stored: tuples become lists
    except TypeError as e:
        raise ValueError(f"task_kwargs {task_kwargs!r} must be JSON-serialisable (numbers, strings, lists, dicts) "
                         f"to be recorded with the dataset: {e}") from None


def config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical(config).encode()).hexdigest()[:16]


def _serialise(example: Example, split: str, i: int) -> str:
    if not isinstance(example, Example):
        raise TypeError(f"split {split!r} item {i} is {type(example).__name__}, not an Example")
    try:
        return json.dumps(example.to_json(), ensure_ascii=False)
    except TypeError as e:  # e.g. numpy scalars in meta
        raise ValueError(f"split {split!r} example {i}: meta is not JSON-serialisable ({e}); store plain "
                         "numbers, strings, lists and dicts in Example.meta") from None


def _make_builder(name: str, version: str, config: dict, examples: Mapping[str, list[Example]], data_dir: str):
    import tensorflow_datasets as tfds

    class _TaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)
        # No checksums file to find next to the code. Also avoids TFDS's code-path lookup, which imports
        # `importlib_resources` (an etils[epath] extra that is often not installed) for builders in packages.
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, description=f"Examples of the jaxrl_llm task {config['task']!r}; the config that "
                                          "generated them is in metadata.json.",
                features=tfds.features.FeaturesDict({_FEATURE: tfds.features.Text()}),
                metadata=tfds.core.MetadataDict(config), disable_shuffling=True)  # keep the task's order

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in examples}

        def _generate_examples(self, split):
            for i, ex in enumerate(examples[split]):
                yield i, {_FEATURE: _serialise(ex, split, i)}

    _TaskBuilder.name = name
    builder_config = tfds.core.BuilderConfig(name=config_hash(config), description=_canonical(config))
    return _TaskBuilder(data_dir=data_dir, config=builder_config, file_format="array_record")


def _stored_config(path: pathlib.Path) -> dict:
    try:
        return json.loads((path / "metadata.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: no readable metadata.json ({e}); not a dataset written by "
                        "build_task_dataset") from None


def build_task_dataset(task_name: str, task_kwargs: Mapping[str, Any] | None = None, *,
                       data_dir: str | pathlib.Path, splits: Mapping[str, int], seed: int = 0,
                       version: str = "1.0.0", overwrite: bool = False) -> pathlib.Path:
    """Generates `task.examples(split, n, seed)` for each split and writes a TFDS dataset; returns its directory.

    An existing dataset with the same config and version is reused (overwrite=True regenerates it).
    """
    if not re.fullmatch(r"\d+\.\d+\.\d+", version):
        raise ValueError(f"version must look like '1.0.0' (TFDS versions are major.minor.patch), got {version!r}")
    if not splits or any(not isinstance(n, int) or n < 1 for n in splits.values()):
        raise ValueError(f"splits must map split names to positive example counts, got {dict(splits)!r}")
    config = task_config(task_name, task_kwargs, splits, seed)
    data_dir = pathlib.Path(data_dir).expanduser()
    path = data_dir / dataset_name(task_name) / config_hash(config) / version
    if (path / "dataset_info.json").exists():
        if _stored_config(path) != config:
            raise DataError(f"{path}: holds a dataset for config {_stored_config(path)}, not {config}; "
                            "remove the directory or pass overwrite=True")
        if not overwrite:
            log.info("reusing task dataset %s", path)
            return path
        shutil.rmtree(path)

    task = get_task(task_name, **(task_kwargs or {}))
    examples = {}
    for split, n in splits.items():
        examples[split] = list(task.examples(split, n, seed))
        if len(examples[split]) > n:
            raise ValueError(f"task {task_name!r} returned {len(examples[split])} examples for split {split!r}; "
                             f"asked for {n}")
        if not examples[split]:
            raise DataError(f"task {task_name!r} returned no examples for split {split!r}")
    builder = _make_builder(dataset_name(task_name), version, config, examples, str(data_dir))
    with tempfile.TemporaryDirectory() as downloads:  # nothing is downloaded; keep TFDS's folder out of data_dir
        builder.download_and_prepare(download_dir=downloads)
    assert pathlib.Path(builder.data_dir) == path, (builder.data_dir, path)
    return path


class TaskSource(Sequence):
    """Random access to one split of a task dataset: `source[i] -> Example`, `len(source)`.

    config: the stored config (task, task_kwargs, splits, seed, format); path: the dataset directory.
    """

    def __init__(self, data_source, path: pathlib.Path, split: str, config: dict):
        self._source, self.path, self.split, self.config = data_source, path, split, config

    def __len__(self) -> int:
        return len(self._source)

    @staticmethod
    def _decode(record: Mapping[str, Any]) -> Example:
        return Example.from_json(json.loads(record[_FEATURE]))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.__getitems__(range(*i.indices(len(self))))
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for split {self.split!r} of {n} examples")
        return self._decode(self._source[int(i) % n])

    def __getitems__(self, indices: Sequence[int]) -> list[Example]:
        """Several examples in one read (what the iterator uses)."""
        return [self._decode(r) for r in self._source.__getitems__([int(i) for i in indices])]

    def __repr__(self) -> str:
        return f"TaskSource({str(self.path)!r}, split={self.split!r}, len={len(self)})"


def _find(task_name: str, data_dir: pathlib.Path, want: Mapping[str, Any]) -> pathlib.Path:
    root = data_dir / dataset_name(task_name)
    found = sorted(p.parent for p in root.glob("*/*/dataset_info.json"))
    configs = {p: {**_stored_config(p), "version": p.name} for p in found}
    match = [p for p, c in configs.items() if all(c.get(k) == v for k, v in want.items())]
    if len(match) == 1:
        return match[0]
    listing = "\n".join(f"  {p}: {c}" for p, c in configs.items()) or "  (none)"
    if not match:
        raise DataError(f"no dataset of task {task_name!r} under {root} matches {dict(want)}; found:\n{listing}\n"
                        "build it with build_task_dataset(...)")
    raise DataError(f"{len(match)} datasets of task {task_name!r} under {root} match {dict(want)}:\n{listing}\n"
                    "pass task_kwargs / seed / splits / version, or the dataset directory itself")


def load_task_split(task_or_dir: str | pathlib.Path, split: str, data_dir: str | pathlib.Path | None = None, *,
                    task_kwargs: Mapping[str, Any] | None = None, seed: int | None = None,
                    splits: Mapping[str, int] | None = None, version: str | None = None) -> TaskSource:
    """One split of a task dataset, read with `as_data_source` (random access, no TensorFlow).

    task_or_dir: a dataset directory (what build_task_dataset returned), or a task name looked up under
    data_dir; with several configs of that task there, the given task_kwargs / seed / splits / version
    must single one out.
    """
    import tensorflow_datasets as tfds

    path = pathlib.Path(task_or_dir).expanduser()
    if not (path / "dataset_info.json").is_file():
        if data_dir is None:
            raise DataError(f"{str(task_or_dir)!r} is not a dataset directory (no dataset_info.json); pass the "
                            "directory build_task_dataset returned, or a task name and data_dir")
        want = {k: v for k, v in (("task_kwargs", task_kwargs and dict(task_kwargs)), ("seed", seed),
                                  ("splits", splits and dict(splits)), ("version", version)) if v is not None}
        path = _find(str(task_or_dir), pathlib.Path(data_dir).expanduser(), want)
    config = _stored_config(path)
    if config.get("format") != RECORD_FORMAT:
        raise DataError(f"{path}: record format {config.get('format')!r}, this code reads {RECORD_FORMAT!r}; "
                        "rebuild the dataset")
    builder = tfds.builder_from_directory(str(path))
    if split not in builder.info.splits:
        raise DataError(f"{path}: no split {split!r}; it has {sorted(builder.info.splits)}")
    return TaskSource(builder.as_data_source(split=split), path, split, config)
