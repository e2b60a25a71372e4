"""Standard zero-shot and retrieval: open_clip's ImageNet class names and templates (the real library, against
its own `build_zero_shot_classifier`), clip_benchmark's metric definitions on cases whose answers are known by
construction, and the clip_benchmark-style JSON."""
import json
import math

import open_clip
import pytest
import torch
from evaltest_helpers import direct_image_features, make_image, tiny_model
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from compclip.evaluation import BenchmarkResult, EvalConfig, EvalDataError, evaluate
from compclip.evaluation.report import write_results
from compclip.evaluation.retrieval import recall_metrics, retrieval_ranks
from compclip.evaluation.zeroshot import class_folders, classification_metrics, load_classification, load_templates

# Known ImageNet-1k facts (WordNet id, label, open_clip's name), not read from the code under test.
IMAGENET_FACTS = [("n01440764", 0, "tench"), ("n01443537", 1, "goldfish"), ("n02099601", 207, "Golden Retriever"),
                  ("n02123045", 281, "tabby cat"), ("n04591713", 907, "wine bottle"), ("n15075141", 999, "toilet paper")]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=7)


def _direct_metrics(model, preprocess, tokenizer, paths, labels, classnames, templates):
    """open_clip's own zero-shot classifier, then top-1 / top-5 / mean per-class recall by their definitions."""
    weights = build_zero_shot_classifier(model, tokenizer, classnames, templates, num_classes_per_batch=None)
    logits = direct_image_features(model, preprocess, paths) @ weights
    labels = torch.tensor(labels)
    order = logits.argsort(dim=1, descending=True)
    top1 = order[:, 0] == labels
    top5 = (order[:, :5] == labels[:, None]).any(1)
    recalls = [top1[labels == c].float().mean().item() for c in range(len(classnames)) if (labels == c).any()]
    return {"top1": top1.float().mean().item(), "top5": top5.float().mean().item(),
            "mean_per_class": sum(recalls) / len(recalls)}


def test_imagenet_wordnet_folders_get_open_clips_names_and_templates(tiny, tmp_path):
    """A 6-class subset of ImageNet (as ImageNet-A / -R are): open_clip's names of those classes and its 80
    templates, without any option, and the numbers of open_clip's own classifier."""
    model, preprocess, tokenizer = tiny
    root = tmp_path / "imagenet-r"
    paths, labels = [], []
    for label, (wnid, _, _) in enumerate(IMAGENET_FACTS):
        for copy in range(1 + label % 2):
            paths.append(make_image(str(root / wnid / f"{copy}.jpg"), 3 * label + copy))
            labels.append(label)
    _, _, names = load_classification(str(root), imagenet=True)
    assert names == [name for _, _, name in IMAGENET_FACTS]

    out = tmp_path / "out"
    metrics = evaluate(model, preprocess, tokenizer, EvalConfig(zeroshot=str(root), progress=False), "cpu",
                       out_dir=str(out), label="tiny", arch="compclip-eval-tiny", pretrained="seed7")["zeroshot"]
    direct = _direct_metrics(model, preprocess, tokenizer, paths, labels, names,
                             open_clip.OPENAI_IMAGENET_TEMPLATES)
    assert metrics == pytest.approx(direct)
    details = json.loads((out / "zeroshot.details.json").read_text())["details"]
    assert details["classnames"] == "open_clip IMAGENET_CLASSNAMES" and details["template_count"] == 80

    # clip_benchmark's output record, under its names, next to compclip's own JSON
    record = json.loads((out / "zeroshot.clip_benchmark.json").read_text())
    assert record == {"dataset": "imagenet-r", "model": "compclip-eval-tiny", "pretrained": "seed7",
                      "task": "zeroshot_classification", "language": "en",
                      "metrics": {"acc1": pytest.approx(direct["top1"]), "acc5": pytest.approx(direct["top5"]),
                                  "mean_per_class_recall": pytest.approx(direct["mean_per_class"])}}

    # a class-names file overrides open_clip's names
    (tmp_path / "names.txt").write_text("".join(f"thing {i}\n" for i in range(len(IMAGENET_FACTS))))
    _, _, names = load_classification(str(root), classnames_file=str(tmp_path / "names.txt"), imagenet=True)
    assert names == [f"thing {i}" for i in range(len(IMAGENET_FACTS))]


