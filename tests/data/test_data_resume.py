"""Resuming mid-epoch: the loader starts at a batch offset without loading (or decoding) the batches before it,
and yields the rest of the epoch exactly as the uninterrupted run does, skip count included."""
import json
import os

import pytest
import torch

from compclip.data import DataConfig, EpochSampler, build_dataloader
from compclip.data import dataset as dataset_module
from compclip.data.shards import write_shards

import datatest_support as support

KEYS = ("images", "text", "negatives", "valid", "concepts", "owner", "index", "skipped")


@pytest.fixture
def decodes(monkeypatch):
    """Every image decode (a usable or a broken image) in this process, as what was opened: a path (manifests)
    or the image bytes (shards)."""
    opened = []
    original = dataset_module.load_image

    def counting(source, preprocess, *name):
        opened.append(source if isinstance(source, str) else source.getvalue())
        return original(source, preprocess, *name)

    monkeypatch.setattr(dataset_module, "load_image", counting)
    return opened


def _rows(folder, count):
    """`count` rows with more negatives than K (so each sample draws per epoch), a broken image and an empty
    caption among them, and the broken image file."""
    os.makedirs(folder, exist_ok=True)
    (folder / "broken.png").write_bytes(b"not a png")
    rows = []
    for i in range(count):
        image = support.write_png(folder / f"{i}.png", (5 * i, 0, 0))
        rows.append({"image": image, "caption": f"caption {i}", "negatives": [f"neg {i} {j}" for j in range(6)]})
    for i in (5, 17):
        rows[i]["image"] = str(folder / "broken.png")
    for i in (9, 26):
        rows[i]["caption"] = " "
    return rows


def _loader(path, workers=0, **overrides):
    cfg = DataConfig(train_manifest=str(path), batch_size=4, num_negatives=2, num_workers=workers,
                     max_skip_fraction=0.5, shuffle_buffer=6, **overrides)
    return build_dataloader(cfg, support.tokenizer(), support.to_tensor, rank=0, world_size=1, seed=7)


def _straight(path, epoch, stop, workers=0, decodes=None):
    """The uninterrupted epoch, the loader's state after batch `stop`, the final skip count, and the decodes made
    for the batches from `stop` on (no workers: batch i is built, bad samples before it included, in its `next`)."""
    loader = _loader(path, workers)
    loader.sampler.set_epoch(epoch)
    batches, state, mark = [], None, 0
    for batch in loader:
        batches.append(batch)
        if len(batches) == stop:
            state = json.loads(json.dumps(loader.state_dict()))  # as it goes through a checkpoint
            mark = len(decodes) if decodes is not None else 0
    later = list(decodes[mark:]) if decodes is not None else None
    if decodes is not None:
        decodes.clear()
    return batches, state, loader.skipped, later


def _same(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        for key in KEYS:
            assert (torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]), key


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume-manifest")
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _rows(folder, 32)))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume-shards")
    write_shards(_rows(folder, 40), str(folder / "shards"), max_count=6)
    return str(folder / "shards" / "shard-{000000..000006}.tar")


def test_sampler_offset_is_the_tail_of_the_epoch():
    full = list(EpochSampler(50, rank=1, world_size=3, seed=2, epoch=4))
    sampler = EpochSampler(50, rank=1, world_size=3, seed=2)
    sampler.set_epoch(4, start=6)
    assert list(sampler) == full[6:] and len(sampler) == len(full) - 6
    sampler.set_epoch(4)
    assert list(sampler) == full
    with pytest.raises(ValueError):
        sampler.set_epoch(4, start=len(full) + 1)


def _broken(source):
    return source == b"not a png" or (isinstance(source, str) and source.endswith("broken.png"))


def test_manifest_resume_loads_only_the_remaining_batches(manifest, decodes):
    straight, state, skipped, later = _straight(manifest, epoch=3, stop=3, decodes=decodes)
    assert state["batch"] == 3 and skipped == 4  # 2 broken images + 2 empty captions in the epoch
    rest = straight[3:]
    # directly: one decode per sample still to come, plus one per broken image tried in its place
    assert len(later) == sum(len(b["index"]) for b in rest) + sum(map(_broken, later))

    resumed = _loader(manifest)
    resumed.load_state_dict(state)
    batches = list(resumed)
    _same(batches, rest)  # same samples, same order, same negative draws (seed, epoch, index)
    assert decodes == later and len(decodes) < 32  # nothing of batches 0-2 is opened
    assert resumed.skipped == skipped  # the count continues from the checkpoint's
    assert resumed.state_dict()["batch"] == len(resumed)

    resumed.sampler.set_epoch(3)  # a plain set_epoch restarts the epoch from its beginning
    _same(list(resumed), straight)


def test_manifest_resume_with_workers(manifest):
    straight, state, skipped, _ = _straight(manifest, epoch=1, stop=2)
    resumed = _loader(manifest, workers=2)
    resumed.load_state_dict(state)
    _same(list(resumed), straight[2:])
    assert resumed.skipped == skipped


@pytest.mark.parametrize("stop", [1, 4])
def test_shard_resume_fast_forwards_without_decoding(shards, decodes, stop):
    straight, state, skipped, later = _straight(shards, epoch=2, stop=stop, decodes=decodes)
    assert skipped == 4
    rest = straight[stop:]
    assert len(later) == sum(len(b["index"]) for b in rest) + sum(map(_broken, later))
    resumed = _loader(shards)
    resumed.load_state_dict(state)
    _same(list(resumed), rest)
    assert decodes == later  # the stream is fast-forwarded past batches 0..stop-1 without decoding them
    assert resumed.skipped == skipped


@pytest.mark.parametrize("stop", [2, 5])
def test_shard_resume_with_workers_keeps_their_turns(shards, stop):
    straight, state, skipped, _ = _straight(shards, epoch=0, stop=stop, workers=2)
    assert len(state["consumed"]) == 2
    resumed = _loader(shards, workers=2)
    resumed.load_state_dict(state)
    _same(list(resumed), straight[stop:])
    assert resumed.skipped == skipped


def test_shard_resume_without_stream_position_rebuilds_the_skipped_batches(shards):
    straight, state, skipped, _ = _straight(shards, epoch=1, stop=2)
    resumed = _loader(shards)
    resumed.load_state_dict({"epoch": state["epoch"], "batch": state["batch"]})  # an older checkpoint
    _same(list(resumed), straight[2:])
