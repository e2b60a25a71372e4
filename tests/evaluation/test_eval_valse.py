"""VALSE: valid-item counts of the real piece files, and pairwise accuracy on a fixture in the official format
against a direct open_clip computation."""
import json
import os

import pytest
from evaltest_helpers import SHARED_DATA, direct_choice_correct, make_image, tiny_model

from compclip.evaluation import EvalConfig, EvalDataError, evaluate
from compclip.evaluation.compositional import parse_valse_piece, valse_files

# (valid items with mturk.caption >= 2, all items) per piece, counted independently with jq on the shared files.
REAL_COUNTS = {
    "actant-swap": (949, 1042), "action-replacement": (648, 779), "coreference-hard": (104, 141),
    "coreference-standard": (708, 916), "counting-adversarial": (691, 756), "counting-hard": (868, 1000),
    "counting-small-quant": (900, 1000), "existence": (505, 534), "foil-it": (943, 1000), "plurals": (851, 1000),
    "relations": (535, 614),
}


def test_real_pieces_valid_counts():
    root = os.path.join(SHARED_DATA, "valse")
    if not os.path.isdir(root):
        pytest.skip("shared VALSE annotations not present")
    files = valse_files(root)
    assert sorted(files) == sorted(REAL_COUNTS)
    for piece, path in files.items():
        valid, total = parse_valse_piece(path)
        assert (len(valid), total) == REAL_COUNTS[piece], piece
    assert sum(count for count, _ in REAL_COUNTS.values()) == 7702


def _entry(image, caption, foil, votes):
    return {"dataset": "fixture", "image_file": image, "caption": caption, "foil": foil,
            "mturk": {"caption": votes, "foil": 3 - votes, "other": 0}}


def test_accuracy_valid_items_only(tmp_path):
    model, preprocess, tokenizer = tiny_model(seed=2)
    images = tmp_path / "images"
    for index in range(3):
        make_image(str(images / f"v7w_{index}.jpg"), index)
    make_image(str(images / "plurals" / "000000000009.jpg"), 5)  # found through the <piece>/ fallback
    pieces = {
        "existence": {f"e{i}": _entry(f"v7w_{i % 3}.jpg", f"there are {i} red things", f"there are no things {i}",
                                      2 + i % 2) for i in range(5)},
        "plurals": {"p0": _entry("000000000009.jpg", "one green field", "several green fields", 3),
                    "p1": _entry("v7w_1.jpg", "a blue square", "blue squares", 3),
                    "p2": _entry("missing-but-invalid.jpg", "x", "y", 1)},
    }
    pieces["existence"]["e_invalid"] = _entry("v7w_0.jpg", "never scored", "not scored", 1)
    for name, data in pieces.items():
        (tmp_path / "ann").mkdir(exist_ok=True)
        (tmp_path / "ann" / f"{name}.json").write_text(json.dumps(data))
    cfg = EvalConfig(valse=str(tmp_path / "ann"), valse_image_root=str(images), progress=False)
    metrics = evaluate(model, preprocess, tokenizer, cfg, "cpu", out_dir=str(tmp_path / "out"))["valse"]
    expected = {}
    for name, data in pieces.items():
        cases = []
        for entry in data.values():
            if entry["mturk"]["caption"] >= 2:
                path = images / entry["image_file"]
                path = path if path.exists() else images / name / entry["image_file"]
                cases.append((str(path), None, [entry["caption"], entry["foil"]], 0))
        correct = direct_choice_correct(model, preprocess, tokenizer, cases)
        expected[name] = sum(correct) / len(correct)
        assert metrics[name] == pytest.approx(expected[name])
    assert metrics["mean"] == pytest.approx(sum(expected.values()) / 2)
    details = json.loads((tmp_path / "out" / "valse.details.json").read_text())["details"]
    assert details["valid_counts"] == {"existence": 5, "plurals": 2}
    assert details["total_counts"] == {"existence": 6, "plurals": 3}


def test_missing_votes_names_file_and_item(tmp_path):
    (tmp_path / "relations.json").write_text(json.dumps({"r7": {"image_file": "a.jpg", "caption": "a", "foil": "b"}}))
    with pytest.raises(EvalDataError, match=r"relations\.json: item r7: missing or malformed 'mturk.caption'"):
        parse_valse_piece(str(tmp_path / "relations.json"))
