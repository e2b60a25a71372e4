"""The seeds' release formats as their users hold them (tests/seed_fixtures.py writes each, with its images),
imported by the `compclip-prepare` command and loaded: NegCLIP TSV, CE-CLIP .npy, DeGLA JSON, C2LIP .pkl, COCO
captions and the Karpathy split; image ids through `--image-template`; the `--types` documentation."""
import json
import os

import pytest
import torch

import seed_fixtures
from compclip.data import DataConfig, build_dataloader
from compclip.data import prepare

import datatest_support as support


def _prepare(seed, output, *extra):
    """The rows compclip-prepare writes, their image paths resolved as the loader resolves them."""
    prepare.main(seed_fixtures.prepare_args(seed) + ["--output", str(output), "--types", "", "--no-concepts", *extra])
    with open(output, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    for row in rows:
        row["image"] = os.path.join(os.path.dirname(str(output)), row["image"])
    return rows


def _lengths(texts):
    return torch.tensor([[len(text)] for text in texts])


@pytest.mark.parametrize("kind", sorted(seed_fixtures.TRAINING_FORMATS))
def test_every_release_format_imports_and_loads(tmp_path, kind):
    seed = seed_fixtures.TRAINING_FORMATS[kind](str(tmp_path / "release"))
    output = tmp_path / "out" / "prepared.jsonl"
    rows = _prepare(seed, output)
    assert len(rows) == seed.count
    with open(output, encoding="utf-8") as handle:  # images outside the output folder stay absolute, not ../
        assert os.path.isabs(json.loads(handle.readline())["image"])
    assert all(os.path.isfile(row["image"]) for row in rows)
    cfg = DataConfig(train_manifest=str(output), val_manifest=str(output), batch_size=len(rows), num_negatives=2)
    batch = next(iter(build_dataloader(cfg, _lengths, support.to_tensor, rank=0, world_size=1, seed=0, train=False)))
    assert batch["skipped"] == 0 and batch["text"][:, 0].tolist() == [len(row["caption"]) for row in rows]


def test_coco_captions_give_one_row_per_annotation_with_its_image(tmp_path):
    seed = seed_fixtures.write_coco_captions(str(tmp_path))
    rows = _prepare(seed, tmp_path / "coco.jsonl")
    with open(seed.path) as handle:
        annotations = json.load(handle)["annotations"]
    assert [row["caption"] for row in rows] == [annotation["caption"] for annotation in annotations]
    assert [os.path.basename(row["image"]) for row in rows] == [
        seed_fixtures.coco_name(annotation["image_id"]) for annotation in annotations]


def test_karpathy_splits_are_selectable(tmp_path):
    seed = seed_fixtures.write_karpathy_json(str(tmp_path))
    with open(seed.path) as handle:
        images = json.load(handle)["images"]

    def expected(splits):
        return [(os.path.join(str(tmp_path), image["filepath"], image["filename"]), sentence["raw"])
                for image in images if image["split"] in splits for sentence in image["sentences"]]

    train = _prepare(seed, tmp_path / "train.jsonl")  # the default: train + restval, COCO's training images
    assert [(row["image"], row["caption"]) for row in train] == expected({"train", "restval"})
    test = _prepare(seed, tmp_path / "test.jsonl", "--split", "test")
    assert [(row["image"], row["caption"]) for row in test] == expected({"test"})


def test_image_ids_resolve_through_the_image_template(tmp_path, capsys):
    seed = seed_fixtures.write_degla_json(str(tmp_path / "coco"))
    coco_root = os.path.dirname(seed.image_root)  # .../coco, which holds train2014/
    rows = _prepare(seed_fixtures.SeedFile(seed.path, coco_root, "degla", seed.count), tmp_path / "t.jsonl",
                    "--image-template", "train2014/COCO_train2014_{id:012d}.jpg")
    assert rows[0]["image"] == os.path.join(coco_root, "train2014", "COCO_train2014_000000000009.jpg")
    assert all(os.path.isfile(row["image"]) for row in rows)
    for template, message in (("COCO_{id:d", "does not format"), ("all.jpg", "has no field {id}"),
                              ("{name}.jpg", "does not format")):
        with pytest.raises(SystemExit) as stopped:
            _prepare(seed, tmp_path / "bad.jsonl", "--image-template", template)
        assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_the_types_are_documented_in_the_help(capsys):
    with pytest.raises(SystemExit):
        prepare.main(["--help"])
    text = capsys.readouterr().out
    for name, meaning in prepare.TYPE_HELP.items():
        assert f"{name}  " in text and meaning in " ".join(text.split())
    assert "--types reshuffle,swap_nouns,swap_adjectives,replace_adjectives,replace_nouns" in text
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md"), encoding="utf-8") as handle:
        readme = handle.read().split("## Data", 1)[1].split("\n## ", 1)[0]
    assert all(name in readme for name in prepare.TYPE_HELP) and "--image-template" in readme
