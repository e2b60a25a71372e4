"""ARO: VG-Relation / VG-Attribution with bounding-box crops and macro averages, and the Order sets'
perturbations and Precision@1, against direct open_clip computations."""
import json

import pytest
import torch
from evaltest_helpers import direct_choice_correct, make_image, tiny_model

from compclip.evaluation import EvalConfig, EvalDataError, evaluate
from compclip.evaluation.compositional import normalize_caption, run_aro_vg


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
    # every attribute pair counts here (the authors' 25-item floor is tested on its own below)
    cfg = EvalConfig(**{field: str(path)}, aro_attribution_min_count=0, progress=False)
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


class _ByPrefixEmbedder:
    """Images all embed to e0; a caption starting with "yes" to e0 (score 1), any other to e1 (score 0)."""

    def images(self, refs, desc=""):
        return torch.tensor([[1.0, 0.0]]).repeat(len(refs), 1)

    def texts(self, texts, desc=""):
        return torch.tensor([[1.0, 0.0] if text.startswith("yes") else [0.0, 1.0] for text in texts])


def test_vg_attribution_macro_leaves_out_pairs_under_25_items(tmp_path):
    """ARO's VG_Attribution.evaluate_scores skips attribute pairs with fewer than 25 items (`attr_mask.sum() <
    25`); the macro accuracy is the mean over the remaining pairs. Hand-worked: pair red_blue, 25 items, all
    right (1.0); pair small_big, 3 items, all wrong (0.0) -> macro 1.0 (0.5 if the small pair were counted)."""
    make_image(str(tmp_path / "images" / "0.jpg"), 0, size=(64, 48))
    box = {"bbox_x": 1, "bbox_y": 2, "bbox_w": 30, "bbox_h": 20}
    items = [dict(box, image_path="images/0.jpg", attributes=["red", "blue"], true_caption=f"yes {i}",
                  false_caption=f"no {i}") for i in range(25)]
    items += [dict(box, image_path="images/0.jpg", attributes=["small", "big"], true_caption=f"no true {i}",
                   false_caption=f"yes false {i}") for i in range(3)]
    path = tmp_path / "visual_genome_attribution.json"
    path.write_text(json.dumps(items))
    result = run_aro_vg(_ByPrefixEmbedder(), str(path), "attribution")
    assert result.metrics["macro_accuracy"] == pytest.approx(1.0)
    assert result.metrics["micro_accuracy"] == pytest.approx(25 / 28)
    assert result.details["groups"]["small_big"] == {"accuracy": 0.0, "count": 3}
    assert result.details["excluded_too_small"] == ["small_big"]
    # the floor is configurable; 0 keeps every pair
    assert run_aro_vg(_ByPrefixEmbedder(), str(path), "attribution", min_count=0).metrics["macro_accuracy"] == \
        pytest.approx(0.5)
    # VG-Relation keeps every relation, however small (the authors skip only empty ones)
    for item in items:
        item["relation_name"] = "_".join(item.pop("attributes"))
    path.write_text(json.dumps(items))
    assert run_aro_vg(_ByPrefixEmbedder(), str(path), "relation").metrics["macro_accuracy"] == pytest.approx(0.5)


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


def test_order_perturbation_with_the_captions_tokens_is_not_a_competitor(tiny, tmp_path, monkeypatch):
    """spaCy joins its tokens with spaces ("a man , riding", "dog 's"), which the CLIP tokenizer drops: such a
    perturbation is the caption itself to the model, an exact tie that the ARO authors' argmax gives to the true
    caption (index 0). Hand-worked: caption 0's four perturbations are all token-identical to it -> correct
    whatever the model; caption 1 has one real competitor, scored against it alone."""
    import compclip.evaluation.perturb as perturb

    captions = ["A man, riding a horse.", "A dog's toy is on the bed."]
    variants = {captions[0]: ["a man , riding a horse", "a man ,riding a horse", "a man , riding a horse .",
                              "A man , riding a horse"],
                captions[1]: ["a dog 's toy is on the bed", "the bed 's toy is on a dog", "a dog's toy is on the bed .",
                              "a dog 's toy is on the bed"]}

    class FixedPerturber:
        def __init__(self, spacy_model, seed):
            pass

        def perturb_all(self, texts):
            return [variants[text] for text in texts]

    monkeypatch.setattr(perturb, "OrderPerturber", FixedPerturber)
    model, preprocess, tokenizer = tiny
    make_image(str(tmp_path / "images" / "a.jpg"), 1)
    (tmp_path / "k.json").write_text(json.dumps({"images": [
        {"filepath": "images", "filename": "a.jpg", "split": "test", "sentences": [{"raw": c} for c in captions]}]}))
    cfg = EvalConfig(aro_coco_order=str(tmp_path / "k.json"), progress=False)
    metrics = evaluate(model, preprocess, tokenizer, cfg, "cpu")["aro_coco_order"]
    image = str(tmp_path / "images" / "a.jpg")
    second = direct_choice_correct(model, preprocess, tokenizer,
                                   [(image, None, ["a dog's toy is on the bed", "the bed 's toy is on a dog"], 0)])
    assert metrics["precision_at_1"] == pytest.approx((1 + sum(second)) / 2)
