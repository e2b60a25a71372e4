"""Compositional benchmarks: one image, several caption options, one of them right.

Every benchmark here becomes a list of `ChoiceItem`s scored the same way: cosine similarity of the image with each
option; an item is correct when the right option scores **strictly** higher than every other one, so a tie counts
as wrong (a model that cannot tell the captions apart gets no credit). What differs is the file format and the
averaging, which follow each benchmark's authors:

* SugarCrepe: accuracy per subset over its items (micro), then the mean of the subsets in each category
  (`add_avg`, `replace_avg`, `swap_avg`) and of all subsets (`mean`).
* ARO VG-Relation / VG-Attribution: image cropped to the item's box, options [false, true]; the headline
  `macro_accuracy` is the mean over relations (attribute pairs `a_b`) of their accuracy, as the ARO authors report;
  like their code, VG-Attribution leaves out attribute pairs with fewer than 25 items.
* ARO COCO-Order / Flickr30k-Order: the true caption against its four word-order perturbations, Precision@1.
  A perturbation that is the same model input as the true caption (the same string, or the same tokens: spaCy's
  "man ," and the caption's "man," tokenize alike) is dropped (the authors' argmax gives such exact ties to the
  true caption, which sits first).
* VALSE: valid items only (`mturk.caption >= 2`), pairwise accuracy caption > foil per piece, `mean` over pieces.
* Generic JSONL `{image, captions, label}`: accuracy.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from compclip.data.inputs import finite_number, parse_json, text_lines

from .common import BenchmarkResult, EvalDataError, data_error, load_json, require_fields, require_texts
from .embed import Embedder, ImageRef, resolve_image

SUGARCREPE_SUBSETS = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")
SUGARCREPE_CATEGORIES = ("add", "replace", "swap")


@dataclass
class ChoiceItem:
    """One test case: an image, its caption options and the index of the right one."""

    id: str
    image: ImageRef
    captions: List[str]
    label: int
    group: str = ""


def score_items(embedder: Embedder, items: Sequence[ChoiceItem], desc: str = "", text_only: Optional[list] = None
                ) -> Tuple[np.ndarray, list]:
    """Return (correct [N] bool, per-item option scores). Correct = right option strictly above all others.

    `text_only`, a list, receives the same choice made without the item's image: every option scored against the
    mean of the items' image embeddings (normalised). Far above chance means that the subset can be solved from
    the captions alone, as Hsieh et al. (SugarCrepe, NeurIPS 2023) found for the benchmarks before theirs."""
    if not items:
        return np.zeros(0, dtype=bool), []
    images = embedder.images([item.image for item in items], desc=f"{desc} images")
    texts = [caption for item in items for caption in item.captions]
    text_features = embedder.texts(texts, desc=f"{desc} texts")
    counts = torch.tensor([len(item.captions) for item in items])
    scores = (text_features * images.repeat_interleave(counts, dim=0)).sum(-1)
    correct = _choices(items, scores, counts)
    per_item = [option_scores.tolist() for option_scores in torch.split(scores, counts.tolist())]
    if text_only is not None:
        mean_image = torch.nn.functional.normalize(images.float().mean(0), dim=-1).to(text_features.dtype)
        text_only.extend(_choices(items, text_features @ mean_image, counts).tolist())
    return correct, per_item


def _choices(items: Sequence[ChoiceItem], scores: torch.Tensor, counts: torch.Tensor) -> np.ndarray:
    correct = np.zeros(len(items), dtype=bool)
    for index, (item, option_scores) in enumerate(zip(items, torch.split(scores, counts.tolist()))):
        others = torch.cat([option_scores[:item.label], option_scores[item.label + 1:]])
        correct[index] = bool((option_scores[item.label] > others).all())
    return correct


def _mean(values) -> float:
    """Mean of the numbers that exist: an empty subset (NaN) does not turn the average into NaN."""
    values = [value for value in values if not np.isnan(value)]
    return float(np.mean(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# SugarCrepe format
# ---------------------------------------------------------------------------------------------------------------

def is_sugarcrepe_data(data) -> bool:
    """Whether a JSON file of a directory is taken as a SugarCrepe subset: any object except a Karpathy file
    (`{"images": [...]}`); its items are then validated, so a malformed subset fails instead of being skipped."""
    return isinstance(data, dict) and not isinstance(data.get("images"), list)


def sugarcrepe_files(path: str, subsets: Sequence[str] = ()) -> Dict[str, str]:
    """`{subset: file}` for a directory of SugarCrepe-format files (other JSON files, such as a Karpathy retrieval
    file next to the synthetic world's sets, are skipped) or a single file."""
    if os.path.isfile(path):
        return {os.path.splitext(os.path.basename(path))[0]: path}
    if not os.path.isdir(path):
        raise EvalDataError(f"{path}: SugarCrepe path is neither a file nor a directory")
    found = {}
    for name in sorted(os.listdir(path)):
        stem, ext = os.path.splitext(name)
        if ext != ".json" or (subsets and stem not in subsets):
            continue
        full = os.path.join(path, name)
        if is_sugarcrepe_data(load_json(full)):
            found[stem] = full
    missing = [subset for subset in subsets if subset not in found]
    if missing:
        raise EvalDataError(f"{path}: no SugarCrepe-format file for subset(s) {missing}")
    if not found:
        raise EvalDataError(f"{path}: no SugarCrepe-format JSON file in this directory")
    return found


def parse_sugarcrepe_file(path: str) -> List[Tuple[str, str, str, str]]:
    """[(id, filename, caption, negative_caption)] of one SugarCrepe-format file, validated."""
    data = load_json(path)
    if not isinstance(data, dict):
        raise EvalDataError(f"{path}: expected an object {{id: {{filename, caption, negative_caption}}}}, "
                            f"got {type(data).__name__}")
    rows = []
    for item_id, entry in data.items():
        require_fields(entry, ("filename", "caption", "negative_caption"), path, item_id)
        rows.append((str(item_id), entry["filename"], entry["caption"], entry["negative_caption"]))
    return rows


def load_sugarcrepe_file(path: str, image_root: Optional[str] = None, max_items: Optional[int] = None,
                         group: str = "") -> List[ChoiceItem]:
    root = image_root or os.path.dirname(path)
    rows = parse_sugarcrepe_file(path)[:max_items]
    return [ChoiceItem(item_id, resolve_image(root, filename, path, item_id), [caption, negative], 0, group)
            for item_id, filename, caption, negative in rows]


def sugarcrepe_metrics(accuracies: Dict[str, float]) -> Dict[str, float]:
    """Subset accuracies plus category averages (only for categories present) and the mean of all subsets."""
    metrics = dict(accuracies)
    for category in SUGARCREPE_CATEGORIES:
        members = [value for name, value in accuracies.items() if name.startswith(category + "_")]
        if members:
            metrics[f"{category}_avg"] = _mean(members)
    metrics["mean"] = _mean(accuracies.values())
    return metrics


def run_sugarcrepe(embedder: Embedder, path: str, image_root=None, subsets=(), max_items=None) -> BenchmarkResult:
    files = sugarcrepe_files(path, subsets)
    reserved = {"mean"} | {f"{category}_avg" for category in SUGARCREPE_CATEGORIES}
    clash = reserved & set(files)
    if clash:
        raise EvalDataError(f"{path}: subset name(s) {sorted(clash)} collide with the averages' names")
    loaded = {subset: load_sugarcrepe_file(file, image_root, max_items, subset) for subset, file in files.items()}
    accuracies, counts, text_only, outcomes = {}, {}, {}, {}
    for subset, items in loaded.items():
        blind: list = []
        correct, _ = score_items(embedder, items, desc=f"sugarcrepe/{subset}", text_only=blind)
        accuracies[subset] = float(correct.mean()) if len(items) else float("nan")
        text_only[subset] = float(np.mean(blind)) if blind else float("nan")
        counts[subset] = len(items)
        # per item, for paired tests between models on the same items (McNemar; compclip.study.stats)
        outcomes[subset] = {"ids": [item.id for item in items], "correct": "".join("01"[bool(c)] for c in correct)}
    return BenchmarkResult(sugarcrepe_metrics(accuracies), {"counts": counts, "files": files,
                                                            "text_only": text_only, "items": outcomes})


# ---------------------------------------------------------------------------------------------------------------
# VALSE
# ---------------------------------------------------------------------------------------------------------------

def valse_files(path: str, pieces: Sequence[str] = ()) -> Dict[str, str]:
    if os.path.isfile(path):
        return {os.path.splitext(os.path.basename(path))[0]: path}
    if not os.path.isdir(path):
        raise EvalDataError(f"{path}: VALSE path is neither a file nor a directory")
    found = {os.path.splitext(name)[0]: os.path.join(path, name) for name in sorted(os.listdir(path))
             if name.endswith(".json") and (not pieces or os.path.splitext(name)[0] in pieces)}
    missing = [piece for piece in pieces if piece not in found]
    if missing or not found:
        raise EvalDataError(f"{path}: no VALSE piece file for {missing or 'any piece'}")
    return found


def parse_valse_piece(path: str) -> Tuple[List[Tuple[str, str, str, str]], int]:
    """([(id, image_file, caption, foil)] of the valid items, number of items in the file).

    Valid = at least 2 of the 3 annotators judged the caption true (`mturk.caption >= 2`), the VALSE authors' subset.
    """
    data = load_json(path)
    if not isinstance(data, dict):
        raise EvalDataError(f"{path}: expected an object {{id: {{image_file, caption, foil, mturk}}}}")
    valid = []
    for item_id, entry in data.items():
        require_fields(entry, ("image_file", "caption", "foil"), path, item_id)
        mturk = entry.get("mturk")
        votes = mturk.get("caption") if isinstance(mturk, dict) else None
        if not isinstance(votes, (int, float)) or isinstance(votes, bool) or not votes >= 0 or votes == float("inf"):
            raise data_error(path, item_id, f"missing or malformed 'mturk.caption' (annotator votes, a count >= 0; "
                                            f"got {str(votes)[:40]})")
        if votes >= 2:
            valid.append((str(item_id), entry["image_file"], entry["caption"], entry["foil"]))
    return valid, len(data)


def run_valse(embedder: Embedder, path: str, image_root=None, pieces=(), max_items=None) -> BenchmarkResult:
    files = valse_files(path, pieces)
    if "mean" in files:
        raise EvalDataError(f"{path}: a piece named 'mean' collides with the average's name")
    loaded, totals = {}, {}
    for piece, file in files.items():
        rows, totals[piece] = parse_valse_piece(file)
        root = image_root or os.path.dirname(file)
        loaded[piece] = [ChoiceItem(item_id, resolve_image(root, image, file, item_id, fallbacks=(piece,)),
                                    [caption, foil], 0, piece) for item_id, image, caption, foil in rows[:max_items]]
    accuracies, counts = {}, {}
    for piece, items in loaded.items():
        correct, _ = score_items(embedder, items, desc=f"valse/{piece}")
        accuracies[piece] = float(correct.mean()) if len(items) else float("nan")
        counts[piece] = len(items)
    metrics = dict(accuracies, mean=_mean(accuracies.values()))
    return BenchmarkResult(metrics, {"valid_counts": counts, "total_counts": totals, "files": files})


# ---------------------------------------------------------------------------------------------------------------
# Generic JSONL
# ---------------------------------------------------------------------------------------------------------------

def load_generic_jsonl(path: str, image_root=None, max_items=None) -> List[ChoiceItem]:
    """Items of a `{"image", "captions": [...], "label", "id"?}` JSONL file; errors name the file and line."""
    root = image_root or os.path.dirname(path)
    items = []
    for number, line in text_lines(path, EvalDataError):
        if not line.strip():
            continue
        where = f"line {number}"
        entry = parse_json(line, f"{path}: item {where}", EvalDataError, whole_file=False)
        if not isinstance(entry, dict):
            raise data_error(path, where, "expected an object {image, captions, label}")
        item_id = f"{str(entry['id'])[:80]} ({where})" if "id" in entry else where
        captions, label = entry.get("captions"), entry.get("label")
        if not isinstance(captions, list) or len(captions) < 2 or not all(isinstance(c, str) for c in captions):
            raise data_error(path, item_id, "'captions' must be a list of at least 2 strings")
        require_texts(captions, "captions", path, item_id)
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(captions):
            raise data_error(path, item_id, f"'label' must be an index into 'captions', got {str(label)[:40]}")
        items.append(ChoiceItem(item_id, resolve_image(root, entry.get("image"), path, item_id), captions, label))
        if max_items is not None and len(items) >= max_items:
            break
    return items


def run_generic(embedder: Embedder, path: str, image_root=None, max_items=None) -> BenchmarkResult:
    items = load_generic_jsonl(path, image_root, max_items)
    correct, _ = score_items(embedder, items, desc=os.path.basename(path))
    return BenchmarkResult({"accuracy": float(correct.mean()) if len(items) else float("nan")},
                           {"count": len(items), "file": path})


# ---------------------------------------------------------------------------------------------------------------
# ARO: VG-Relation and VG-Attribution
# ---------------------------------------------------------------------------------------------------------------

def load_aro_vg(path: str, kind: str, image_root=None, max_items=None) -> List[ChoiceItem]:
    """Items of ARO's `visual_genome_relation.json` (kind `relation`) or `visual_genome_attribution.json`
    (kind `attribution`): the image cropped to (x, y, x + w, y + h), options [false_caption, true_caption]."""
    data = load_json(path)
    if not isinstance(data, list):
        raise EvalDataError(f"{path}: expected a list of ARO items, got {type(data).__name__}")
    root = image_root or os.path.dirname(path)
    items = []
    for index, entry in enumerate(data[:max_items]):
        require_fields(entry, ("image_path", "true_caption", "false_caption"), path, index)
        box = []
        for name in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"):
            value = entry.get(name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise data_error(path, index, f"field {name!r} must be a number, got {str(value)[:40]}")
            try:
                box.append(finite_number(value, name, minimum=0))
            except ValueError as error:
                raise data_error(path, index, str(error)) from None
        if box[2] <= 0 or box[3] <= 0:
            raise data_error(path, index, f"empty bounding box (w={box[2]}, h={box[3]})")
        if kind == "relation":
            group = entry.get("relation_name")
            if not isinstance(group, str):
                raise data_error(path, index, "missing field 'relation_name'")
        else:
            attributes = entry.get("attributes")
            if not isinstance(attributes, list) or len(attributes) != 2 or \
                    not all(isinstance(attribute, str) for attribute in attributes):
                raise data_error(path, index, "'attributes' must be a list of the two attributes")
            group = f"{attributes[0]}_{attributes[1]}"
        crop = (box[0], box[1], box[0] + box[2], box[1] + box[3])
        image = resolve_image(root, entry["image_path"], path, index, box=crop)
        items.append(ChoiceItem(str(index), image, [entry["false_caption"], entry["true_caption"]], 1, group))
    return items


ARO_ATTRIBUTION_MIN_COUNT = 25
"""The ARO authors' `VG_Attribution.evaluate_scores` leaves attribute pairs with fewer than 25 test items out of
the per-pair records that the macro accuracy averages."""


def grouped_accuracy(items: Sequence[ChoiceItem], correct: np.ndarray, exclude=(),
                     min_count: int = 0) -> Tuple[float, Dict]:
    """Macro accuracy over `item.group` (excluded groups and groups of fewer than `min_count` items left out)
    and {group: {accuracy, count}} of every group."""
    groups: Dict[str, List[bool]] = {}
    for item, hit in zip(items, correct):
        groups.setdefault(item.group, []).append(bool(hit))
    per_group = {name: {"accuracy": float(np.mean(hits)), "count": len(hits)} for name, hits in sorted(groups.items())}
    macro = _mean(value["accuracy"] for name, value in per_group.items()
                  if name not in set(exclude) and value["count"] >= min_count)
    return macro, per_group


def run_aro_vg(embedder: Embedder, path: str, kind: str, image_root=None, exclude=(), max_items=None,
               min_count: Optional[int] = None):
    """`min_count`: groups with fewer items are left out of `macro_accuracy`; default: the ARO authors' rule
    (attribute pairs with fewer than 25 items are dropped for VG-Attribution; every relation counts)."""
    if min_count is None:
        min_count = ARO_ATTRIBUTION_MIN_COUNT if kind == "attribution" else 0
    items = load_aro_vg(path, kind, image_root, max_items)
    correct, _ = score_items(embedder, items, desc=f"aro_vg_{kind}")
    macro, per_group = grouped_accuracy(items, correct, exclude, min_count)
    metrics = {"macro_accuracy": macro, "micro_accuracy": float(correct.mean()) if len(items) else float("nan")}
    too_small = [name for name, value in per_group.items() if value["count"] < min_count]
    return BenchmarkResult(metrics, {"count": len(items), "groups": per_group, "excluded": list(exclude),
                                     "min_count": min_count, "excluded_too_small": too_small, "file": path})


# ---------------------------------------------------------------------------------------------------------------
# ARO: COCO-Order and Flickr30k-Order
# ---------------------------------------------------------------------------------------------------------------

_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")


def normalize_caption(caption: str, max_words: int = 30) -> str:
    """The caption clean-up the ARO Order sets apply to every option: lower case, these punctuation marks
    `.!"()*#:;~` become spaces, runs of spaces collapse, at most `max_words` words."""
    words = _PUNCTUATION.sub(" ", caption.lower()).split()
    return " ".join(words[:max_words])


def _same_model_input(embedder, groups: Sequence[Sequence[str]]) -> List[List[bool]]:
    """For each group [true, option...], whether each option is the same model input as the true caption: the
    same tokens (the CLIP tokenizer drops the spaces that spaCy's tokens are joined with, so "a man , riding" and
    "a man, riding" are one input), or the same string when the embedder has no tokenizer."""
    tokenizer = getattr(embedder, "tokenizer", None)
    if tokenizer is None or not groups:
        return [[option == group[0] for option in group[1:]] for group in groups]
    tokens = tokenizer([text for group in groups for text in group])
    out, start = [], 0
    for group in groups:
        rows = tokens[start:start + len(group)]
        out.append([bool(torch.equal(row, rows[0])) for row in rows[1:]])
        start += len(group)
    return out


def run_order(embedder: Embedder, path: str, image_root=None, split="test", seed=0, spacy_model="en_core_web_sm",
              max_items=None, name="order") -> BenchmarkResult:
    from .perturb import OrderPerturber
    from .retrieval import load_karpathy

    entries = load_karpathy(path, split)
    root = image_root or os.path.dirname(path)
    cases = []  # (image ref, item id, caption)
    for entry in entries:
        image = resolve_image(root, entry.path, path, entry.id)
        for number, caption in enumerate(entry.captions):
            cases.append((image, f"{entry.id}/{number}", caption))
    cases = cases[:max_items]
    perturber = OrderPerturber(spacy_model, seed)
    perturbed = perturber.perturb_all([caption for _, _, caption in cases])
    normalized = [[normalize_caption(caption)] + [normalize_caption(variant) for variant in variants]
                  for (_, _, caption), variants in zip(cases, perturbed)]
    same = _same_model_input(embedder, normalized)
    items, dropped = [], 0
    for (image, item_id, caption), (true, *options), identical in zip(cases, normalized, same):
        kept = [option for option, twin in zip(options, identical) if not twin]
        dropped += len(options) - len(kept)
        if kept:
            items.append(ChoiceItem(item_id, image, [true] + kept, 0))
    correct, _ = score_items(embedder, items, desc=name)
    # An item whose four perturbations all equal the caption cannot be wrong under the authors' argmax.
    hits = int(correct.sum()) + (len(cases) - len(items))
    metrics = {"precision_at_1": hits / len(cases) if cases else float("nan")}
    return BenchmarkResult(metrics, {"count": len(cases), "identical_perturbations_dropped": dropped,
                                     "seed": seed, "split": split, "file": path})
