"""The checkpointer's parts, one process: what a save fsyncs and records before its completion marker, the start
of a new line of descent, retention over the current line, and the verification that picks the tag to resume.
(Kills, SIGTERM and whole runs with two ranks: test_fault_tolerance.py.)"""
import binascii
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from compclip import durable, runfolder
from compclip.config import ConfigError
from compclip.runfolder import LINE, MARKER, POINTER, RunFolder
from compclip.trainer.checkpoint import Checkpointer, _fsynced_records

SHARDS = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "compclip_rank0.pt")


def make_checkpointer(run_dir: Path, keep: int = 0, keep_abandoned: bool = True) -> Checkpointer:
    """Rank 0 of a world of one, without a process group (for the parts that are rank 0's alone)."""
    checkpoints = Checkpointer.__new__(Checkpointer)
    checkpoints.run = RunFolder(run_dir)
    checkpoints.rank, checkpoints.world_size, checkpoints.keep, checkpoints.keep_exports = 0, 1, keep, 0
    checkpoints.keep_abandoned, checkpoints.saved_step = keep_abandoned, -1
    checkpoints.line, checkpoints.parent = 0, None
    checkpoints.dir, checkpoints.ds_dir = checkpoints.run.checkpoints, checkpoints.run.deepspeed
    return checkpoints


def commit(checkpoints: Checkpointer, step: int, extras: bytes = b"") -> Path:
    """Tag `step<step>`: random shards and `extras` as this rank's pieces, committed by rank 0's real code."""
    tag_dir = checkpoints.ds_dir / f"step{step}"
    tag_dir.mkdir(parents=True, exist_ok=True)
    for name in SHARDS[:2]:
        (tag_dir / name).write_bytes(os.urandom(500 + step))
    (tag_dir / SHARDS[2]).write_bytes(extras or os.urandom(50))
    checkpoints._commit(tag_dir, step, [_fsynced_records(tag_dir, [tag_dir / n for n in SHARDS])], {"seed": 0})
    return tag_dir


def _marker(tag_dir: Path) -> dict:
    return json.loads((tag_dir / MARKER).read_text())


class _CheckpointEngine:
    def save(self, state_dict, path):
        torch.save(state_dict, path)


class _Engine:
    """What Checkpointer.save uses of a DeepSpeed engine: shards through its checkpoint engine, as DeepSpeed
    writes them, and one file beside it (as DeepSpeed copies NVMe-offloaded tensors)."""

    def __init__(self):
        self.checkpoint_engine = _CheckpointEngine()

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"module": torch.ones(3), **client_state}, str(folder / SHARDS[0]))
        self.checkpoint_engine.save({"optimizer": torch.zeros(5)}, str(folder / SHARDS[1]))
        (folder / "offloaded_tensors" / "rank0").mkdir(parents=True)
        (folder / "offloaded_tensors" / "rank0" / "state.swp").write_bytes(b"swapped" * 10)


