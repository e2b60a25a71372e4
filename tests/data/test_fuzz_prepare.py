"""Fuzz: `compclip-prepare` on mutated inputs (a JSONL manifest, NegCLIP's TSV, DeGLA's JSON). Every case ends
in exactly one of: a written manifest with one row per input sample, or one line `compclip-prepare: error: <file>
...` on stderr and exit status 2, no traceback. Plus the console command itself on a bad file, in a process."""
import contextlib
import csv
import io
import json
import os
import subprocess
import sys

import pytest

import fuzz_support as fz
import seed_fixtures
from compclip.data import prepare


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("prepare"))
    return {"jsonl": seed_fixtures.write_manifest(os.path.join(folder, "jsonl")),
            "negclip": seed_fixtures.write_negclip_tsv(os.path.join(folder, "negclip")),
            "degla": seed_fixtures.write_degla_json(os.path.join(folder, "degla"))}


def run_command(argv) -> tuple[int, str]:
    """(exit status, stderr) of compclip-prepare's main in this process; any exception but SystemExit propagates
    (a traceback is a failure of the test)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            prepare.main(argv)
            status = 0
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else 1
    return status, stderr.getvalue()


def _strategy(kind, seed):
    with open(seed.path, "rb") as handle:
        original = handle.read()
    if kind == "jsonl":
        return fz.mutated_json([json.loads(line) for line in original.decode().splitlines()], as_lines=True)
    if kind == "negclip":
        table = list(csv.reader(io.StringIO(original.decode(), newline=""), delimiter="\t"))
        return fz.mutated_table(table, "\t", table[0].index("filepath"))
    return fz.mutated_json(json.loads(original))


@pytest.mark.parametrize("kind", ["jsonl", "negclip", "degla"])
def test_prepare_writes_every_row_or_exits_2_with_one_message(seeds, kind):
    seed = seeds[kind]
    folder = os.path.dirname(seed.path)
    path = os.path.join(folder, "case" + os.path.splitext(seed.path)[1])
    output = os.path.join(folder, "out", "prepared.jsonl")
    input_format = "manifest" if kind == "jsonl" else kind

    argv = ["--input", path, "--input-format", input_format, "--image-root", seed.image_root, "--output", output,
            "--types", "", "--no-concepts"]

    def check(result, mutation):
        status, stderr = result
        if status == 0:
            with open(output, encoding="utf-8") as handle:
                written = handle.read().splitlines()
            assert len(written) == fz.expected_samples(kind, mutation[1]), "rows lost without a word"
            return "accepted"
        assert status == 2, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("compclip-prepare: error: "), stderr
        fz.check_names_file(lines[0], path)
        return "error"

    fz.fuzz_reader(f"prepare-{kind}", _strategy(kind, seed), path, lambda: run_command(argv), check, ci=40)


def test_the_console_command_prints_one_line_and_exits_2(tmp_path):
    """FINDINGS' case: a non-UTF-8 manifest ended in a UnicodeDecodeError traceback."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"image": "a.png", "caption": "caf\xe9"}\n')
    done = subprocess.run([sys.executable, "-m", "compclip.data.prepare", "--input", str(bad), "--output",
                           str(tmp_path / "out.jsonl"), "--types", "", "--no-concepts"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == f"compclip-prepare: error: {bad}:1: not UTF-8 text (byte 0xe9 at column 35)"
