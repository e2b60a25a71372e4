"""Importers of the published training-data formats into manifest rows
(`{"image", "caption", "negatives"?, "valid"?, "concepts"?}`, image paths resolved).

| kind     | file                   | content                                                                          |
|----------|------------------------|----------------------------------------------------------------------------------|
| negclip  | TSV                    | columns `title` (caption), `filepath`, `neg_caption` (Python list literal)       |
| ceclip   | .npy (object array)    | a list/array of dicts (or one dict) with `caption`, `relation_aug_caption`,       |
|          |                        | `adj_aug_caption`, `noun_aug_caption`, `verb_aug_caption`, `valid_caption`, and    |
|          |                        | `image_path` or a COCO `image_id`                                                 |
| degla    | JSON                   | `[{"image_id", "original", "enhanced": [...]}]`, COCO train2014 images            |
| c2lip    | .pkl                   | a list of dicts with an image path, a caption and `nounphrases` (empty -> caption) |

WebDataset shards whose json carries `nounphrases` (C2LIP) are read directly by the loader
(`compclip.data.shards`), no import needed.

The two pickled formats (C2LIP's `.pkl`, CE-CLIP's object `.npy`) are read with `compclip.safe_pickle`'s
restricted unpickler: builtins containers/scalars and numpy arrays only; any other global in a downloaded file
(code execution) raises `UnsafePickleError` naming the file and the global, before anything runs.
"""
from __future__ import annotations

import ast
import csv
import json
import os
import sys

import numpy as np

from ..safe_pickle import load_npy, load_pickle
from .manifest import INVALID_NEGATIVE, ManifestError

CECLIP_SLOTS = ("relation_aug_caption", "adj_aug_caption", "noun_aug_caption", "verb_aug_caption")
"""CE-CLIP's typed negatives, in slot order (relation, attribute, object, action)."""
UNFILLED_MASK = "<mask>"
"""CE-CLIP's intermediate files keep `<mask>` where the fill-mask model has not run: such a negative is invalid."""
C2LIP_IMAGE_KEYS = ("image", "image_path", "img_path", "filepath", "file_path", "path", "filename", "file_name")
C2LIP_CAPTION_KEYS = ("caption", "text", "title", "short_caption")
C2LIP_CONCEPT_KEYS = ("nounphrases", "noun_phrases", "concepts")


def coco_path(image_root: str, image_id, split: str = "train2014") -> str:
    """COCO 2014 file name of an image id: `<root>/COCO_train2014_000000000009.jpg`."""
    return os.path.join(image_root, f"COCO_{split}_{int(image_id):012d}.jpg")


def _resolve(path: str, base: str) -> str:
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) else os.path.join(base, path)


def _base(path: str, image_root: str) -> str:
    return image_root or os.path.dirname(os.path.abspath(path))


def import_negclip(path: str, image_root: str = "") -> list[dict]:
    """NegCLIP TSV: `title`, `filepath`, `neg_caption` (a Python list literal, or one caption)."""
    rows = []
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = {"title", "filepath"} - set(reader.fieldnames or [])
        if missing:
            raise ManifestError(f"{path}:1: NegCLIP TSV header lacks {sorted(missing)}")
        for row in reader:
            line = reader.line_num
            negatives = None
            cell = (row.get("neg_caption") or "").strip()
            if cell:
                try:
                    value = ast.literal_eval(cell) if cell[0] in "[(" else cell
                except (ValueError, SyntaxError):
                    raise ManifestError(f"{path}:{line}: neg_caption is not a Python list literal") from None
                negatives = [value] if isinstance(value, str) else [str(v) for v in value]
            out = {"image": _resolve(row["filepath"], _base(path, image_root)), "caption": row["title"] or ""}
            if negatives is not None:
                out["negatives"] = negatives
            rows.append(out)
    return rows


