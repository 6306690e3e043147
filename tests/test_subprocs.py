"""The helper that stops hung child processes shows where their threads were (tests/subprocs.py)."""

import os
import subprocess
import sys

from subprocs import stop_with_tracebacks

# one write per line (print writes the text and its newline apart: the two threads' lines could interleave)
HANG = ("import os, threading, time\n"
        "def nap():\n    os.write(1, b'in nap\\n')\n    time.sleep(300)\n"
        "threading.Thread(target=nap).start()\n"
        "nap()\n")


def test_a_hung_child_is_stopped_with_every_threads_stack_and_an_ended_one_is_reported_as_ended():
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    hung = subprocess.Popen([sys.executable, "-c", HANG], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    done = subprocess.Popen([sys.executable, "-c", "print('bye')"], env=env, stdout=subprocess.PIPE, text=True)
    done.wait(timeout=60)
    assert [hung.stdout.readline() for _ in range(2)] == [b"in nap\n"] * 2  # both threads are in nap() now
    report = stop_with_tracebacks([hung, done], grace=30)
    assert hung.returncode is not None and done.returncode == 0
    first, second = report.split(f"process 1 ({done.pid})")
    assert f"process 0 ({hung.pid}) was still running" in first
    assert first.count(" in nap\n") == 2, first  # where the main thread and the other one were
    assert "had ended with exit 0" in second and "bye" in second
