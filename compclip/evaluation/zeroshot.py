"""Zero-shot classification: class-name prompts as the classifier; top-1 / top-5 accuracy and mean per-class recall.

Class names: a class-names file when given; else open_clip's ImageNet names for ImageNet class folders (or when
the dataset is named as an ImageNet variant, see `metadata.py`); else the folder names or the CSV's labels. Prompt
templates: open_clip's 80 CLIP templates by default (`openai`), or another set or a file.

The metrics are clip_benchmark's (`zeroshot_classification`): each class's weight is the normalised mean of its
normalised prompt embeddings (one prompt per template), as in CLIP. Top-k accuracy counts an image when its class
is among the k best-scoring ones; top-5 is NaN with fewer than 5 classes, where it would be 1 by construction.
Mean per-class recall is the mean over the classes that have images of their top-1 recall (clip_benchmark's
`balanced_accuracy_score`). One difference: a class scoring **equal** to the true class counts as ranked above it
(ties count as wrong, as in the other benchmarks), where clip_benchmark's `topk` / `argmax` break ties by index;
the two agree whenever scores are distinct.
"""
from __future__ import annotations

import csv
import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from compclip.data.inputs import shown, text_lines
from compclip.data.manifest import CELL_LIMIT

from .common import BenchmarkResult, EvalDataError, data_error, require_texts
from .embed import Embedder, ImageRef, resolve_image
from .metadata import (IMAGENET_DATASETS, IMAGENET_SOURCE, TEMPLATE_SETS, imagenet_classnames,
                       imagenet_folder_classnames, is_imagenet_layout, template_set)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_templates(spec: str) -> List[Callable[[str], str]]:
    """A named set (`openai`: open_clip's 80 CLIP ImageNet templates; `openai-simple`: its 7-template subset;
    `simple`: 'a photo of a {}.'), otherwise a text file with one template containing `{}` per line."""
    named = template_set(spec)
    if named is not None:
        return named
    if not os.path.isfile(spec):
        raise EvalDataError(f"{spec}: prompt templates must be one of {', '.join(TEMPLATE_SETS)} or an existing "
                            "text file")
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


def _label_number(label: str) -> Optional[int]:
    """A CSV label that is a class index (ASCII digits; `int()` would take '²' and refuse 5,000 digits)."""
    return int(label) if label.isascii() and label.isdigit() and len(label) < 19 else None


def class_folders(path: str) -> List[str]:
    """The class subfolders of an image folder in label order: sorted, numerically when all are numbers."""
    folders = [entry for entry in os.listdir(path) if os.path.isdir(os.path.join(path, entry))]
    return sorted(folders, key=int) if folders and all(f.isdigit() for f in folders) else sorted(folders)


def load_classification(path: str, image_root: Optional[str] = None, classnames_file: Optional[str] = None,
                        max_items: Optional[int] = None,
                        imagenet: bool = False) -> Tuple[List[ImageRef], List[int], List[str]]:
    """(images, labels, class names) from an image folder (one subfolder per class) or a CSV `image,label`.
    `imagenet`: without a class-names file, the classes get open_clip's ImageNet names (folders by WordNet id or
    label number; a CSV's labels are ImageNet indices or names)."""
    given = _read_classnames(classnames_file) if classnames_file else None
    refs, labels = [], []
    if os.path.isdir(path):
        folders = class_folders(path)
        if not folders:
            raise EvalDataError(f"{path}: no class subfolder")
        if given is not None and len(given) != len(folders):
            raise EvalDataError(f"{classnames_file}: {len(given)} class names for {len(folders)} class folders")
        classnames = given or (imagenet_folder_classnames(folders, path) if imagenet
                               else [folder.replace("_", " ") for folder in folders])
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
        if given is None and imagenet:
            given = list(imagenet_classnames())
        if given is None and all(_label_number(label) is not None for _, _, label in rows):
            raise EvalDataError(f"{path}: numeric labels need a class-name file (zeroshot_classnames), or an "
                                f"ImageNet dataset name (zeroshot_dataset: {', '.join(IMAGENET_DATASETS)})")
        classnames = given or sorted({label for _, _, label in rows})
        index = {name: i for i, name in enumerate(classnames)}
        for line, image, label in rows:
            number = _label_number(label)
            if number is not None and given is not None:
                if number >= len(classnames):
                    raise data_error(path, line, f"label {label} out of range for {len(classnames)} classes")
                labels.append(number)
            elif label in index:
                labels.append(index[label])
            else:
                raise data_error(path, line, f"unknown class {shown(label)}")
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
    """top1, top5 (NaN with fewer than 5 classes) and mean_per_class (recall) from [N, C] scores."""
    true = logits.gather(1, labels[:, None])
    others_above = (logits >= true).sum(dim=1) - 1  # pessimistic rank: ties count against the true class
    top1 = others_above < 1
    per_class = [float(top1[labels == c].double().mean()) for c in range(num_classes) if (labels == c).any()]
    top5 = float((others_above < 5).double().mean()) if num_classes >= 5 else float("nan")
    return {"top1": float(top1.double().mean()), "top5": top5, "mean_per_class": sum(per_class) / len(per_class)}


def dataset_name(path: str, dataset: Optional[str] = None) -> str:
    """The dataset's name in the clip_benchmark-style JSON: `dataset` when given, else the folder's or file's."""
    return dataset or os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def run_zeroshot(embedder: Embedder, path: str, image_root=None, classnames_file=None, templates="openai",
                 max_items=None, dataset: Optional[str] = None) -> BenchmarkResult:
    """`dataset`: its name (clip_benchmark's, e.g. `imagenet1k`); an ImageNet name selects open_clip's ImageNet
    class names, which ImageNet class folders get without it."""
    imagenet = dataset in IMAGENET_DATASETS or (os.path.isdir(path) and is_imagenet_layout(class_folders(path)))
    refs, labels, classnames = load_classification(path, image_root, classnames_file, max_items, imagenet=imagenet)
    prompts = load_templates(templates)
    weights = class_weights(embedder, classnames, prompts)
    images = embedder.images(refs, desc="zeroshot images")
    metrics = classification_metrics(images @ weights.T, torch.tensor(labels), len(classnames))
    source = classnames_file or (IMAGENET_SOURCE if imagenet
                                 else "folder names" if os.path.isdir(path) else "CSV labels")
    return BenchmarkResult(metrics, {"images": len(refs), "classes": len(classnames), "classnames": source,
                                     "templates": templates, "template_count": len(prompts),
                                     "dataset": dataset_name(path, dataset), "path": path})
