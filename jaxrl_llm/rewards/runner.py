"""HostRewardRunner: calls host-side reward terms in chunks, each call with a time limit.

    with HostRewardRunner(combine(task, ("format", fmt, 0.5)), timeout_s=10, batch_size=64) as runner:
        out = runner(inputs)          # RewardOutput; out.errors / out.timeouts count failed calls per term

The time limit is per term and per chunk: a combined reward is split into
its terms, the batch into chunks of `batch_size` rows, and every (term,
chunk) call runs on its own worker with `timeout_s` from the moment it is
handed to the worker (queueing and worker start-up do not count). Calls run
concurrently, up to `num_workers` at a time. A call that raises, returns
something other than one finite float per row, or runs out of time fails:

* on_error="score": its rows get `error_score` for that term (unweighted; the
  term's weight still applies; a failed task term also makes `correct`
  False there), the failure is counted in RewardOutput.errors / .timeouts
  (and so in metrics() as reward/errors/<term>), and the first failure of
  each kind per term is logged with its traceback.
* on_error="abort": a RewardError naming the term, the exception with the
  reward function's traceback (or the time limit), and how to change this.

isolation="thread" runs calls in daemon threads. Python cannot stop a
thread: a timed-out call is abandoned (its result is dropped when it comes)
and keeps its CPU until it returns, and a new thread replaces it. Pure-Python
rewards share the GIL, so threads help only rewards that wait (I/O, C code).

isolation="process" runs calls in worker processes started with the "spawn"
(default) or "forkserver" method, never "fork": the parent runs JAX's
threads, and forking a threaded process can deadlock. A timed-out worker is
terminated and replaced. The terms must pickle (top-level functions, module
level classes, Tasks, the shaping terms); the pool is persistent, each
worker unpickles the terms once, and a call costs a pickle of its chunk.
Close the runner (close() or `with`) to stop the workers.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import queue
import signal
import threading
import time
from typing import Any, Callable

import numpy as np

from jaxrl_llm.rewards.combine import (CombinedReward, RewardError, Term, TermValue, _as_term, check, execute,
                                       failure_message)
from jaxrl_llm.tasks.base import RewardInputs, RewardOutput

log = logging.getLogger(__name__)
_call_ids = itertools.count()


class _ThreadPool:
    """Daemon worker threads fed through per-worker inboxes; results come back on one queue."""

    def __init__(self, fns: list[Callable], max_workers: int):
        self._fns, self._max = fns, max_workers
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._idle: list[queue.SimpleQueue] = []
        self._busy: dict[int, queue.SimpleQueue] = {}

    def _loop(self, inbox: queue.SimpleQueue):
        while (msg := inbox.get()) is not None:
            call_id, fn, inputs = msg
            self._results.put((call_id, execute(fn, inputs)))

    def prepare(self, n_pending: int):
        pass

    def try_submit(self, call_id: int, term: int, inputs: RewardInputs) -> bool:
        if self._idle:
            inbox = self._idle.pop()
        elif len(self._busy) < self._max:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._loop, args=(inbox,), daemon=True, name="reward-worker").start()
        else:
            return False
        self._busy[call_id] = inbox
        inbox.put((call_id, self._fns[term], inputs))
        return True

    def wait(self, timeout: float | None) -> list[tuple[int, tuple]]:
        try:
            items = [self._results.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._results.get_nowait())
            except queue.Empty:
                break
        events = []
        for call_id, outcome in items:
            inbox = self._busy.pop(call_id, None)
            if inbox is not None:  # else: the late result of an abandoned call
                self._idle.append(inbox)
                events.append((call_id, outcome))
        return events

    def abandon(self, call_id: int):
        inbox = self._busy.pop(call_id, None)
        if inbox is not None:
            inbox.put(None)  # the thread exits once the abandoned call returns

    def close(self):
        for inbox in self._idle + list(self._busy.values()):
            inbox.put(None)
        self._idle, self._busy = [], {}


def _process_worker(conn, blobs: list[bytes]):
    """Worker process: unpickle the terms once, then answer (call_id, term, inputs) messages."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    fns = []
    for i, blob in enumerate(blobs):
        try:
            fns.append(pickle.loads(blob))
        except BaseException as e:  # noqa: BLE001  (reported to the parent, which raises)
            import traceback
            conn.send(("load_failed", i, f"{type(e).__name__}: {e}", traceback.format_exc()))
            return
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        call_id, term, inputs = msg
        outcome = execute(fns[term], inputs)
        try:
            conn.send(("result", call_id, outcome))
        except Exception as e:  # noqa: BLE001
            conn.send(("result", call_id, ("bad", f"a value that cannot be sent back from the worker ({e})")))


