"""Samples -> batches: K negatives per sample, image decoding, tokenisation, concepts with their owners,
distributed deterministic sampling, and the bookkeeping of skipped samples.

Batch contract (docs/internals.md), all local to the rank:
`{"images": float [b,3,H,W], "text": long [b,ctx], "negatives": long [b,K,ctx], "valid": bool [b,K],
"concepts": long [p,ctx], "owner": long [p], "index": long [b], "skipped": int}`.
"""
from __future__ import annotations

import io
import logging
import math
from typing import Callable, Sequence

import numpy as np
import torch
from .inputs import UnusableImage, open_image
from .manifest import INVALID_NEGATIVE, Record
from .negatives import normalise

log = logging.getLogger(__name__)

Tokenizer = Callable[[list[str]], torch.Tensor]



def sample_rng(seed: int, epoch: int, index: int, *stream: int) -> np.random.Generator:
    """The random stream of one sample in one epoch: independent of worker count, rank and batch order. `stream`
    numbers a further stream of the same sample (the negatives' choice draws from the first, none given)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index, *stream])


CAPTION_ORDERS = ("keep", "shuffle")


def shuffle_words(caption: str, rng: np.random.Generator) -> str:
    """The caption's words (split on whitespace) in an order drawn from `rng`."""
    words = caption.split()
    return " ".join(words[i] for i in rng.permutation(len(words)))


def select_negatives(negatives: Sequence[str] | None, valid: Sequence[bool] | None, caption: str, k: int,
                     rng: np.random.Generator | None = None) -> tuple[list[str], list[bool]]:
    """Exactly K negatives and their validity for one sample.

    - exactly K: kept in slot order (typed negatives, slot k = type k);
    - more than K: K drawn without replacement by `rng`, kept in their original relative order;
    - fewer (but some): the sample's own negatives repeated cyclically, the repeats marked invalid;
    - none: the caption repeated, all invalid (no empty caption ever enters a softmax).
    `'###'` (CE-CLIP's unbuilt negative) stays as text with its mask False; an empty negative is replaced by
    the caption, invalid; a negative equal to the caption (case and punctuation aside) is marked invalid.
    """
    texts = list(negatives or [])
    mask = [True] * len(texts) if valid is None else [bool(v) for v in valid]
    positive = normalise(caption)
    for slot, text in enumerate(texts):
        if text == INVALID_NEGATIVE:
            mask[slot] = False
        elif not text.strip():
            texts[slot], mask[slot] = caption, False
        elif normalise(text) == positive:  # an imported "negative" that is the caption itself
            mask[slot] = False
    if not texts:
        return [caption] * k, [False] * k
    if len(texts) > k:
        if rng is None:
            raise ValueError("a generator is needed to draw K of more negatives")
        chosen = np.sort(rng.choice(len(texts), size=k, replace=False))
        return [texts[i] for i in chosen], [mask[i] for i in chosen]
    own = len(texts)
    for slot in range(own, k):
        texts.append(texts[slot % own])
        mask.append(False)
    return texts, mask


def load_image(source, preprocess: Callable | None, name: str = ""):
    """The image at `source` (a path or a binary file object), checked and decoded by
    `compclip.data.inputs.open_image` (UnusableImage when it cannot be used), then preprocessed."""
    image = open_image(source, name)
    return preprocess(image) if preprocess is not None else image


