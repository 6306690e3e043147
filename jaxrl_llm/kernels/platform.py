"""What the host CPU is: its model name and the instruction-set features that decide CPU-specific choices.

    info = cpu_info()            # {"model": "AMD EPYC ...", "vendor": "AuthenticAMD", "features": {...}}
    info["features"]["avx512_bf16"]

Read from /proc/cpuinfo (Linux); elsewhere the model comes from `platform.processor()` and the features are
unknown (all False). `features_of(flags)` maps a set of cpuinfo flag names to the summary, so a rule that
depends on the CPU can be tested with made-up flag sets. `bench/cpu_choices.py` prints this summary next
to its measurements, so a table from one machine says which CPU it describes.
"""

from __future__ import annotations

import pathlib
import platform as _platform

# The cpuinfo flags that matter for the dense layers' matmuls: vector width, bf16 dot products, AMX tiles.
FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def features_of(flags) -> dict[str, bool]:
    """{feature: present} for the names in FEATURES, from an iterable of /proc/cpuinfo flag names."""
    flags = set(flags)
    return {name: name in flags for name in FEATURES}


def parse_cpuinfo(text: str) -> dict:
    """Model name, vendor and feature summary from the text of /proc/cpuinfo (its first processor)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough: every core of a host is the same model
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return {"model": fields.get("model name", ""), "vendor": fields.get("vendor_id", ""),
            "family": fields.get("cpu family", ""), "cpu_model": fields.get("model", ""),
            "features": features_of(fields.get("flags", "").split())}


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """`parse_cpuinfo` of this host (without /proc/cpuinfo: the processor name, no features known)."""
    p = pathlib.Path(path)
    if p.is_file():
        return parse_cpuinfo(p.read_text(errors="replace"))
    return {"model": _platform.processor(), "vendor": "", "family": "", "cpu_model": "",
            "features": features_of(())}


def summary(info: dict) -> str:
    """One line: the model and its features, e.g. 'AMD EPYC (AuthenticAMD family 25 model 17): avx512f ...'."""
    have = [k for k, v in info["features"].items() if v]
    lacks = [k for k, v in info["features"].items() if not v]
    head = info["model"] or "unknown CPU"
    if info.get("vendor"):
        head += f" ({info['vendor']} family {info.get('family')} model {info.get('cpu_model')})"
    return f"{head}: has {' '.join(have) or 'none of ' + ' '.join(FEATURES)}" + (
        f"; lacks {' '.join(lacks)}" if lacks and have else "")
