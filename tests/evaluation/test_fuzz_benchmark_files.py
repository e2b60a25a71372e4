"""Fuzz: the benchmark readers (SugarCrepe, VALSE, ARO VG-Relation / VG-Attribution, the generic multiple-choice
JSONL, the Karpathy retrieval JSON, zero-shot template, class-name and CSV files) under seeded mutations of valid
files. Each case is accepted with every item of the file kept (counted here with the standard parsers), or stopped
by an EvalDataError naming the file; `compclip-eval` turns that into one line and exit status 2."""
import csv
import io
import json
import os

import pytest
from hypothesis import strategies as st

import fuzz_support as fz
import seed_fixtures
from compclip.evaluation.__main__ import main as eval_main
from compclip.evaluation.compositional import load_aro_vg, load_generic_jsonl, load_sugarcrepe_file, parse_valse_piece
from compclip.evaluation.retrieval import load_karpathy
from compclip.evaluation.zeroshot import _read_classnames, load_classification, load_templates


def _pairs(data: bytes):
    return json.loads(data.decode("utf-8-sig"), object_pairs_hook=list)


def _valse_counts(data: bytes):
    items = json.loads(data.decode("utf-8-sig"))
    return sum(item["mturk"]["caption"] >= 2 for item in items.values()), len(items)


READERS = {
    # name: (seed writer, file inside the seed, reader(path, seed) -> count, expected count(bytes))
    "sugarcrepe": (seed_fixtures.write_sugarcrepe, lambda seed: os.path.join(seed.path, "replace_rel.json"),
                   lambda path, seed: len(load_sugarcrepe_file(path, seed.image_root)), lambda data: len(_pairs(data))),
    "valse": (seed_fixtures.write_valse, lambda seed: seed.path,
              lambda path, seed: (len(parse_valse_piece(path)[0]), parse_valse_piece(path)[1]), _valse_counts),
    "aro_vg_relation": (lambda folder: seed_fixtures.write_aro_vg(folder, "relation"), lambda seed: seed.path,
                        lambda path, seed: len(load_aro_vg(path, "relation", seed.image_root)),
                        lambda data: len(json.loads(data))),
    "aro_vg_attribution": (lambda folder: seed_fixtures.write_aro_vg(folder, "attribution"), lambda seed: seed.path,
                           lambda path, seed: len(load_aro_vg(path, "attribution", seed.image_root)),
                           lambda data: len(json.loads(data))),
    "retrieval": (seed_fixtures.write_retrieval, lambda seed: seed.path,
                  lambda path, seed: len(load_karpathy(path, "test")),
                  lambda data: sum(image["split"] == "test" for image in json.loads(data)["images"])),
}


@pytest.mark.parametrize("name", sorted(READERS))
def test_json_benchmark_readers(tmp_path_factory, name):
    write, file_of, read, expected = READERS[name]
    seed = write(str(tmp_path_factory.mktemp(name)))
    source = file_of(seed)
    with open(source, encoding="utf-8") as handle:
        original = json.load(handle)
    path = os.path.join(os.path.dirname(source), "case.json")

    def check(count, mutation):
        assert count == expected(mutation[1]), "items lost without a word"

    fz.fuzz_reader(f"eval-{name}", fz.mutated_json(original), path, lambda: read(path, seed), check)


def test_generic_jsonl_reader(tmp_path):
    seed = seed_fixtures.write_generic_jsonl(str(tmp_path))
    with open(seed.path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    path = str(tmp_path / "case.jsonl")

    def check(items, mutation):
        assert len(items) == fz.expected_samples("jsonl", mutation[1]), "items lost without a word"

    fz.fuzz_reader("eval-generic", fz.mutated_json(rows, as_lines=True), path,
                   lambda: load_generic_jsonl(path, seed.image_root), check)


LINE_JUNK = ["{", "}", "{0}", "{name}", "a {} {}", "{}}", "{{}}", "{!r}", "{:>99999999999}", "\t", "é", "{}"]


@st.composite
def mutated_lines(draw, lines):
    lines = list(lines)
    kinds = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["junk_line", "drop_line", "blank_line", "long_line", "repeat_line"]))
        kinds.append(kind)
        index = draw(st.integers(0, len(lines))) if lines else 0
        if kind == "junk_line":
            lines.insert(index, draw(st.sampled_from(LINE_JUNK)))
        elif kind == "drop_line" and lines:
            lines.pop(min(index, len(lines) - 1))
        elif kind == "blank_line":
            lines.insert(index, draw(st.sampled_from(["", "   "])))
        elif kind == "long_line":
            lines.insert(index, "w" * fz.LONG_LINE + "{}")
        elif kind == "repeat_line" and lines:
            lines.insert(index, lines[min(index, len(lines) - 1)])
    data = "".join(line + "\n" for line in lines).encode()
    if draw(st.booleans()):
        kind, data = draw(fz.byte_mutation(data))
        kinds.append(kind)
    return kinds, data


def _nonblank(data: bytes) -> int:
    return sum(1 for line in data.decode("utf-8-sig").split("\n") if line.strip())


@pytest.mark.parametrize("name", ["templates", "classnames", "classification_csv"])
def test_zeroshot_text_files(tmp_path, name):
    seed = seed_fixtures.write_zeroshot(str(tmp_path))
    path = str(tmp_path / ("case.csv" if name == "classification_csv" else "case.txt"))
    if name == "classification_csv":
        lines = ["image,label"] + [f"classes/n0{label}/{index}.png,{['dog', 'cat', 'horse'][label]}"
                                   for label in range(3) for index in range(2)]
    else:
        with open(seed.extra[name], encoding="utf-8") as handle:
            lines = handle.read().splitlines()

    def read():
        if name == "templates":
            templates = load_templates(path)
            return [template("class") for template in templates]
        if name == "classnames":
            return _read_classnames(path)
        return load_classification(path, seed.image_root)[0]

    def check(values, mutation):
        if name == "classification_csv":
            text = mutation[1].decode("utf-8-sig")
            rows = [row for row in csv.reader(io.StringIO(text, newline="")) if row][1:]
            assert len(values) == len(rows), "images lost without a word"
        else:
            assert len(values) == _nonblank(mutation[1]), "lines lost without a word"

    fz.fuzz_reader(f"eval-zeroshot-{name}", mutated_lines(lines), path, read, check)


def test_compclip_eval_prints_one_line_and_exits_2(tmp_path, capsys, monkeypatch):
    """The annotation files are read before any model work, so a stand-in model is enough here."""
    import torch

    import compclip.evaluation.__main__ as command

    monkeypatch.setattr(command, "load_model", lambda spec, device: (torch.nn.Linear(1, 1), None, None))
    seed = seed_fixtures.write_sugarcrepe(str(tmp_path))
    bad = os.path.join(seed.path, "swap_att.json")
    with open(bad, "rb") as handle:
        data = handle.read()
    with open(bad, "wb") as handle:
        handle.write(data.replace(b'"1": {', b'"0": {', 1))  # a repeated id: json would keep only the last item
    with pytest.raises(SystemExit) as stopped:
        eval_main(["--model", "stand-in", "--sugarcrepe", seed.path, "--sugarcrepe-image-root",
                   seed.image_root, "--device", "cpu", "--out", str(tmp_path / "out"), "--no-progress"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"compclip-eval: error: {bad}: duplicate key '0' in the object at / (JSON keeps only the last)")
