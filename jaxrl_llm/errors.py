"""The errors a user can cause, one class per kind, each with its own exit code of the `jaxrl-llm` command.

Every class derives from `UserError`; the CLI prints such an error as one `error: ...` line (its message
says what is wrong, where — file:line or config key — and how to fix it) and exits with the class's
`exit_code`. Anything else is an internal error and keeps its traceback. `--debug` (or JAXRL_LLM_DEBUG=1)
shows the traceback of a user error too.

Each class also derives from the builtin exception that code catching the old errors expects
(`ValueError`, `FileNotFoundError`, `KeyError`), so catching those still works.

This module is the bottom layer of the package: it imports nothing of it.
"""

from __future__ import annotations

import errno

# What says "the disk is full": an OSError's errno, or (where a library wraps it, as tensorstore does) its text.
FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_DISK_TEXT = ("No space left on device", "Disk quota exceeded")


class UserError(Exception):
    """A mistake in what the user gave (config, data, model, task, mesh, run directory); not a bug."""

    exit_code = 2
    kind = "error"

    def __str__(self) -> str:  # KeyError quotes its message; ours are sentences
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ConfigError(UserError, ValueError):
    """A config, an experiment file, an override or a command-line flag is wrong."""

    exit_code = 2


class DataError(UserError, ValueError):
    """A dataset file or record is malformed; the message names the file, line/row and field."""

    exit_code = 3


class ModelError(UserError, ValueError):
    """A model directory, its config.json, weights or tokenizer cannot be used (missing, truncated, mismatched,
    unsupported architecture)."""

    exit_code = 4


class ModelNotFoundError(ModelError, FileNotFoundError):
    """A model or tokenizer path, or a file it needs, does not exist."""


class ModelPresetError(ModelError, KeyError):
    """An unknown model preset name (config.model.preset, --model)."""


class TaskError(UserError, KeyError):
    """An unknown task name, or task arguments the task does not accept."""

    exit_code = 5


class MeshError(UserError, ValueError):
    """A device mesh that cannot be built on the devices there are (sizes that do not divide them)."""

    exit_code = 6


class ResumeError(UserError, ValueError):
    """A run directory or checkpoint that cannot be resumed as asked (another config, structure or topology)."""

    exit_code = 7


class RunDirBusyError(UserError, RuntimeError):
    """Another live process holds the run directory's lock."""

    exit_code = 8


class RewardFailureError(UserError, RuntimeError):
    """Every call of the reward function failed: the run learned nothing."""

    exit_code = 9


class DivergedError(UserError, RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""

    exit_code = 10


class StorageError(UserError, OSError):
    """The run directory's disk is full (or not writable); the previous checkpoint is intact."""

    exit_code = 11


class Interrupted(UserError):
    """The run stopped on Ctrl-C or SIGTERM (after saving a checkpoint when it could).

    `at_once` is True after a second Ctrl-C: the run did not wait for its step to end. A second Ctrl-C waits
    for a checkpoint being handed to its writer (`train.signals.finish_first`), a third does not, and a save
    cut short leaves the writer's background threads waiting for ever (Python's exit joins them), so the
    process should end with `os._exit` once the error is reported, as `jaxrl-llm` does; what was being written
    stays a temporary directory that a resume ignores, as after SIGKILL."""

    exit_code = 130
    at_once = False


EXIT_CODES = {cls.__name__: cls.exit_code for cls in (
    ConfigError, DataError, ModelError, TaskError, MeshError, ResumeError, RunDirBusyError, RewardFailureError,
    DivergedError, StorageError, Interrupted)}
