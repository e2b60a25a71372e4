"""Reading a run folder without a process group: checksums, verification of a tag against its completion marker,
and the tags a resume tries (the current line of descent, then its ancestors). Tags are written here by hand, with
checksums from `binascii` (another implementation of CRC-32 than the zlib one the code uses)."""
import binascii
import json
import logging
import os
import threading

import pytest

from compclip import durable, runfolder
from compclip.runfolder import LINE, MARKER, CheckpointNotFound, RunFolder, candidates, verify


def tag(ds, step, line=0, parent=None, files=None, lineage=True):
    """Tag `step<step>` of `ds` with `files` ({name: bytes}) and a marker recording them; `parent`: a tag folder."""
    tag_dir = ds / f"step{step}"
    tag_dir.mkdir(parents=True)
    files = {"mp_rank_00_model_states.pt": os.urandom(300 + step), "compclip_rank0.pt": b"extras"} if files is None \
        else files
    for name, data in files.items():
        (tag_dir / name).write_bytes(data)
    found = {"tag": tag_dir.name, "world_size": 1, "files": {
        name: {"size": len(data), "crc32": f"{binascii.crc32(data):08x}"} for name, data in files.items()}}
    if lineage:
        found.update(id=f"id-{step}-{line}", line=line, parent=None if parent is None else {
            "tag": parent.name, "id": json.loads((parent / MARKER).read_text())["id"]})
    (tag_dir / MARKER).write_text(json.dumps(found))
    return tag_dir


def test_checksum_is_the_size_and_crc32_and_refuses_what_would_block():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "check")
        with open(path, "wb") as handle:
            handle.write(b"123456789")
        assert durable.checksum(path) == (9, "cbf43926")  # CRC-32's published check value
        fifo = os.path.join(folder, "fifo")
        os.mkfifo(fifo)
        done = []
        worker = threading.Thread(target=lambda: done.append(pytest.raises(OSError, durable.checksum, fifo)))
        worker.start()
        worker.join(5)
        assert done, "checksum blocked on a FIFO"
        with pytest.raises(OSError, match="not a regular file"):
            durable.checksum(folder)


def test_verify_names_every_damaged_file_and_shares_divide_the_work(tmp_path):
    ds = tmp_path / "ds"
    files = {f"shard{i}.pt": os.urandom(100) for i in range(5)}
    tag_dir = tag(ds, 1, files=files)
    assert verify(tag_dir) == []
    (tag_dir / "shard0.pt").write_bytes(files["shard0.pt"][:50])
    (tag_dir / "shard1.pt").write_bytes(bytes([files["shard1.pt"][0] ^ 1]) + files["shard1.pt"][1:])
    (tag_dir / "shard2.pt").unlink()
    (tag_dir / "shard3.pt").write_bytes(files["shard3.pt"] + b"!")
    problems = verify(tag_dir)
    assert [p.split(": ", 1)[0].rsplit("/", 1)[1] for p in problems] == ["shard0.pt", "shard1.pt", "shard2.pt",
                                                                          "shard3.pt"]
    assert "(truncated)" in problems[0] and "corrupt" in problems[1] and "missing" in problems[2]
    assert "(grown)" in problems[3]
    shares = [verify(tag_dir, (rank, 3)) for rank in range(3)]
    assert sorted(p for share in shares for p in share) == problems and all(len(s) <= 2 for s in shares)
    marker = json.loads((tag_dir / MARKER).read_text())
    marker["files"] = {"../escape.pt": {"size": 1, "crc32": "00000000"}, "x.pt": {"size": "big"}}
    (tag_dir / MARKER).write_text(json.dumps(marker))
    assert [p.split(": ", 1)[1][:24] for p in verify(tag_dir)] == ["names a file outside the",
                                                                  "malformed record of 'x.p"]


def test_latest_follows_the_current_line_not_the_newest_tag(tmp_path):
    """Line 0 has step1, step3, step5; a run resumed step1 and started line 1 (its record written, the abandoned
    tags not moved yet: a kill came between). Line 1 committed step2. `latest` is step2, then its ancestors."""
    run = RunFolder(tmp_path / "run")
    ds = run.deepspeed
    step1 = tag(ds, 1)
    step3 = tag(ds, 3, parent=step1)
    tag(ds, 5, parent=step3)
    (ds / LINE).write_text(json.dumps({"line": 1, "start": "step1"}))
    assert candidates("latest", run) == [(ds, "step1")]  # nothing committed on line 1 yet: its start
    tag(ds, 2, line=1, parent=step1)
    assert candidates("latest", run) == [(ds, "step2"), (ds, "step1")]
    assert candidates(str(ds), run) == [(ds, "step2"), (ds, "step1")]
    assert candidates(str(ds / "step5"), run) == [(ds, "step5")]  # explicit: that tag, no fallback


def test_markers_from_before_lineage_are_one_line(tmp_path):
    run = RunFolder(tmp_path / "run")
    for step in (1, 2, 4):
        tag(run.deepspeed, step, lineage=False)
    (run.deepspeed / "step3").mkdir()  # an interrupted save
    assert [t for _, t in candidates("latest", run)] == ["step4", "step2", "step1"]


def test_an_unreadable_marker_is_passed_over_by_latest_and_refused_by_name(tmp_path, caplog):
    run = RunFolder(tmp_path / "run")
    step1 = tag(run.deepspeed, 1)
    step2 = tag(run.deepspeed, 2, parent=step1)
    (step2 / MARKER).write_bytes(b'{"tag": "ste')
    with caplog.at_level(logging.WARNING, logger="compclip"):
        assert candidates("latest", run) == [(run.deepspeed, "step1")]
    assert "step2/compclip_complete.json: unreadable completion marker" in caplog.text
    with pytest.raises(CheckpointNotFound, match="step2/compclip_complete.json: unreadable completion marker"):
        candidates(str(step2), run)


def test_deepspeed_pointer_of_a_folder_without_markers_must_name_a_tag(tmp_path):
    run = RunFolder(tmp_path / "run")
    (run.deepspeed / "step7").mkdir(parents=True)
    for text, ok in (("step7\n", True), ("step8", False), ("../run", False), ("", False)):
        (run.deepspeed / "latest").write_text(text)
        if ok:
            assert candidates("latest", run) == [(run.deepspeed, "step7")]
        else:
            with pytest.raises(CheckpointNotFound, match="deepspeed/latest: names"):
                candidates("latest", run)


def test_a_folder_that_is_no_checkpoint_is_not_called_an_interrupted_save(tmp_path):
    with pytest.raises(CheckpointNotFound, match="is not a DeepSpeed checkpoint folder or tag"):
        candidates(str(tmp_path))
    (tmp_path / "step3").mkdir()
    with pytest.raises(CheckpointNotFound, match="step3 is incomplete"):
        candidates(str(tmp_path / "step3"))


def test_line_record_records_its_start_relative_to_the_folder(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / LINE).write_text(json.dumps({"line": 2, "start": "abandoned/line1/step6"}))
    assert runfolder.current_line(ds) == runfolder.Line(2, ds / "abandoned" / "line1" / "step6")
    (ds / LINE).write_text("[]")
    with pytest.raises(CheckpointNotFound, match="compclip_line.json: the line record is not a JSON object"):
        runfolder.current_line(ds)
