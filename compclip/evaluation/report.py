"""Output: one JSON per benchmark (and a clip_benchmark-style JSON for zero-shot and retrieval), a printed table,
`results.md` / `results.csv`, and a bar chart comparing models.

`Runs` below is `{model label: {benchmark: {metric: value}}}`, values in [0, 1] (NaN: undefined); tables show
them in percent.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .common import BenchmarkResult
from .retrieval import RECALL_KS

Runs = Mapping[str, Mapping[str, Mapping[str, float]]]

# The numbers a chart and the headline table show per benchmark (all metrics go to the JSON files and the other
# tables); None: every subset and the mean (not the category averages, which the subsets already show).
HEADLINE = {
    "sugarcrepe": None,
    "aro_vg_relation": ("macro_accuracy",),
    "aro_vg_attribution": ("macro_accuracy",),
    "aro_coco_order": ("precision_at_1",),
    "aro_flickr_order": ("precision_at_1",),
    "valse": ("mean",),
    "zeroshot": ("top1", "top5", "mean_per_class"),
    "retrieval": ("image_to_text_R@1", "text_to_image_R@1", "mean_recall"),
}

# clip_benchmark's task and metric names for ours: {benchmark: (task, {their metric: our metric})}.
CLIP_BENCHMARK = {
    "zeroshot": ("zeroshot_classification", {"acc1": "top1", "acc5": "top5", "mean_per_class_recall": "mean_per_class"}),
    "retrieval": ("zeroshot_retrieval", {**{f"image_retrieval_recall@{k}": f"text_to_image_R@{k}" for k in RECALL_KS},
                                         **{f"text_retrieval_recall@{k}": f"image_to_text_R@{k}" for k in RECALL_KS}}),
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


def clip_benchmark_record(benchmark: str, result: BenchmarkResult, model: str,
                          pretrained: str) -> Optional[dict]:
    """The JSON clip_benchmark's `eval` writes for this result (`dataset`, `model`, `pretrained`, `task`,
    `metrics` under its names, `language`), so `clip_benchmark build` can put it in its CSV; None for a benchmark
    clip_benchmark has no task for."""
    if benchmark not in CLIP_BENCHMARK:
        return None
    task, names = CLIP_BENCHMARK[benchmark]
    return {"dataset": result.details.get("dataset", benchmark), "model": model, "pretrained": pretrained,
            "task": task, "metrics": {theirs: result.metrics[ours] for theirs, ours in names.items()
                                      if ours in result.metrics},
            "language": "en"}


def write_results(results: Mapping[str, BenchmarkResult], out_dir: str, label: Optional[str] = None,
                  arch: Optional[str] = None, pretrained: Optional[str] = None) -> List[str]:
    """Write `<out_dir>/<benchmark>.json` = the metrics alone, `{subset: accuracy, ...}` as the benchmarks' official
    scripts write them, and `<out_dir>/<benchmark>.details.json` = {benchmark, model, details} (item counts,
    files, per-group numbers). Zero-shot and retrieval also get `<benchmark>.clip_benchmark.json`, with `model` =
    `arch` and `pretrained` (None: the label). Returns the metric files' paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, result in results.items():
        path = os.path.join(out_dir, f"{name}.json")
        _write_json(path, result.metrics)
        _write_json(os.path.join(out_dir, f"{name}.details.json"),
                    {"benchmark": name, "model": label, "details": result.details})
        record = clip_benchmark_record(name, result, arch or label or "",
                                       (label or "") if pretrained is None else pretrained)
        if record is not None:
            _write_json(os.path.join(out_dir, f"{name}.clip_benchmark.json"), record)
        paths.append(path)
    return paths


def _write_json(path: str, record) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(json_safe(record), handle, indent=2, sort_keys=False)
        handle.write("\n")


def _benchmark_rank(benchmark: str) -> int:
    """Compositional benchmarks first, then zero-shot and retrieval (HEADLINE's order); generic files with the
    compositional ones."""
    order = list(HEADLINE)
    if benchmark in order:
        return order.index(benchmark)
    return order.index("zeroshot") if benchmark.startswith("generic_") else len(order)


def metric_pairs(runs: Runs) -> List[Tuple[str, str]]:
    """Every (benchmark, metric) of the runs: benchmarks in `_benchmark_rank` order, metrics in the order they
    first appear."""
    pairs: Dict[Tuple[str, str], None] = {}
    for metrics_by_benchmark in runs.values():
        for benchmark, metrics in metrics_by_benchmark.items():
            for metric in metrics:
                pairs[(benchmark, metric)] = None
    return sorted(pairs, key=lambda pair: _benchmark_rank(pair[0]))


def _percent(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.{digits}f}"


