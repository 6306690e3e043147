"""What every peer runner shares: its command line and the workload description (stdlib only: each runner
runs in its own virtualenv, and this file sits next to it on sys.path)."""

from __future__ import annotations

import argparse
import json
import os


def torch_env() -> None:
    """Two torch threads with OpenMP's default waiting (spin, then sleep). Call before importing torch.

    `OMP_WAIT_POLICY=PASSIVE` makes torch slower on this workload even on a quiet machine (generate 0.74-0.82
    s against 0.51-0.54 s, a TRL iteration 1.84 against 1.52 s), so the peers run with the default; peers.py
    runs one job at a time, so no other job competes for the cores. An OMP_WAIT_POLICY already set in the
    environment is kept (and reported in each peer's JSON)."""
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(doc: str, argv=None, threads: bool = True, extra=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", required=True, help="directory written by bench/workload.py")
    ap.add_argument("--iters", type=int, default=10, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=2, help="iterations run before timing")
    if threads:
        ap.add_argument("--threads", type=int, default=2, help="torch threads")
    if extra is not None:
        extra(ap)
    return ap.parse_args(argv)


def load_workload(directory: str) -> dict:
    with open(os.path.join(directory, "workload.json")) as f:
        return json.load(f)
