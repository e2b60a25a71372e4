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


def _clean(value):
    """JSON has no NaN: an empty subset's accuracy is written as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value


def write_results(results: Mapping[str, BenchmarkResult], out_dir: str, label: Optional[str] = None) -> List[str]:
    """Write `<out_dir>/<benchmark>.json` = {benchmark, model, metrics, details}; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, result in results.items():
        path = os.path.join(out_dir, f"{name}.json")
        record = {"benchmark": name, "model": label, "metrics": result.metrics, "details": result.details}
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(_clean(record), handle, indent=2, sort_keys=False)
            handle.write("\n")
        paths.append(path)
    return paths


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
