"""Plot one or several runs side by side from their metrics.jsonl: loss, LR, images/s, data-wait and kNN.

    python tools/plot_run.py runs/swav-a runs/simclr-b --out runs/compare.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "plot_run"
PANELS = (("loss", "loss"), ("lr", "learning rate"), ("images_per_second", "images/s"),
          ("data_wait", "fraction of time waiting for data"), ("knn_top1", "kNN top-1 (%)"))


class PlotError(Exception):
    pass


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise PlotError(f"{run}: no metrics.jsonl (give a run directory written by train.py)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise PlotError(f"{path}:{number}: not a JSON line") from None
    if not records:
        raise PlotError(f"{path}: empty")
    return records


def plot(runs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {run: read_metrics(run) for run in runs}
    figure, axes = plt.subplots(len(PANELS), 1, figsize=(9, 2.3 * len(PANELS)), sharex=True)
    for axis, (key, title) in zip(axes, PANELS):
        for run, records in series.items():
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, marker="o" if key == "knn_top1" else None, markersize=4,
                          label=run.name if run.is_dir() else run.parent.name)
        axis.set_ylabel(title, fontsize=8)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[-1].set_xlabel("optimizer step")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (or their metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="the PNG (default: <first run>/metrics.png)")
    args = parser.parse_args(argv)
    out = args.out or (args.runs[0] if args.runs[0].is_dir() else args.runs[0].parent) / "metrics.png"
    try:
        print(f"written: {plot(args.runs, out)}")
    except PlotError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
