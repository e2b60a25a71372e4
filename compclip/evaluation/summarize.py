"""`compclip-eval --summarize RUN_OR_DIR ...`: the results of several runs in one table and one chart.

Each argument is one of:

* a training run folder of `compclip/train.py` (`config.yaml` and `eval/<label>/`): its newest evaluation, by the
  time its files were written (`eval/before` only when it has no other), as one row named after the run;
* an output folder of `compclip-eval` (`summary.json`): every model in it, one row each;
* a folder of `<benchmark>.json` files (`<run>/eval/<label>/`, `<out>/<model>/`): that evaluation, one row;
* a folder holding any of these (e.g. `logs/`): each of them.

Nothing is evaluated. The output folder gets `results.md`, `results.csv` and `comparison.png` (as an evaluation
writes them, compositional subsets, zero-shot and retrieval side by side) and a `summary.json` with the numbers and
where each row came from, which can itself be summarized again.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from .common import EvalDataError, load_json
from .report import HEADLINE, format_table, json_safe, plot_comparison, write_tables

Results = Dict[str, Dict[str, float]]


@dataclass
class Evaluation:
    """One row of the summary: a model's results and where they were read."""

    label: str
    results: Results
    source: str  # the folder the numbers were read from
    evaluation: str = ""  # which evaluation of a training run (`epoch_3`); empty otherwise


def is_benchmark_file(name: str) -> bool:
    """`<benchmark>.json` of a benchmark compclip-eval writes (not `.details.json`, `.clip_benchmark.json`,
    `summary.json`)."""
    stem, extension = os.path.splitext(name)
    return extension == ".json" and "." not in stem and (stem in HEADLINE or stem.startswith("generic_"))


def _metrics(data, path: str) -> Dict[str, float]:
    if not isinstance(data, dict) or not data:
        raise EvalDataError(f"{path}: not a result file of compclip-eval: expected {{metric: value}}, got "
                            f"{type(data).__name__}")
    metrics = {}
    for metric, value in data.items():
        if value is None:  # NaN is written as null
            value = math.nan
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EvalDataError(f"{path}: not a result file of compclip-eval: metric {metric!r} is not a number: "
                                f"{str(value)[:40]!r}")
        metrics[str(metric)] = float(value)
    return metrics


def read_benchmark_folder(folder: str) -> Results:
    """{benchmark: metrics} of the `<benchmark>.json` files in `folder` ({} when there are none)."""
    return {os.path.splitext(name)[0]: _metrics(load_json(os.path.join(folder, name)), os.path.join(folder, name))
            for name in sorted(os.listdir(folder)) if is_benchmark_file(name)}


def _newest_file_time(folder: str) -> float:
    return max(os.path.getmtime(os.path.join(folder, name)) for name in os.listdir(folder) if is_benchmark_file(name))


def _is_run(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "config.yaml")) and os.path.isdir(os.path.join(folder, "eval"))


def _has_benchmarks(folder: str) -> bool:
    return any(is_benchmark_file(name) for name in os.listdir(folder))


def read_run(run: str) -> Evaluation:
    """A training run folder's newest evaluation (`before` only when it has no other)."""
    root = os.path.join(run, "eval")
    labels = [name for name in os.listdir(root)
              if os.path.isdir(os.path.join(root, name)) and _has_benchmarks(os.path.join(root, name))]
    if not labels:
        raise EvalDataError(f"{run}: a run folder with no evaluation in eval/ (evaluate its export with "
                            f"compclip-eval --checkpoint {run} ...)")
    after = [label for label in labels if label != "before"] or labels
    newest = max(after, key=lambda label: (_newest_file_time(os.path.join(root, label)), label))
    return Evaluation(os.path.basename(os.path.normpath(run)), read_benchmark_folder(os.path.join(root, newest)),
                      os.path.join(root, newest), newest)