def test_a_save_fsyncs_and_records_every_file_before_its_marker(tmp_path, monkeypatch, one_process):
    events = []
    for name in ("fsync_file", "fsync_tree", "fsync_dir", "write_text"):
        original = getattr(durable, name)
        monkeypatch.setattr(durable, name, lambda path, *rest, _name=name, _original=original: (
            events.append((_name, Path(path))), _original(path, *rest))[1])
    checkpoints = Checkpointer(RunFolder(tmp_path / "run"), 0, 1)
    engine = _Engine()
    tag_dir = checkpoints.save(engine, 7, {"epoch": 0, "micro_in_epoch": 7, "global_step": 7},
                               {"config": {}, "request": {"seed": 0}}, {"nonfinite": 0})
    assert "save" not in vars(engine.checkpoint_engine)  # the recording is undone
    files = sorted(p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*") if p.is_file() and p.name != MARKER)
    assert files == ["compclip_rank0.pt", "mp_rank_00_model_states.pt", "offloaded_tensors/rank0/state.swp",
                     "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    recorded = _marker(tag_dir)["files"]
    assert recorded == {name: {"size": (tag_dir / name).stat().st_size,
                               "crc32": f"{binascii.crc32((tag_dir / name).read_bytes()):08x}"} for name in files}
    marker_written = events.index(("write_text", tag_dir / MARKER))
    fsynced = {path for kind, path in events[:marker_written] if kind == "fsync_file"}
    assert fsynced == {tag_dir / name for name in files}
    assert ("fsync_tree", tag_dir) in events[:marker_written]  # the tag's folders: their entries
    assert events.index(("write_text", checkpoints.ds_dir / POINTER)) > marker_written


def test_resuming_an_older_tag_starts_a_line_and_moves_the_tags_it_leaves(tmp_path, caplog):
    first = make_checkpointer(tmp_path / "run")
    step1, step2, step3 = (commit(first, step) for step in (1, 2, 3))
    assert _marker(step3)["parent"] == {"tag": "step2", "id": _marker(step2)["id"]} and _marker(step3)["line"] == 0
    resumed = make_checkpointer(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="compclip"):
        resumed._begin_line(step1)
    ds = resumed.ds_dir
    assert json.loads((ds / LINE).read_text()) == {"line": 1, "start": "step1"}
    assert sorted(p.name for p in (ds / "abandoned" / "line1").iterdir()) == ["step2", "step3"]
    assert runfolder.is_complete(ds / "abandoned" / "line1" / "step3") and (ds / POINTER).read_text() == "step1"
    assert "line 1 of this run starts at" in caplog.text and "abandoned/line1/step3" in caplog.text
    new2 = commit(resumed, 2)
    assert _marker(new2)["parent"] == {"tag": "step1", "id": _marker(step1)["id"]} and _marker(new2)["line"] == 1
    assert runfolder.candidates("latest", resumed.run) == [(ds, "step2"), (ds, "step1")]
    # The newest tag of the line resumed again: the same line goes on, nothing moves.
    again = make_checkpointer(tmp_path / "run")
    again._begin_line(new2)
    assert again.line == 1 and again.parent["tag"] == "step2" and json.loads((ds / LINE).read_text())["line"] == 1


def test_keep_abandoned_false_deletes_them_and_a_fresh_start_abandons_everything(tmp_path):
    first = make_checkpointer(tmp_path / "run")
    for step in (1, 2, 3):
        commit(first, step)
    resumed = make_checkpointer(tmp_path / "run", keep_abandoned=False)
    resumed._begin_line(resumed.ds_dir / "step2")
    assert sorted(n for _, n in runfolder.tags(resumed.ds_dir)) == ["step1", "step2"]
    assert not (resumed.ds_dir / "abandoned").exists()
    fresh = make_checkpointer(tmp_path / "run")
    fresh._begin_line(None)
    assert runfolder.tags(fresh.ds_dir) == [] and fresh.line == 2 and fresh.parent is None
    assert sorted(p.name for p in (fresh.ds_dir / "abandoned" / "line2").iterdir()) == ["step1", "step2"]
    assert not (fresh.ds_dir / POINTER).exists() and not (fresh.ds_dir / "latest").exists()
    with pytest.raises(runfolder.CheckpointNotFound, match="no checkpoint"):
        runfolder.candidates("latest", fresh.run)


def test_a_kill_between_the_line_record_and_the_moves_is_finished_by_the_next_start(tmp_path):
    first = make_checkpointer(tmp_path / "run")
    for step in (1, 2, 3):
        commit(first, step)
    ds = first.ds_dir
    (ds / LINE).write_text(json.dumps({"line": 1, "start": "step1"}))  # what the kill left: nothing moved
    assert runfolder.candidates("latest", first.run) == [(ds, "step1")]
    restarted = make_checkpointer(tmp_path / "run")
    restarted._begin_line(ds / "step1")  # resume latest: step1 is line 1's head, so line 1 goes on
    assert restarted.line == 1 and sorted(p.name for p in (ds / "abandoned" / "line1").iterdir()) == ["step2",
                                                                                                      "step3"]


def test_retention_counts_the_current_line_only_and_keeps_the_resumed_tag(tmp_path):
    """keep=2 on a line started at step1 while line 0's step2 and step3 are still in the folder: counting every
    complete tag would delete step1 (the tag being resumed) as soon as step4 is committed."""
    first = make_checkpointer(tmp_path / "run")
    for step in (1, 2, 3):
        commit(first, step)
    ds = first.ds_dir
    (ds / LINE).write_text(json.dumps({"line": 1, "start": "step1"}))
    resumed = make_checkpointer(tmp_path / "run", keep=2)
    resumed.line, resumed.parent = 1, {"tag": "step1", "id": _marker(ds / "step1")["id"]}
    commit(resumed, 4)
    assert sorted(n for _, n in runfolder.tags(ds)) == ["step1", "step2", "step3", "step4"]
    commit(resumed, 5)
    assert sorted(n for _, n in runfolder.tags(ds)) == ["step2", "step3", "step4", "step5"]


def test_verification_falls_back_naming_the_file_and_refuses_an_explicit_tag(tmp_path, caplog, one_process):
    first = make_checkpointer(tmp_path / "run")
    for step in (1, 2, 3):
        commit(first, step)
    ds = first.ds_dir
    shard = ds / "step3" / SHARDS[1]
    shard.write_bytes(shard.read_bytes()[:-1])
    checkpoints = Checkpointer(RunFolder(tmp_path / "run"), 0, 1)
    with caplog.at_level(logging.WARNING, logger="compclip"):
        assert checkpoints.verified(runfolder.candidates("latest", checkpoints.run)) == (ds, "step2")
    assert f"{ds / 'step3'} fails verification ({shard}: 502 bytes, the completion marker records 503 " \
           f"(truncated)); falling back to {ds / 'step2'}" in caplog.text
    with pytest.raises(ConfigError, match=f"resume: {ds / 'step3'}: {shard}: 502 bytes.*resume another tag"):
        checkpoints.verified(runfolder.candidates(str(ds / "step3")))


def test_a_resume_of_another_runs_tag_into_a_new_folder_continues_its_line(tmp_path):
    """Nothing to leave behind: no line record, no moves; the first commit names the other run's tag as parent."""
    other = make_checkpointer(tmp_path / "other")
    step2 = (commit(other, 1), commit(other, 2))[1]
    checkpoints = make_checkpointer(tmp_path / "new")
    checkpoints._begin_line(step2)
    assert not (checkpoints.ds_dir / LINE).exists() and checkpoints.line == 0
    step3 = commit(checkpoints, 3)
    assert _marker(step3)["parent"] == {"tag": "step2", "id": _marker(step2)["id"]}
    assert runfolder.candidates("latest", checkpoints.run) == [(checkpoints.ds_dir, "step3")]
