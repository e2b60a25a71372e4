"""Errors, result records and file reading shared by the benchmarks."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict


class EvalDataError(ValueError):
    """An annotation file or one of its items cannot be used; the message names the file and the item."""


class EvaluationStopped(Exception):
    """The caller's `should_stop` asked to stop between two batches (a preemption); there is no result."""


def data_error(source, item, message: str) -> EvalDataError:
    return EvalDataError(f"{source}: item {item}: {message}")


@dataclass
class BenchmarkResult:
    """Headline numbers (`metrics`, all floats, accuracies in [0, 1]) and everything else worth keeping
    (`details`: item counts, per-group accuracies)."""

    metrics: Dict[str, float]
    details: Dict[str, Any] = field(default_factory=dict)


def load_json(path):
    """Parse a JSON file; a syntax error names the file, line and column."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise EvalDataError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise EvalDataError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}): {error.msg}") from None


def require_fields(entry, names, source, item):
    """Check that `entry` is a dict holding every field of `names` as a string."""
    if not isinstance(entry, dict):
        raise data_error(source, item, f"expected an object, got {type(entry).__name__}")
    for name in names:
        if name not in entry:
            raise data_error(source, item, f"missing field {name!r}")
        if not isinstance(entry[name], str):
            raise data_error(source, item, f"field {name!r} must be a string, got {type(entry[name]).__name__}")
