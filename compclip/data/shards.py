"""WebDataset shards: reading (streamed, split over ranks and workers, fixed batches per epoch) and writing.

A shard is a tar file; the files of one sample share a key (the member path up to the first dot of its file
name): `<key>.jpg|png|jpeg|webp` holds the image, `<key>.json` the fields (`caption`, `negatives`, `valid`,
`concepts`; C2LIP's `nounphrases` is read as `concepts`) and/or `<key>.txt` the caption. This is the layout the
`webdataset` library reads and writes; plain `tarfile` is used so that no library version matters.

Damage (docs/reliability.md, "Bad input"): a sample whose json or txt does not decode, whose fields have the
wrong types, that repeats a member or has no image is skipped and counted like an unreadable image. A shard that
is not a complete tar archive (truncated, a header overwritten: `tarfile` would stop there without a word) is an
`InputError` naming the shard and the byte offset when the samples are counted at start; met while streaming,
the rest of that shard is skipped and counted as one skipped sample, with a warning naming it.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import zlib
from typing import Iterator

import numpy as np
import torch

from .dataset import Collate, SampleBuilder, Skip
from .inputs import InputError, parse_json
from .manifest import ManifestError, check_fields

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_SHARDS = 1_000_000
"""Largest number of shards a brace pattern may name (a typo such as `{0..99999999999}` would otherwise build a
list until memory runs out)."""
TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, ValueError)
"""What `tarfile` raises on a damaged archive (ReadError, "unexpected end of data", gzip and zlib errors)."""


def expand_urls(pattern: str) -> list[str]:
    """`a-{000..011}.tar::b.tar` -> the list of paths (brace ranges keep their zero padding)."""
    urls: list[str] = []
    for part in pattern.split("::"):
        match = re.search(r"\{(\d+)\.\.(\d+)\}", part)
        if match is None:
            urls.append(part)
            continue
        first, last = match.group(1), match.group(2)
        if int(last) - int(first) >= MAX_SHARDS:
            raise InputError(f"{pattern}: the range {{{first}..{last}}} names more than {MAX_SHARDS} shards")
        width = len(first)
        for number in range(int(first), int(last) + 1):
            urls.extend(expand_urls(part[: match.start()] + str(number).zfill(width) + part[match.end():]))
        if len(urls) > MAX_SHARDS:
            raise InputError(f"{pattern}: names more than {MAX_SHARDS} shards")
    return urls


def split_key(member_name: str) -> tuple[str, str]:
    folder, _, name = member_name.rpartition("/")
    stem, _, extension = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _check_end(archive: tarfile.TarFile, url: str, members: int) -> None:
    """`tarfile` ends its iteration silently at a header it cannot parse or at a truncated one; an archive that
    really ended has only zero bytes (the end-of-archive blocks) from there on, at least one 512-byte block."""
    handle, offset = archive.fileobj, archive.offset
    handle.seek(offset)
    tail = 0
    while True:
        block = handle.read(1 << 16)
        if not block:
            break
        if block.count(0) != len(block):
            raise InputError(f"{url}: damaged tar data at byte {offset} (after {members} members): a header "
                             "tarfile cannot read")
        tail += len(block)
    if tail < tarfile.BLOCKSIZE:
        raise InputError(f"{url}: the archive ends at byte {offset} without its end-of-archive blocks (after "
                         f"{members} members): a truncated shard")


NOT_A_FILE = object()
"""Stands for the data of a member that is a link or a device."""


def _members(url: str, read: bool) -> Iterator[tuple[str, object]]:
    """(member name, its bytes, None when `read` is False, or NOT_A_FILE) of the members of one shard except
    folders, in order; any damage raises InputError naming the shard."""
    count = 0
    try:
        with tarfile.open(url, "r") as archive:
            for member in archive:
                if member.isdir():
                    continue
                if not member.isfile():  # a link or device is no sample data: its sample is skipped, counted
                    count += 1
                    yield member.name, NOT_A_FILE
                    continue
                data = None
                if read:
                    handle = archive.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    if len(data) != member.size:
                        raise InputError(f"{url}: member {member.name} holds {len(data)} of its {member.size} bytes")
                count += 1
                yield member.name, data
            _check_end(archive, url, count)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{url}: shard not found") from None
    except TAR_ERRORS as error:
        raise InputError(f"{url}: damaged tar archive after {count} members ({type(error).__name__}: {error})"
                         ) from None


def _grouped(url: str, read: bool) -> Iterator[dict]:
    current: dict | None = None
    try:
        for name, data in _members(url, read):
            key, extension = split_key(name)
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            if extension in current:
                current["__error__"] = f"member {name} appears twice in the sample"
            elif data is NOT_A_FILE:
                current["__error__"] = f"member {name} is a link or a device, not a file"
            current[extension] = data
    except InputError:
        if current is not None and read:  # its members before the damage were read whole: let it be built or
            yield current                 # skipped like any sample, then report the damage
        raise
    if current is not None:
        yield current


def iter_tar_samples(url: str) -> Iterator[dict]:
    """Samples of one shard as dicts `{"__key__", "__url__", extension: bytes}`; members of one sample must be
    adjacent (as webdataset writes them). A sample that repeats a member carries `__error__`; a damaged shard
    raises InputError (after yielding the samples before the damage)."""
    return _grouped(url, read=True)


def count_samples(urls: list[str]) -> int:
    """Samples in the shards, counted as `iter_tar_samples` yields them, reading headers only; a damaged shard
    raises InputError naming it and the byte offset."""
    return sum(1 for url in urls for _ in _grouped(url, read=False))


def sample_id(url: str, key: str) -> int:
    """A stable 62-bit id of a sample (the batch's `index`, and the seed of its negative draw)."""
    return int.from_bytes(hashlib.blake2b(f"{os.path.basename(url)}/{key}".encode(), digest_size=8).digest(),
                          "little") >> 2


def decode_fields(sample: dict, caption_key: str = "caption") -> tuple[bytes | None, str, dict]:
    """(image bytes or None, caption, checked fields) of a raw sample; ManifestError naming `shard:key` when the
    sample is damaged (a repeated member, json or txt that does not decode, fields of the wrong type)."""
    where = f"{sample['__url__']}:{sample['__key__']}"
    if "__error__" in sample:
        raise ManifestError(f"{where}: {sample['__error__']}")
    image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    fields: dict = {}
    try:
        if "json" in sample:
            fields = parse_json(sample["json"].decode("utf-8"), f"{where}.json", ManifestError, whole_file=False)
            if not isinstance(fields, dict):
                raise ManifestError(f"{where}.json: expected an object, got {type(fields).__name__}")
        if "concepts" not in fields and "nounphrases" in fields:
            fields["concepts"] = fields["nounphrases"]
        if fields.get(caption_key) is None and "txt" in sample:
            fields[caption_key] = sample["txt"].decode("utf-8").strip()
        caption, negatives, valid, concepts = check_fields(fields, caption_key)
    except UnicodeDecodeError as error:
        raise ManifestError(f"{where}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    except ManifestError:
        raise
    except ValueError as error:
        raise ManifestError(f"{where}: {error}") from None
    fields.update(negatives=negatives, valid=valid, concepts=concepts)
    return image, caption, fields


class ShardDataset(torch.utils.data.IterableDataset):
    """Streams shards and yields ready batches; every rank yields exactly `batches_per_rank` batches per epoch
    (cycling its shards if needed), so ranks never wait on each other.

    Shards are split over (rank, worker) slots when there are at least as many shards as slots, otherwise
    every slot reads all shards and keeps every S-th sample. Training shuffles the shard order per epoch and
    samples through a buffer, both seeded by (seed, epoch, slot). A bad sample is skipped (the next one takes
    its place) and counted in the batch's `skipped`.

    The DataLoader takes the workers' batches in turn, so batch i of the rank comes from reader i % W (W
    workers, or 1). `set_epoch(epoch, start_batch, consumed)` resumes the epoch at batch `start_batch`: worker
    j plays reader (start_batch + j) % W, so the turns continue where they stopped, and each reader first
    fast-forwards its stream past the `consumed[reader]` raw samples it had used or skipped (`Loader.consumed`)
    — shard bytes are read (the shuffle buffer must be refilled exactly), but no image is decoded and no
    sample built. Without `consumed` (an older checkpoint) each reader builds and drops its skipped batches."""

    def __init__(self, urls: list[str], builder: SampleBuilder, collate: Collate, batch_size: int,
                 batches_per_rank: int, rank: int, world_size: int, seed: int, train: bool, shuffle_buffer: int,
                 caption_key: str = "caption", epoch: int = 0):
        super().__init__()
        self.urls, self.builder, self.collate = urls, builder, collate
        self.batch_size, self.batches_per_rank = batch_size, batches_per_rank
        self.rank, self.world_size, self.seed, self.train = rank, world_size, seed, train
        self.shuffle_buffer, self.caption_key, self.epoch = shuffle_buffer, caption_key, epoch
        self.start_batch = 0
        self.consumed: list[int] | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0, consumed: list[int] | None = None) -> None:
        if not 0 <= start_batch <= self.batches_per_rank:
            raise ValueError(f"start_batch {start_batch} outside the {self.batches_per_rank} batches of an epoch")
        self.epoch, self.start_batch = epoch, start_batch
        self.consumed = list(consumed) if consumed is not None and start_batch else None

    def _slot(self) -> tuple[int, int, int]:
        """(slot, slots, reader): the reader this process plays on its rank, and its slot among all readers."""
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        reader = (worker + self.start_batch) % workers
        return self.rank * workers + reader, self.world_size * workers, reader

    def _raw_stream(self, slot: int, slots: int) -> Iterator[dict]:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, slot, 0x5BD])
        by_shard = len(self.urls) >= slots
        urls = self.urls[slot::slots] if by_shard else self.urls
        while True:
            order = rng.permutation(len(urls)) if self.train else range(len(urls))
            position = produced = 0
            for shard in order:
                try:
                    for sample in iter_tar_samples(urls[shard]):
                        if by_shard or position % slots == slot:
                            produced += 1
                            yield sample
                        position += 1
                except InputError as error:  # the rest of the shard cannot be read: one counted skip
                    if by_shard or position % slots == slot:
                        produced += 1
                        yield {"__key__": "(rest of shard)", "__url__": urls[shard], "__error__": str(error)}
                    position += 1
            if not produced:
                raise RuntimeError(f"no samples for reader {slot} of {slots} in {urls[:3]}...")

    def _shuffled(self, stream: Iterator[dict], slot: int) -> Iterator[dict]:
        if not self.train or self.shuffle_buffer <= 1:
            yield from stream
            return
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, slot, 0xB0F])
        buffer: list[dict] = []
        for sample in stream:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            pick = int(rng.integers(len(buffer)))
            yield buffer[pick]
            buffer[pick] = sample

    def __iter__(self):
        slot, slots, reader = self._slot()
        readers = slots // self.world_size
        # batches of the epoch this reader produces (i % readers == reader), and those it has already produced
        quota = len(range(reader, self.batches_per_rank, readers))
        done = len(range(reader, self.start_batch, readers))
        stream = self._shuffled(self._raw_stream(slot, slots), slot)
        if done and self.consumed is not None:
            for _ in range(self.consumed[reader]):
                next(stream)
            quota, done = quota - done, 0
        batches = self._batches(stream, quota)
        for _ in range(done):  # no stream position saved: build the skipped batches and drop them
            next(batches)
        yield from batches

    def _batches(self, stream: Iterator[dict], quota: int) -> Iterator[dict]:
        samples: list[dict] = []
        bad: list[str] = []
        consecutive_bad = 0
        while quota > 0:
            raw = next(stream)
            name = f"{raw['__url__']}:{raw['__key__']}"
            try:
                try:
                    image, caption, fields = decode_fields(raw, self.caption_key)
                except ManifestError as error:
                    raise Skip(name, str(error).removeprefix(name).lstrip(":. ")) from None
                if image is None:
                    raise Skip(name, "no image in the sample")
                sample = self.builder.build(sample_id(raw["__url__"], raw["__key__"]), self.epoch, image, caption,
                                            fields.get("negatives"), fields.get("valid"), fields.get("concepts"),
                                            name)
            except Skip as skip:
                log.warning("skipping %s", skip)
                bad.append(str(skip))
                consecutive_bad += 1
                if consecutive_bad > 1000:
                    raise RuntimeError(f"1000 consecutive unusable samples; last: {skip}") from None
                continue
            consecutive_bad = 0
            sample["skipped_files"], bad = bad, []
            samples.append(sample)
            if len(samples) == self.batch_size:
                yield self.collate(samples)
                samples = []
                quota -= 1


