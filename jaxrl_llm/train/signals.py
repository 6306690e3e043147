"""Stopping a run cleanly: Ctrl-C (SIGINT) and SIGTERM ask the training loop to stop after the step it is
in, save a checkpoint there and end with `errors.Interrupted` saying where to resume from; a second Ctrl-C
stops at once (the last complete checkpoint is what a resume starts from), except that it lets a section
marked `finish_first` (a checkpoint being handed to its writer) end first; a third Ctrl-C cuts that short too.

    with StopRequests() as stop:       # installs the handlers (main thread only), restores them on exit
        ...
        if stop.now(step):            # every process agrees (on log steps when there are several)
            save; raise stop.error("at stage 'rl' step 37 ...")
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from jaxrl_llm.errors import Interrupted
from jaxrl_llm.sharding import multihost

SIGNALS = (signal.SIGINT, signal.SIGTERM)
NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class _Section:
    """The main thread's `finish_first` section: how deep, what it does, and whether a Ctrl-C waits for it."""

    depth = 0
    what = ""
    held = False


@contextlib.contextmanager
def finish_first(what: str):
    """A second Ctrl-C (the one that stops at once) that comes while the body runs is held until the body has
    ended and raised then (KeyboardInterrupt): the body is never cut short by it. For work that must not stop
    half done, e.g. handing a checkpoint to orbax, whose writer threads would otherwise wait for ever for
    signals the save had not sent yet (and Python's exit waits for them). A third Ctrl-C raises at once.
    `what` finishes the line printed when a Ctrl-C is held ("stopping at once when <what> ..."). A body that
    raises ends the section with its own exception (a held Ctrl-C is dropped: the run stops either way).
    Outside the main thread, or with no StopRequests installed, it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _Section.depth += 1
    outer, _Section.what = _Section.what, _Section.what or what
    try:
        yield
    finally:
        _Section.depth -= 1
        _Section.what = outer
        held = _Section.held and not _Section.depth
        if not _Section.depth:
            _Section.held = False
    if held:
        raise KeyboardInterrupt


class StopRequests:
    """The stop signals a run received; the first asks for a clean stop, a second Ctrl-C raises at once."""

    def __init__(self, every: int = 1):
        self.signum: int | None = None
        self.every = max(int(every), 1)  # with several processes: agree every `every` steps (log steps)
        self._previous: dict[int, object] = {}
        self._unraisable = None

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
            self._unraisable, sys.unraisablehook = sys.unraisablehook, self._quiet_unraisable
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        if self._unraisable is not None:
            sys.unraisablehook, self._unraisable = self._unraisable, None

    def _quiet_unraisable(self, info) -> None:
        """A second Ctrl-C that lands in a callback Python cannot raise from (a garbage-collector hook, a
        __del__) is dropped by the interpreter with a traceback on stderr; the stop is already requested,
        so the run stops after this step with its checkpoint and the one line, without that traceback."""
        if issubclass(info.exc_type, KeyboardInterrupt) and self.signum is not None:
            return
        (self._unraisable or sys.__unraisablehook__)(info)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            if _Section.depth and not _Section.held:  # the second Ctrl-C in a finish_first section: after it
                _Section.held = True
                print(f"\nCtrl-C again: stopping at once when {_Section.what} (Ctrl-C once more to cut it short)",
                      file=sys.stderr, flush=True)
                return
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.signum is None:
            print(f"\n{NAMES.get(signum, signum)}: stopping after this step and saving a checkpoint "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def now(self, step: int) -> bool:
        """Whether to stop after `step`: this process's flag alone, or with several processes every
        `every` steps whether any process got a signal (all of them take the same decision)."""
        if not multihost.is_multiprocess():
            return self.requested
        if step % self.every:
            return False
        return multihost.process_sum(1.0 if self.requested else 0.0) > 0

    def error(self, where: str) -> Interrupted:
        """Interrupted("stopped by <the signal> <where>"), exiting with 128 + the signal's number."""
        e = Interrupted(f"stopped by {NAMES.get(self.signum, 'a signal')} {where}")
        e.exit_code = 128 + int(self.signum or signal.SIGINT)  # 130 for SIGINT, 143 for SIGTERM, as shells do
        return e
