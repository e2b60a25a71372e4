"""Fuzz of what a resume reads from a checkpoint folder: completion markers, the shards they record, the ranks'
`compclip_rank<r>.pt` extras, DeepSpeed's `latest` pointer, the line record, and symlinks among them.

A valid folder (three tags on one line, written by the real commit code, `Checkpointer._commit`) is copied per case
and damaged: a marker mutated field by field (missing, wrong types, NaN, huge and negative numbers, very long
strings, paths that climb out of the tag) or byte by byte (truncated, random and non-UTF-8 bytes, empty); a shard
truncated, flipped, deleted, or replaced by a folder, a FIFO or a symlink (to /dev/zero, to itself, out of the
folder); extras holding other fields or other bytes; pointers and line records with any content.

Every case ends, within a time bound, in one of: accepted (a complete tag, every file of it as the marker
recorded it: a damaged shard is never accepted), passed over with a warning naming the tag (the resume falls back
to the previous one), or one error that names the file (CheckpointNotFound, ConfigError). Anything else fails.
The engine is the readers' (tests/fuzz_support.py: fixed seed per reader, bounded cases in CI,
`COMPCLIP_FUZZ_CASES` / `COMPCLIP_FUZZ_RECORD` for a longer, recorded run).
"""
import json
import logging
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
import fuzz_support as fz  # noqa: E402
from hypothesis import given, seed, strategies as st  # noqa: E402

