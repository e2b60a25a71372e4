"""Importers of the published formats: tiny files written here in each format, imported, then loaded."""
import json
import pickle

import numpy as np
import pytest

from compclip.data import DataConfig, ManifestError, build_dataloader, write_jsonl
from compclip.data.importers import import_c2lip, import_ceclip, import_degla, import_negclip, import_rows
from compclip.data.shards import expand_urls, iter_tar_samples, write_shards

import datatest_support as support


def _load(tmp_path, rows, **overrides):
    manifest = tmp_path / "imported.jsonl"
    write_jsonl(str(manifest), rows)
    cfg = DataConfig(train_manifest=str(manifest), val_manifest=str(manifest), batch_size=len(rows),
                     num_negatives=4, **overrides)
    return next(iter(build_dataloader(cfg, support.tokenizer(), support.to_tensor, rank=0, world_size=1, seed=0,
                                      train=False)))


def test_negclip_tsv(tmp_path):
    support.write_png(tmp_path / "a.jpg")
    support.write_png(tmp_path / "b.jpg")
    (tmp_path / "train.tsv").write_text(
        "title\tfilepath\tneg_caption\n"
        "a dog on a bed\ta.jpg\t['a bed on a dog', \"a dog's bed\"]\n"
        f"a cat\t{tmp_path / 'b.jpg'}\t\n")
    rows = import_negclip(str(tmp_path / "train.tsv"))
    assert rows == [
        {"image": str(tmp_path / "a.jpg"), "caption": "a dog on a bed", "negatives": ["a bed on a dog", "a dog's bed"]},
        {"image": str(tmp_path / "b.jpg"), "caption": "a cat"},
    ]
    batch = _load(tmp_path, rows)
    assert support.decoded(batch["negatives"][0]) == ["a bed on a dog", "a dog 's bed", "a bed on a dog",
                                                      "a dog 's bed"]
    assert batch["valid"].tolist() == [[True, True, False, False], [False] * 4]


def test_negclip_tsv_bad_list_names_the_line(tmp_path):
    (tmp_path / "bad.tsv").write_text("title\tfilepath\tneg_caption\nx\ta.jpg\t['unclosed\n")
    with pytest.raises(ManifestError, match="bad.tsv:2"):
        import_negclip(str(tmp_path / "bad.tsv"))


def test_ceclip_npy_keeps_typed_slots_and_hash_marks(tmp_path):
    support.write_png(tmp_path / f"COCO_train2014_{9:012d}.jpg")
    support.write_png(tmp_path / "x.png")
    samples = np.array([
        {"image_id": 9, "caption": "a man rides a horse", "relation_aug_caption": "###",
         "adj_aug_caption": "a tall man rides a horse", "noun_aug_caption": "a man rides a cow",
         "verb_aug_caption": "a man feeds a horse", "valid_caption": [0, 1, 1, 1]},
        {"image_path": "x.png", "caption": "a dog chases a cat near a tree",
         "relation_aug_caption": "a cat chases a dog near a tree", "adj_aug_caption": "a dog chases a <mask> cat",
         "noun_aug_caption": "a dog chases a cat near a car", "verb_aug_caption": "a dog bites a cat near a tree",
         "valid_caption": [1, 1, 1, 1, 1]},
    ], dtype=object)
    np.save(tmp_path / "train.npy", samples, allow_pickle=True)
    rows = import_ceclip(str(tmp_path / "train.npy"), image_root=str(tmp_path))
    assert rows[0]["image"] == str(tmp_path / "COCO_train2014_000000000009.jpg")
    assert rows[0]["negatives"][0] == "###" and rows[0]["valid"] == [False, True, True, True]
    assert rows[1]["image"] == str(tmp_path / "x.png") and rows[1]["valid"] == [True, False, True, True]
    batch = _load(tmp_path, rows)
    assert support.decoded(batch["negatives"][0]) == ["###", "a tall man rides a horse", "a man rides a cow",
                                                      "a man feeds a horse"]
    assert batch["valid"].tolist() == [[False, True, True, True], [True, False, True, True]]
    np.save(tmp_path / "one.npy", np.array(samples[1], dtype=object), allow_pickle=True)
    assert import_rows(str(tmp_path / "one.npy"), "ceclip", str(tmp_path)) == rows[1:]


