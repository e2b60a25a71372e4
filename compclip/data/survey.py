"""A look at a training source without building a loader: its files, its first samples, its size.

The checks a run makes before any process group starts (compclip.resolve: the manifest exists and parses, a
hard-negative method has negatives to train on), the run plan (compclip.plan: samples per epoch) and the study's
checks of an external world (compclip.study) all read a source through these functions, and these functions read
through the same parsers the loader uses (compclip.data.manifest, compclip.data.shards), so an error names the
file and line (or shard and sample) and the field exactly as the loader would.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, List

from .manifest import Record, detect_format, iter_rows, make_record, read_manifest, string_list
from .shards import count_samples as count_shard_samples
from .shards import decode_fields, expand_urls, iter_tar_samples


@dataclass(frozen=True)
class Peek:
    """One sample of a source, as far as the checks need it."""

    where: str
    """`file:line` of a manifest row, `shard:key` of a WebDataset sample."""
    has_negatives: bool
    has_concepts: bool


def source_files(path: str, fmt: str = "auto") -> List[str]:
    """The files behind a training source: the manifest itself, or each shard of a WebDataset pattern (`a.tar`,
    `train-{000..011}.tar`, `a.tar::b.tar`). FileNotFoundError names the first missing one."""
    files = expand_urls(path) if detect_format(path, fmt) == "wds" else [path]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        more = f" (and {len(missing) - 1} more of the pattern's {len(files)})" if len(missing) > 1 else ""
        raise FileNotFoundError(f"no such file {missing[0]}{more}")
    return files


def peek(path: str, limit: int, fmt: str = "auto", image_root: str = "", image_key: str = "image",
         caption_key: str = "caption") -> Iterator[Peek]:
    """The first `limit` samples of a manifest or shard pattern, checked as the loader checks them (ValueError /
    ManifestError naming file:line or shard:sample and the field)."""
    fmt = detect_format(path, fmt)
    seen = 0
    if fmt == "wds":
        for url in expand_urls(path):
            for sample in iter_tar_samples(url):
                where = f"{url}:{sample['__key__']}"
                image, caption, fields = decode_fields(sample, caption_key)
                if image is None or not caption:
                    raise ValueError(f"{where}: a sample needs an image member and a caption (json "
                                     f"{caption_key!r} or a .txt member)")
                try:
                    negatives = string_list(fields.get("negatives"), "negatives")
                    concepts = string_list(fields.get("concepts"), "concepts")
                except ValueError as error:
                    raise ValueError(f"{where}: {error}") from None
                yield Peek(where, bool(negatives), bool(concepts))
                seen += 1
                if seen >= limit:
                    return
        return
    base = image_root or os.path.dirname(os.path.abspath(path))
    for number, row in iter_rows(path, fmt, image_key, caption_key):
        record = make_record(row, f"{path}:{number}", base, image_key, caption_key)
        yield Peek(record.source, bool(record.negatives), bool(record.concepts))
        seen += 1
        if seen >= limit:
            return


def count(path: str, fmt: str = "auto", image_root: str = "", image_key: str = "image",
          caption_key: str = "caption") -> int:
    """Samples in a training source (every row of a manifest is checked; shards are counted by their members)."""
    fmt = detect_format(path, fmt)
    if fmt == "wds":
        return count_shard_samples(expand_urls(path))
    records: List[Record] = read_manifest(path, fmt, image_root, image_key, caption_key)
    return len(records)
