"""The defects the fuzz suite found in the benchmark readers, one regression test each: every case ended in a bare
traceback (UnicodeDecodeError, OverflowError, KeyError after the model was loaded) or lost items silently."""
import json
import os

import pytest

import seed_fixtures
from compclip.evaluation import EvalDataError
from compclip.evaluation.compositional import (load_aro_vg, load_generic_jsonl, load_sugarcrepe_file,
                                               parse_sugarcrepe_file, parse_valse_piece)
from compclip.evaluation.retrieval import load_karpathy
from compclip.evaluation.zeroshot import _read_classnames, load_classification, load_templates


def _write(path, data: bytes) -> str:
    with open(path, "wb") as handle:
        handle.write(data)
    return str(path)


def test_annotation_json_that_is_not_utf8_names_line_and_column(tmp_path):
    path = _write(tmp_path / "swap_att.json", b'{\n "1": {"filename": "a.jpg", "caption": "caf\xe9",\n}}')
    with pytest.raises(EvalDataError, match=r"swap_att.json:2: not UTF-8 text \(byte 0xe9 at column 44\)"):
        parse_sugarcrepe_file(path)


def test_a_repeated_sugarcrepe_id_is_an_error_not_a_lost_item(tmp_path):
    text = '{"7": {"filename": "a.jpg", "caption": "a", "negative_caption": "b"},' \
           ' "7": {"filename": "b.jpg", "caption": "c", "negative_caption": "d"}}'
    with pytest.raises(EvalDataError, match=r"add_att.json: duplicate key '7' in the object at /"):
        parse_sugarcrepe_file(_write(tmp_path / "add_att.json", text.encode()))


@pytest.mark.parametrize("value, message", [
    ("9" * 400, "field 'bbox_w' must be a finite number"),
    ("NaN", "field 'bbox_w' must be a finite number, got nan"),
    ("-3", "field 'bbox_w' must be at least 0"),
])
def test_aro_boxes_must_be_finite_and_non_negative(tmp_path, value, message):
    seed = seed_fixtures.write_aro_vg(str(tmp_path), "relation")
    with open(seed.path) as handle:
        text = handle.read().replace('"bbox_w": 20', f'"bbox_w": {value}', 1)
    path = _write(tmp_path / "vgr.json", text.encode())
    with pytest.raises(EvalDataError, match=f"vgr.json: item 0: {message}"):
        load_aro_vg(path, "relation", seed.image_root)


@pytest.mark.parametrize("votes", ["NaN", "-1", "Infinity", '"3"'])
def test_valse_votes_must_be_a_count(tmp_path, votes):
    """A NaN vote count compared false with 2 and silently dropped the item from the valid subset."""
    seed = seed_fixtures.write_valse(str(tmp_path))
    with open(seed.path) as handle:
        text = handle.read().replace('"caption": 3', f'"caption": {votes}', 1)
    path = _write(tmp_path / "existence.json", text.encode())
    with pytest.raises(EvalDataError, match=r"existence.json: item existence_0: missing or malformed 'mturk.caption'"):
        parse_valse_piece(path)


def test_generic_jsonl_lines_that_are_not_utf8_or_not_unicode(tmp_path):
    seed = seed_fixtures.write_generic_jsonl(str(tmp_path))
    with open(seed.path, "rb") as handle:
        lines = handle.read().splitlines(keepends=True)
    bad = _write(tmp_path / "c1.jsonl", lines[0] + lines[1].replace(b"umbrella", b"umbr\xe9lla"))
    with pytest.raises(EvalDataError, match=r"c1.jsonl:2: not UTF-8 text"):
        load_generic_jsonl(bad, seed.image_root)
    surrogate = _write(tmp_path / "c2.jsonl", lines[0].replace(b"dog", b"\\udc80"))
    with pytest.raises(EvalDataError, match=r"c2.jsonl: item q0 \(line 1\): field 'captions' is not valid Unicode"):
        load_generic_jsonl(surrogate, seed.image_root)


@pytest.mark.parametrize("template", ["a photo of {0} and {}.", "a {name} {}", "{} in {"])
def test_templates_that_cannot_format_fail_when_read(tmp_path, template):
    """They used to pass the read and raise IndexError / KeyError / ValueError at the first class name."""
    path = _write(tmp_path / "t.txt", f"a photo of a {{}}.\n{template}\n".encode())
    with pytest.raises(EvalDataError, match=r"t.txt: item line 2: template does not format"):
        load_templates(path)


def test_class_names_and_label_csv_that_are_not_text(tmp_path):
    with pytest.raises(EvalDataError, match=r"names.txt:2: not UTF-8 text"):
        _read_classnames(_write(tmp_path / "names.txt", b"dog\nc\xe4t\n"))
    broken = b"image,label\na.png,dog\nb.png\rc,cat\n"
    with pytest.raises(EvalDataError, match=r"labels.csv: item line 3: not a CSV row \(new-line character seen"):
        load_classification(_write(tmp_path / "labels.csv", broken), str(tmp_path))
    long_cell = b"image,label\n" + b"x" * 200_000 + b",dog\n"  # read whole (not a csv field-limit traceback)
    with pytest.raises(EvalDataError, match=r"long.csv: item line 2: image not found: .*xxx\.\.\. \(2000"):
        load_classification(_write(tmp_path / "long.csv", long_cell), str(tmp_path))


def test_karpathy_images_need_a_split_and_stay_under_the_root(tmp_path):
    seed = seed_fixtures.write_retrieval(str(tmp_path))
    with open(seed.path) as handle:
        data = json.load(handle)
    del data["images"][1]["split"]
    with pytest.raises(EvalDataError, match=r"dataset_coco.json: item 1: field 'split' must be a string"):
        load_karpathy(_write(tmp_path / "dataset_coco.json", json.dumps(data).encode()), "test")


def test_image_names_may_not_climb_out_of_the_image_root(tmp_path):
    seed = seed_fixtures.write_sugarcrepe(str(tmp_path))
    os.makedirs(tmp_path / "secret", exist_ok=True)
    seed_fixtures.write_image(str(tmp_path / "secret" / "x.jpg"), 0)
    text = json.dumps({"0": {"filename": "../secret/x.jpg", "caption": "a", "negative_caption": "b"}})
    path = _write(tmp_path / "swap_obj.json", text.encode())
    with pytest.raises(EvalDataError, match=r"swap_obj.json: item 0: field 'image': '../secret/x.jpg' climbs out"):
        load_sugarcrepe_file(path, seed.image_root)
