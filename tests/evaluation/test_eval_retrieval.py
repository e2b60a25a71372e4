"""Retrieval: Recall@K on a hand-made similarity matrix with known ranks, and end to end on a Karpathy JSON
against a direct brute-force computation."""
import json

import pytest
import torch
from evaltest_helpers import direct_image_features, direct_text_features, make_image, tiny_model

from compclip.evaluation import EvalConfig, EvalDataError, evaluate
from compclip.evaluation.retrieval import recall_metrics, retrieval_ranks


def test_recall_on_hand_constructed_case():
    # Image features = identity, so sim[image i, text t] = text_features[t, i]: each row below is one text's
    # scores against images 0, 1, 2. Texts 0-1 belong to image 0, 2-3 to image 1, 4-5 to image 2.
    text_features = torch.tensor([
        [0.9, 0.1, 0.0],  # own image best: rank 0
        [0.2, 0.8, 0.1],  # image 1 beats its own image 0: rank 1
        [0.1, 0.3, 0.5],  # image 2 beats its own image 1: rank 1
        [0.0, 0.7, 0.7],  # tie with image 2 counts against it: rank 1
        [0.1, 0.0, 0.2],  # rank 0
        [0.6, 0.2, 0.4],  # image 0 beats image 2: rank 1
    ])
    text_to_image = torch.tensor([0, 0, 1, 1, 2, 2])
    i2t, t2i = retrieval_ranks(torch.eye(3), text_features, text_to_image, chunk=2)
    # image 0: best own 0.9, nothing above -> 0; image 1: best own 0.7, text 1 (0.8) above -> 1;
    # image 2: best own 0.4, texts 2 (0.5) and 3 (0.7) above -> 2.
    assert i2t.tolist() == [0, 1, 2]
    assert t2i.tolist() == [0, 1, 1, 1, 0, 1]
    metrics = recall_metrics(i2t, t2i, ks=(1, 2, 3))
    assert metrics["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert metrics["image_to_text_R@2"] == pytest.approx(2 / 3)
    assert metrics["image_to_text_R@3"] == pytest.approx(1.0)
    assert metrics["text_to_image_R@1"] == pytest.approx(2 / 6)
    assert metrics["text_to_image_R@2"] == pytest.approx(1.0)


def test_karpathy_end_to_end_matches_brute_force(tmp_path):
    model, preprocess, tokenizer = tiny_model(seed=1)
    words = ["red", "green", "blue", "round", "square", "small", "big", "dark", "light", "striped", "dotted", "tall"]
    images = []
    for index in range(12):
        split = "test" if index % 4 else "val"  # 3 of 12 are not in the test split
        make_image(str(tmp_path / "imgs" / "val2014" / f"im{index}.jpg"), index)
        sentences = [{"raw": f"a {words[index]} {words[(index + k) % 12]} thing"} for k in (1, 2)]
        images.append({"filepath": "val2014", "filename": f"im{index}.jpg", "split": split, "imgid": index,
                       "sentences": sentences})
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": images}))
    cfg = EvalConfig(retrieval=str(tmp_path / "karpathy.json"), retrieval_image_root=str(tmp_path / "imgs"),
                     batch_size=4, progress=False)
    metrics = evaluate(model, preprocess, tokenizer, cfg, "cpu", out_dir=str(tmp_path / "out"))["retrieval"]

    test = [entry for entry in images if entry["split"] == "test"]
    image_features = direct_image_features(model, preprocess,
                                           [str(tmp_path / "imgs" / "val2014" / e["filename"]) for e in test])
    texts = [s["raw"] for e in test for s in e["sentences"]]
    owner = [i for i, e in enumerate(test) for _ in e["sentences"]]
    sim = (image_features @ direct_text_features(model, tokenizer, texts).T).tolist()
    i2t = [sum(sim[i][t] >= max(sim[i][u] for u in range(len(texts)) if owner[u] == i)
               for t in range(len(texts)) if owner[t] != i) for i in range(len(test))]
    t2i = [sum(sim[j][t] >= sim[owner[t]][t] for j in range(len(test)) if j != owner[t]) for t in range(len(texts))]
    for k in (1, 5, 10):
        assert metrics[f"image_to_text_R@{k}"] == pytest.approx(sum(r < k for r in i2t) / len(i2t))
        assert metrics[f"text_to_image_R@{k}"] == pytest.approx(sum(r < k for r in t2i) / len(t2i))
    assert 0 < metrics["image_to_text_R@5"] and metrics["text_to_image_R@10"] == 1.0  # 9 test images
    # every query's rank is kept (the study bootstraps R@1 over queries and pairs two models on them)
    ranks = json.loads((tmp_path / "out" / "retrieval.details.json").read_text())["details"]["ranks"]
    assert ranks == {"image_to_text": i2t, "text_to_image": t2i}


def test_malformed_karpathy_names_file_and_item(tmp_path):
    model, preprocess, tokenizer = tiny_model()
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "test", "imgid": 5, "sentences": []}]}))
    with pytest.raises(EvalDataError, match=r"k\.json: item 5: missing or empty 'sentences'"):
        evaluate(model, preprocess, tokenizer, EvalConfig(retrieval=str(path), progress=False), "cpu")
