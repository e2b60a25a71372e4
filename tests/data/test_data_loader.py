"""Manifests -> batches: the K-negative rule, manifest checks, skipping, distributed sampling, workers."""
import json
import os

import pytest
import torch

from compclip.data import (DataConfig, EpochSampler, ManifestError, SkipBudgetExceeded, SyntheticConfig,
                           build_dataloader, read_manifest, select_negatives)
from compclip.data.dataset import sample_rng

import datatest_support as support


# ------------------------------------------------------------------------------------------- K negatives


def test_exactly_k_typed_slots_keep_their_order_and_hash_marks_are_invalid():
    texts, valid = select_negatives(["rel", "###", "noun", "verb"], [True, True, True, False], "cap", 4)
    assert texts == ["rel", "###", "noun", "verb"]
    assert valid == [True, False, True, False]


def test_fewer_negatives_repeat_invalid_and_none_repeat_the_caption():
    assert select_negatives(["a", "b"], None, "cap", 5) == (["a", "b", "a", "b", "a"],
                                                           [True, True, False, False, False])
    assert select_negatives([], None, "cap", 3) == (["cap"] * 3, [False] * 3)
    assert select_negatives(None, None, "cap", 2) == (["cap"] * 2, [False] * 2)
    assert select_negatives(["", "x"], [True, True], "cap", 2) == (["cap", "x"], [False, True])


def test_a_negative_equal_to_the_caption_is_invalid():
    """An imported list may hold the positive itself (NegCLIP swaps of two equal words, a DeGLA rewrite that
    changed nothing): it is not a negative, so its mask is False; the text is kept (slot order, K stays K)."""
    texts, valid = select_negatives(["A dog on a mat .", "a mat on a dog", "a dog on a mat"], [True, True, True],
                                    "A dog on a mat.", 3)
    assert texts == ["A dog on a mat .", "a mat on a dog", "a dog on a mat"]
    assert valid == [False, True, False]


def test_more_negatives_draw_k_per_epoch_deterministically():
    pool = [f"n{i}" for i in range(10)]
    valid = [i % 2 == 0 for i in range(10)]
    draws = {}
    for epoch in range(6):
        texts, mask = select_negatives(pool, valid, "cap", 3, sample_rng(11, epoch, 5))
        assert len(set(texts)) == 3 and all(text in pool for text in texts)
        assert texts == sorted(texts, key=pool.index)  # original relative order kept
        assert mask == [int(text[1:]) % 2 == 0 for text in texts]
        assert (texts, mask) == select_negatives(pool, valid, "cap", 3, sample_rng(11, epoch, 5))
        draws[epoch] = tuple(texts)
    assert len(set(draws.values())) > 1


# ------------------------------------------------------------------------------------------- manifests


def _images(folder, count):
    os.makedirs(folder, exist_ok=True)
    return [support.write_png(os.path.join(folder, f"{i}.png"), (10 * i, 0, 0)) for i in range(count)]


def _config(path, **overrides):
    values = {"train_manifest": str(path), "val_manifest": str(path), "batch_size": 2, "num_negatives": 3}
    values.update(overrides)
    return DataConfig(**values)


def test_jsonl_relative_paths_resolve_against_the_manifest_folder_or_image_root(tmp_path):
    _images(tmp_path / "imgs", 2)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "imgs/0.png", "caption": "a"}) + "\n\n"
                        + json.dumps({"image": str(tmp_path / "imgs" / "1.png"), "caption": "b"}) + "\n")
    records = read_manifest(str(manifest))
    assert [r.image for r in records] == [str(tmp_path / "imgs" / "0.png"), str(tmp_path / "imgs" / "1.png")]
    assert records[1].source == f"{manifest}:3"
    rooted = read_manifest(str(manifest), image_root="/data/root")
    assert rooted[0].image == "/data/root/imgs/0.png"


@pytest.mark.parametrize("delimiter,suffix", [(",", "csv"), ("\t", "tsv")])
def test_csv_and_tsv_manifests_with_list_cells(tmp_path, delimiter, suffix):
    _images(tmp_path, 2)
    lines = [delimiter.join(["image", "caption", "negatives", "valid"]),
             delimiter.join(["0.png", "a red cat", "\"['a blue cat', \"\"a cat, red\"\"]\"", "\"[true, false]\""]),
             delimiter.join(["1.png", "a dog", "", ""])]
    path = tmp_path / f"m.{suffix}"
    path.write_text("\n".join(lines) + "\n")
    records = read_manifest(str(path))
    assert records[0].negatives == ["a blue cat", "a cat, red"] and records[0].valid == [True, False]
    assert records[1].negatives is None and records[1].caption == "a dog"


@pytest.mark.parametrize("line,message", [
    ("{not json", "invalid JSON"),
    (json.dumps({"caption": "x"}), "missing field 'image'"),
    (json.dumps({"image": "a.png", "caption": "x", "negatives": ["n"], "valid": [True, False]}), "2 entries for 1"),
    (json.dumps({"image": "a.png", "caption": "x", "negatives": "n"}), "list of strings"),
    (json.dumps(["a.png", "x"]), "expected an object"),
])
def test_malformed_manifest_fails_at_start_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"image": "a.png", "caption": "ok"}) + "\n" + "\n" + line + "\n")
    with pytest.raises(ManifestError, match=f"bad.jsonl:3: .*{message}"):
        build_dataloader(_config(path), support.tokenizer(), support.to_tensor, rank=0, world_size=1, seed=0)


# ------------------------------------------------------------------------------------------- batches


