"""Generic multiple-choice JSONL and zero-shot classification against direct open_clip computations."""
import json
import math

import pytest
import torch
from evaltest_helpers import direct_choice_correct, direct_image_features, direct_text_features, make_image, \
    tiny_model

from compclip.evaluation import EvalConfig, EvalDataError, evaluate
from compclip.evaluation.zeroshot import classification_metrics


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=4)


def test_generic_jsonl_accuracy(tiny, tmp_path):
    model, preprocess, tokenizer = tiny
    lines, cases = [], []
    for index in range(7):
        image = make_image(str(tmp_path / f"g{index}.png"), index)
        captions = [f"a {c} shape" for c in ("red", "green", "blue", "white")[: 2 + index % 3]]
        label = index % len(captions)
        lines.append(json.dumps({"id": f"q{index}", "image": f"g{index}.png", "captions": captions, "label": label}))
        cases.append((image, None, captions, label))
    (tmp_path / "choices.jsonl").write_text("\n".join(lines) + "\n\n")
    cfg = EvalConfig(generic_jsonl=[str(tmp_path / "choices.jsonl")], progress=False)
    metrics = evaluate(model, preprocess, tokenizer, cfg, "cpu")["generic_choices"]
    correct = direct_choice_correct(model, preprocess, tokenizer, cases)
    assert metrics["accuracy"] == pytest.approx(sum(correct) / len(correct))

    lines[3] = json.dumps({"id": "q3", "image": "g3.png", "captions": ["a", "b"], "label": 2})
    (tmp_path / "choices.jsonl").write_text("\n".join(lines))
    with pytest.raises(EvalDataError, match=r"choices\.jsonl: item q3 \(line 4\): 'label' must be an index"):
        evaluate(model, preprocess, tokenizer, cfg, "cpu")


def test_classification_metrics_by_hand():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.5, 0.1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    labels = torch.tensor([0, 1, 1, 2])
    # ranks of the true class: 0, 1 (tie with class 0 counts against it), 1, 2
    metrics = classification_metrics(logits, labels, 3)
    assert metrics["top1"] == pytest.approx(1 / 4)
    assert math.isnan(metrics["top5"])  # fewer than 5 classes: undefined, as clip_benchmark's acc5
    assert metrics["mean_per_class"] == pytest.approx((1 + 0 + 0) / 3)


@pytest.mark.parametrize("layout", ["folder", "csv"])
def test_zeroshot_matches_direct_computation(tiny, tmp_path, layout):
    model, preprocess, tokenizer = tiny
    classes = ["red_square", "green_circle", "blue_thing", "tall_tree", "old_car", "small_cat"]
    paths, labels = [], []
    for label, name in enumerate(classes):
        for copy in range(2 if label % 2 else 1):
            paths.append(make_image(str(tmp_path / "data" / name / f"{copy}.png"), label * 2 + copy))
            labels.append(label)
    if layout == "folder":
        cfg = EvalConfig(zeroshot=str(tmp_path / "data"), zeroshot_templates="simple", progress=False)
    else:
        rows = ["image,label"] + [f"data/{classes[l]}/{p.rsplit('/', 1)[1]},{classes[l].replace('_', ' ')}"
                                  for p, l in zip(paths, labels)]
        (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
        (tmp_path / "names.txt").write_text("\n".join(c.replace("_", " ") for c in classes) + "\n")
        cfg = EvalConfig(zeroshot=str(tmp_path / "test.csv"), zeroshot_classnames=str(tmp_path / "names.txt"),
                         zeroshot_templates="openai", progress=False)
    metrics = evaluate(model, preprocess, tokenizer, cfg, "cpu")["zeroshot"]

    if layout == "folder":
        templates = ["a photo of a {}."]
    else:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        templates = [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]
        assert len(templates) == 80
    weights = []
    for name in classes:
        prompts = [template.replace("{}", name.replace("_", " ")) for template in templates]
        weights.append(torch.nn.functional.normalize(direct_text_features(model, tokenizer, prompts).mean(0), dim=0))
    logits = direct_image_features(model, preprocess, paths) @ torch.stack(weights).T
    labels = torch.tensor(labels)
    top1 = logits.argmax(1) == labels
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1)
    assert metrics["top1"] == pytest.approx(top1.float().mean().item())
    assert metrics["top5"] == pytest.approx(top5.float().mean().item())
    per_class = [top1[labels == c].float().mean().item() for c in range(len(classes))]
    assert metrics["mean_per_class"] == pytest.approx(sum(per_class) / len(per_class))


def test_zeroshot_csv_unknown_class_names_line(tiny, tmp_path):
    model, preprocess, tokenizer = tiny
    make_image(str(tmp_path / "a.png"), 0)
    (tmp_path / "t.csv").write_text("image,label\na.png,cat\na.png,dog\n")
    (tmp_path / "names.txt").write_text("cat\n")
    cfg = EvalConfig(zeroshot=str(tmp_path / "t.csv"), zeroshot_classnames=str(tmp_path / "names.txt"))
    with pytest.raises(EvalDataError, match=r"t\.csv: item line 3: unknown class 'dog'"):
        evaluate(model, preprocess, tokenizer, cfg, "cpu")