class Skip(Exception):
    """A sample that cannot be used; `path` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path


class SampleBuilder:
    """Turns one record (image path or bytes, caption, optional negatives / validity / concepts) into the
    per-sample dict that `Collate` batches. Shared by the manifest and WebDataset readers."""

    def __init__(self, preprocess: Callable | None, num_negatives: int, seed: int, concept_extractor=None,
                 max_concepts: int = 0, caption_order: str = "keep"):
        if caption_order not in CAPTION_ORDERS:
            raise ValueError(f"data.caption_order must be one of {', '.join(CAPTION_ORDERS)}, not {caption_order!r}")
        self.caption_order = caption_order
        self.preprocess = preprocess
        self.num_negatives = num_negatives
        self.seed = seed
        self.concept_extractor = concept_extractor
        self.max_concepts = max_concepts

    def concepts_of(self, caption: str, concepts: list[str] | None) -> list[str]:
        if concepts is None and self.concept_extractor is not None:
            concepts = self.concept_extractor([caption])[0]
        concepts = [c for c in (concepts or []) if c.strip()]
        if self.max_concepts:
            concepts = concepts[: self.max_concepts]
        return concepts or [caption]

    def build(self, index: int, epoch: int, image_source, caption: str, negatives, valid, concepts,
              name: str) -> dict:
        if not caption or not caption.strip():
            raise Skip(name, "empty caption")
        if isinstance(image_source, (bytes, bytearray)):
            image_source = io.BytesIO(image_source)
        try:
            image = load_image(image_source, self.preprocess, name)
        except UnusableImage as error:
            raise Skip(name, f"unusable image ({str(error).removeprefix(name + ': ')})") from None
        texts, mask = select_negatives(negatives, valid, caption, self.num_negatives,
                                       sample_rng(self.seed, epoch, index))
        concepts = self.concepts_of(caption, concepts)  # of the caption as written
        if self.caption_order == "shuffle":
            caption = shuffle_words(caption, sample_rng(self.seed, epoch, index, 1))
        return {"index": index, "image": image, "caption": caption, "negatives": texts, "valid": mask,
                "concepts": concepts}


class ManifestDataset(torch.utils.data.Dataset):
    """Map-style dataset over checked manifest records. Keys are `(index, epoch)` pairs (from `EpochSampler`)
    so the draw of K negatives depends on the epoch without any state shared with worker processes.

    A sample that cannot be used is replaced by the next usable one (index + 1, + 2, ...), so batches keep
    their size on every rank; the replacement is counted in the sample's `skipped` and its path reported."""

    max_substitutions = 64

    def __init__(self, records: list[Record], builder: SampleBuilder):
        self.records = records
        self.builder = builder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        bad: list[str] = []
        for attempt in range(min(self.max_substitutions, len(self.records))):
            position = (index + attempt) % len(self.records)
            record = self.records[position]
            try:
                sample = self.builder.build(position, epoch, record.image, record.caption, record.negatives,
                                            record.valid, record.concepts, record.source or record.image)
            except Skip as skip:
                log.warning("skipping %s", skip)
                bad.append(f"{skip} [{record.image}]" if record.source else str(skip))
                continue
            sample["skipped_files"] = bad
            return sample
        raise RuntimeError(f"no usable sample found from index {index}: " + "; ".join(bad[-3:]))


