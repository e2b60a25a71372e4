"""Output: one JSON per benchmark, a printed table, and a bar chart comparing checkpoints."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Mapping, Optional

from .common import BenchmarkResult

# The numbers a chart shows per benchmark (all metrics go to the JSON files and the table).
HEADLINE = {
    "sugarcrepe": ("add_avg", "replace_avg", "swap_avg", "mean"),
    "aro_vg_relation": ("macro_accuracy",),
    "aro_vg_attribution": ("macro_accuracy",),
    "aro_coco_order": ("precision_at_1",),
    "aro_flickr_order": ("precision_at_1",),
    "valse": ("mean",),
    "zeroshot": ("top1", "top5", "mean_per_class"),
    "retrieval": ("image_to_text_R@1", "text_to_image_R@1", "mean_recall"),
}


def json_safe(value):
    """JSON has no NaN: an empty subset's accuracy is written as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_results(results: Mapping[str, BenchmarkResult], out_dir: str, label: Optional[str] = None) -> List[str]:
    """Write `<out_dir>/<benchmark>.json` = the metrics alone, `{subset: accuracy, ...}` as the benchmarks' official
    scripts write them, and `<out_dir>/<benchmark>.details.json` = {benchmark, model, details} (item counts,
    files, per-group numbers). Returns the metric files' paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, result in results.items():
        path = os.path.join(out_dir, f"{name}.json")
        _write_json(path, result.metrics)
        _write_json(os.path.join(out_dir, f"{name}.details.json"),
                    {"benchmark": name, "model": label, "details": result.details})
        paths.append(path)
    return paths


def _write_json(path: str, record) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(json_safe(record), handle, indent=2, sort_keys=False)
        handle.write("\n")


def format_table(runs: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """A plain-text table: one row per (benchmark, metric), one column per model, values in percent."""
    labels = list(runs)
    rows = []
    seen = []
    for metrics_by_benchmark in runs.values():
        for benchmark, metrics in metrics_by_benchmark.items():
            for metric in metrics:
                if (benchmark, metric) not in seen:
                    seen.append((benchmark, metric))
    for benchmark, metric in seen:
        values = []
        for label in labels:
            value = runs[label].get(benchmark, {}).get(metric)
            values.append("-" if value is None or (isinstance(value, float) and math.isnan(value))
                          else f"{100 * value:.2f}")
        rows.append([benchmark, metric] + values)
    header = ["benchmark", "metric"] + labels
    widths = [max(len(str(row[col])) for row in [header] + rows) for col in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) if col < 2 else str(cell).rjust(width)
                       for col, (cell, width) in enumerate(zip(row, widths))) for row in [header] + rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def chart_metrics(runs: Mapping[str, Mapping[str, Mapping[str, float]]]) -> List[tuple]:
    """(benchmark, metric) pairs a chart shows: the headline metrics, or every metric of other benchmarks."""
    pairs = []
    for metrics_by_benchmark in runs.values():
        for benchmark, metrics in metrics_by_benchmark.items():
            wanted = [m for m in HEADLINE.get(benchmark, tuple(metrics)) if m in metrics]
            pairs += [(benchmark, metric) for metric in wanted if (benchmark, metric) not in pairs]
    return pairs


def plot_comparison(runs: Mapping[str, Mapping[str, Mapping[str, float]]], path: str,
                    title: str = "compclip evaluation") -> Optional[str]:
    """Grouped bar chart (percent), one group per headline metric, one bar per model; returns the PNG path."""
    pairs = chart_metrics(runs)
    if not pairs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(runs)
    width = 0.8 / len(labels)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.6 * len(pairs) * max(1, len(labels)) + 2), 4.5))
    for offset, label in enumerate(labels):
        values = []
        for benchmark, metric in pairs:
            value = runs[label].get(benchmark, {}).get(metric)
            values.append(float("nan") if value is None else 100 * value)
        positions = [index + (offset - (len(labels) - 1) / 2) * width for index in range(len(pairs))]
        bars = axes.bar(positions, values, width=width, label=label)
        axes.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    axes.set_xticks(range(len(pairs)))
    axes.set_xticklabels([f"{benchmark}\n{metric}" for benchmark, metric in pairs], rotation=45, ha="right",
                         fontsize=8)
    axes.set_ylabel("%")
    axes.set_ylim(0, 100)
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