class _Worker:
    def __init__(self, ctx, blobs: list[bytes], start_timeout_s: float):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_process_worker, args=(child, blobs), daemon=True, name="reward-worker")
        self.proc.start()
        child.close()  # so that our end sees EOF when the worker dies
        self.state, self.call_id = "starting", None
        self.start_deadline = time.monotonic() + start_timeout_s

    def stop(self, grace_s: float = 0.0):
        if grace_s and self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(grace_s)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(1.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(1.0)
        self.conn.close()


class _ProcessPool:
    def __init__(self, terms: list[Term], max_workers: int, start_method: str, start_timeout_s: float):
        self._blobs = [pickle.dumps(t.fn) for t in terms]  # picklability was checked by the runner
        self._names = [t.name for t in terms]
        self._ctx = mp.get_context(start_method)
        self._max, self._start_timeout_s = max_workers, start_timeout_s
        self._workers: list[_Worker] = []

    def prepare(self, n_pending: int):
        """Starts workers for pending calls that no idle or starting worker will take."""
        spare = sum(w.state in ("idle", "starting") for w in self._workers)
        for _ in range(min(n_pending - spare, self._max - len(self._workers))):
            self._workers.append(_Worker(self._ctx, self._blobs, self._start_timeout_s))

    def try_submit(self, call_id: int, term: int, inputs: RewardInputs) -> bool:
        w = next((w for w in self._workers if w.state == "idle"), None)
        if w is None:
            return False
        w.conn.send((call_id, term, inputs))
        w.state, w.call_id = "busy", call_id
        return True

    def _fatal(self, w: _Worker, msg: str):
        self._workers.remove(w)
        w.stop()
        raise RewardError(msg)

    def wait(self, timeout: float | None) -> list[tuple[int, tuple]]:
        active = [w for w in self._workers if w.state != "idle"]
        starts = [w.start_deadline for w in active if w.state == "starting"]
        if starts:
            left = max(0.0, min(starts) - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        ready = mp.connection.wait([w.conn for w in active], timeout)
        events = []
        for w in active:
            if w.conn not in ready:
                if w.state == "starting" and time.monotonic() >= w.start_deadline:
                    self._fatal(w, f"a reward worker process did not start within {self._start_timeout_s} s "
                                   f"(importing the reward functions' modules?); raise start_timeout_s")
                continue
            try:
                msg = w.conn.recv()
            except (EOFError, OSError):
                w.proc.join(1.0)
                code = w.proc.exitcode
                if w.state == "starting":
                    self._fatal(w, f"a reward worker process exited with code {code} while starting (its error "
                                   f"is printed above). With the spawn/forkserver start methods each worker "
                                   f"imports the main script: a script that runs a process-isolated reward at "
                                   f"import time needs an `if __name__ == '__main__':` guard.")
                self._replace(w)
                why = "(no traceback: the process ended without raising: a crash in C code, os._exit, the OOM killer)"
                events.append((w.call_id, ("error", f"the worker process died (exit code {code})", why)))
                continue
            if msg[0] == "ready":
                w.state = "idle"
            elif msg[0] == "load_failed":
                self._fatal(w, f"reward term {self._names[msg[1]]!r} could not be loaded in the worker process: "
                               f"{msg[2]}\n{msg[3].rstrip()}\nWith isolation='process' the function is imported "
                               f"by reference: define it in an importable module (not in a notebook or an "
                               f"interactive session), or use isolation='thread'.")
            elif msg[1] == w.call_id:
                w.state, w.call_id = "idle", None
                events.append((msg[1], msg[2]))
        return events

    def abandon(self, call_id: int):
        for w in self._workers:
            if w.call_id == call_id:
                self._replace(w)
                return

    def _replace(self, w: _Worker):
        """Stops w (mid-call: it is killed) and starts its successor now, so the next call finds it warm."""
        self._workers.remove(w)
        w.stop()
        self._workers.append(_Worker(self._ctx, self._blobs, self._start_timeout_s))

    def close(self):
        for w in self._workers:
            w.stop(grace_s=1.0 if w.state == "idle" else 0.0)
        self._workers = []


def _picklable(term: Term):
    try:
        pickle.dumps(term.fn)
    except Exception as e:  # noqa: BLE001  (pickle raises several types)
        code = getattr(term.fn, "__code__", None)
        where = f" (defined at {code.co_filename}:{code.co_firstlineno})" if code else ""
        raise TypeError(
            f"isolation='process' needs picklable reward terms, but term {term.name!r} = {term.fn!r}{where} "
            f"cannot be pickled: {type(e).__name__}: {e}. Lambdas, closures and functions defined inside "
            f"other functions cannot be sent to a worker process: define the function at the top level of a "
            f"module (or use a module-level class with __call__, or functools.partial of a top-level "
            f"function), or use isolation='thread'.") from None


class HostRewardRunner:
    """Runs a reward (a combine() result, a Task, or a RewardFn) with time limits; see the module docstring.

    reward: combine(...) result, Task, or function RewardInputs -> float [B] (or -> RewardOutput).
    timeout_s: limit per (term, chunk) call, None for none. error_score: a failed term's value.
    batch_size: rows per chunk (None: the whole batch in one call per term).
    num_workers: concurrent calls (default: min(32, cpus + 4) threads, min(4, cpus) processes).
    start_method: "spawn" or "forkserver" for isolation="process".
    """

    def __init__(self, reward: Any, timeout_s: float | None = 30.0, on_error: str = "score",
                 error_score: float = 0.0, isolation: str = "thread", batch_size: int | None = None,
                 num_workers: int | None = None, start_method: str = "spawn", start_timeout_s: float = 120.0):
        self.check_options(timeout_s, on_error, error_score)
        if isolation not in ("thread", "process"):
            raise ValueError(f"isolation={isolation!r}; expected 'thread' or 'process'")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(f"start_method={start_method!r}; expected 'spawn' or 'forkserver' ('fork' is "
                             f"unsafe: the parent process runs JAX threads)")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; expected a positive number of rows or None")
        self.reward = reward if isinstance(reward, CombinedReward) else CombinedReward([_as_term(reward)])
        self.timeout_s, self.on_error, self.error_score = timeout_s, on_error, float(error_score)
        self.isolation, self.batch_size = isolation, batch_size
        terms = self.reward.terms
        cpus = os.cpu_count() or 1
        if isolation == "thread":
            self._pool = _ThreadPool([t.fn for t in terms], num_workers or min(32, cpus + 4))
        else:
            for t in terms:
                _picklable(t)
            self._pool = _ProcessPool(terms, num_workers or min(4, cpus), start_method, start_timeout_s)
        self._logged: set[tuple[str, str]] = set()
        self.last_calls = self.last_failed = 0   # (term, chunk) calls of the last batch, and how many failed
        self.last_failure: str | None = None     # the message of the last batch's first failure

    @staticmethod
    def check_options(timeout_s: float | None, on_error: str, error_score: float) -> None:
        """Raises ValueError naming the option (timeout_s=..., on_error=..., error_score=...) that is invalid."""
        if on_error not in ("score", "abort"):
            raise ValueError(f"on_error={on_error!r}; expected 'score' (failed terms get error_score and "
                             f"are counted) or 'abort' (raise RewardError)")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s}; expected a positive number of seconds or None")
        if not math.isfinite(error_score):
            raise ValueError(f"error_score={error_score} must be finite")

    def __enter__(self) -> "HostRewardRunner":
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Stops the workers (idle processes exit, busy ones are terminated; abandoned threads are left)."""
        self._pool.close()

    def __del__(self):
        try:
            self._pool.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass

    def _fail(self, term: Term, kind: str, msg: str, counts: dict[str, int]) -> None:
        self.last_failed += 1
        if self.last_failure is None:
            self.last_failure = msg
        if self.on_error == "abort":
            raise RewardError(f"{msg}\n\nThe runner has on_error='abort'. To give such completions "
                              f"error_score={self.error_score} for this term and count the failure instead, "
                              f"pass HostRewardRunner(..., on_error='score').")
        counts[term.name] += 1
        if (term.name, kind) not in self._logged:  # the first of each kind per term; counts carry the rest
            self._logged.add((term.name, kind))
            log.warning("%s\n(on_error='score': those completions get error_score=%s for %r; further failures "
                        "are counted in reward/%s/%s without this message)", msg, self.error_score, term.name,
                        "errors" if kind == "error" else "timeouts", term.name)

    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        terms, b = self.reward.terms, len(inputs)
        size = b if self.batch_size is None else self.batch_size
        bounds = [(s, min(s + size, b)) for s in range(0, b, size)] if b else []
        chunks = [inputs if (s, e) == (0, b) else inputs.subset(range(s, e)) for s, e in bounds]
        pending = collections.deque((ti, ci) for ti in range(len(terms)) for ci in range(len(chunks)))
        results: dict[tuple[int, int], TermValue | None] = {}
        errors = {t.name: 0 for t in terms}
        timeouts = {t.name: 0 for t in terms}
        running: dict[int, tuple[int, int, float]] = {}
        limit = math.inf if self.timeout_s is None else self.timeout_s
        self.last_calls, self.last_failed, self.last_failure = len(pending), 0, None
        try:
            while pending or running:
                self._pool.prepare(len(pending))
                while pending:
                    ti, ci = pending[0]
                    call_id = next(_call_ids)
                    if not self._pool.try_submit(call_id, ti, chunks[ci]):
                        break
                    pending.popleft()
                    running[call_id] = (ti, ci, time.monotonic() + limit)
                first = min((d for *_, d in running.values()), default=math.inf)
                wait = None if first == math.inf else max(0.0, first - time.monotonic())
                for call_id, outcome in self._pool.wait(wait):
                    ti, ci, _ = running.pop(call_id)
                    n = len(chunks[ci])
                    problem = (failure_message(terms[ti].name, outcome, n) if outcome[0] != "ok"
                               else check(terms[ti].name, outcome[1], n))
                    results[(ti, ci)] = None if problem else outcome[1]
                    if problem:
                        self._fail(terms[ti], "error", self._where(problem, bounds[ci], b), errors)
                now = time.monotonic()
                for call_id, (ti, ci, deadline) in list(running.items()):
                    if deadline <= now:
                        del running[call_id]
                        self._pool.abandon(call_id)
                        results[(ti, ci)] = None
                        s, e = bounds[ci]
                        self._fail(terms[ti], "timeout", self._timeout_message(terms[ti].name, s, e, b), timeouts)
        except BaseException:
            for call_id in running:  # leave the pool clean for the next call
                self._pool.abandon(call_id)
            raise
        values = {t.name: self._merge(t, [results[(ti, ci)] for ci in range(len(chunks))], bounds, b)
                  for ti, t in enumerate(terms)}
        return self.reward.assemble(values, b, errors, timeouts)

    @staticmethod
    def _where(problem: str, bound: tuple[int, int], b: int) -> str:
        return problem if bound == (0, b) else f"{problem}\n(rows {bound[0]}..{bound[1] - 1} of a batch of {b})"

    def _timeout_message(self, name: str, s: int, e: int, b: int) -> str:
        what = ("the call keeps running in an abandoned thread; isolation='process' can stop it"
                if self.isolation == "thread" else "its worker process was terminated")
        return (f"reward term {name!r} did not return within timeout_s={self.timeout_s} s on rows {s}..{e - 1} "
                f"of a batch of {b} ({what}). Raise timeout_s, make the reward faster, or split the batch "
                f"with batch_size=.")

    def _merge(self, term: Term, parts: list[TermValue | None], bounds, b: int) -> TermValue:
        """Concatenates a term's chunks; failed chunks get error_score (and correct=False)."""
        if len(parts) == 1 and parts[0] is not None:
            return parts[0]
        scores = np.full((b,), self.error_score, np.float64)
        has_correct = any(p is not None and p.correct is not None for p in parts) or (
            term.name == self.reward.correct_from and any(p is None for p in parts))  # a failed verification is not correct
        correct = np.zeros((b,), bool) if has_correct else None
        whole = all(p is not None for p in parts)  # a term's own components only when no chunk failed
        comps = {k: np.zeros((b,), np.float64) for k in parts[0].components} if whole and parts else {}
        errs, tos = collections.Counter(), collections.Counter()
        for p, (s, e) in zip(parts, bounds):
            if p is None:
                continue
            scores[s:e] = p.scores
            if correct is not None and p.correct is not None:
                correct[s:e] = p.correct
            for k in comps:
                comps[k][s:e] = p.components.get(k, np.nan)
            errs.update(p.errors)
            tos.update(p.timeouts)
        return TermValue(scores, correct, comps, dict(errs), dict(tos))
