"""Native manifests: JSONL, CSV and TSV files with one sample per row.

A sample is `{"image": path, "caption": str, "negatives": [str...], "valid": [bool...], "concepts": [str...]}`;
only `image` and `caption` are required. In CSV / TSV files the list fields hold a JSON array or a Python list
literal (NegCLIP's `neg_caption` style). Every row is checked when the manifest is read, so a malformed file
fails at start with its file name and line number, not hours into a run.
"""
from __future__ import annotations

import ast
import csv
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

INVALID_NEGATIVE = "###"
"""CE-CLIP's marker of a negative that could not be built: the text is kept, its mask is False."""

SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".tar": "wds"}


class ManifestError(ValueError):
    """A manifest row that cannot be used; the message starts with `file:line:`."""


@dataclass(slots=True)
class Record:
    """One manifest row, checked and with its image path resolved."""

    image: str
    caption: str
    negatives: list[str] | None = None
    valid: list[bool] | None = None
    concepts: list[str] | None = None
    source: str = ""
    """`file:line` of the row, for messages."""

    def to_json(self, image: str | None = None) -> dict:
        row = {"image": self.image if image is None else image, "caption": self.caption}
        if self.negatives is not None:
            row["negatives"] = list(self.negatives)
        if self.valid is not None:
            row["valid"] = list(self.valid)
        if self.concepts is not None:
            row["concepts"] = list(self.concepts)
        return row


def detect_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in ("jsonl", "csv", "tsv", "wds"):
            raise ValueError(f"unknown data format {fmt!r} (auto, jsonl, csv, tsv, wds)")
        return fmt
    first = path.split("::")[0]
    if "{" in first or first.endswith(".tar"):
        return "wds"
    suffix = os.path.splitext(first)[1].lower()
    if suffix not in SUFFIX_FORMATS:
        raise ValueError(f"{path}: cannot tell the format from the suffix {suffix!r}; set data.format")
    return SUFFIX_FORMATS[suffix]


def _parse_list_cell(cell: str):
    cell = cell.strip()
    if not cell:
        return None
    try:
        return json.loads(cell)
    except json.JSONDecodeError:
        try:
            return ast.literal_eval(cell)
        except (ValueError, SyntaxError) as error:
            raise ValueError(f"not a JSON array or Python list literal: {cell[:80]!r}") from error


def string_list(value, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{name!r} must be a list of strings")
    return value


def _bool_list(value) -> list[bool] | None:
    if value is None:
        return None
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(item, (bool, int)) and item in (0, 1) for item in value):
        raise ValueError("'valid' must be a list of booleans (or 0/1)")
    return [bool(item) for item in value]


def make_record(row: dict, source: str, base_dir: str, image_key: str = "image", caption_key: str = "caption",
                ) -> Record:
    """Check one row (already parsed) and resolve its image path; raises ManifestError naming `source`."""
    try:
        if not isinstance(row, dict):
            raise ValueError(f"expected an object, got {type(row).__name__}")
        if image_key not in row:
            raise ValueError(f"missing field {image_key!r}")
        if caption_key not in row:
            raise ValueError(f"missing field {caption_key!r}")
        image, caption = row[image_key], row[caption_key]
        if not isinstance(image, str) or not image:
            raise ValueError(f"{image_key!r} must be a non-empty string")
        if caption is None:
            caption = ""
        if not isinstance(caption, str):
            raise ValueError(f"{caption_key!r} must be a string")
        negatives = string_list(row.get("negatives"), "negatives")
        valid = _bool_list(row.get("valid"))
        concepts = string_list(row.get("concepts"), "concepts")
        if valid is not None and negatives is None:
            raise ValueError("'valid' given without 'negatives'")
        if valid is not None and len(valid) != len(negatives):
            raise ValueError(f"'valid' has {len(valid)} entries for {len(negatives)} negatives")
    except ValueError as error:
        raise ManifestError(f"{source}: {error}") from None
    path = os.path.expanduser(image)
    if not os.path.isabs(path) and "://" not in path:
        path = os.path.join(base_dir, path)
    return Record(path, caption, negatives, valid, concepts, source)


def iter_rows(path: str, fmt: str, image_key: str = "image") -> Iterator[tuple[int, dict]]:
    """Yield (line number, parsed row) from a JSONL / CSV / TSV file; a row that does not parse raises
    ManifestError with its line."""
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    yield line_number, json.loads(line)
                except json.JSONDecodeError as error:
                    raise ManifestError(f"{path}:{line_number}: invalid JSON ({error.msg})") from None
        return
    delimiter = "\t" if fmt == "tsv" else ","
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        if reader.fieldnames is None or image_key not in reader.fieldnames:
            raise ManifestError(f"{path}:1: header {reader.fieldnames} has no column {image_key!r}")
        for row in reader:
            line_number = reader.line_num
            if None in row:
                raise ManifestError(f"{path}:{line_number}: more cells than header columns")
            parsed = dict(row)
            for key in ("negatives", "valid", "concepts"):
                if key in parsed:
                    try:
                        parsed[key] = _parse_list_cell(parsed[key] or "")
                    except ValueError as error:
                        raise ManifestError(f"{path}:{line_number}: column {key!r}: {error}") from None
            yield line_number, parsed


def read_manifest(path: str, fmt: str = "auto", image_root: str = "", image_key: str = "image",
                  caption_key: str = "caption") -> list[Record]:
    """Read and check a whole JSONL / CSV / TSV manifest. Relative image paths resolve against `image_root`,
    or the manifest's folder when it is empty."""
    fmt = detect_format(path, fmt)
    if fmt == "wds":
        raise ValueError(f"{path}: WebDataset shards are streamed, not read as a manifest")
    if not os.path.exists(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    base_dir = image_root or os.path.dirname(os.path.abspath(path))
    records = [make_record(row, f"{path}:{line_number}", base_dir, image_key, caption_key)
               for line_number, row in iter_rows(path, fmt, image_key)]
    if not records:
        raise ManifestError(f"{path}:1: the manifest holds no samples")
    return records


def write_jsonl(path: str, rows: Iterable[dict]) -> int:
    """Write rows as JSONL (atomically: a temporary file renamed into place). Returns the row count."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp"
    count = 0
    with open(temporary, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    os.replace(temporary, path)
    return count
