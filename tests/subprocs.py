"""For tests that run the library in child processes: stop the ones that outlived their time with every thread's
Python stack in the failure message, instead of a bare TimeoutExpired.

The children must be started with PYTHONFAULTHANDLER=1 (then SIGABRT makes Python print where each thread was).
"""

from __future__ import annotations

import signal
import subprocess


def stop_with_tracebacks(procs: list[subprocess.Popen], grace: float = 60.0, tail: int = 6000) -> str:
    """Stops the processes: each still running gets SIGABRT and `grace` seconds to print its threads' stacks
    before it is killed. Returns, per process, whether it was still running and the last `tail` characters of
    what it wrote to the streams piped from it (stdout, then stderr; bytes or text)."""
    running = [p.poll() is None for p in procs]
    for p, alive in zip(procs, running):
        if alive:
            p.send_signal(signal.SIGABRT)
    parts = []
    for i, (p, alive) in enumerate(zip(procs, running)):
        try:
            streams = p.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            streams = p.communicate()
        text = "".join(s.decode(errors="replace") if isinstance(s, bytes) else s for s in streams if s)
        state = "was still running" if alive else f"had ended with exit {p.returncode}"
        parts.append(f"process {i} ({p.pid}) {state}:\n{text[-tail:]}")
    return "\n".join(parts)
