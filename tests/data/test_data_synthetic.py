"""The synthetic world: determinism, reuse, file formats, and captions that are true of the rendered pixels."""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from compclip.data import synthetic
from compclip.data.synthetic import COLOURS, NEGATIVE_TYPES, generate_world, normalise

import datatest_support as support


def _digest(folder: str) -> dict:
    digests = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name == ".lock":
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                digests[os.path.relpath(path, folder)] = hashlib.sha256(handle.read()).hexdigest()
    return digests


def test_same_seed_gives_byte_identical_world_whatever_the_workers(tmp_path):
    first = generate_world(str(tmp_path / "a"), 25, 10, seed=7, image_size=32, workers=1)
    second = generate_world(str(tmp_path / "b"), 25, 10, seed=7, image_size=32, workers=2)
    assert _digest(first.root) == _digest(second.root)
    assert len(_digest(first.root)) == 25 + 10 + 2 + len(NEGATIVE_TYPES) + 1 + 1  # images, jsonl, eval, meta
    other = generate_world(str(tmp_path / "c"), 25, 10, seed=8, image_size=32, workers=1)
    with open(first.train, "rb") as a, open(other.train, "rb") as c:
        assert a.read() != c.read()


def test_complete_world_is_reused_and_changed_parameters_regenerate(tmp_path):
    paths = generate_world(str(tmp_path), 6, 4, seed=1, image_size=32)
    stamp = os.stat(paths.train).st_mtime_ns
    assert generate_world(str(tmp_path), 6, 4, seed=1, image_size=32) == paths
    assert os.stat(paths.train).st_mtime_ns == stamp
    generate_world(str(tmp_path), 9, 4, seed=1, image_size=32)
    with open(paths.train) as handle:
        assert len(handle.readlines()) == 9


def test_manifest_rows_have_four_typed_negatives_that_differ_from_the_caption():
    world = support.small_world()
    with open(world.train) as handle:
        rows = [json.loads(line) for line in handle]
    assert len(rows) == 40
    for row in rows:
        assert row["negative_types"] == ["relation_swap", "attribute_swap", "object_replace", "attribute_replace"]
        assert len(row["negatives"]) == len(row["valid"]) == 4
        assert all(normalise(n) != normalise(row["caption"]) for n, ok in zip(row["negatives"], row["valid"]) if ok)
        assert 2 <= len(row["concepts"]) <= 3
        assert all(concept in row["caption"] for concept in row["concepts"])
        assert os.path.exists(os.path.join(world.root, row["image"]))


def test_hand_built_scene_caption_and_negatives():
    scene = {"objects": [{"shape": "circle", "colour": "red", "size": "large", "cell": [1, 0], "show_size": True},
                         {"shape": "square", "colour": "blue", "size": "small", "cell": [1, 2], "show_size": False}],
             "relations": [[0, "left", 1]], "template": 1, "phrases": [1]}
    import random

    assert synthetic.caption_of(scene) == "a large red circle is left of a blue square"
    assert synthetic.negative_of(scene, "relation_swap", random.Random(0)) == \
        ("a blue square is left of a large red circle", True)
    assert synthetic.negative_of(scene, "attribute_swap", random.Random(0)) == \
        ("a large blue circle is left of a red square", True)
    others = sorted(set(COLOURS) - {"red", "blue"})
    possible = ({f"a large {c} circle is left of a blue square" for c in others}
                | {f"a large red circle is left of a {c} square" for c in others}
                | {"a small red circle is left of a blue square"})
    for seed in range(20):
        text, ok = synthetic.negative_of(scene, "attribute_replace", random.Random(seed))
        assert ok and text in possible
    image = np.asarray(synthetic.render(scene, 60))
    assert tuple(image[30, 10]) == COLOURS["red"] and tuple(image[30, 50]) == COLOURS["blue"]
    assert tuple(image[5, 5]) == synthetic.BACKGROUND


def _centroid(pixels: np.ndarray, colour) -> tuple[float, float]:
    rows, cols = np.nonzero(np.all(pixels == np.array(colour, dtype=pixels.dtype), axis=-1))
    assert len(rows), f"colour {colour} not drawn"
    return rows.mean(), cols.mean()


def test_stated_relations_hold_in_the_rendered_pixels():
    """Read the relation back from the image (colour centroids): the caption's first relation must hold, its
    relation swap must not."""
    world = support.small_world()
    with open(world.val) as handle:
        rows = [json.loads(line) for line in handle]
    checked = 0
    for index, row in enumerate(rows):
        scene = synthetic.make_sample(3, "val", index)["scene"]
        assert synthetic.caption_of(scene) == row["caption"]
        pixels = np.asarray(Image.open(os.path.join(world.root, row["image"])).convert("RGB"))
        for a, relation, b in scene["relations"]:  # the first relation and, in 3-object scenes, the second
            (ya, xa), (yb, xb) = (_centroid(pixels, COLOURS[scene["objects"][i]["colour"]]) for i in (a, b))
            observed = {"left": xa < xb - 3, "right": xa > xb + 3, "above": ya < yb - 3, "below": ya > yb + 3}
            assert observed[relation] and not observed[synthetic.OPPOSITE[relation]]
            aligned = abs(ya - yb) if relation in ("left", "right") else abs(xa - xb)
            assert aligned < 32 / 3 / 2
            checked += 1
    assert checked >= 12


