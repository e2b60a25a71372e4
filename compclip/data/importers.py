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
| coco     | JSON                   | COCO captions (`captions_train2014.json`): one row per caption annotation         |
| karpathy | JSON                   | Karpathy split (`dataset_coco.json`): one row per sentence of the chosen splits    |

Image ids (CE-CLIP's and DeGLA's `image_id`) become file names through an image template, a `str.format`
pattern with the field `id` (default `COCO_train2014_{id:012d}.jpg`, COCO's train2014 names); like every relative
image path it resolves against the image root (default: the input file's folder).

Every row goes through the manifest's own check (`compclip.data.manifest.make_record`), so an importer accepts
exactly what a manifest would, and an error names the file, the line or item, and the field. NegCLIP's TSV is
read by the manifest reader itself: `data.train_manifest` accepts it directly.

WebDataset shards whose json carries `nounphrases` (C2LIP) are read directly by the loader
(`compclip.data.shards`), no import needed.

The two pickled formats (C2LIP's `.pkl`, CE-CLIP's object `.npy`) are read with `compclip.safe_pickle`'s
restricted unpickler: builtins containers/scalars and numpy arrays only; any other global in a downloaded file
(code execution) raises `UnsafePickleError` naming the file and the global, before anything runs.
"""
from __future__ import annotations

import inspect
import os
from typing import Collection

import numpy as np

from ..safe_pickle import load_npy, load_pickle
from .coco import read_coco_captions, read_karpathy
from .inputs import check_text, load_json, whole_number
from .manifest import INVALID_NEGATIVE, ManifestError, Record, make_record, read_manifest

CECLIP_SLOTS = ("relation_aug_caption", "adj_aug_caption", "noun_aug_caption", "verb_aug_caption")
"""CE-CLIP's typed negatives, in slot order (relation, attribute, object, action)."""
UNFILLED_MASK = "<mask>"
"""CE-CLIP's intermediate files keep `<mask>` where the fill-mask model has not run: such a negative is invalid."""
C2LIP_IMAGE_KEYS = ("image", "image_path", "img_path", "filepath", "file_path", "path", "filename", "file_name")
C2LIP_CAPTION_KEYS = ("caption", "text", "title", "short_caption")
C2LIP_CONCEPT_KEYS = ("nounphrases", "noun_phrases", "concepts")
DEFAULT_IMAGE_TEMPLATE = "COCO_train2014_{id:012d}.jpg"
"""COCO train2014 file names, the images of CE-CLIP's and DeGLA's releases (relative to the image root)."""
KARPATHY_TRAIN_SPLITS = ("train", "restval")
"""The Karpathy splits that make COCO's 113,287 training images."""


def check_image_template(template: str) -> str:
    """`template` unchanged, or a ValueError saying what is wrong with it."""
    try:
        name = template.format(id=9)
    except (KeyError, IndexError, ValueError, AttributeError) as error:
        raise ValueError(f"image template {template!r} does not format with a field 'id' such as "
                         f"{DEFAULT_IMAGE_TEMPLATE!r} ({type(error).__name__}: {error})") from None
    if name == template:
        raise ValueError(f"image template {template!r} has no field {{id}}: every image would be the same file")
    return template


def image_name(template: str, image_id) -> str:
    """The file name of a numeric image id through `template` (`COCO_train2014_{id:012d}.jpg`)."""
    return template.format(id=whole_number(image_id, "image_id"))


def _base(path: str, image_root: str) -> str:
    return image_root or os.path.dirname(os.path.abspath(path))


def _samples(loaded, path: str, single_key: str) -> list:
    """The list of samples of a loaded release file: a list, a tuple, an array, or a dict of samples (or one
    sample, recognised by `single_key`)."""
    if isinstance(loaded, np.ndarray):
        loaded = loaded.item() if loaded.ndim == 0 else loaded.tolist()
    if isinstance(loaded, dict):
        loaded = [loaded] if single_key in loaded else list(loaded.values())
    if not isinstance(loaded, (list, tuple)):
        raise ManifestError(f"{path}: expected a list of samples, got {type(loaded).__name__}")
    return list(loaded)


def _field_error(source: str, message: str) -> ManifestError:
    return ManifestError(f"{source}: {message}")


def negclip_records(path: str, image_root: str = "") -> list[Record]:
    """NegCLIP TSV: `title`, `filepath`, `neg_caption` (a Python list literal, or one caption); read by the
    manifest reader (the same code path as `data.train_manifest`)."""
    return read_manifest(path, "tsv", image_root, image_key="filepath", caption_key="title")


def _ceclip_valid(sample: dict, negatives: list[str], source: str) -> list[bool]:
    valid = [text != INVALID_NEGATIVE and UNFILLED_MASK not in text for text in negatives]
    given = sample.get("valid_caption")
    if given is None:
        return valid
    flags = np.asarray(given, dtype=object).reshape(-1).tolist()
    if not all(isinstance(flag, (bool, int, np.bool_, np.integer)) and flag in (0, 1) for flag in flags):
        raise _field_error(source, "field 'valid_caption' must be a list of 0/1 flags")
    flags = [bool(flag) for flag in flags]
    if len(flags) == len(negatives) + 1:  # a mask that also covers the positive caption
        flags = flags[1:]
    if len(flags) != len(negatives):
        raise _field_error(source, f"field 'valid_caption' has {len(flags)} entries for {len(negatives)} negatives")
    return [a and b for a, b in zip(flags, valid)]


def ceclip_records(path: str, image_root: str = "", image_template: str = DEFAULT_IMAGE_TEMPLATE) -> list[Record]:
    """CE-CLIP `.npy`: typed slots kept in CE-CLIP's order; `'###'` and unfilled `<mask>` are invalid; a missing
    slot is `'###'`."""
    base = _base(path, image_root)
    records = []
    for number, sample in enumerate(_samples(load_npy(path), path, "caption")):
        source = f"{path}: item {number}"
        if not isinstance(sample, dict) or "caption" not in sample:
            raise _field_error(source, "expected a dict with 'caption'")
        try:
            if "image_path" in sample:
                image_key, image = "image_path", sample["image_path"]
            elif "image_id" in sample:
                image_key, image = "image_id", image_name(image_template, sample["image_id"])
            else:
                raise ValueError("neither 'image_path' nor 'image_id'")
            negatives = []
            for slot in CECLIP_SLOTS:
                text = sample.get(slot, INVALID_NEGATIVE)
                if not isinstance(text, str):
                    raise ValueError(f"field {slot!r} must be a string, got {type(text).__name__}")
                negatives.append(check_text(text, slot))
        except ValueError as error:
            raise _field_error(source, str(error)) from None
        row = {image_key: image, "caption": sample["caption"], "negatives": negatives,
               "valid": _ceclip_valid(sample, negatives, source)}
        records.append(make_record(row, source, base, image_key=image_key))
    return records


def degla_records(path: str, image_root: str = "", image_template: str = DEFAULT_IMAGE_TEMPLATE) -> list[Record]:
    """DeGLA JSON: `original` is the caption, `enhanced` its LLM-written negatives (all valid)."""
    base = _base(path, image_root)
    records = []
    for number, entry in enumerate(_samples(load_json(path, ManifestError), path, "original")):
        source = f"{path}: item {number}"
        if not isinstance(entry, dict) or not {"image_id", "original"} <= set(entry):
            raise _field_error(source, "expected an object with 'image_id' and 'original'")
        negatives = entry.get("enhanced")
        if negatives is None:
            negatives = []
        elif isinstance(negatives, str):
            negatives = [negatives]
        if not isinstance(negatives, list) or not all(isinstance(text, str) for text in negatives):
            raise _field_error(source, "field 'enhanced' must be a list of strings")
        try:
            image = image_name(image_template, entry["image_id"])
        except ValueError as error:
            raise _field_error(source, str(error)) from None
        row = {"image_id": image, "original": entry["original"], "negatives": negatives}
        records.append(make_record(row, source, base, image_key="image_id", caption_key="original"))
    return records


def _first_key(sample: dict, keys: tuple[str, ...]):
    return next((key for key in keys if key in sample), None)


def c2lip_records(path: str, image_root: str = "") -> list[Record]:
    """C2LIP pickle: concepts from `nounphrases`; an empty (or missing) list means the caption is the one
    concept."""
    base = _base(path, image_root)
    records = []
    for number, sample in enumerate(_samples(load_pickle(path), path, "nounphrases")):
        source = f"{path}: item {number}"
        if not isinstance(sample, dict):
            raise _field_error(source, f"expected a dict, got {type(sample).__name__}")
        image_key, caption_key = _first_key(sample, C2LIP_IMAGE_KEYS), _first_key(sample, C2LIP_CAPTION_KEYS)
        if image_key is None or caption_key is None:
            raise _field_error(source, f"no image ({'/'.join(C2LIP_IMAGE_KEYS)}) or caption "
                                       f"({'/'.join(C2LIP_CAPTION_KEYS)}) among {sorted(map(str, sample))}")
        concept_key = _first_key(sample, C2LIP_CONCEPT_KEYS)
        phrases = sample[concept_key] if concept_key else None
        if isinstance(phrases, np.ndarray):
            phrases = phrases.tolist()
        if isinstance(phrases, (list, tuple)) and all(isinstance(p, str) for p in phrases):
            phrases = [p for p in phrases if p.strip()]
        elif phrases is not None:
            raise _field_error(source, f"field {concept_key!r} must be a list of strings")
        caption = sample[caption_key]
        row = {image_key: sample[image_key], caption_key: caption}
        if isinstance(caption, str):
            row["concepts"] = phrases or [caption]
        records.append(make_record(row, source, base, image_key=image_key, caption_key=caption_key))
    return records


def coco_records(path: str, image_root: str = "") -> list[Record]:
    """COCO captions JSON: one record per caption annotation, the image by its `file_name`."""
    base = _base(path, image_root)
    return [make_record({"image": image.path, "caption": caption}, source, base)
            for image in read_coco_captions(path, ManifestError)
            for caption, source in zip(image.captions, image.sources)]


def karpathy_records(path: str, image_root: str = "", splits: Collection[str] = KARPATHY_TRAIN_SPLITS
                     ) -> list[Record]:
    """Karpathy-split JSON: one record per sentence of the images in `splits`, the image `<filepath>/<filename>`."""
    base = _base(path, image_root)
    return [make_record({"image": image.path, "caption": caption}, source, base)
            for image in read_karpathy(path, tuple(splits), ManifestError)
            for caption, source in zip(image.captions, image.sources)]


IMPORTERS = {"negclip": negclip_records, "ceclip": ceclip_records, "degla": degla_records, "c2lip": c2lip_records,
             "coco": coco_records, "karpathy": karpathy_records}
"""kind -> function(path, image_root, **options) returning checked records (`source` = file and line or item)."""
TEMPLATED = sorted(kind for kind, read in IMPORTERS.items() if "image_template" in inspect.signature(read).parameters)
"""The kinds whose images are named by id (their readers take an `image_template`)."""


def import_records(path: str, kind: str, image_root: str = "", *, image_template: str = DEFAULT_IMAGE_TEMPLATE,
                   splits: Collection[str] = KARPATHY_TRAIN_SPLITS) -> list[Record]:
    """Checked records of a published-format file; `kind` is one of IMPORTERS."""
    if kind not in IMPORTERS:
        raise ValueError(f"unknown input kind {kind!r} ({', '.join(IMPORTERS)})")
    options = {}
    if kind in TEMPLATED:
        options["image_template"] = check_image_template(image_template)
    if kind == "karpathy":
        options["splits"] = splits
    return IMPORTERS[kind](path, image_root, **options)


def import_rows(path: str, kind: str, image_root: str = "", **options) -> list[dict]:
    """Manifest rows of a published-format file (see `import_records` for the options)."""
    return [record.to_json() for record in import_records(path, kind, image_root, **options)]


def import_negclip(path: str, image_root: str = "") -> list[dict]:
    return import_rows(path, "negclip", image_root)


def import_ceclip(path: str, image_root: str = "", image_template: str = DEFAULT_IMAGE_TEMPLATE) -> list[dict]:
    return import_rows(path, "ceclip", image_root, image_template=image_template)


def import_degla(path: str, image_root: str = "", image_template: str = DEFAULT_IMAGE_TEMPLATE) -> list[dict]:
    return import_rows(path, "degla", image_root, image_template=image_template)


def import_c2lip(path: str, image_root: str = "") -> list[dict]:
    return import_rows(path, "c2lip", image_root)
