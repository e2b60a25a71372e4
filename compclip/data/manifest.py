"""Native manifests: JSONL, CSV and TSV files with one sample per row, and NegCLIP's TSV as it ships.

A sample is `{"image": path, "caption": str, "negatives": [str...], "valid": [bool...], "concepts": [str...]}`;
only `image` and `caption` are required; other fields are ignored by the loader (and kept by `compclip-prepare`).
In CSV / TSV files the list fields hold a JSON array or a Python list literal (NegCLIP's `neg_caption` style).
A TSV with NegCLIP's columns (`title`, `filepath`, `neg_caption`) and no image column is read as NegCLIP's
release: the same reader serves `data.train_manifest` and `compclip-prepare --input-format negclip`.

Every row is checked when the manifest is read (compclip.data.inputs has the rules), so a malformed file fails at
start with its file name, line number and field, not hours into a run.
"""
from __future__ import annotations

import ast
import csv
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

from .inputs import InputError, check_text, parse_json, resolve_under, text_lines

INVALID_NEGATIVE = "###"
"""CE-CLIP's marker of a negative that could not be built: the text is kept, its mask is False."""

SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".tar": "wds"}
SAMPLE_FIELDS = ("image", "caption", "negatives", "valid", "concepts")

NEGCLIP_COLUMNS = ("title", "filepath")
"""The columns that mark NegCLIP's TSV (caption, image path); its `neg_caption` cell holds the negatives as a
Python list literal (or one caption). Its other columns (`neg_image`: rows whose images serve as hard-negative
images, which compclip does not use; pandas' unnamed index) are ignored."""

CELL_LIMIT = 2**31 - 1
"""Largest CSV/TSV cell, in characters (the csv module's default, 131,072, refuses long negative lists). The csv
module's limit is process-wide; every CSV reader of the project sets this one, so none depends on another."""


class ManifestError(InputError):
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


def _parse_list_cell(cell: str, single_caption: bool = False):
    """A CSV/TSV list cell: a JSON array or a Python list literal; with `single_caption` (NegCLIP) a cell that is
    not bracketed is one caption."""
    cell = cell.strip()
    if not cell:
        return None
    if single_caption and cell[0] not in "[(":
        return [cell]
    try:
        return json.loads(cell)
    except (ValueError, RecursionError):
        try:
            return ast.literal_eval(cell)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as error:
            raise ValueError(f"not a JSON array or Python list literal: {cell[:80]!r}") from error


def string_list(value, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{name!r} must be a list of strings")
    for item in value:
        check_text(item, name)
    return value


def _bool_list(value) -> list[bool] | None:
    if value is None:
        return None
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(item, (bool, int)) and item in (0, 1) for item in value):
        raise ValueError("'valid' must be a list of booleans (or 0/1)")
    return [bool(item) for item in value]


def check_fields(row: dict, caption_key: str = "caption") -> tuple[str, list | None, list | None, list | None]:
    """(caption, negatives, valid, concepts) of a parsed row, checked; a ValueError names the field. A missing
    or null caption is "" (the loader skips and counts it)."""
    caption = row.get(caption_key)
    if caption is None:
        caption = ""
    if not isinstance(caption, str):
        raise ValueError(f"{caption_key!r} must be a string")
    check_text(caption, caption_key)
    negatives = string_list(row.get("negatives"), "negatives")
    valid = _bool_list(row.get("valid"))
    concepts = string_list(row.get("concepts"), "concepts")
    if valid is not None and negatives is None:
        raise ValueError("'valid' given without 'negatives'")
    if valid is not None and len(valid) != len(negatives):
        raise ValueError(f"'valid' has {len(valid)} entries for {len(negatives)} negatives")
    return caption, negatives, valid, concepts


def make_record(row: dict, source: str, base_dir: str, image_key: str = "image", caption_key: str = "caption",
                ) -> Record:
    """Check one row (already parsed) and resolve its image path against `base_dir` (a relative path may not
    climb out of it); raises ManifestError naming `source`."""
    try:
        if not isinstance(row, dict):
            raise ValueError(f"expected an object, got {type(row).__name__}")
        if image_key not in row:
            raise ValueError(f"missing field {image_key!r}")
        if caption_key not in row:
            raise ValueError(f"missing field {caption_key!r}")
        image = row[image_key]
        if not isinstance(image, str) or not image:
            raise ValueError(f"{image_key!r} must be a non-empty string")
        check_text(image, image_key)  # a path that cannot be written as UTF-8 cannot be written to a manifest
        caption, negatives, valid, concepts = check_fields(row, caption_key)
        path = resolve_under(base_dir, image, image_key)
    except ValueError as error:
        raise ManifestError(f"{source}: {error}") from None
    return Record(path, caption, negatives, valid, concepts, source)