def test_imagenet_v2_numbered_folders_and_csv_indices(tiny, tmp_path):
    """ImageNet-V2's release layout (folders 0 ... 999): all 1000 classes, each named by its number, in numeric
    order; a CSV of ImageNet indices with zeroshot_dataset=imagenet1k."""
    model, preprocess, tokenizer = tiny
    root = tmp_path / "imagenetv2-matched-frequency-format-val"
    for label in range(1000):
        (root / str(label)).mkdir(parents=True)
    paths, labels = [], []
    for index, (_, label, _) in enumerate(IMAGENET_FACTS):
        paths.append(make_image(str(root / str(label) / "a.jpeg"), index))
        labels.append(label)
    assert class_folders(str(root))[:12] == [str(label) for label in range(12)]  # not "0", "1", "10", "100", ...
    cfg = EvalConfig(zeroshot=str(root), zeroshot_templates="simple", progress=False)
    metrics = evaluate(model, preprocess, tokenizer, cfg, "cpu")["zeroshot"]
    direct = _direct_metrics(model, preprocess, tokenizer, paths, labels, open_clip.IMAGENET_CLASSNAMES,
                             ["a photo of a {}."])
    assert metrics == pytest.approx(direct)

    rows = ["image,label"] + [f"{root.name}/{label}/a.jpeg,{label}" for _, label, _ in IMAGENET_FACTS]
    (tmp_path / "v2.csv").write_text("\n".join(rows) + "\n")
    refs, csv_labels, names = load_classification(str(tmp_path / "v2.csv"), imagenet=True)
    assert csv_labels == labels and names == list(open_clip.IMAGENET_CLASSNAMES)
    with pytest.raises(EvalDataError, match="zeroshot_dataset"):  # without it, numbers are not names
        load_classification(str(tmp_path / "v2.csv"))


def test_folder_names_otherwise_and_bad_imagenet_folders(tmp_path):
    for name in ("n01440764", "red_square"):  # one WordNet id among other names is not ImageNet
        make_image(str(tmp_path / "mixed" / name / "0.png"), 0)
    from compclip.evaluation.metadata import is_imagenet_layout

    assert not is_imagenet_layout(class_folders(str(tmp_path / "mixed")))
    _, _, names = load_classification(str(tmp_path / "mixed"))
    assert names == ["n01440764", "red square"]
    with pytest.raises(EvalDataError, match=r"mixed: class folder 'red_square' is neither an ImageNet-1k WordNet"):
        load_classification(str(tmp_path / "mixed"), imagenet=True)
    for name in ("n01440764", "0"):  # both are tench
        make_image(str(tmp_path / "twice" / name / "0.png"), 0)
    with pytest.raises(EvalDataError, match="two class folders name the same ImageNet class"):
        load_classification(str(tmp_path / "twice"), imagenet=True)