def _ceclip_valid(sample: dict, negatives: list[str], source: str) -> list[bool]:
    valid = [text != INVALID_NEGATIVE and UNFILLED_MASK not in text for text in negatives]
    given = sample.get("valid_caption")
    if given is None:
        return valid
    given = [bool(v) for v in np.asarray(given).reshape(-1).tolist()]
    if len(given) == len(negatives) + 1:  # a mask that also covers the positive caption
        given = given[1:]
    if len(given) != len(negatives):
        raise ManifestError(f"{source}: valid_caption has {len(given)} entries for {len(negatives)} negatives")
    return [a and b for a, b in zip(given, valid)]


def import_ceclip(path: str, image_root: str = "", coco_split: str = "train2014") -> list[dict]:
    """CE-CLIP `.npy`: typed slots kept in CE-CLIP's order; `'###'` and unfilled `<mask>` are invalid."""
    loaded = load_npy(path)
    samples = loaded.item() if loaded.ndim == 0 else loaded.tolist()
    if isinstance(samples, dict):
        samples = [samples] if "caption" in samples else list(samples.values())
    rows = []
    for number, sample in enumerate(samples):
        source = f"{path}:{number}"
        if not isinstance(sample, dict) or "caption" not in sample:
            raise ManifestError(f"{source}: expected a dict with 'caption'")
        if "image_path" in sample:
            image = _resolve(sample["image_path"], _base(path, image_root))
        elif "image_id" in sample:
            image = coco_path(image_root, sample["image_id"], coco_split)
        else:
            raise ManifestError(f"{source}: neither 'image_path' nor 'image_id'")
        negatives = [str(sample.get(slot, INVALID_NEGATIVE)) for slot in CECLIP_SLOTS]
        rows.append({"image": image, "caption": str(sample["caption"]), "negatives": negatives,
                     "valid": _ceclip_valid(sample, negatives, source)})
    return rows


def import_degla(path: str, image_root: str = "", coco_split: str = "train2014") -> list[dict]:
    """DeGLA JSON: `original` is the caption, `enhanced` its LLM-written negatives (all valid)."""
    with open(path, encoding="utf-8") as handle:
        entries = json.load(handle)
    if isinstance(entries, dict):
        entries = list(entries.values())
    rows = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"image_id", "original"} <= set(entry):
            raise ManifestError(f"{path}:{number}: expected an object with 'image_id' and 'original'")
        negatives = entry.get("enhanced") or []
        if isinstance(negatives, str):
            negatives = [negatives]
        rows.append({"image": coco_path(image_root, entry["image_id"], coco_split), "caption": entry["original"],
                     "negatives": [str(n) for n in negatives]})
    return rows


def _first(sample: dict, keys: tuple[str, ...]):
    return next((sample[key] for key in keys if key in sample), None)


def import_c2lip(path: str, image_root: str = "") -> list[dict]:
    """C2LIP pickle: concepts from `nounphrases`; an empty list means the caption is the one concept."""
    samples = load_pickle(path)
    if isinstance(samples, dict):
        samples = list(samples.values())
    rows = []
    for number, sample in enumerate(samples):
        image, caption = _first(sample, C2LIP_IMAGE_KEYS), _first(sample, C2LIP_CAPTION_KEYS)
        if image is None or caption is None:
            raise ManifestError(f"{path}:{number}: no image ({'/'.join(C2LIP_IMAGE_KEYS)}) or caption "
                                f"({'/'.join(C2LIP_CAPTION_KEYS)}) among {sorted(sample)}")
        phrases = [str(p) for p in (_first(sample, C2LIP_CONCEPT_KEYS) or []) if str(p).strip()]
        rows.append({"image": _resolve(image, _base(path, image_root)), "caption": str(caption),
                     "concepts": phrases or [str(caption)]})
    return rows


IMPORTERS = {"negclip": import_negclip, "ceclip": import_ceclip, "degla": import_degla, "c2lip": import_c2lip}


def import_rows(path: str, kind: str, image_root: str = "") -> list[dict]:
    """Rows of a published-format file; `kind` is one of IMPORTERS."""
    if kind not in IMPORTERS:
        raise ValueError(f"unknown input kind {kind!r} ({', '.join(IMPORTERS)})")
    return IMPORTERS[kind](path, image_root)
