"""What the host's C allocator does with memory that XLA:CPU frees: keep it for the next step, or give it back.

XLA:CPU allocates each run of a compiled program's temporaries with malloc: gigabytes for an update at a real
shape. glibc serves every allocation above 32 MiB with a fresh `mmap` and unmaps it on `free`, so each run of
the program page-faults its temporaries in again and the kernel zeroes them again (measured in
docs/performance.md: 1.57 million page faults and 5.5 s of kernel time in every SmolLM2-135M GRPO update on
a 2-core VM). On glibc, `jaxrl_llm` therefore sets, when it is imported:

    M_ARENA_MAX = 1         every thread allocates from the main heap (XLA's worker threads included)
    M_MMAP_MAX = 0          large blocks come from that heap too, not from their own mappings
    M_TRIM_THRESHOLD = -1   freed memory stays mapped (no trimming): the next step reuses it without faults

The price: the process keeps its peak host memory until it exits, which a training process reaches again
at its next step anyway. The settings only take hold for threads that have not allocated yet, so import
jaxrl_llm before running any JAX computation (the `jaxrl-llm` command and `import jaxrl_llm` at the top of a
script do). On a GPU or TPU, XLA's device allocator already keeps device memory; this is host memory only.

    JAXRL_LLM_HOST_MALLOC=keep     (default) the settings above, on glibc; elsewhere nothing is changed
    JAXRL_LLM_HOST_MALLOC=system   the C library's own behaviour

`STATE` says what was done ({"mode", "applied", "reason"}); the benchmarks record it. Another value of the
variable applies nothing and is reported by `check()`, which the `jaxrl-llm` command and `train()` call: the
run stops with one line naming the variable (importing the package never raises for it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from jaxrl_llm.errors import ConfigError

ENV = "JAXRL_LLM_HOST_MALLOC"
MODES = ("keep", "system")
# (glibc tunable name, mallopt parameter from malloc.h, value): one arena, no mmap, no trimming (-1: the
# largest size_t)
_KEEP = (("arena_max", -8, 1), ("mmap_max", -4, 0), ("trim_threshold", -1, -1))

STATE: dict = {"mode": None, "applied": False, "reason": "not configured yet"}


def mode(environ=None) -> str:
    """The requested mode from JAXRL_LLM_HOST_MALLOC (default "keep"); anything else is a ConfigError."""
    value = (os.environ if environ is None else environ).get(ENV, "keep").strip().lower() or "keep"
    if value not in MODES:
        raise ConfigError(f"environment variable {ENV}={value!r}: must be one of {', '.join(MODES)} (keep: "
                          "freed host memory stays mapped for the next step; system: the C library's default)")
    return value


def check() -> None:
    """Raises the ConfigError of a bad JAXRL_LLM_HOST_MALLOC that `configure` recorded (nothing was applied)."""
    if STATE.get("error"):
        raise ConfigError(STATE["error"])


def _glibc():
    """The process's glibc (with mallopt), or None on another C library or system."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None


def keep_tunables() -> str:
    """The same settings as a GLIBC_TUNABLES value, for a process that does not import jaxrl_llm (a peer's
    benchmark run); glibc reads it at start-up."""
    return ":".join(f"glibc.malloc.{name}={v if v >= 0 else 2**64 - 1}" for name, _, v in _KEEP)


def configure(environ=None) -> dict:
    """Applies the mode (see the module docstring) and returns `STATE`; a bad value is recorded in
    STATE["error"] for `check()`, and nothing is applied."""
    STATE.pop("error", None)
    try:
        m = mode(environ)
    except ConfigError as e:
        STATE.update(mode=None, applied=False, reason="bad value", error=str(e))
        return STATE
    STATE.update(mode=m, applied=False)
    if m == "system":
        STATE["reason"] = f"{ENV}=system"
        return STATE
    libc = _glibc()
    if libc is None:
        STATE["reason"] = "not glibc: the C library's default"
        return STATE
    failed = [name for name, p, v in _KEEP if libc.mallopt(p, v) != 1]
    STATE.update(applied=not failed, reason="mallopt refused parameters " + str(failed) if failed else
                 "glibc " + libc.gnu_get_libc_version().decode())
    return STATE
