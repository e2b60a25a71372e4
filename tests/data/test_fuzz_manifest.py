"""Fuzz: the manifest reader (JSONL, CSV, TSV, and NegCLIP's TSV read directly as a train manifest) under seeded
mutations of valid files. Each case is accepted with every row kept and every relative image path inside the
image root, or stopped by a ManifestError naming `file:line` (fuzz_support has the rules and the mutations)."""
import csv
import io
import json
import os

import pytest

import fuzz_support as fz
import seed_fixtures
from compclip.data.manifest import read_manifest

def check_accepted(records, data, fmt, folder):
    assert len(records) == fz.expected_samples(fmt, data), "rows lost without a word"
    for record in records:
        if record.image.startswith(folder + os.sep):  # a relative path, joined to the root
            assert os.path.normpath(record.image).startswith(folder + os.sep), f"{record.image} left the root"
        assert isinstance(record.caption, str)
        record.caption.encode("utf-8")


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("manifests"))
    seeds = {fmt: seed_fixtures.write_manifest(folder, fmt) for fmt in ("jsonl", "csv", "tsv")}
    seeds["negclip"] = seed_fixtures.write_negclip_tsv(folder)
    return folder, seeds


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "negclip"])
def test_manifest_reader_accepts_or_names_file_and_line(valid, fmt):
    folder, seeds = valid
    seed = seeds[fmt]
    with open(seed.path, "rb") as handle:
        original = handle.read()
    suffix = "tsv" if fmt == "negclip" else fmt
    path = os.path.join(folder, f"case.{suffix}")
    if fmt == "jsonl":
        rows = [json.loads(line) for line in original.decode().splitlines()]
        strategy = fz.mutated_json(rows, as_lines=True)
    else:
        table = list(csv.reader(io.StringIO(original.decode(), newline=""), delimiter="," if fmt == "csv" else "\t"))
        strategy = fz.mutated_table(table, "," if fmt == "csv" else "\t", table[0].index("filepath" if fmt == "negclip"
                                                                                        else "image"))

    fz.fuzz_reader(f"manifest-{fmt}", strategy, path, lambda: read_manifest(path, image_root=folder),
                   lambda records, mutation: check_accepted(records, mutation[1], fmt, folder), line_format=True)
