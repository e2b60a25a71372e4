"""Image↔text retrieval on a Karpathy-split JSON, and the Karpathy reader shared with ARO's Order sets.

Recall@K: image→text, an image is a hit when one of its own captions is among the top K of all captions;
text→image, a caption is a hit when its image is among the top K images. These are clip_benchmark's
`zeroshot_retrieval` recalls (its `text_retrieval_recall@K` is image→text, `image_retrieval_recall@K` text→image).
Ranks are pessimistic: a candidate that scores **equal** to the right answer is counted as ranked above it (ties
count as wrong, as in the other metrics), where clip_benchmark's `topk` breaks ties by index; the two agree
whenever scores are distinct.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from compclip.data.coco import read_karpathy

from .common import BenchmarkResult, EvalDataError, data_error, load_json, require_texts
from .embed import Embedder, resolve_image

RECALL_KS = (1, 5, 10)
# The published Karpathy-split files under the dataset names clip_benchmark gives them.
CLIP_BENCHMARK_NAMES = {"dataset_coco": "mscoco_captions", "coco_karpathy_test": "mscoco_captions",
                        "coco_karpathy_val": "mscoco_captions", "dataset_flickr30k": "flickr30k",
                        "flickr30k_test": "flickr30k", "flickr30k_val": "flickr30k", "dataset_flickr8k": "flickr8k"}


@dataclass
class KarpathyEntry:
    id: str
    path: str  # relative to the image root
    captions: List[str]


def load_karpathy(path: str, split: str = "test") -> List[KarpathyEntry]:
    """Images of `split` from a Karpathy JSON (`{"images": [{filename, filepath?, split, sentences: [{raw}]}]}`,
    read by `compclip.data.coco.read_karpathy`, the importer's reader), or every entry of a BLIP-style list
    (`[{"image": path, "caption": str | [str]}]`, one file per split)."""
    data = load_json(path)
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        return [KarpathyEntry(image.id, image.path, image.captions)
                for image in read_karpathy(path, (split,), EvalDataError, data)]
    if not isinstance(data, list):
        raise EvalDataError(f"{path}: expected a Karpathy JSON {{\"images\": [...]}} or a list of "
                            "{image, caption} entries")
    entries = []
    for index, image in enumerate(data):
        if not isinstance(image, dict) or not isinstance(image.get("image"), str):
            raise data_error(path, index, "entry needs a string 'image'")
        captions = image.get("caption")
        captions = [captions] if isinstance(captions, str) else captions
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise data_error(path, index, "'caption' must be a string or a non-empty list of strings")
        require_texts(captions, "caption", path, index)
        entries.append(KarpathyEntry(str(index), image["image"], captions))
    if not entries:
        raise EvalDataError(f"{path}: no image in split {split!r}")
    return entries


def retrieval_ranks(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                    chunk: int = 1024) -> Tuple[torch.Tensor, torch.Tensor]:
    """0-based pessimistic ranks: (image→text rank [I], text→image rank [T]).

    image→text rank of image i = number of captions of other images scoring >= its best own caption;
    text→image rank of caption t = number of other images scoring >= its own image.
    """
    num_images, num_texts = len(image_features), len(text_features)
    text_to_image = text_to_image.to(image_features.device)
    own = (image_features[text_to_image] * text_features).sum(-1)  # [T]
    t2i = torch.zeros(num_texts, dtype=torch.long, device=image_features.device)
    i2t = torch.zeros(num_images, dtype=torch.long, device=image_features.device)
    for start in range(0, num_images, chunk):
        rows = torch.arange(start, min(start + chunk, num_images), device=image_features.device)
        scores = image_features[rows] @ text_features.T  # [c, T]
        is_own = text_to_image[None, :] == rows[:, None]
        best_own = scores.masked_fill(~is_own, float("-inf")).max(dim=1).values
        i2t[rows] = ((scores >= best_own[:, None]) & ~is_own).sum(dim=1)
        t2i += ((scores >= own[None, :]) & ~is_own).sum(dim=0)
    return i2t.cpu(), t2i.cpu()


def recall_metrics(i2t: torch.Tensor, t2i: torch.Tensor, ks: Sequence[int] = RECALL_KS) -> Dict[str, float]:
    metrics = {}
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = float((i2t < k).double().mean())
    for k in ks:
        metrics[f"text_to_image_R@{k}"] = float((t2i < k).double().mean())
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics


def run_retrieval(embedder: Embedder, path: str, image_root=None, split="test", max_items=None) -> BenchmarkResult:
    """R@1/5/10 both ways over the split's images and captions; the details keep every query's 0-based rank
    (`ranks`: image→text per image in file order, text→image per caption in file order), so that an interval over
    queries, or a paired comparison of two models, can be computed after the fact (compclip.study.report)."""
    entries = load_karpathy(path, split)[:max_items]
    root = image_root or os.path.dirname(path)
    images = [resolve_image(root, entry.path, path, entry.id) for entry in entries]
    texts = [caption for entry in entries for caption in entry.captions]
    text_to_image = torch.tensor([index for index, entry in enumerate(entries) for _ in entry.captions])
    image_features = embedder.images(images, desc="retrieval images").to(embedder.device)
    text_features = embedder.texts(texts, desc="retrieval texts").to(embedder.device)
    i2t, t2i = retrieval_ranks(image_features, text_features, text_to_image)
    stem = os.path.splitext(os.path.basename(path))[0]
    return BenchmarkResult(recall_metrics(i2t, t2i), {"images": len(entries), "texts": len(texts), "split": split,
                                                      "dataset": CLIP_BENCHMARK_NAMES.get(stem, stem), "file": path,
                                                      "ranks": {"image_to_text": i2t.tolist(),
                                                                "text_to_image": t2i.tolist()}})
