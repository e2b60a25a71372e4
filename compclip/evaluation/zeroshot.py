"""Zero-shot classification: class-name prompts as the classifier, top-1 / top-5 and mean per-class accuracy.

Each class's weight is the normalised mean of its normalised prompt embeddings (one prompt per template), as in
CLIP. A prediction is counted at top-k when fewer than k other classes score >= the true class (ties count as
wrong). Mean per-class accuracy is the mean over classes that have images of their top-1 recall.
"""
from __future__ import annotations

import csv
import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from compclip.data.inputs import text_lines
from compclip.data.manifest import CELL_LIMIT

from .common import BenchmarkResult, EvalDataError, data_error, require_texts
from .embed import Embedder, ImageRef, resolve_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SIMPLE_TEMPLATES = ("a photo of a {}.",)


def load_templates(spec: str) -> List[Callable[[str], str]]:
    """`openai`: the 80 ImageNet prompt templates of CLIP (as open_clip ships them); `simple`: 'a photo of a {}.';
    otherwise a text file with one template containing `{}` per line."""
    if spec == "openai":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES)
    if spec == "simple":
        return [template.format for template in SIMPLE_TEMPLATES]
    if not os.path.isfile(spec):
        raise EvalDataError(f"{spec}: prompt templates must be 'openai', 'simple' or an existing text file")
    templates = []
    for number, line in text_lines(spec, EvalDataError):
        line = line.strip()
        if not line:
            continue
        if "{}" not in line:
            raise data_error(spec, f"line {number}", "template has no '{}' for the class name")
        try:  # other braces would fail at the first class name, after the model has been loaded
            line.format("class name")
        except (ValueError, KeyError, IndexError, AttributeError) as error:
            raise data_error(spec, f"line {number}", f"template does not format with one '{{}}' ({error!r}); "
                                                     "write a literal brace as '{{' or '}}'") from None
        templates.append(line.format)
    if not templates:
        raise EvalDataError(f"{spec}: no template in the file")
    return templates


def _read_classnames(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise EvalDataError(f"{path}: class-name file not found")
    names = []
    for number, line in text_lines(path, EvalDataError):
        if line.strip():
            require_texts([line.strip()], "class name", path, f"line {number}")
            names.append(line.strip())
    if not names:
        raise EvalDataError(f"{path}: no class name in the file")
    return names


def load_classification(path: str, image_root: Optional[str] = None, classnames_file: Optional[str] = None,
                        max_items: Optional[int] = None) -> Tuple[List[ImageRef], List[int], List[str]]:
    """(images, labels, class names) from an image folder (one subfolder per class, sorted) or a CSV `image,label`."""
    given = _read_classnames(classnames_file) if classnames_file else None
    refs, labels = [], []
    if os.path.isdir(path):
        folders = sorted(entry for entry in os.listdir(path) if os.path.isdir(os.path.join(path, entry)))
        if not folders:
            raise EvalDataError(f"{path}: no class subfolder")
        if given is not None and len(given) != len(folders):
            raise EvalDataError(f"{classnames_file}: {len(given)} class names for {len(folders)} class folders")
        classnames = given or [folder.replace("_", " ") for folder in folders]
        for label, folder in enumerate(folders):
            for name in sorted(os.listdir(os.path.join(path, folder))):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    refs.append(ImageRef(os.path.realpath(os.path.join(path, folder, name)), None, path,
                                         f"{folder}/{name}"))
                    labels.append(label)
    elif os.path.isfile(path):
        root = image_root or os.path.dirname(path)
        csv.field_size_limit(CELL_LIMIT)  # the manifest reader's limit: the process-wide setting must not differ
        reader = csv.DictReader((line for _, line in text_lines(path, EvalDataError)))
        rows, start = [], 2
        try:
            if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
                raise EvalDataError(f"{path}: CSV needs the columns 'image,label', found {reader.fieldnames}")
            for row in reader:
                label = (row["label"] or "").strip()
                require_texts([label], "label", path, f"line {start}")
                rows.append((f"line {start}", row["image"], label))
                start = reader.line_num + 1
        except csv.Error as error:
            raise data_error(path, f"line {start}", f"not a CSV row ({error})") from None
        if given is None and all(label.isdigit() for _, _, label in rows):
            raise EvalDataError(f"{path}: numeric labels need a class-name file (zeroshot_classnames)")
        classnames = given or sorted({label for _, _, label in rows})
        index = {name: i for i, name in enumerate(classnames)}
        for line, image, label in rows:
            if label.isdigit() and given is not None:
                if int(label) >= len(classnames):
                    raise data_error(path, line, f"label {label} out of range for {len(classnames)} classes")
                labels.append(int(label))
            elif label in index:
                labels.append(index[label])
            else:
                raise data_error(path, line, f"unknown class {label!r}")
            refs.append(resolve_image(root, image, path, line))
    else:
        raise EvalDataError(f"{path}: zero-shot data is neither an image folder nor a CSV file")
    if not refs:
        raise EvalDataError(f"{path}: no image found")
    return refs[:max_items], labels[:max_items], classnames


def class_weights(embedder: Embedder, classnames: Sequence[str], templates: Sequence[Callable]) -> torch.Tensor:
    """[C, D]: per class, the normalised mean of its normalised prompt embeddings."""
    prompts = [template(name) for name in classnames for template in templates]
    features = embedder.texts(prompts, desc="zeroshot prompts").view(len(classnames), len(templates), -1)
    return F.normalize(features.mean(dim=1), dim=-1)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    true = logits.gather(1, labels[:, None])
    others_above = (logits >= true).sum(dim=1) - 1  # pessimistic rank: ties count against the true class
    top1 = others_above < 1
    per_class = [float(top1[labels == c].float().mean()) for c in range(num_classes) if (labels == c).any()]
    return {"top1": float(top1.float().mean()), "top5": float((others_above < 5).float().mean()),
            "mean_per_class": sum(per_class) / len(per_class)}


def run_zeroshot(embedder: Embedder, path: str, image_root=None, classnames_file=None, templates="openai",
                 max_items=None) -> BenchmarkResult:
    refs, labels, classnames = load_classification(path, image_root, classnames_file, max_items)
    weights = class_weights(embedder, classnames, load_templates(templates))
    images = embedder.images(refs, desc="zeroshot images")
    metrics = classification_metrics(images @ weights.T, torch.tensor(labels), len(classnames))
    return BenchmarkResult(metrics, {"images": len(refs), "classes": len(classnames), "templates": templates,
                                     "path": path})