def read_evaluation_output(folder: str) -> List[Evaluation]:
    """Every model of a compclip-eval output folder (its `summary.json`)."""
    path = os.path.join(folder, "summary.json")
    summary = load_json(path)
    results = summary.get("results") if isinstance(summary, dict) else None
    if not isinstance(results, dict):
        raise EvalDataError(f"{path}: expected {{'results': {{model: {{benchmark: {{metric: value}}}}}}}}")
    sources = summary.get("sources") if isinstance(summary.get("sources"), dict) else {}
    rows = []
    for label, benchmarks in results.items():
        if not isinstance(benchmarks, dict):
            raise EvalDataError(f"{path}: results of {label!r} must be an object {{benchmark: metrics}}")
        origin = sources.get(label) if isinstance(sources.get(label), dict) else {}
        rows.append(Evaluation(str(label), {b: _metrics(m, f"{path}: {label}/{b}") for b, m in benchmarks.items()},
                               str(origin.get("source") or folder), str(origin.get("evaluation") or "")))
    return rows


def read_folder(folder: str) -> Evaluation:
    """A folder of `<benchmark>.json` files; named after its run and label when it is `<run>/eval/<label>/`, else
    after the model its `.details.json` names, else after the folder."""
    folder = os.path.normpath(folder)
    name, parent = os.path.basename(folder), os.path.dirname(folder)
    if os.path.basename(parent) == "eval" and os.path.isfile(os.path.join(os.path.dirname(parent), "config.yaml")):
        return Evaluation(f"{os.path.basename(os.path.dirname(parent))}/{name}", read_benchmark_folder(folder),
                          folder, name)
    label = name
    for file in sorted(os.listdir(folder)):
        if file.endswith(".details.json"):
            with open(os.path.join(folder, file), encoding="utf-8") as handle:
                try:
                    model = json.load(handle).get("model")
                except (json.JSONDecodeError, AttributeError):
                    model = None
            if isinstance(model, str) and model:
                label = model
                break
    return Evaluation(label, read_benchmark_folder(folder), folder)


def _read_one(path: str) -> List[Evaluation]:
    if _is_run(path):
        return [read_run(path)]
    if os.path.isfile(os.path.join(path, "summary.json")):
        return read_evaluation_output(path)
    if _has_benchmarks(path):
        return [read_folder(path)]
    return []


def collect(paths: Sequence[str]) -> List[Evaluation]:
    """The rows of every path (see the module docstring), labels made unique."""
    rows: List[Evaluation] = []
    for path in paths:
        if not os.path.isdir(path):
            raise EvalDataError(f"{path}: no such folder (give run folders or evaluation output folders)")
        found = _read_one(path)
        if not found:  # a folder of runs or evaluation folders
            for child in sorted(os.listdir(path)):
                if os.path.isdir(os.path.join(path, child)):
                    found += _read_one(os.path.join(path, child))
        if not found:
            raise EvalDataError(f"{path}: neither a run folder (config.yaml, eval/<label>/), an evaluation output "
                                "(summary.json), a folder of <benchmark>.json files, nor a folder holding them")
        rows += found
    seen: Dict[str, int] = {}
    labels = [row.label for row in rows]
    for row in rows:
        if labels.count(row.label) > 1:  # the same model name from two places: say which place
            row.label = f"{os.path.basename(os.path.normpath(row.source))}/{row.label}"
        seen[row.label] = seen.get(row.label, 0) + 1
        if seen[row.label] > 1:
            row.label = f"{row.label}-{seen[row.label]}"
    return rows


def summarize(paths: Sequence[str], out: str) -> Tuple[List[str], str]:
    """Write `results.md`, `results.csv`, `comparison.png` and `summary.json` of every row under `out`; returns
    (the written paths, the plain-text table)."""
    rows = collect(paths)
    out_real = os.path.realpath(out)
    for row in rows:
        if os.path.realpath(row.source) == out_real:
            raise EvalDataError(f"--out {out} is one of the summarized folders: its results would be overwritten")
    runs = {row.label: row.results for row in rows}
    info = {row.label: {"evaluation": row.evaluation, "source": row.source} for row in rows}
    written = list(write_tables(runs, out, info, title="compclip evaluation summary"))
    chart = plot_comparison(runs, os.path.join(out, "comparison.png"), title="compclip evaluation summary")
    if chart:
        written.append(chart)
    path = os.path.join(out, "summary.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(json_safe({"sources": info, "results": runs}), handle, indent=2)
        handle.write("\n")
    return written + [path], format_table(runs)
