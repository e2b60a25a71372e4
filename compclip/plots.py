"""Training curves of one or more run folders, as a PNG a person can look at.

    python -m compclip.plots logs/run_a [logs/run_b ...] --out curves.png

Reads each run's ``metrics.jsonl``. Panels: the total and per-term losses, the training loss against the validation
loss and the validation retrieval R@1 (``val/...``, when the run validates), the learning rate and logit scale,
throughput, and every periodic evaluation metric (``eval/<benchmark>/<metric>``). The trainer writes
``<run>/curves.png`` at the end of a run.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

Series = Dict[str, List[Tuple[int, float]]]


def read_metrics(run_dir: str) -> Series:
    """``{metric: [(step, value), ...]}`` from ``<run_dir>/metrics.jsonl``; a malformed line is an error naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    series: Series = defaultdict(list)
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc})") from None
            step = row.get("step")
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    series[key].append((step, float(value)))
    return dict(series)


def _panels(keys: Sequence[str]) -> List[Tuple[str, List[str]]]:
    losses = [k for k in keys if k == "loss" or k.startswith("loss/")]
    evals = sorted(k for k in keys if k.startswith("eval/"))
    panels = [("loss", losses), ("train vs validation loss", ["loss", "val/loss"]),
              ("validation retrieval R@1", ["val/image_to_text_R@1", "val/text_to_image_R@1"]),
              ("learning rate", ["lr"]), ("logit scale", ["logit_scale"]), ("samples/s", ["samples_per_s"])]
    benchmarks = defaultdict(list)
    for key in evals:
        benchmarks[key.split("/")[1]].append(key)
    panels += [(f"eval: {name}", names) for name, names in sorted(benchmarks.items())]
    return [(title, [k for k in names if k in keys]) for title, names in panels
            if any(k in keys for k in names) and (not title.startswith("train vs") or "val/loss" in keys)]


def plot_runs(run_dirs: Sequence[str], out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(run).name: read_metrics(run) for run in run_dirs}
    keys = sorted({key for series in runs.values() for key in series})
    panels = _panels(keys)
    if not panels:
        raise ValueError(f"nothing to plot in {', '.join(run_dirs)}")
    columns = 2
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.2 * rows), squeeze=False)
    for axis, (title, names) in zip(axes.flat, panels):
        for run, series in runs.items():
            for name in names:
                if name in series:
                    steps, values = zip(*series[name])
                    short = "validation" if name == "val/loss" else name.split("/")[-1]
                    label = short if len(runs) == 1 else f"{run}: {short}"
                    axis.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Plot training curves of compclip run folders.")
    parser.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    parser.add_argument("--out", default="curves.png", help="PNG to write")
    args = parser.parse_args(argv)
    print(plot_runs(args.runs, args.out))


if __name__ == "__main__":
    main()