def test_a_relation_swap_is_not_recognisable_from_the_text_alone():
    """In a 3-object caption ("A rel B and C rel2 the X") X is A or B about equally often, in the captions and in
    their relation swaps alike. In version 1 X was always B, so only relation swaps referred back to the first
    object, and a text-only model could reject them."""
    refers_to_first = {"caption": 0, "relation_swap": 0}
    three = 0
    for index in range(3000):
        scene = synthetic.make_sample(0, "train", index)["scene"]
        if len(scene["relations"]) < 2:
            continue
        three += 1
        first = scene["relations"][0][0]
        refers_to_first["caption"] += scene["relations"][1][2] == first
        swapped = scene["relations"][0][2]  # after the swap the first relation starts with b
        refers_to_first["relation_swap"] += scene["relations"][1][2] == swapped
    assert three > 800
    for kind, count in refers_to_first.items():
        assert 0.45 < count / three < 0.55, (kind, count / three)


def test_evaluation_sets_and_retrieval_json():
    world = support.small_world()
    for kind in NEGATIVE_TYPES:
        with open(world.eval[kind]) as handle:
            entries = json.load(handle)
        assert entries and all(set(entry) == {"filename", "caption", "negative_caption"} for entry in entries.values())
        for entry in entries.values():
            assert os.path.exists(os.path.join(world.eval_image_root, entry["filename"]))
            assert normalise(entry["caption"]) != normalise(entry["negative_caption"])
    with open(world.retrieval) as handle:
        images = json.load(handle)["images"]
    assert len(images) == 12 and {image["split"] for image in images} == {"test"}
    assert all(len(image["sentences"]) == 1 and image["sentences"][0]["raw"] for image in images)


def test_command_line(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path), "--num-train", "3", "--num-val", "2", "--image-size", "16"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"] == str(tmp_path / "train.jsonl")
    assert Image.open(tmp_path / "images" / "val" / "000001.png").size == (16, 16)


@pytest.mark.parametrize("kind", ["nonsense"])
def test_unknown_negative_type_is_an_error(kind):
    import random

    with pytest.raises(ValueError, match="unknown negative type"):
        synthetic.negative_of(synthetic.make_sample(0, "train", 0)["scene"], kind, random.Random(0))


def test_the_controlled_variants_two_objects_and_one_phrasing(tmp_path):
    """--max-objects 2 keeps the scenes of the default draw that have 2 objects; --one-phrasing also writes each
    relation as 'left of' / 'above', which stays true of the pixels; the default world.json is unchanged."""
    paths = generate_world(str(tmp_path / "one"), 30, 40, seed=5, image_size=32, workers=1, max_objects=2,
                           one_phrasing=True)
    meta = json.loads(open(paths.meta).read())
    assert meta["max_objects"] == 2 and meta["one_phrasing"] is True
    converse = {"right", "below", "under", "beneath"}
    with open(paths.val) as handle:
        rows = [json.loads(line) for line in handle]
    for index, row in enumerate(rows):
        assert not converse & set(row["caption"].split()), row["caption"]
        scene = synthetic.make_sample(5, "val", index, max_objects=2, one_phrasing=True)["scene"]
        assert len(scene["objects"]) == 2 and synthetic.caption_of(scene) == row["caption"]
        pixels = np.asarray(Image.open(os.path.join(paths.root, row["image"])).convert("RGB"))
        a, relation, b = scene["relations"][0]
        (ya, xa), (yb, xb) = (_centroid(pixels, COLOURS[scene["objects"][i]["colour"]]) for i in (a, b))
        assert {"left": xa < xb - 2, "above": ya < yb - 2}[relation]
        swap, valid = row["negatives"][0], row["valid"][0]  # slot 0: the relation swap, one-way as well
        assert valid and not converse & set(swap.split())
    # without --one-phrasing, the same 2-object scenes with their relations as drawn
    control = synthetic.make_sample(5, "val", 0, max_objects=2)["scene"]
    assert control["objects"] == synthetic.make_sample(5, "val", 0, max_objects=2, one_phrasing=True)["scene"]["objects"]
    default = generate_world(str(tmp_path / "default"), 3, 2, seed=5, image_size=16, workers=1)
    assert "max_objects" not in json.loads(open(default.meta).read())
    with pytest.raises(ValueError, match="one_phrasing needs max_objects=2"):
        generate_world(str(tmp_path / "bad"), 3, 2, one_phrasing=True)
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path / "cli"), "--one-phrasing"])
