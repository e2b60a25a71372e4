"""`build_dataloader`: a DataConfig -> a loader yielding the batch contract of docs/internals.md."""
from __future__ import annotations

import logging
from typing import Callable

import torch

from .concepts import ConceptExtractor
from .config import DataConfig
from .dataset import Collate, EpochSampler, Loader, ManifestDataset, SampleBuilder, Tokenizer
from .inputs import InputError
from .manifest import detect_format, read_manifest
from .shards import EpochSetter, ShardDataset, count_samples, expand_urls

log = logging.getLogger(__name__)


def resolve_manifests(cfg: DataConfig) -> tuple[str, str]:
    """(train, val) data paths; an empty `train_manifest` means the synthetic world (generated if needed)."""
    if cfg.train_manifest:
        return cfg.train_manifest, cfg.val_manifest
    from .synthetic import generate

    paths = generate(cfg.synthetic)
    return paths.train, cfg.val_manifest or paths.val


def build_dataloader(cfg: DataConfig, tokenizer: Tokenizer, preprocess: Callable | None, *, rank: int,
                     world_size: int, seed: int, epoch: int = 0, train: bool = True) -> Loader | None:
    """The loader of the training (`train=True`) or validation data of this rank; None when there is no
    validation data. Training shuffles per epoch (`loader.sampler.set_epoch`) and gives every rank the same
    number of full batches; validation keeps the order and pads the last rank by wrapping around.

    `tokenizer`: list[str] -> LongTensor [n, ctx] (the model's); `preprocess`: PIL image -> float [3,H,W]."""
    if cfg.num_negatives < 1:
        raise ValueError("data.num_negatives must be at least 1")
    train_path, val_path = resolve_manifests(cfg)
    path = train_path if train else val_path
    if not path:
        return None
    extractor = ConceptExtractor(cfg.spacy_model) if cfg.concept_extractor == "spacy" else None
    if cfg.concept_extractor not in ("none", "spacy"):
        raise ValueError(f"data.concept_extractor must be 'none' or 'spacy', not {cfg.concept_extractor!r}")
    builder = SampleBuilder(preprocess, cfg.num_negatives, seed, extractor, cfg.max_concepts,
                            cfg.caption_order if train else "keep")
    collate = Collate(tokenizer, cfg.num_negatives)
    fmt = detect_format(path, cfg.format)
    common = {"num_workers": cfg.num_workers, "pin_memory": cfg.pin_memory,
              "persistent_workers": False}
    if fmt == "wds":
        urls = expand_urls(path)
        total = cfg.train_num_samples if (train and cfg.train_num_samples) else count_samples(urls)
        per_rank = total // world_size if train else -(-total // world_size)
        batches = per_rank // cfg.batch_size if train else -(-per_rank // cfg.batch_size)
        if batches < 1:
            raise InputError(f"{path}: {total} samples give no batch of {cfg.batch_size} on {world_size} ranks")
        dataset = ShardDataset(urls, builder, collate, cfg.batch_size, batches, rank, world_size, seed, train,
                               cfg.shuffle_buffer, cfg.caption_key, epoch)
        dataloader = torch.utils.data.DataLoader(dataset, batch_size=None, **common)
        loader = Loader(dataloader, EpochSetter(dataset), batches, batches * cfg.batch_size, cfg.max_skip_fraction)
        loader.batch_size = cfg.batch_size
        return loader
    records = read_manifest(path, fmt, cfg.image_root, cfg.image_key, cfg.caption_key)
    dataset = ManifestDataset(records, builder)
    sampler = EpochSampler(len(records), rank, world_size, shuffle=train, seed=seed, drop_last=train, epoch=epoch)
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                                             collate_fn=collate, drop_last=train, **common)
    if len(dataloader) < 1:
        raise InputError(f"{path}: {len(records)} samples give no full batch of {cfg.batch_size} "
                         f"on {world_size} ranks")
    log.info("%s: %d samples, %d batches of %d per rank (rank %d of %d)", path, len(records), len(dataloader),
             cfg.batch_size, rank, world_size)
    return Loader(dataloader, sampler, len(dataloader), len(sampler), cfg.max_skip_fraction)


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch with its tensors on `device` (non-blocking: pinned host memory copies asynchronously)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