def is_negclip_header(columns, image_key: str = "image") -> bool:
    """Whether a TSV header is NegCLIP's (its columns, and no `image_key` column of the manifest's own)."""
    return set(NEGCLIP_COLUMNS) <= set(columns) and (image_key not in columns or image_key == "filepath")


def _csv_rows(path: str, delimiter: str, image_key: str, caption_key: str) -> Iterator[tuple[int, dict]]:
    csv.field_size_limit(CELL_LIMIT)
    last_line = ""

    def lines():
        nonlocal last_line
        for _, text in text_lines(path, ManifestError):
            last_line = text
            yield text

    reader = csv.reader(lines(), delimiter=delimiter)
    start = 1
    try:
        header = next(reader, None)
        if header is None:
            raise ManifestError(f"{path}:1: empty file (no header row)")
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise ManifestError(f"{path}:1: header repeats the column(s) {repeated}")
        negclip = is_negclip_header(header, image_key)
        if not negclip and image_key not in header:
            raise ManifestError(f"{path}:1: header {header} has no column {image_key!r} (nor NegCLIP's "
                                f"{list(NEGCLIP_COLUMNS)})")
        start = reader.line_num + 1
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not cells:
                continue
            if len(cells) > len(header):
                raise ManifestError(f"{path}:{line}: {len(cells)} cells, more than the {len(header)} "
                                    "header columns")
            if len(cells) < len(header):
                raise ManifestError(f"{path}:{line}: {len(cells)} cells for {len(header)} header columns: no "
                                    f"{header[len(cells)]!r} (a row cut short?)")
            row = dict(zip(header, cells))
            if negclip:
                row = {image_key: row["filepath"], caption_key: row["title"],
                       **({"negatives": row["neg_caption"]} if "neg_caption" in row else {})}
            for key in ("negatives", "valid", "concepts"):
                if key in row:
                    try:
                        row[key] = _parse_list_cell(row[key] or "", single_caption=negclip)
                    except ValueError as error:
                        column = "neg_caption" if negclip else key
                        raise ManifestError(f"{path}:{line}: column {column!r}: {error}") from None
            yield line, row
    except csv.Error as error:
        raise ManifestError(f"{path}:{start}: {error}") from None
    if last_line and not last_line.endswith(("\n", "\r")):
        raise ManifestError(f"{path}:{start - 1}: the file does not end with a line break, so its last row may be "
                            "cut short (a truncated copy?); end the line if the row is complete")


def iter_rows(path: str, fmt: str, image_key: str = "image", caption_key: str = "caption"
              ) -> Iterator[tuple[int, dict]]:
    """Yield (line number, parsed row) from a JSONL / CSV / TSV file; a row that does not parse raises
    ManifestError with its line. NegCLIP TSV rows come out with the manifest's keys."""
    if fmt == "jsonl":
        for line_number, line in text_lines(path, ManifestError):
            if line.strip():
                yield line_number, parse_json(line, f"{path}:{line_number}", ManifestError, whole_file=False)
        return
    yield from _csv_rows(path, "\t" if fmt == "tsv" else ",", image_key, caption_key)


def read_manifest(path: str, fmt: str = "auto", image_root: str = "", image_key: str = "image",
                  caption_key: str = "caption") -> list[Record]:
    """Read and check a whole JSONL / CSV / TSV manifest (or NegCLIP TSV). Relative image paths resolve against
    `image_root`, or the manifest's folder when it is empty, and may not climb out of it."""
    fmt = detect_format(path, fmt)
    if fmt == "wds":
        raise ValueError(f"{path}: WebDataset shards are streamed, not read as a manifest")
    if not os.path.exists(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    base_dir = image_root or os.path.dirname(os.path.abspath(path))
    records = [make_record(row, f"{path}:{line_number}", base_dir, image_key, caption_key)
               for line_number, row in iter_rows(path, fmt, image_key, caption_key)]
    if not records:
        raise ManifestError(f"{path}:1: the manifest holds no samples")
    return records


LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}
"""Characters that JSON leaves unescaped but `str.splitlines` (and JavaScript before ES2019) treat as line ends;
escaped so that one row stays one line for every reader of the JSONL."""


def write_jsonl(path: str, rows: Iterable[dict]) -> int:
    """Write rows as JSONL (atomically: a temporary file renamed into place). Returns the row count."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp"
    count = 0
    with open(temporary, "w", encoding="utf-8") as handle:
        for row in rows:
            line = json.dumps(row, ensure_ascii=False)
            for character, escape in LINE_BREAKS.items():
                line = line.replace(character, escape)
            handle.write(line + "\n")
            count += 1
    os.replace(temporary, path)
    return count