class EpochSampler(torch.utils.data.Sampler):
    """Distributed sampler yielding `(index, epoch)` keys.

    Training (`shuffle=True`, `drop_last=True`): a permutation seeded by (seed, epoch), split round-robin over
    ranks, every rank getting exactly floor(N / world_size) samples. Evaluation: no shuffle, the tail padded
    by wrapping around so every rank gets ceil(N / world_size) samples (equal batch counts on all ranks).

    `set_epoch(epoch, start)` starts the epoch at this rank's `start`-th key: the keys yielded are exactly the
    tail of the full epoch's (same order, same epoch in the key, hence the same per-sample negative draws), so
    a resumed run never builds the samples it has already trained on. `len()` counts the keys still to come."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, epoch: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if num_samples < world_size and drop_last:
            raise ValueError(f"{num_samples} samples cannot be split over {world_size} ranks")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.shuffle, self.seed, self.drop_last, self.epoch = shuffle, seed, drop_last, epoch
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.per_rank():
            raise ValueError(f"start {start} outside the {self.per_rank()} samples of this rank's epoch")
        self.epoch, self.start = epoch, start

    def per_rank(self) -> int:
        if self.drop_last:
            return self.num_samples // self.world_size
        return math.ceil(self.num_samples / self.world_size)

    def __len__(self) -> int:
        return self.per_rank() - self.start

    def __iter__(self):
        if self.shuffle:
            order = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, 0x5A11]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        total = self.per_rank() * self.world_size
        if total > len(order):
            order = np.concatenate([order, order[: total - len(order)]])
        for index in order[:total][self.rank :: self.world_size][self.start :]:
            yield int(index), self.epoch


class Collate:
    """Stacks samples and tokenises captions, negatives and concepts with one tokenizer call each."""

    def __init__(self, tokenizer: Tokenizer, num_negatives: int):
        self.tokenizer = tokenizer
        self.num_negatives = num_negatives

    def __call__(self, samples: list[dict]) -> dict:
        k = self.num_negatives
        concepts = [c for sample in samples for c in sample["concepts"]]
        owner = [i for i, sample in enumerate(samples) for _ in sample["concepts"]]
        text = self.tokenizer([sample["caption"] for sample in samples])
        negatives = self.tokenizer([n for sample in samples for n in sample["negatives"]])
        return {
            "images": torch.stack([sample["image"] for sample in samples]),
            "text": text,
            "negatives": negatives.view(len(samples), k, -1),
            "valid": torch.tensor([sample["valid"] for sample in samples], dtype=torch.bool).view(len(samples), k),
            "concepts": self.tokenizer(concepts),
            "owner": torch.tensor(owner, dtype=torch.long),
            "index": torch.tensor([sample["index"] for sample in samples], dtype=torch.long),
            "skipped": sum(len(sample["skipped_files"]) for sample in samples),
            "skipped_files": [path for sample in samples for path in sample["skipped_files"]],
        }


class SkipBudgetExceeded(RuntimeError):
    pass


class Loader:
    """What `build_dataloader` returns: iterates a torch DataLoader, takes the skipped-file names out of the
    batches, and stops with an error once more than `max_skip_fraction` of the epoch has been skipped.
    `loader.sampler.set_epoch(epoch)` reshuffles; `loader.dataset` and `len(loader)` (batches per epoch) are
    there as on a DataLoader.

    Resuming mid-epoch: `state_dict()` (after any batch) is this rank's position in the epoch — epoch, batches
    done, samples skipped so far, and the raw samples each reader consumed (what a shard stream needs to
    fast-forward without decoding); `load_state_dict(state)` makes the next iteration yield exactly the
    remaining batches of that epoch, with the skip count continuing from the saved one. The batches already
    done are never built (manifests: the sampler starts at the offset; shards: see `ShardDataset`).

    `iter(loader)` creates the DataLoader iterator at once (on a DataLoader that draws its base seed from
    torch's global generator, and starts workers); nothing is loaded before the first `next`."""

    def __init__(self, dataloader, sampler, num_batches: int, samples_per_epoch: int, max_skip_fraction: float):
        self.dataloader = dataloader
        self.dataset = dataloader.dataset
        self.sampler = sampler
        self.batch_size = dataloader.batch_size
        self.num_batches = num_batches
        self.samples_per_epoch = samples_per_epoch
        self.max_skip_fraction = max_skip_fraction
        self.skipped = 0
        """Samples skipped so far in the current epoch on this rank."""
        self.batch = 0
        """Batches of the current epoch yielded so far (counting those skipped by a resume)."""
        self.consumed = [0] * self.readers
        """Raw samples (used + skipped) each reader of this rank has consumed in the current epoch."""
        self._resume: dict | None = None

    @property
    def readers(self) -> int:
        """Processes producing this rank's batches, which take turns batch by batch (DataLoader workers)."""
        return max(getattr(self.dataloader, "num_workers", 0), 1)

    def __len__(self) -> int:
        return self.num_batches

    def state_dict(self) -> dict:
        return {"epoch": int(self.sampler.epoch), "batch": self.batch, "skipped": self.skipped,
                "consumed": list(self.consumed)}

    def load_state_dict(self, state: dict) -> None:
        """Position the next iteration at `state` (from `state_dict()` of a loader built the same way). Keys
        `skipped` and `consumed` may be missing (an older checkpoint): the skip count then restarts at 0, and a
        shard stream falls back to building the batches it skips."""
        epoch, batch = int(state["epoch"]), int(state.get("batch", 0))
        if not 0 <= batch <= self.num_batches:
            raise ValueError(f"resume position: batch {batch} outside an epoch of {self.num_batches} batches")
        consumed = state.get("consumed")
        if consumed is not None and len(consumed) != self.readers:
            log.warning("resume position saved with %d readers, this loader has %d: the data before batch %d is "
                        "read again", len(consumed), self.readers, batch)
            consumed = None
        if hasattr(self.sampler, "start"):  # map-style: the sampler starts at the first sample of `batch`
            self.sampler.set_epoch(epoch, batch * self.batch_size)
        else:  # streamed: the dataset fast-forwards each reader
            self.sampler.set_epoch(epoch, batch, consumed)
        self._resume = {"epoch": epoch, "batch": batch, "skipped": int(state.get("skipped", 0)),
                        "consumed": list(consumed) if consumed is not None else [0] * self.readers}

    def _start(self) -> dict:
        """Where this iteration starts: the loaded position if the sampler still points there (a later
        `sampler.set_epoch(epoch)` restarts the epoch), else the epoch's beginning."""
        resume = self._resume
        if resume is not None and resume["epoch"] == self.sampler.epoch and resume["batch"] == self._sampler_batch():
            return resume
        return {"epoch": self.sampler.epoch, "batch": 0, "skipped": 0, "consumed": [0] * self.readers}

    def _sampler_batch(self) -> int:
        if hasattr(self.sampler, "start"):
            return self.sampler.start // self.batch_size
        return self.sampler.start_batch

    def __iter__(self):
        start = self._start()
        self._resume = None
        self.batch, self.skipped, self.consumed = start["batch"], start["skipped"], list(start["consumed"])
        return self._batches(iter(self.dataloader))

    def _batches(self, iterator):
        budget = self.max_skip_fraction * self.samples_per_epoch
        for batch in iterator:
            files = batch.pop("skipped_files")
            self.skipped += batch["skipped"]
            self.consumed[self.batch % self.readers] += len(batch["index"]) + batch["skipped"]
            self.batch += 1
            if self.skipped > budget:
                raise SkipBudgetExceeded(
                    f"{self.skipped} bad samples skipped this epoch, more than max_skip_fraction="
                    f"{self.max_skip_fraction} of {self.samples_per_epoch}; last: {files[-1]}")
            yield batch