from compclip import runfolder  # noqa: E402
from compclip.config import ConfigError  # noqa: E402
from compclip.rng import rng_state  # noqa: E402
from compclip.safe_pickle import rng_state_to_safe  # noqa: E402
from compclip.trainer.checkpoint import read_extras  # noqa: E402
from test_checkpoint import SHARDS, commit, make_checkpointer  # noqa: E402  (tests/trainer is on sys.path)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from([2 ** 63, -2 ** 63, 10 ** 40, -1]) | st.floats(
        allow_nan=True, allow_infinity=True) | st.text(max_size=12) | st.sampled_from(
        ["../../etc/passwd", "/dev/zero", "step2", "x" * 50_000, "a\x00b", "..", "", "compclip_rank0.pt"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


def _extras(step):
    return {"rng": rng_state_to_safe(rng_state()), "method": {"name": "negclip", "weights": {"negclip": 1.0}},
            "teacher": None, "data": {"epoch": 0, "batch": step, "skipped": 0}, "nonfinite": 0,
            "pending_evaluation": None, "epoch": 0, "micro_in_epoch": step, "global_step": step}


def _extras_bytes(step) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(_extras(step), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def valid_run(tmp_path_factory):
    """A run folder with step1 -> step2 -> step3, each complete, on line 0."""
    run_dir = tmp_path_factory.mktemp("valid") / "run"
    checkpoints = make_checkpointer(run_dir)
    for step in (1, 2, 3):
        commit(checkpoints, step, _extras_bytes(step))
    return run_dir


def _copy(valid_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "case"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    shutil.copytree(valid_run, run_dir, symlinks=True)
    return run_dir


def fuzz_case(reader: str, ci: int):
    """The decorators of one reader's Hypothesis case: the suite's settings and the reader's fixed seed."""
    def decorate(case):
        return fz.fuzz_settings(ci)(seed(fz.fuzz_seed(reader))(case))
    return decorate


def _pick_tag(run_dir: Path, counts, kinds):
    """The tag a resume of `latest` takes, as the trainer decides it (without ranks), under the time bound: the
    first candidate whose files verify, each failure named. Returns (tag folder or None, the problems of the ones
    passed over); the outcome ('accepted', 'fell back' or 'error') goes to `counts` with the mutation `kinds`."""
    ds = run_dir / "checkpoints" / "deepspeed"
    passed_over = []
    with fz.time_bound():
        try:
            located = runfolder.candidates("latest", runfolder.RunFolder(run_dir))
        except runfolder.CheckpointNotFound as error:
            assert str(ds) in str(error) or "resume" in str(error), error
            counts.add("error", kinds)
            return None, []
        for root, tag in located:
            problems = runfolder.verify(root / tag)
            assert all(isinstance(problem, str) and str(root / tag) in problem for problem in problems), problems
            if not problems:
                counts.add("accepted" if not passed_over else "fell back", kinds)
                return root / tag, passed_over
            passed_over.append(problems)
    counts.add("error", kinds)
    return None, passed_over


def _intact(tag_dir: Path, original: dict) -> bool:
    """Every file `original` (a marker's records) lists is there with its recorded size and checksum."""
    from compclip import durable

    for name, record in original["files"].items():
        try:
            size, crc = durable.checksum(tag_dir / name)
        except OSError:
            return False
        if (size, crc) != (record["size"], record["crc32"]):
            return False
    return True


# --------------------------------------------------------------------------------------------------------------
# Completion markers


def _mutate_json(found, path, value, delete):
    """`found` with the field at `path` (a list of keys, into nested objects) replaced by `value` or deleted."""
    target = found
    for key in path[:-1]:
        if not isinstance(target, dict) or key not in target:
            return found
        target = target[key]
    if isinstance(target, dict):
        if delete:
            target.pop(path[-1], None)
        else:
            target[path[-1]] = value
    return found


MARKER_PATHS = st.sampled_from([["files"], ["files", SHARDS[0]], ["files", SHARDS[0], "size"],
                                ["files", SHARDS[0], "crc32"], ["files", "../outside.pt"], ["files", "/etc/passwd"],
                                ["files", "a\x00b"], ["world_size"], ["id"], ["parent"], ["parent", "tag"],
                                ["parent", "id"], ["line"], ["tag"], ["global_step"], ["request"], ["checksum"]])


def test_completion_markers(valid_run, tmp_path, caplog):
    reader = "checkpoint: completion marker"

    @fuzz_case(reader, ci=80)
    @given(edits=st.lists(st.tuples(MARKER_PATHS, JSON, st.booleans()), min_size=1, max_size=3),
           raw=st.none() | st.sampled_from(["truncate", "flip", "non-utf8", "empty", "array", "huge"]),
           at=st.floats(0, 1, exclude_max=True))
    def case(edits, raw, at):
        run_dir = _copy(valid_run, tmp_path)
        tag_dir = run_dir / "checkpoints" / "deepspeed" / "step3"
        path = tag_dir / runfolder.MARKER
        original = json.loads(path.read_text())
        found = json.loads(path.read_text())
        for keys, value, delete in edits:
            found = _mutate_json(found, keys, value, delete)
        data = json.dumps(found).encode()
        if raw is not None:
            data = {"truncate": data[:int(at * len(data))], "flip": data[:int(at * len(data))] + b"\xff" + data[
                int(at * len(data)) + 1:], "non-utf8": b"\xff\xfe" + data, "empty": b"", "array": b"[1, 2]",
                "huge": b" " * (runfolder.MAX_RECORD_BYTES + 1)}[raw]
        path.write_bytes(data)
        caplog.clear()
        kinds = [raw or "fields"] + ["/".join(map(str, keys)) for keys, _, _ in edits]
        with caplog.at_level(logging.WARNING, logger="compclip"):
            picked, passed_over = _pick_tag(run_dir, latest, kinds)
            explicit = _explicit(tag_dir, named, kinds)
        # Nothing passed over silently: if step3 is not taken, a warning or a verification failure names it.
        if picked is None or picked.name != "step3":
            assert "step3" in caplog.text or any("step3" in p for problems in passed_over for p in problems), (
                picked, caplog.text)
        else:  # taken: its files are the ones written (whatever the marker now says)
            assert _intact(picked, original)
        assert explicit is None or _intact(tag_dir, original) or runfolder.verify(tag_dir)

    with fz.tally(reader) as latest, fz.tally(reader + " (explicit tag)") as named:
        case()


def _explicit(tag_dir: Path, counts, kinds):
    """`--resume <tag_dir>`: the tag, or CheckpointNotFound naming it."""
    try:
        with fz.time_bound():
            (root, tag), = runfolder.candidates(str(tag_dir))
    except runfolder.CheckpointNotFound as error:
        assert str(tag_dir) in str(error), error
        counts.add("error", kinds)
        return None
    counts.add("accepted", kinds)
    return root / tag


# --------------------------------------------------------------------------------------------------------------
# Shards


DAMAGE = ("truncate", "flip", "delete", "folder", "fifo", "to /dev/zero", "to itself", "to garbage outside",
          "to an identical copy outside", "empty", "grow")


def _damage(path: Path, how: str, at: float, outside: Path) -> bool:
    """Damage `path`; whether its content is still the original (a symlink to an identical copy)."""
    data = path.read_bytes()
    position = min(int(at * len(data)), len(data) - 1)
    path.unlink()
    if how == "truncate":
        path.write_bytes(data[:position])
    elif how == "flip":
        path.write_bytes(data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1:])
    elif how == "folder":
        path.mkdir()
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "to /dev/zero":
        os.symlink("/dev/zero", path)
    elif how == "to itself":
        os.symlink(path, path)
    elif how.startswith("to "):
        outside.mkdir(exist_ok=True)
        copy = outside / path.name
        copy.write_bytes(data if how.endswith("identical copy outside") else os.urandom(len(data)))
        os.symlink(copy, path)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "grow":
        path.write_bytes(data + b"\x00")
    return how == "to an identical copy outside"


def test_damaged_shards_are_never_accepted(valid_run, tmp_path):
    reader = "checkpoint: shards"

    @fuzz_case(reader, ci=60)
    @given(damaged=st.lists(st.tuples(st.sampled_from(SHARDS), st.sampled_from(DAMAGE), st.floats(0, 1)),
                            min_size=1, max_size=2, unique_by=lambda d: d[0]),
           newest_too=st.booleans())
    def case(damaged, newest_too):
        run_dir = _copy(valid_run, tmp_path)
        outside = tmp_path / "outside"
        outside.mkdir(exist_ok=True)
        ds = run_dir / "checkpoints" / "deepspeed"
        changed = [name for name, how, at in damaged if not _damage(ds / "step3" / name, how, at, outside)]
        if newest_too and changed:  # step2 as well: the resume must fall back twice
            newest_too = not _damage(ds / "step2" / damaged[0][0], damaged[0][1], damaged[0][2], outside / "2")
        picked, passed_over = _pick_tag(run_dir, counts, [how for _, how, _ in damaged])
        named = " ".join(p for problems in passed_over for p in problems)
        assert all(str(ds / "step3" / name) in named for name in changed), named
        expected = "step3" if not changed else "step1" if newest_too else "step2"
        assert picked is not None and picked.name == expected, (picked, named)

    with fz.tally(reader) as counts:
        case()


# --------------------------------------------------------------------------------------------------------------
# The extras compclip_rank<r>.pt


EXTRAS_EDITS = st.sampled_from(["rng", "nonfinite", "epoch", "micro_in_epoch", "global_step", "data",
                                "pending_evaluation", "method", "teacher", ("rng", "python"), ("rng", "numpy"),
                                ("rng", "torch")])


def test_extras(tmp_path):
    reader = "checkpoint: compclip_rank<r>.pt extras"

    @fuzz_case(reader, ci=60)
    @given(edits=st.lists(st.tuples(EXTRAS_EDITS, JSON | st.just(torch.zeros(3)), st.booleans()), max_size=3),
           raw=st.none() | st.sampled_from(["truncate", "random", "empty", "a list", "zip of nothing"]),
           at=st.floats(0, 1, exclude_max=True))
    def case(edits, raw, at):
        extras = _extras(3)
        for field, value, delete in edits:
            keys = [field] if isinstance(field, str) else list(field)
            extras = _mutate_json(extras, keys, value, delete)
        path = tmp_path / "compclip_rank0.pt"
        torch.save(extras if raw != "a list" else [extras], path)
        data = path.read_bytes()
        if raw == "truncate":
            path.write_bytes(data[:int(at * len(data))])
        elif raw == "random":
            path.write_bytes(os.urandom(len(data)))
        elif raw == "empty":
            path.write_bytes(b"")
        elif raw == "zip of nothing":
            path.write_bytes(b"PK\x05\x06" + b"\x00" * 18)
        kinds = [raw or "fields"] + [str(field) for field, _, _ in edits]
        try:
            with fz.time_bound():
                loaded = read_extras(path)
        except ConfigError as error:
            assert str(path) in str(error), error
            counts.add("error", kinds)
            return
        counts.add("accepted", kinds)
        for field in ("rng", "nonfinite", "epoch", "micro_in_epoch", "global_step"):
            assert field in loaded

    with fz.tally(reader) as counts:
        case()


# --------------------------------------------------------------------------------------------------------------
# Pointers, line records, symlinks


POINTER_TEXT = st.text(max_size=30) | st.sampled_from(["step2", "step2\n", "../step2", "/etc", "step9", ".", "..",
                                                       "", "x" * 100_000, "step2\x00", "latest"]) | st.binary(
    max_size=20).map(lambda b: b.decode("latin-1"))


def test_pointers(valid_run, tmp_path):
    """DeepSpeed's `latest` is what a folder written before markers has (compclip's own pointer is never read:
    changing it changes nothing)."""
    reader = "checkpoint: DeepSpeed latest (no markers)"

    @fuzz_case(reader, ci=40)
    @given(text=POINTER_TEXT, ours=POINTER_TEXT)
    def case(text, ours):
        run_dir = _copy(valid_run, tmp_path)
        ds = run_dir / "checkpoints" / "deepspeed"
        (ds / runfolder.POINTER).write_text(ours, encoding="utf-8", errors="surrogateescape")
        assert _pick_tag(run_dir, own, ["any text"])[0] == ds / "step3"
        for name in ("step1", "step2", "step3"):  # a folder from before markers: DeepSpeed's pointer decides
            (ds / name / runfolder.MARKER).unlink()
        (ds / "latest").write_text(text, encoding="utf-8", errors="surrogateescape")
        try:
            with fz.time_bound():
                (root, tag), = runfolder.candidates("latest", runfolder.RunFolder(run_dir))
        except runfolder.CheckpointNotFound as error:
            assert str(ds / "latest") in str(error), error
            counts.add("error", ["any text"])
            return
        counts.add("accepted", ["any text"])
        assert root == ds and (ds / tag).is_dir() and tag == text.strip()

    with fz.tally(reader) as counts, fz.tally("checkpoint: compclip_latest") as own:
        case()


def test_line_records(valid_run, tmp_path):
    reader = "checkpoint: line record"

    @fuzz_case(reader, ci=40)
    @given(record=JSON | st.fixed_dictionaries({"line": JSON, "start": JSON}), raw=st.none() | st.sampled_from(
        [b"", b"{", b"\xff", b"[]", b"null"]))
    def case(record, raw):
        run_dir = _copy(valid_run, tmp_path)
        ds = run_dir / "checkpoints" / "deepspeed"
        (ds / runfolder.LINE).write_bytes(raw if raw is not None else json.dumps(record).encode())
        picked, _ = _pick_tag(run_dir, counts, ["bytes" if raw is not None else "object"])
        assert picked is None or runfolder.is_complete(picked)

    with fz.tally(reader) as counts:
        case()


SYMLINKS = ("tag to a copy outside", "tag to itself", "tag to /dev/null", "marker to /dev/zero", "marker to a fifo",
            "deepspeed folder to itself", "tag to the folder above")


@pytest.mark.parametrize("how", SYMLINKS)
def test_symlinks(valid_run, tmp_path, how):
    run_dir = _copy(valid_run, tmp_path)
    ds = run_dir / "checkpoints" / "deepspeed"
    step3 = ds / "step3"
    if how == "tag to a copy outside":
        shutil.copytree(step3, tmp_path / "elsewhere")
        shutil.rmtree(step3)
        os.symlink(tmp_path / "elsewhere", step3)
    elif how.startswith("tag to"):
        shutil.rmtree(step3)
        os.symlink({"tag to itself": step3, "tag to /dev/null": Path("/dev/null"),
                    "tag to the folder above": ds}[how], step3)
    elif how == "marker to /dev/zero":
        (step3 / runfolder.MARKER).unlink()
        os.symlink("/dev/zero", step3 / runfolder.MARKER)
    elif how == "marker to a fifo":
        (step3 / runfolder.MARKER).unlink()
        os.mkfifo(tmp_path / "fifo")
        os.symlink(tmp_path / "fifo", step3 / runfolder.MARKER)
    else:
        shutil.rmtree(ds)
        os.symlink(ds, ds)
    with fz.tally("checkpoint: symlinks") as counts:
        picked, _ = _pick_tag(run_dir, counts, [how])
    expected = {"tag to a copy outside": "step3", "deepspeed folder to itself": None}.get(how, "step2")
    assert (picked.name if picked is not None else None) == expected, (how, picked)


def test_markers_hold_only_finite_numbers(valid_run):
    """What the commit writes, the fuzz's starting point, is itself valid: strict JSON, every recorded file."""
    marker = (valid_run / "checkpoints" / "deepspeed" / "step3" / runfolder.MARKER).read_text()
    found = json.loads(marker, parse_constant=lambda name: math.nan)
    assert sorted(found["files"]) == sorted(SHARDS) and found["parent"]["tag"] == "step2" and found["line"] == 0
