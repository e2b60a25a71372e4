"""Render pytest-benchmark JSON into a markdown table and a PNG plot.

    pytest bench --benchmark-only --benchmark-json bench/results/<device>-<date>.json
    python bench/render.py bench/results/<device>-<date>.json [--baseline other.json] [--md out.md] [--png out.png]

Table: one block per group (op and size), one row per provider and mode: mean time, peak memory, throughput,
the ratio to the arithmetic / bandwidth floor, and the speed-up over the group's reference in the same mode:
compclip's PyTorch reference (``torch``) for ops, plain CLIP for training steps. With ``--baseline``, a column compares each row with the same benchmark in the baseline file.
Plot: for each op, speed-up over the reference and peak memory against size (mode ``full``).
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional


def load(path: str) -> Dict:
    with open(path) as handle:
        data = json.load(handle)
    if "benchmarks" not in data:
        raise SystemExit(f"{path}: not a pytest-benchmark JSON (no 'benchmarks' key)")
    return data


def _params(bench: Dict) -> Dict:
    return bench.get("params") or {}


def _provider(bench: Dict) -> str:
    params = _params(bench)
    return params.get("provider") or params.get("method") or bench["name"].split("[")[0].replace("test_", "")


def _mode(bench: Dict) -> str:
    params = _params(bench)
    return params.get("mode") or ("step" if "method" in params else "forward")


SHOWN = {"device", "peak_memory_mb", "tflops", "gb_per_s", "x_floor"}


def _reference(rows: List[Dict]) -> str:
    """What a group's speed-ups are relative to: compclip's PyTorch reference, or plain CLIP for training steps."""
    return "torch" if any(_provider(b) == "torch" for b in rows) else "clip"


def _op(group: str) -> str:
    return re.split(r" [A-Z]=", group)[0]


def table(data: Dict, baseline: Optional[Dict] = None) -> str:
    base_means = {b["fullname"]: b["stats"]["mean"] for b in (baseline or {}).get("benchmarks", [])}
    groups: Dict[str, List[Dict]] = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench.get("group") or bench["name"]].append(bench)
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    device = next((b["extra_info"].get("device") for b in data["benchmarks"] if b.get("extra_info")), "?")
    lines = [
        f"Device: **{device}** · CPU: {machine.get('cpu', {}).get('brand_raw', '?')} · "
        f"date: {data.get('datetime', '?')[:10]} · commit: {str(commit.get('id', '?'))[:10]}",
        "",
    ]
    header = "| provider | mode | mean ms | peak MB | TFLOP/s | GB/s | × floor | speed-up vs reference | other |"
    if baseline:
        header += " vs baseline |"
    for group in sorted(groups):
        rows = sorted(groups[group], key=lambda b: (_mode(b), _provider(b)))
        reference = {_mode(b): b["stats"]["mean"] for b in rows if _provider(b) == _reference(rows)}
        lines += [f"**{group}**", "", header, "|" + "---|" * (header.count("|") - 1)]
        for bench in rows:
            mean = bench["stats"]["mean"]
            extra = bench.get("extra_info", {})
            ref = reference.get(_mode(bench))
            cells = [
                _provider(bench), _mode(bench), f"{mean * 1e3:.3f}", str(extra.get("peak_memory_mb", "")),
                str(extra.get("tflops", "")), str(extra.get("gb_per_s", "")), str(extra.get("x_floor", "")),
                f"{ref / mean:.2f}×" if ref else "",
                ", ".join(f"{key}={value}" for key, value in sorted(extra.items()) if key not in SHOWN),
            ]
            if baseline:
                old = base_means.get(bench["fullname"])
                cells.append(f"{old / mean:.2f}×" if old else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(data: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_op: Dict[str, Dict[str, Dict[str, Dict]]] = defaultdict(lambda: defaultdict(dict))
    for bench in data["benchmarks"]:
        if _mode(bench) != "full" or "group" not in bench:
            continue
        group = bench["group"]
        by_op[_op(group)][group][_provider(bench)] = bench
    if not by_op:
        raise SystemExit("no 'full'-mode benchmarks to plot")
    fig, axes = plt.subplots(len(by_op), 2, figsize=(12, 3.5 * len(by_op)), squeeze=False)
    for row, (op, groups) in enumerate(sorted(by_op.items())):
        sizes = sorted(groups, key=lambda g: [int(n) for n in re.findall(r"=(\d+)", g)])
        labels = [g[len(op):].strip() for g in sizes]
        providers = sorted({p for g in sizes for p in groups[g]})
        for provider in providers:
            speedups, memory = [], []
            for group in sizes:
                bench = groups[group].get(provider)
                ref = groups[group].get(_reference(list(groups[group].values())))
                speedups.append(ref["stats"]["mean"] / bench["stats"]["mean"] if bench and ref else float("nan"))
                memory.append(bench["extra_info"].get("peak_memory_mb", float("nan")) if bench else float("nan"))
            axes[row][0].plot(labels, speedups, marker="o", label=provider)
            axes[row][1].plot(labels, memory, marker="o", label=provider)
        axes[row][0].set_title(f"{op}: speed-up over the PyTorch reference (fwd+bwd)")
        axes[row][1].set_title(f"{op}: peak memory (MB)")
        axes[row][1].set_yscale("log")
        for axis in axes[row]:
            axis.legend()
            axis.tick_params(axis="x", labelrotation=15, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--baseline", help="a second JSON to compare against")
    parser.add_argument("--md", help="write the markdown table here (default: print)")
    parser.add_argument("--png", help="write the plot here")
    args = parser.parse_args(argv)
    data = load(args.results)
    text = table(data, load(args.baseline) if args.baseline else None)
    if args.md:
        Path(args.md).write_text(text + "\n")
    else:
        print(text)
    if args.png:
        plot(data, args.png)


if __name__ == "__main__":
    main()
