"""jaxrl_llm.host_memory: freed host memory stays mapped for the next step (glibc), or the C library's default.

The effect is measured in fresh processes (the settings act when the package is imported): a thread allocates
256 MiB with malloc, writes it, frees it, and does it again; the second round's page faults are what each
XLA program run pays for its temporaries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxrl_llm import cli, host_memory
from jaxrl_llm.errors import ConfigError

ROUNDS = r"""
import ctypes, json, resource, sys, threading
import jaxrl_llm
from jaxrl_llm import host_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
n = 256 << 20
faults = []

def rounds():
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

t = threading.Thread(target=rounds)  # a thread of its own, as XLA's workers are
t.start()
t.join()
print(json.dumps({"state": host_memory.STATE, "faults": faults}))
"""


def _rounds(mode: str, tunables: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env[host_memory.ENV] = mode
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, "-c", ROUNDS], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="mallopt is glibc's")
def test_keep_reuses_freed_memory_without_page_faults():
    keep, system = _rounds("keep"), _rounds("system")
    assert keep["state"]["mode"] == "keep" and keep["state"]["applied"], keep
    assert system["state"] == {"mode": "system", "applied": False, "reason": f"{host_memory.ENV}=system"}
    pages = (256 << 20) // 4096
    # the first round faults the memory in either way (in 4 KiB pages, or fewer with transparent huge pages)
    assert keep["faults"][0] > 16 and system["faults"][0] > 16, (keep, system)
    # the C library's default unmaps the block on free, so the second round faults it in again ...
    assert system["faults"][1] >= system["faults"][0] // 2, system
    # ... where kept memory is reused as it is
    assert keep["faults"][1] <= max(16, system["faults"][1] // 10) and keep["faults"][1] < pages // 100, keep


@pytest.mark.skipif(host_memory._glibc() is None, reason="GLIBC_TUNABLES is glibc's")
def test_keep_tunables_give_a_process_the_same_reuse():
    """`keep_tunables()` (what bench/peers.py hands a peer's process) does without mallopt what `keep` does."""
    system, tuned = _rounds("system"), _rounds("system", host_memory.keep_tunables())
    assert tuned["state"]["applied"] is False  # nothing from mallopt: the tunables alone
    assert tuned["faults"][0] > 16, tuned
    assert tuned["faults"][1] <= max(16, system["faults"][1] // 10) and tuned["faults"][1] < (256 << 20) // 4096 // 100


@pytest.mark.parametrize("value,expected", [(None, "keep"), ("", "keep"), ("keep", "keep"), (" System ", "system")])
def test_mode_reads_the_variable(value, expected):
    env = {} if value is None else {host_memory.ENV: value}
    assert host_memory.mode(env) == expected


def test_a_bad_value_applies_nothing_and_stops_a_run_with_one_line(monkeypatch, capsys):
    saved = dict(host_memory.STATE)
    try:
        state = host_memory.configure({host_memory.ENV: "fast"})
        assert state["applied"] is False and state["mode"] is None
        with pytest.raises(ConfigError, match=f"{host_memory.ENV}='fast': must be one of keep, system"):
            host_memory.check()
        assert cli.main(["train", "experiments/demo.py"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: environment variable JAXRL_LLM_HOST_MALLOC='fast'")
    finally:
        host_memory.STATE.clear()
        host_memory.STATE.update(saved)
    host_memory.check()  # the process's own state is good again
