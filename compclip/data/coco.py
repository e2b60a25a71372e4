"""COCO's caption annotations and the Karpathy-split JSON, read and checked.

- COCO captions (`captions_train2014.json`): `{"images": [{"id", "file_name", ...}], "annotations": [{"image_id",
  "id", "caption"}, ...]}`; several captions per image, each its own annotation.
- Karpathy split (`dataset_coco.json`, `dataset_flickr30k.json`): `{"images": [{"filepath"?, "filename",
  "split", "sentences": [{"raw", "tokens", ...}], "imgid", "cocoid"?}]}`; `split` is `train`, `restval`, `val` or
  `test` (COCO's 113,287 training images are `train` + `restval`). The image is `<filepath>/<filename>`.

`compclip-prepare` imports both (one manifest row per caption); the evaluation reads the Karpathy file for
retrieval and ARO's Order sets. Errors name the file and the item (`file: item N: ...`) and the field.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Collection, List

from .inputs import ErrorType, InputError, check_text, load_json, whole_number


@dataclass
class CaptionedImage:
    """An image and its captions; `path` is relative to the image root (or absolute); `sources` name the item of
    each caption in the file."""

    id: str
    path: str
    captions: List[str]
    sources: List[str]


def _item_error(error: ErrorType, path: str, item, message: str) -> Exception:
    return error(f"{path}: item {item}: {message}")


def _text(value, field: str, path: str, item, error: ErrorType) -> str:
    if not isinstance(value, str):
        raise _item_error(error, path, item, f"field {field!r} must be a string, got {type(value).__name__}")
    try:
        return check_text(value, field)
    except ValueError as failure:
        raise _item_error(error, path, item, str(failure)) from None


def _object_id(entry, field: str, path: str, where: str, error: ErrorType) -> int:
    """The non-negative integer `field` of the object `entry` (item `where`)."""
    if not isinstance(entry, dict):
        raise _item_error(error, path, where, f"expected an object, got {type(entry).__name__}")
    try:
        return whole_number(entry.get(field), field)
    except ValueError as failure:
        raise _item_error(error, path, where, str(failure)) from None


def read_karpathy(path: str, splits: Collection[str], error: ErrorType = InputError, data=None
                  ) -> List[CaptionedImage]:
    """The images of a Karpathy-split JSON whose `split` is one of `splits`, in file order; an error when none is.
    `data`: the file already parsed (by `load_json`), to read it once."""
    data = load_json(path, error) if data is None else data
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise error(f"{path}: expected a Karpathy-split JSON {{\"images\": [...]}}")
    out, seen_splits = [], set()
    for index, image in enumerate(data["images"]):
        item = str(image.get("imgid", image.get("cocoid", index)))[:80] if isinstance(image, dict) else index
        if not isinstance(image, dict):
            raise _item_error(error, path, index, f"expected an object, got {type(image).__name__}")
        filename = _text(image.get("filename"), "filename", path, item, error)
        if not filename:
            raise _item_error(error, path, item, "field 'filename' is empty")
        split = _text(image.get("split"), "split", path, item, error)
        seen_splits.add(split)
        if split not in splits:
            continue
        sentences = image.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise _item_error(error, path, item, "missing or empty 'sentences'")
        captions, sources = [], []
        for number, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if not isinstance(raw, str):
                raise _item_error(error, path, item, f"sentence {number} needs a string 'raw'")
            captions.append(_text(raw, "raw", path, item, error))
            sources.append(f"{path}: item {item}, sentence {number}")
        folder = image.get("filepath") or ""
        relative = os.path.join(_text(folder, "filepath", path, item, error), filename)
        out.append(CaptionedImage(str(item), relative, captions, sources))
    if not out:
        raise error(f"{path}: no image in split(s) {sorted(splits)} (the file has {sorted(seen_splits)})")
    return out


def read_coco_captions(path: str, error: ErrorType = InputError) -> List[CaptionedImage]:
    """The images of a COCO caption file that have captions, in the order of their first annotation, each with
    its captions in annotation order."""
    data = load_json(path, error)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise error(f"{path}: expected COCO captions {{\"images\": [...], \"annotations\": [...]}}")
    files = {}
    for index, image in enumerate(data["images"]):
        where = f"images[{index}]"
        image_id = _object_id(image, "id", path, where, error)
        if image_id in files:
            raise _item_error(error, path, where, f"image id {image_id} appears twice")
        name = _text(image.get("file_name"), "file_name", path, where, error)
        if not name:
            raise _item_error(error, path, where, "field 'file_name' is empty")
        files[image_id] = name
    by_image: dict = {}
    for index, annotation in enumerate(data["annotations"]):
        where = f"annotations[{index}]"
        image_id = _object_id(annotation, "image_id", path, where, error)
        if image_id not in files:
            raise _item_error(error, path, where, f"field 'image_id': no image with id {image_id} in 'images'")
        caption = _text(annotation.get("caption"), "caption", path, where, error)
        entry = by_image.setdefault(image_id, CaptionedImage(str(image_id), files[image_id], [], []))
        entry.captions.append(caption)
        entry.sources.append(f"{path}: item {where}")
    if not by_image:
        raise error(f"{path}: no caption annotation")
    return list(by_image.values())