class EpochSetter:
    """Stands in for a sampler on a streamed dataset: `set_epoch` reaches the dataset before workers start."""

    def __init__(self, dataset: ShardDataset):
        self.dataset = dataset

    def set_epoch(self, epoch: int, start_batch: int = 0, consumed: list[int] | None = None) -> None:
        self.dataset.set_epoch(epoch, start_batch, consumed)

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    @property
    def start_batch(self) -> int:
        return self.dataset.start_batch


def write_shards(rows: list[dict], out_dir: str, prefix: str = "shard", max_count: int = 1000,
                 base_dir: str = "") -> list[str]:
    """Write rows (`image` path + JSON fields) as shards `<out_dir>/<prefix>-000000.tar`, ...; the image is
    stored as `<key>.<its extension>`, the other fields as `<key>.json`. Returns the shard paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for shard_number, start in enumerate(range(0, len(rows), max_count)):
        path = os.path.join(out_dir, f"{prefix}-{shard_number:06d}.tar")
        temporary = path + ".tmp"
        with tarfile.open(temporary, "w") as archive:
            for offset, row in enumerate(rows[start : start + max_count]):
                key = f"{start + offset:09d}"
                image_path = row["image"] if os.path.isabs(row["image"]) else os.path.join(base_dir, row["image"])
                extension = os.path.splitext(image_path)[1].lstrip(".").lower() or "jpg"
                try:
                    with open(image_path, "rb") as handle:
                        _add_member(archive, f"{key}.{extension}", handle.read())
                except OSError as error:
                    raise InputError(f"{image_path}: cannot read the image of row {start + offset + 1} for the "
                                     f"shards ({error.strerror})") from None
                fields = {name: value for name, value in row.items() if name != "image"}
                _add_member(archive, f"{key}.json", json.dumps(fields, ensure_ascii=False).encode("utf-8"))
        os.replace(temporary, path)
        paths.append(path)
    return paths


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # byte-identical shards from identical input
    archive.addfile(info, io.BytesIO(data))