def test_template_sets_are_open_clips():
    assert [t("x") for t in load_templates("openai")] == [t("x") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    assert [t("x") for t in load_templates("openai-simple")] == [t("x") for t in open_clip.SIMPLE_IMAGENET_TEMPLATES]
    assert len(load_templates("openai")) == 80 and len(load_templates("openai-simple")) == 7
    assert [t("cat") for t in load_templates("simple")] == ["a photo of a cat."]
    with pytest.raises(EvalDataError, match="openai, openai-simple, simple"):
        load_templates("imagenet")


def test_classification_metrics_on_known_ranks():
    """clip_benchmark: acc@k = share of images whose class is among the k best scores; mean_per_class_recall =
    balanced accuracy of the arg-max = mean over the classes that have images of their top-1 recall. Scores are
    built so that the true class's rank is known; class 11 is scored but has no image."""
    generator = torch.Generator().manual_seed(0)
    num_classes, count = 12, 300
    labels = torch.randint(0, num_classes - 1, (count,), generator=generator)
    ranks = torch.randint(0, num_classes, (count,), generator=generator)
    logits = torch.empty(count, num_classes)
    for row in range(count):
        best_first = [c for c in torch.randperm(num_classes, generator=generator).tolist() if c != labels[row]]
        best_first.insert(int(ranks[row]), int(labels[row]))
        for position, cls in enumerate(best_first):
            logits[row, cls] = 0.5 - 0.01 * position
    metrics = classification_metrics(logits, labels, num_classes)
    rank, label = ranks.tolist(), labels.tolist()
    assert metrics["top1"] == pytest.approx(sum(r == 0 for r in rank) / count)
    assert metrics["top5"] == pytest.approx(sum(r < 5 for r in rank) / count)
    recalls = [sum(r == 0 for r, l in zip(rank, label) if l == c) / label.count(c) for c in set(label)]
    assert len(recalls) == num_classes - 1
    assert metrics["mean_per_class"] == pytest.approx(sum(recalls) / len(recalls))
    assert math.isnan(classification_metrics(logits[:, :4], labels.clamp(max=3), 4)["top5"])


def test_retrieval_recalls_on_known_top_k():
    """clip_benchmark: image→text R@k (its `text_retrieval_recall@k`) = share of images with one of their own
    captions among the k best captions; text→image (`image_retrieval_recall@k`) = share of captions whose image
    is among the k best images. Here the top k come from sorting distinct random scores."""
    generator = torch.Generator().manual_seed(1)
    num_images, per_image = 12, 3
    owner = [image for image in range(num_images) for _ in range(per_image)]
    scores = torch.randperm(num_images * len(owner), generator=generator).double().view(num_images, len(owner))
    # identity image features: similarity[i, t] = text_features[t, i] = scores[i, t]
    i2t, t2i = retrieval_ranks(torch.eye(num_images, dtype=torch.float64), scores.T.contiguous(),
                               torch.tensor(owner), chunk=5)
    metrics = recall_metrics(i2t, t2i)
    table = scores.tolist()
    for k in (1, 5, 10):
        image_hits = [any(owner[t] == i for t in sorted(range(len(owner)), key=lambda t: -table[i][t])[:k])
                      for i in range(num_images)]
        text_hits = [owner[t] in sorted(range(num_images), key=lambda i: -table[i][t])[:k] for t in range(len(owner))]
        assert metrics[f"image_to_text_R@{k}"] == pytest.approx(sum(image_hits) / num_images)
        assert metrics[f"text_to_image_R@{k}"] == pytest.approx(sum(text_hits) / len(owner))
    assert 0 < metrics["text_to_image_R@1"] < metrics["text_to_image_R@10"] < 1  # the case is not degenerate


def test_retrieval_clip_benchmark_record(tmp_path):
    metrics = {f"{direction}_R@{k}": k / 20 + (0.3 if direction == "image_to_text" else 0)
               for direction in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    result = BenchmarkResult(dict(metrics, mean_recall=0.5), {"dataset": "mscoco_captions"})
    write_results({"retrieval": result}, str(tmp_path), label="run/epoch_2")
    record = json.loads((tmp_path / "retrieval.clip_benchmark.json").read_text())
    assert record["task"] == "zeroshot_retrieval" and record["dataset"] == "mscoco_captions"
    assert record["model"] == record["pretrained"] == "run/epoch_2"
    assert record["metrics"] == {f"{theirs}_retrieval_recall@{k}": pytest.approx(metrics[f"{ours}_R@{k}"])
                                 for theirs, ours in (("image", "text_to_image"), ("text", "image_to_text"))
                                 for k in (1, 5, 10)}