def _manifest(tmp_path, rows):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_batch_contract_concepts_owner_and_negative_padding(tmp_path):
    _images(tmp_path, 2)
    path = _manifest(tmp_path, [
        {"image": "0.png", "caption": "a red cat", "negatives": ["a blue cat"], "concepts": ["red cat", "mat"]},
        {"image": "1.png", "caption": "a dog", "concepts": []},
    ])
    loader = build_dataloader(_config(path), support.tokenizer(), support.to_tensor, rank=0, world_size=1, seed=0,
                              train=False)
    batch = next(iter(loader))
    assert set(batch) == {"images", "text", "negatives", "valid", "concepts", "owner", "index", "skipped"}
    assert batch["images"].shape == (2, 3, 8, 8) and batch["images"].dtype == torch.float32
    assert batch["text"].dtype == torch.long and batch["text"].shape == (2, 77)
    assert batch["negatives"].shape == (2, 3, 77)
    assert support.decoded(batch["negatives"][0]) == ["a blue cat"] * 3
    assert support.decoded(batch["negatives"][1]) == ["a dog"] * 3
    assert batch["valid"].tolist() == [[True, False, False], [False, False, False]]
    assert support.decoded(batch["concepts"]) == ["red cat", "mat", "a dog"]
    assert batch["owner"].tolist() == [0, 0, 1] and batch["index"].tolist() == [0, 1]
    assert batch["skipped"] == 0
    assert batch["images"][1, 0].max() == pytest.approx(10 / 255)


def test_synthetic_world_is_the_default_and_distributed_ranks_split_it(tmp_path):
    cfg = DataConfig(batch_size=4, synthetic=SyntheticConfig(num_train=42, num_val=10, root=str(tmp_path), seed=5,
                                                             image_size=32))
    loaders = [build_dataloader(cfg, support.tokenizer(), support.to_tensor, rank=rank, world_size=2, seed=1)
               for rank in (0, 1)]
    assert [len(loader) for loader in loaders] == [5, 5]  # 42 // 2 = 21 per rank -> 5 full batches of 4
    seen = {}
    for epoch in (0, 1):
        per_rank = []
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
            batches = list(loader)
            assert all(b["images"].shape == (4, 3, 32, 32) and b["negatives"].shape[:2] == (4, 4) for b in batches)
            per_rank.append(torch.cat([b["index"] for b in batches]).tolist())
        assert not set(per_rank[0]) & set(per_rank[1])
        seen[epoch] = per_rank
    assert seen[0] != seen[1]
    loaders[0].sampler.set_epoch(0)
    assert torch.cat([b["index"] for b in loaders[0]]).tolist() == seen[0][0]
    val = build_dataloader(cfg, support.tokenizer(), support.to_tensor, rank=1, world_size=2, seed=1, train=False)
    assert [b["index"].tolist() for b in val] == [[1, 3, 5, 7], [9]]


def test_eval_sampler_pads_ranks_to_equal_length():
    keys = [list(EpochSampler(5, rank, 2, shuffle=False, drop_last=False)) for rank in (0, 1)]
    assert keys == [[(0, 0), (2, 0), (4, 0)], [(1, 0), (3, 0), (0, 0)]]


def test_workers_give_the_same_batches_as_the_main_process():
    world = support.small_world()
    batches = {}
    for workers in (0, 2):
        cfg = DataConfig(train_manifest=world.train, batch_size=8, num_negatives=2, num_workers=workers)
        loader = build_dataloader(cfg, support.tokenizer(), support.to_tensor, rank=0, world_size=1, seed=4)
        loader.sampler.set_epoch(3)
        batches[workers] = list(loader)
    assert len(batches[0]) == len(batches[2]) == 5
    for first, second in zip(batches[0], batches[2]):
        for key in ("images", "text", "negatives", "valid", "concepts", "owner", "index"):
            assert torch.equal(first[key], second[key])


def test_bad_samples_are_skipped_counted_and_too_many_stop_with_the_file(tmp_path):
    _images(tmp_path, 6)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [{"image": f"{i}.png", "caption": f"caption {i}"} for i in range(6)]
    rows[2]["image"] = "broken.png"
    rows[4]["caption"] = "  "
    path = _manifest(tmp_path, rows)
    loader = build_dataloader(_config(path, max_skip_fraction=0.5), support.tokenizer(), support.to_tensor,
                              rank=0, world_size=1, seed=0, train=False)
    batches = list(loader)
    assert sum(b["skipped"] for b in batches) == 2 and loader.skipped == 2
    assert [b["index"].tolist() for b in batches] == [[0, 1], [3, 3], [5, 5]]
    strict = build_dataloader(_config(path, max_skip_fraction=0.2), support.tokenizer(), support.to_tensor,
                              rank=0, world_size=1, seed=0, train=False)
    with pytest.raises(SkipBudgetExceeded, match=r"train.jsonl:5: empty caption"):
        list(strict)
    zero = build_dataloader(_config(path, max_skip_fraction=0.0), support.tokenizer(), support.to_tensor,
                            rank=0, world_size=1, seed=0, train=False)
    with pytest.raises(SkipBudgetExceeded, match=r"broken.png"):
        list(zero)


def test_more_negatives_than_k_are_redrawn_each_epoch(tmp_path):
    _images(tmp_path, 2)
    pool = [f"negative number {i}" for i in range(8)]
    path = _manifest(tmp_path, [{"image": f"{i}.png", "caption": "c", "negatives": pool} for i in range(2)])
    loader = build_dataloader(_config(path), support.tokenizer(), support.to_tensor, rank=0, world_size=1, seed=0)
    drawn = []
    for epoch in range(4):
        loader.sampler.set_epoch(epoch)
        batch = next(iter(loader))
        drawn.append(tuple(support.decoded(batch["negatives"][0])))
        assert batch["valid"].all()
    assert all(set(d) <= set(pool) and len(set(d)) == 3 for d in drawn)
    assert len(set(drawn)) > 1
