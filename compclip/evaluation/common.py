"""Errors, result records and file reading shared by the benchmarks.

Annotation files are read through `compclip.data.inputs` (UTF-8 with line and column, JSON without repeated keys,
numbers Python can parse), so a malformed file is one `EvalDataError` naming the file, the item and the field;
`exit_on_bad_input` turns it into one message and exit status 2 for the command line.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Any, Dict

from compclip.data.inputs import InputError, check_text
from compclip.data.inputs import load_json as _load_checked_json


class EvalDataError(InputError):
    """An annotation file or one of its items cannot be used; the message names the file and the item."""


class EvaluationStopped(Exception):
    """The caller's `should_stop` asked to stop between two batches (a preemption); there is no result."""


def data_error(source, item, message: str) -> EvalDataError:
    return EvalDataError(f"{source}: item {item}: {message}")


def exit_on_bad_input(main):
    """Wrap a command's `main(argv)`: an `InputError` (a malformed annotation file, item, field or image) is
    printed as one line, `<prog>: error: ...`, and the command exits with status 2 instead of a traceback."""
    @functools.wraps(main)
    def command(argv=None):
        try:
            return main(argv)
        except InputError as error:
            text = str(error)
            if "Original Traceback" in text:  # raised in a DataLoader worker: keep the worker's own message
                text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
            print(f"compclip-eval: error: {text}", file=sys.stderr)
            raise SystemExit(2) from None

    return command


@dataclass
class BenchmarkResult:
    """Headline numbers (`metrics`, all floats, accuracies in [0, 1]) and everything else worth keeping
    (`details`: item counts, per-group accuracies)."""

    metrics: Dict[str, float]
    details: Dict[str, Any] = field(default_factory=dict)


def load_json(path):
    """Parse a JSON file; errors name the file, line and column (or the repeated key and where it is)."""
    return _load_checked_json(path, EvalDataError)


def require_texts(texts, field: str, source, item) -> None:
    """Check that every string of `texts` is valid Unicode (encodable as UTF-8), naming `field` and the item."""
    try:
        for text in texts:
            check_text(text, field)
    except ValueError as error:
        raise data_error(source, item, str(error)) from None


def require_fields(entry, names, source, item):
    """Check that `entry` is a dict holding every field of `names` as a (UTF-8 encodable) string."""
    if not isinstance(entry, dict):
        raise data_error(source, item, f"expected an object, got {type(entry).__name__}")
    for name in names:
        if name not in entry:
            raise data_error(source, item, f"missing field {name!r}")
        if not isinstance(entry[name], str):
            raise data_error(source, item, f"field {name!r} must be a string, got {type(entry[name]).__name__}")
        require_texts([entry[name]], name, source, item)
