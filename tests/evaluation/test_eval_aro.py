"""ARO: VG-Relation / VG-Attribution with bounding-box crops and macro averages, and the Order sets'
perturbations and Precision@1, against direct open_clip computations."""
import json

import pytest
from evaltest_helpers import direct_choice_correct, make_image, tiny_model

from compclip.evaluation import EvalConfig, EvalDataError, evaluate
from compclip.evaluation.compositional import normalize_caption


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=3)


def _vg_items(kind):
    items = []
    for index in range(8):
        item = {"image_path": f"images/{index % 3}.jpg", "bbox_x": 2 + index, "bbox_y": 3, "bbox_w": 20 + index,
                "bbox_h": 18, "true_caption": f"the red thing is on the {'blue green yellow'.split()[index % 3]} box",
                "false_caption": f"the {'blue green yellow'.split()[index % 3]} box is on the red thing"}
        if kind == "relation":
            item["relation_name"] = ["on", "under", "near"][index % 3] if index < 6 else "on"
        else:
            item["attributes"] = [["red", "blue"], ["small", "big"]][index % 2]
        items.append(item)
    return items


@pytest.mark.parametrize("kind", ["relation", "attribution"])
def test_vg_macro_accuracy_with_crops(tiny, tmp_path, kind):
    model, preprocess, tokenizer = tiny
    for index in range(3):
        make_image(str(tmp_path / "images" / f"{index}.jpg"), index, size=(64, 48))
    items = _vg_items(kind)
    path = tmp_path / f"visual_genome_{kind}.json"
    path.write_text(json.dumps(items))
    field = "aro_vg_relation" if kind == "relation" else "aro_vg_attribution"
    cfg = EvalConfig(**{field: str(path)}, progress=False)
    metrics = evaluate(model, preprocess, tokenizer, cfg, "cpu")[field]
    cases = [(str(tmp_path / item["image_path"]),
              (item["bbox_x"], item["bbox_y"], item["bbox_x"] + item["bbox_w"], item["bbox_y"] + item["bbox_h"]),
              [item["false_caption"], item["true_caption"]], 1) for item in items]
    correct = direct_choice_correct(model, preprocess, tokenizer, cases)
    groups = {}
    for item, hit in zip(items, correct):
        key = item["relation_name"] if kind == "relation" else "_".join(item["attributes"])
        groups.setdefault(key, []).append(hit)
    macro = sum(sum(hits) / len(hits) for hits in groups.values()) / len(groups)
    assert metrics["macro_accuracy"] == pytest.approx(macro)
    assert metrics["micro_accuracy"] == pytest.approx(sum(correct) / len(correct))
    if kind == "relation":
        cfg = EvalConfig(aro_vg_relation=str(path), aro_exclude_relations=["near"], progress=False)
        kept = [sum(hits) / len(hits) for key, hits in groups.items() if key != "near"]
        assert evaluate(model, preprocess, tokenizer, cfg, "cpu")[field]["macro_accuracy"] == \
            pytest.approx(sum(kept) / len(kept))


def test_vg_malformed_box_names_file_and_item(tiny, tmp_path):
    model, preprocess, tokenizer = tiny
    for index in range(3):
        make_image(str(tmp_path / "images" / f"{index}.jpg"), index)
    items = _vg_items("relation")
    del items[4]["bbox_w"]
    (tmp_path / "vgr.json").write_text(json.dumps(items))
    with pytest.raises(EvalDataError, match=r"vgr\.json: item 4: field 'bbox_w' must be a number"):
        evaluate(model, preprocess, tokenizer, EvalConfig(aro_vg_relation=str(tmp_path / "vgr.json")), "cpu")


def _spacy_available():
    try:
        from compclip.evaluation.perturb import load_spacy

        load_spacy("en_core_web_sm")
        return True
    except RuntimeError:
        return False


needs_spacy = pytest.mark.skipif(not _spacy_available(), reason="no English spaCy pipeline installed")


@needs_spacy
def test_perturbations_are_seeded_and_keep_the_words():
    from compclip.evaluation.perturb import OrderPerturber

    captions = ["A small brown dog sits on the red sofa near a tall window.", "Two men play frisbee in a park"]
    first = OrderPerturber(seed=5).perturb_all(captions)
    assert first == OrderPerturber(seed=5).perturb_all(captions)
    assert first != OrderPerturber(seed=6).perturb_all(captions)
    for caption, variants in zip(captions, first):
        assert len(variants) == 4
        for variant in variants:
            assert sorted(normalize_caption(variant).split()) == sorted(normalize_caption(caption).split())
    nouns_adjectives = first[0][0].split()
    # nouns stay on noun positions: "dog", "sofa", "window" are at positions 3, 8, 12 in some order
    assert sorted(nouns_adjectives[i] for i in (3, 8, 12)) == ["dog", "sofa", "window"]


@needs_spacy
def test_coco_order_precision_at_1(tiny, tmp_path):
    from compclip.evaluation.perturb import OrderPerturber

    model, preprocess, tokenizer = tiny
    sentences = [["A small red dog sits on a big blue sofa.", "The green car is parked near the old house."],
                 ["Three white birds fly over the dark sea today.", "A child holds a yellow kite in the park."]]
    images = []
    for index, raw in enumerate(sentences):
        make_image(str(tmp_path / "coco" / "val2014" / f"c{index}.jpg"), index)
        images.append({"filepath": "val2014", "filename": f"c{index}.jpg", "split": "test",
                       "sentences": [{"raw": text} for text in raw]})
    images.append({"filepath": "val2014", "filename": "unused.jpg", "split": "train", "sentences": [{"raw": "x"}]})
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": images}))
    cfg = EvalConfig(aro_coco_order=str(tmp_path / "karpathy.json"), aro_coco_image_root=str(tmp_path / "coco"),
                     aro_order_seed=11, progress=False)
    metrics = evaluate(model, preprocess, tokenizer, cfg, "cpu")["aro_coco_order"]
    captions = [text for raw in sentences for text in raw]
    variants = OrderPerturber(seed=11).perturb_all(captions)
    cases = []
    for number, (caption, perturbed) in enumerate(zip(captions, variants)):
        true = normalize_caption(caption)
        options = [true] + [option for option in map(normalize_caption, perturbed) if option != true]
        cases.append((str(tmp_path / "coco" / "val2014" / f"c{number // 2}.jpg"), None, options, 0))
    correct = direct_choice_correct(model, preprocess, tokenizer, cases)
    assert metrics["precision_at_1"] == pytest.approx(sum(correct) / len(correct))


def test_missing_spacy_pipeline_is_a_clear_error(tiny, tmp_path):
    model, preprocess, tokenizer = tiny
    make_image(str(tmp_path / "a.jpg"), 0)
    (tmp_path / "k.json").write_text(json.dumps([{"image": "a.jpg", "caption": ["a red dog on a sofa"]}]))
    cfg = EvalConfig(aro_flickr_order=str(tmp_path / "k.json"), spacy_model="no_such_pipeline_xyz", progress=False)
    with pytest.raises(RuntimeError, match="spaCy pipeline 'no_such_pipeline_xyz' is not installed"):
        evaluate(model, preprocess, tokenizer, cfg, "cpu")