def test_degla_json_uses_coco_train2014_names(tmp_path):
    entries = [{"image_id": 57870, "original": "A restaurant with wooden tables.",
                "enhanced": ["A restaurant with metal tables.", "Wooden restaurant with tables.", "x", "y", "z"]}]
    (tmp_path / "degla.json").write_text(json.dumps(entries))
    rows = import_degla(str(tmp_path / "degla.json"), image_root="/coco/train2014")
    assert rows == [{"image": "/coco/train2014/COCO_train2014_000000057870.jpg",
                     "caption": "A restaurant with wooden tables.", "negatives": entries[0]["enhanced"]}]


def test_c2lip_pickle_nounphrases_and_empty_fallback(tmp_path):
    support.write_png(tmp_path / "0.jpg")
    support.write_png(tmp_path / "1.jpg")
    with open(tmp_path / "c2lip.pkl", "wb") as handle:
        pickle.dump([{"image_path": "0.jpg", "caption": "a red car by a tree", "nounphrases": ["red car", "tree"]},
                     {"image_path": "1.jpg", "caption": "sunset", "nounphrases": []}], handle)
    rows = import_c2lip(str(tmp_path / "c2lip.pkl"))
    assert [row["concepts"] for row in rows] == [["red car", "tree"], ["sunset"]]
    batch = _load(tmp_path, rows)
    assert support.decoded(batch["concepts"]) == ["red car", "tree", "sunset"]
    assert batch["owner"].tolist() == [0, 0, 1]
    with open(tmp_path / "bad.pkl", "wb") as handle:
        pickle.dump([{"img": "0.jpg"}], handle)
    with pytest.raises(ManifestError, match="bad.pkl: item 0: no image"):
        import_c2lip(str(tmp_path / "bad.pkl"))


def test_webdataset_shards_with_nounphrases_and_txt(tmp_path):
    for i in range(5):
        support.write_png(tmp_path / f"{i}.png", (40 * i, 0, 0))
    rows = [{"image": f"{i}.png", "caption": f"caption {i}", "nounphrases": [f"thing {i}"], "negatives": ["n"]}
            for i in range(5)]
    shards = write_shards(rows, str(tmp_path / "shards"), max_count=2, base_dir=str(tmp_path))
    assert len(shards) == 3 and expand_urls(str(tmp_path / "shards" / "shard-{000000..000002}.tar")) == shards
    first = list(iter_tar_samples(shards[0]))
    assert [s["__key__"] for s in first] == ["000000000", "000000001"] and set(first[0]) >= {"png", "json"}
    pattern = str(tmp_path / "shards" / "shard-{000000..000002}.tar")
    cfg = DataConfig(train_manifest=pattern, val_manifest=pattern, batch_size=2, num_negatives=2)
    val = build_dataloader(cfg, support.tokenizer(), support.to_tensor, rank=0, world_size=1, seed=0, train=False)
    batches = list(val)
    assert len(val) == len(batches) == 3
    assert [support.decoded(b["text"]) for b in batches][:2] == [["caption 0", "caption 1"], ["caption 2", "caption 3"]]
    assert support.decoded(batches[0]["concepts"]) == ["thing 0", "thing 1"]
    assert batches[0]["valid"].tolist() == [[True, False], [True, False]]
    train = [build_dataloader(cfg, support.tokenizer(), support.to_tensor, rank=r, world_size=2, seed=0)
             for r in (0, 1)]
    assert [len(list(loader)) for loader in train] == [1, 1]  # 5 samples // 2 ranks // batch 2
    train[0].sampler.set_epoch(1)
    assert train[0].dataset.epoch == 1
