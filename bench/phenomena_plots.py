"""The plots of docs/phenomena.md, from finished runs.

    .venv/bin/python bench/phenomena_plots.py length RUN_GRPO RUN_DR_GRPO   # docs/img/length_bias.png
    .venv/bin/python bench/phenomena_plots.py passk RUN_DIR                 # docs/img/pass_at_k.png

length: per RL iteration, response_length/correct and response_length/wrong (train/stages/rl.py
`lengths_by_outcome`) and the batch accuracy of each run, and a table of their means over the first and
last ten iterations, and the wrong completions' mean length per block of ten iterations. passk: pass@k of
<run>/eval-sft.json (the SFT checkpoint, `jaxrl-llm eval --stage sft`)
and <run>/eval.json (the final one) against k, the table of both, and how many problems each solved at least
once.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from jaxrl_llm.train.plots import _draw, _figure, read_metrics, series

IMG = pathlib.Path(__file__).resolve().parent.parent / "docs" / "img"
LENGTH_KEYS = ("response_length/wrong", "response_length/correct", "accuracy")


def plot_length(runs: list[str], out: pathlib.Path, stage: str = "rl", window: int = 10) -> None:
    fig, axes = _figure(len(LENGTH_KEYS), "length of correct and wrong completions (one seed)")
    print(f"| run | {' | '.join(f'{k} first {window} / last {window}' for k in LENGTH_KEYS)} |")
    print("|---|" + "---|" * len(LENGTH_KEYS))
    for i, run in enumerate(runs):
        recs, label, cells = read_metrics(run), pathlib.Path(run).name, []
        for ax, key in zip(axes, LENGTH_KEYS):
            steps, values = series(recs, stage, key)
            _draw(ax, steps, values, label, color=f"C{i}")
            ax.set_title(key)
            ax.legend(fontsize=7)
            cells.append(f"{np.nanmean(values[:window]):.2f} / {np.nanmean(values[-window:]):.2f}")
        print(f"| {label} | {' | '.join(cells)} |")
    print(f"\nmean response_length/wrong per block of {window} iterations:")
    for run in runs:
        _, values = series(read_metrics(run), stage, "response_length/wrong")
        blocks = [f"{np.nanmean(values[i:i + window]):.2f}" for i in range(0, len(values), window)]
        print(f"  {pathlib.Path(run).name}: {' '.join(blocks)}")
    fig.savefig(out, dpi=90)


def plot_passk(run: str, out: pathlib.Path) -> None:
    fig, (ax,) = _figure(1, "pass@k, same problems (one seed)")
    tables, solved = {}, {}
    for i, (label, name) in enumerate((("SFT", "eval-sft.json"), ("SFT + GRPO", "eval.json"))):
        data = json.loads((pathlib.Path(run) / name).read_text())
        solved[label] = {r["index"] for r in data["records"] if r["n_correct"] > 0}
        ks = sorted(int(k.split("@")[1]) for k in data["metrics"] if k.startswith("pass@"))
        tables[label] = {k: data["metrics"][f"pass@{k}"] for k in ks}
        ax.plot(ks, [tables[label][k] for k in ks], marker="o", ms=3, color=f"C{i}",
                label=f"{label} ({data['stage']} step {data['step']})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.legend(fontsize=8)
    fig.savefig(out, dpi=90)
    ks = sorted(next(iter(tables.values())))
    print("| model | " + " | ".join(f"pass@{k}" for k in ks) + " |\n|---|" + "---|" * len(ks))
    for label, t in tables.items():
        print(f"| {label} | " + " | ".join(f"{100 * t[k]:.1f}%" for k in ks) + " |")
    sft, rl = solved.values()
    print(f"problems solved at least once: SFT {len(sft)}, SFT + GRPO {len(rl)}; by SFT only {len(sft - rl)}, "
          f"by SFT + GRPO only {len(rl - sft)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("length", "passk"))
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default=None, help="default: docs/img/length_bias.png or docs/img/pass_at_k.png")
    a = ap.parse_args()
    out = pathlib.Path(a.out or IMG / ("length_bias.png" if a.what == "length" else "pass_at_k.png"))
    plot_length(a.runs, out) if a.what == "length" else plot_passk(a.runs[0], out)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
