"""SugarCrepe: the real annotation files parse with their published sizes; the accuracy of a tiny model on a
fixture in the official format equals a direct open_clip computation; errors name the file and the item."""
import json
import math
import os

import pytest
import torch
from evaltest_helpers import (SHARED_DATA, direct_choice_correct, direct_image_features, direct_text_features,
                              make_image, tiny_model)

from compclip.evaluation import EvalConfig, EvalDataError, evaluate
from compclip.evaluation.compositional import SUGARCREPE_SUBSETS, parse_sugarcrepe_file, sugarcrepe_files
from compclip.evaluation.embed import Embedder
from compclip.evaluation.runner import run_benchmarks

# Sizes of the official subsets (SugarCrepe paper, Table 1), counted independently with json.load.
OFFICIAL_COUNTS = {"add_att": 692, "add_obj": 2062, "replace_att": 788, "replace_obj": 1652, "replace_rel": 1406,
                   "swap_att": 666, "swap_obj": 245}


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def test_real_files_parse_with_published_counts():
    root = os.path.join(SHARED_DATA, "sugarcrepe")
    if not os.path.isdir(root):
        pytest.skip("shared SugarCrepe annotations not present")
    files = sugarcrepe_files(root)
    assert sorted(files) == sorted(SUGARCREPE_SUBSETS)
    for subset, path in files.items():
        rows = parse_sugarcrepe_file(path)
        assert len(rows) == OFFICIAL_COUNTS[subset]
        assert all(filename.endswith(".jpg") and caption and negative for _, filename, caption, negative in rows)


def _write_fixture(tmp_path):
    """Two subsets in the official format sharing 4 images, plus a Karpathy file the loader must skip."""
    images = tmp_path / "images"
    for index in range(4):
        make_image(str(images / f"{index:012d}.jpg"), index)
    captions = ["a red square", "a green circle", "a blue square on yellow", "a purple ring", "an orange box"]
    subsets = {}
    for subset, shift in (("add_att", 1), ("swap_obj", 2), ("replace_rel", 3)):
        data = {}
        for index in range(6):
            data[str(100 + index)] = {"filename": f"{index % 4:012d}.jpg", "caption": captions[index % 5],
                                      "negative_caption": captions[(index + shift) % 5]}
        subsets[subset] = data
        (tmp_path / "ann").mkdir(exist_ok=True)
        (tmp_path / "ann" / f"{subset}.json").write_text(json.dumps(data))
    (tmp_path / "ann" / "retrieval.json").write_text(json.dumps({"images": []}))
    return tmp_path / "ann", images, subsets


def test_accuracy_matches_direct_computation(tiny, tmp_path):
    model, preprocess, tokenizer = tiny
    ann, images, subsets = _write_fixture(tmp_path)
    cfg = EvalConfig(sugarcrepe=str(ann), sugarcrepe_image_root=str(images), batch_size=3, progress=False)
    results = evaluate(model, preprocess, tokenizer, cfg, "cpu", out_dir=str(tmp_path / "out"))
    metrics = results["sugarcrepe"]
    expected = {}
    for subset, data in subsets.items():
        cases = [(str(images / item["filename"]), None, [item["caption"], item["negative_caption"]], 0)
                 for item in data.values()]
        correct = direct_choice_correct(model, preprocess, tokenizer, cases)
        expected[subset] = sum(correct) / len(correct)
        assert metrics[subset] == pytest.approx(expected[subset])
        per_item = json.loads((tmp_path / "out" / "sugarcrepe.details.json").read_text())["details"]["items"][subset]
        assert per_item == {"ids": list(data), "correct": "".join("01"[bool(c)] for c in correct)}
    assert metrics["add_avg"] == pytest.approx(expected["add_att"])
    assert metrics["replace_avg"] == pytest.approx(expected["replace_rel"])
    assert metrics["swap_avg"] == pytest.approx(expected["swap_obj"])
    assert metrics["mean"] == pytest.approx(sum(expected.values()) / 3)
    written = json.loads((tmp_path / "out" / "sugarcrepe.json").read_text())
    assert written == pytest.approx(metrics)  # {subset: accuracy, ...averages}, as the official script writes it
    details = json.loads((tmp_path / "out" / "sugarcrepe.details.json").read_text())["details"]
    assert details["counts"] == {"add_att": 6, "replace_rel": 6, "swap_obj": 6}
    # text-only: each item's two captions against the mean image embedding of the subset's items
    for subset, data in subsets.items():
        items = list(data.values())
        image_features = direct_image_features(model, preprocess, [str(images / i["filename"]) for i in items],
                                               [None] * len(items))
        mean_image = torch.nn.functional.normalize(torch.as_tensor(image_features).mean(0), dim=-1)
        hits = []
        for item in items:
            scores = torch.as_tensor(direct_text_features(model, tokenizer, [item["caption"], item["negative_caption"]]))
            hits.append(bool(scores[0] @ mean_image > scores[1] @ mean_image))
        assert details["text_only"][subset] == pytest.approx(sum(hits) / len(hits)), subset


def test_each_image_embedded_once_and_ties_are_wrong(tiny, tmp_path):
    model, preprocess, tokenizer = tiny
    ann, images, _ = _write_fixture(tmp_path)
    tie = {"1": {"filename": "000000000000.jpg", "caption": "same words", "negative_caption": "same words"}}
    (ann / "tie.json").write_text(json.dumps(tie))
    (ann / "swap_empty.json").write_text("{}")  # the synthetic world may write a type with no valid negative
    embedder = Embedder(model, preprocess, tokenizer, "cpu", batch_size=5, progress=False)
    results = run_benchmarks(embedder, EvalConfig(sugarcrepe=str(ann), sugarcrepe_image_root=str(images)))
    assert embedder.images_encoded == 4  # 19 items over 4 subsets, 4 distinct images
    metrics = results["sugarcrepe"].metrics
    assert metrics["tie"] == 0.0
    assert math.isnan(metrics["swap_empty"]) and metrics["swap_avg"] == metrics["swap_obj"]
    assert metrics["mean"] == pytest.approx(sum(metrics[s] for s in ("add_att", "swap_obj", "replace_rel", "tie")) / 4)


def test_missing_image_names_file_and_item(tiny, tmp_path):
    model, preprocess, tokenizer = tiny
    ann, images, _ = _write_fixture(tmp_path)
    bad = {"7": {"filename": "000000000000.jpg", "caption": "a", "negative_caption": "b"},
           "42": {"filename": "missing.jpg", "caption": "a", "negative_caption": "b"}}
    (ann / "add_obj.json").write_text(json.dumps(bad))
    cfg = EvalConfig(sugarcrepe=str(ann), sugarcrepe_image_root=str(images), progress=False)
    with pytest.raises(EvalDataError, match=r"add_obj\.json: item 42: image not found"):
        evaluate(model, preprocess, tokenizer, cfg, "cpu")
    (ann / "add_obj.json").write_text(json.dumps({"9": {"filename": "x.jpg", "caption": "a"}}))
    with pytest.raises(EvalDataError, match=r"add_obj\.json: item 9: missing field 'negative_caption'"):
        evaluate(model, preprocess, tokenizer, cfg, "cpu")