def format_table(runs: Runs) -> str:
    """A plain-text table: one row per (benchmark, metric), one column per model, values in percent."""
    labels = list(runs)
    rows = [[benchmark, metric] + [_percent(runs[label].get(benchmark, {}).get(metric)) for label in labels]
            for benchmark, metric in metric_pairs(runs)]
    header = ["benchmark", "metric"] + labels
    widths = [max(len(str(row[col])) for row in [header] + rows) for col in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) if col < 2 else str(cell).rjust(width)
                       for col, (cell, width) in enumerate(zip(row, widths))) for row in [header] + rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> List[str]:
    cells = [str(cell).replace("|", "\\|") for cell in header]
    lines = ["| " + " | ".join(cells) + " |",
             "|" + "|".join("---:" if col >= numeric_from else "---" for col in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def format_markdown(runs: Runs, info: Optional[Mapping[str, Mapping[str, str]]] = None,
                    title: str = "compclip evaluation") -> str:
    """`results.md`: the headline metrics of every benchmark side by side (one row per model), then one table
    per benchmark with all its metrics, then what each model is (`info`: {label: {column: text}})."""
    labels = list(runs)
    lines = [f"# {title}", "", "Accuracy and recall in %, one row per model; `-`: not evaluated, or undefined "
             "(an empty subset; top-5 with fewer than 5 classes).", ""]
    headline = chart_metrics(runs)
    if headline:
        lines += ["## Headline", ""]
        lines += _markdown_table(["model"] + [f"{b}/{m}" for b, m in headline],
                                 [[label] + [_percent(runs[label].get(b, {}).get(m)) for b, m in headline]
                                  for label in labels])
        lines.append("")
    pairs = metric_pairs(runs)
    for benchmark in dict.fromkeys(b for b, _ in pairs):
        metrics = [m for b, m in pairs if b == benchmark]
        lines += [f"## {benchmark}", ""]
        lines += _markdown_table(["model"] + metrics,
                                 [[label] + [_percent(runs[label].get(benchmark, {}).get(m)) for m in metrics]
                                  for label in labels])
        lines.append("")
    columns = list(dict.fromkeys(column for label in labels for column in (info or {}).get(label, {})))
    if columns:
        lines += ["## Models", ""]
        lines += _markdown_table(["model"] + columns,
                                 [[label] + [str((info or {}).get(label, {}).get(c) or "") for c in columns]
                                  for label in labels], numeric_from=len(columns) + 1)
        lines.append("")
    return "\n".join(lines)


def write_csv(runs: Runs, path: str, info: Optional[Mapping[str, Mapping[str, str]]] = None) -> str:
    """`results.csv`: one row per model; columns `model`, the `info` columns, then `<benchmark>/<metric>` for every
    metric, in percent (empty: not evaluated or undefined)."""
    labels = list(runs)
    columns = list(dict.fromkeys(column for label in labels for column in (info or {}).get(label, {})))
    pairs = metric_pairs(runs)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model"] + columns + [f"{b}/{m}" for b, m in pairs])
        for label in labels:
            values = []
            for benchmark, metric in pairs:
                value = runs[label].get(benchmark, {}).get(metric)
                missing = value is None or (isinstance(value, float) and math.isnan(value))
                values.append("" if missing else f"{100 * value:.4f}")
            writer.writerow([label] + [(info or {}).get(label, {}).get(c) or "" for c in columns] + values)
    return path


def write_tables(runs: Runs, out_dir: str, info: Optional[Mapping[str, Mapping[str, str]]] = None,
                 title: str = "compclip evaluation") -> Tuple[str, str]:
    """Write `<out_dir>/results.md` and `<out_dir>/results.csv`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    markdown = os.path.join(out_dir, "results.md")
    with open(markdown, "w", encoding="utf-8") as handle:
        handle.write(format_markdown(runs, info, title) + "\n")
    return markdown, write_csv(runs, os.path.join(out_dir, "results.csv"), info)


def chart_metrics(runs: Runs) -> List[tuple]:
    """(benchmark, metric) pairs a chart shows: the headline metrics (`HEADLINE`), or every metric of other
    benchmarks."""
    pairs = []
    for metrics_by_benchmark in runs.values():
        for benchmark, metrics in metrics_by_benchmark.items():
            wanted = HEADLINE.get(benchmark, tuple(metrics))
            if wanted is None:
                wanted = [m for m in metrics if not m.endswith("_avg")]
            wanted = [m for m in wanted if m in metrics]
            pairs += [(benchmark, metric) for metric in wanted if (benchmark, metric) not in pairs]
    return sorted(pairs, key=lambda pair: _benchmark_rank(pair[0]))


def plot_comparison(runs: Runs, path: str,
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
