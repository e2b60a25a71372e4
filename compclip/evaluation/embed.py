"""Batched, cached image and text embedding.

One `Embedder` lives for one model and one evaluation run. Every image is decoded and encoded once per run, even
when several benchmarks or subsets use it: the cache key is the resolved path plus the crop box. Texts are cached
the same way. Embeddings are L2-normalised, float32, and kept on the CPU.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image

from compclip.progress import Progress

from compclip.data.inputs import UnusableImage, open_image, resolve_under, shown

from .common import EvaluationStopped, data_error

log = logging.getLogger("compclip.evaluation")


Box = Tuple[float, float, float, float]


@dataclass(frozen=True)
class ImageRef:
    """An image to embed: resolved path, optional crop box (left, upper, right, lower), and where it was named."""

    path: str
    box: Optional[Box] = None
    source: str = ""
    item: str = ""

    @property
    def key(self):
        return (self.path, self.box)


def resolve_image(root, name, source, item, *, fallbacks: Sequence[str] = (), box: Optional[Box] = None) -> ImageRef:
    """Find image `name` under `root` (or under `root/<fallback>`); an absolute `name` is used as it is.

    Raises `EvalDataError` naming the annotation file and item when the image does not exist, so a missing image
    stops the run before any model work.
    """
    if not isinstance(name, str) or not name:
        raise data_error(source, item, f"image path must be a non-empty string, got {shown(name)}")
    try:  # a relative name may not climb out of the image root (compclip.data.inputs.resolve_under)
        candidates = [resolve_under(root, name)]
        if not os.path.isabs(name):
            candidates += [resolve_under(os.path.join(root, sub), name) for sub in fallbacks]
    except ValueError as error:
        raise data_error(source, item, str(error)) from None
    for path in candidates:
        if os.path.isfile(path):
            return ImageRef(os.path.realpath(path), box, str(source), str(item))
    raise data_error(source, item, f"image not found: {shown(candidates[0], 300)}"
                     + (f" (also tried {', '.join(shown(c, 300) for c in candidates[1:])})" if len(candidates) > 1
                        else ""))


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, refs: Sequence[ImageRef], preprocess: Callable):
        self.refs = list(refs)
        self.preprocess = preprocess

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, index):
        ref = self.refs[index]
        try:
            image = open_image(ref.path)
        except UnusableImage as error:
            raise data_error(ref.source, ref.item, f"cannot read image {error}") from None
        if ref.box is not None:
            left, upper, right, lower = ref.box
            if left >= image.width or upper >= image.height:
                raise data_error(ref.source, ref.item, f"box {ref.box} lies outside the {image.width}x{image.height} "
                                                       f"image {ref.path}")
            if (right - left) * (lower - upper) > Image.MAX_IMAGE_PIXELS:
                raise data_error(ref.source, ref.item, f"box {ref.box} is larger than the decompression-bomb limit")
            image = image.crop(ref.box)
        return self.preprocess(image)


class Embedder:
    """Encodes images and texts with an open_clip model, in batches, caching by image key and by text."""

    def __init__(self, model, preprocess, tokenizer, device, *, batch_size: int = 64, num_workers: int = 0,
                 precision: str = "amp", progress: bool = True, should_stop: Optional[Callable[[], bool]] = None):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.precision = precision
        self.progress = progress
        self._images: Dict[tuple, torch.Tensor] = {}
        self._texts: Dict[str, torch.Tensor] = {}
        self.images_encoded = 0  # counts forward passes' rows: tests check that the cache works
        self.texts_encoded = 0
        self.should_stop = should_stop  # asked before every batch: a preempted run stops within one batch

    def _check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise EvaluationStopped(f"stopped after {self.images_encoded} images and {self.texts_encoded} texts")

    def _autocast(self):
        if self.precision == "amp" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _progress(self, total: int, desc: str, unit: str) -> Progress:
        # Transient: in a log, a pass shorter than one progress interval leaves no line.
        return Progress(total, desc, unit=unit, enabled=self.progress and total > 0, leave=False, logger=log)

    def _input_dtype(self):
        for parameter in self.model.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
        return torch.float32

    @torch.no_grad()
    def images(self, refs: Sequence[ImageRef], desc: str = "images") -> torch.Tensor:
        """[N, D] normalised embeddings of `refs`, in order."""
        todo, seen = [], set()
        for ref in refs:
            if ref.key not in self._images and ref.key not in seen:
                seen.add(ref.key)
                todo.append(ref)
        if todo:
            loader = torch.utils.data.DataLoader(_ImageDataset(todo, self.preprocess), batch_size=self.batch_size,
                                                 num_workers=self.num_workers, shuffle=False)
            dtype = self._input_dtype()
            position = 0
            with self._progress(len(todo), f"embed {desc}", "images") as progress:
                for batch in loader:
                    self._check_stop()
                    with self._autocast():
                        features = self.model.encode_image(batch.to(self.device, dtype=dtype))
                    features = F.normalize(features.float(), dim=-1).cpu()
                    for row in features:
                        self._images[todo[position].key] = row
                        position += 1
                    self.images_encoded += len(features)
                    progress.update(len(features))
        if not refs:
            return torch.zeros(0, 0)
        return torch.stack([self._images[ref.key] for ref in refs])

    @torch.no_grad()
    def texts(self, texts: Sequence[str], desc: str = "texts") -> torch.Tensor:
        """[N, D] normalised embeddings of `texts`, in order."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._texts))
        with self._progress(len(todo), f"embed {desc}", "texts") as progress:
            for start in range(0, len(todo), self.batch_size):
                self._check_stop()
                chunk = todo[start:start + self.batch_size]
                tokens = self.tokenizer(chunk).to(self.device)
                with self._autocast():
                    features = self.model.encode_text(tokens)
                features = F.normalize(features.float(), dim=-1).cpu()
                for text, row in zip(chunk, features):
                    self._texts[text] = row
                self.texts_encoded += len(chunk)
                progress.update(len(chunk))
        if not texts:
            return torch.zeros(0, 0)
        return torch.stack([self._texts[text] for text in texts])
