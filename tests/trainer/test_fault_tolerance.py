"""Kills at every stage of a save, retention, and preemption by SIGTERM, with two real gloo ranks (CPU, fp32,
ZeRO-3, DeGLA with its EMA teacher, the tiny model).

Every world runs in `fork_world.py`: forked ranks of one process that imported the trainer once, killed by the
real signals (`compclip.trainer.faults`). The reference is one straight run; every other run continues from what a killed
run left on disk with `--resume latest`, and must log the straight run's losses bit for bit.

The kill chain (one run folder, each world resumes the previous one and is killed at the next stage):

    world  resumes from        killed at (COMPCLIP_FAULT)      leaves (keep_checkpoints=2)
    1      -                   save:before_states:2            step1
    2      step1               save:after_states:3             step1 step2 step3(incomplete)
    3      step2 (skips 3)     save:after_extras:5             step3 step4 step5(incomplete)   <- 5th save
    4      step4 (skips 5)     save:after_marker:5             step3 step4 step5(complete, no pointer)
    5      step5               save:after_pointer:6            step3 step4 step5 step6
    6      step6               - (nothing left to train: exports)
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6  # the tiny world has 4 micro-batches per rank and epoch: the runs cross an epoch end at step 4
CHAIN = [("save:before_states:2", None), ("save:after_states:3", 1), ("save:after_extras:5", 2),
         ("save:after_marker:5", 4), ("save:after_pointer:6", 5), ("", 6)]  # (fault, step it resumes from)


def _args(tmp_path, name, *extra):
    return ["--config", str(ROOT / "configs" / "degla.yaml"), "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--deepspeed.zero_stage=3", f"--optim.max_steps={STEPS}", "--eval_synthetic=false", "--threads=1",
            f"--log.logs={tmp_path}", f"--log.name={name}", f"--data.synthetic.root={tmp_path / 'world'}", *extra]


def _run_worlds(tmp_path, plan):
    """Run the worlds of `plan` one after the other; per world (exit codes, rank 0's log)."""
    logs = tmp_path / "ranks"
    logs.mkdir()
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "RANK", "LOCAL_", "WORLD_", "MASTER_"))}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("fork_world.py")), str(tmp_path / "plan.json"),
                           str(tmp_path / "results.json"), str(logs)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    return [(r["codes"], (logs / f"world{i}_rank0.log").read_text()) for i, r in enumerate(results)]


def _losses(run_dir):
    """{step: row} of metrics.jsonl; a step logged again by a resumed run counts as its last value."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: {k: v for k, v in row.items() if k.startswith("loss")} for row in rows if "loss" in row}


def _tags(run_dir):
    ds = run_dir / "checkpoints" / "deepspeed"
    return {p.name: (p / "compclip_complete.json").is_file() for p in ds.iterdir() if p.is_dir()}


def test_kills_at_every_save_stage_retention_and_sigterm_continue_the_straight_run(tmp_path):
    keep = "--log.keep_checkpoints=2"
    plan = [{"argv": _args(tmp_path, "straight", "--log.save_every_n_steps=1", keep), "ranks": 2}]
    plan += [{"argv": _args(tmp_path, "chain", "--log.save_every_n_steps=1", keep,
                            *(["--resume", "latest"] if start else [])),
              "ranks": 2, "env": {"COMPCLIP_FAULT": fault} if fault else {}} for fault, start in CHAIN]
    # Preemption: rank 1 alone gets SIGTERM during step 3; no periodic saves. The continuation saves on a
    # wall-clock period short enough to save at every step.
    plan.append({"argv": _args(tmp_path, "preempted"), "ranks": 2, "env": {"COMPCLIP_FAULT": "sigterm:3:1"}})
    plan.append({"argv": _args(tmp_path, "preempted", "--resume", "latest", "--log.save_every_n_minutes=1e-9"),
                 "ranks": 2})
    worlds = _run_worlds(tmp_path, plan)
    (straight_codes, _), chain, (preempt_codes, preempt_log), (continued_codes, continued_log) = \
        worlds[0], worlds[1:1 + len(CHAIN)], worlds[-2], worlds[-1]

    assert straight_codes == [0, 0]
    straight = _losses(tmp_path / "straight")
    assert sorted(straight) == list(range(1, STEPS + 1))
    # Retention: 6 saves, the newest 2 complete tags are left.
    assert _tags(tmp_path / "straight") == {"step5": True, "step6": True}

    for (fault, start), (codes, log) in zip(CHAIN, chain):
        # Killed ranks report -9; a rank the kill left waiting in a collective fails or is killed with it.
        assert (codes[0] == -9 and 0 not in codes) if fault else codes == [0, 0], (fault, codes, log[-3000:])
        if start is not None:
            assert f"deepspeed/step{start} at epoch" in log, (fault, log[-3000:])
    # The incomplete tags skipped on the way, with a warning naming them.
    assert "skipping" in chain[2][1] and "step3: incomplete" in chain[2][1]
    assert "step5: incomplete" in chain[3][1]
    assert _losses(tmp_path / "chain") == straight
    tags = _tags(tmp_path / "chain")
    assert {name for name, complete in tags.items() if complete} >= {"step5", "step6"}
    assert (tmp_path / "chain" / "checkpoints" / "deepspeed" / "compclip_latest").read_text() == "step6"
    exported = torch.load(tmp_path / "chain" / "checkpoints" / "epoch_2.pt", map_location="cpu", weights_only=True)
    reference = torch.load(tmp_path / "straight" / "checkpoints" / "epoch_2.pt", map_location="cpu",
                           weights_only=True)
    for key, value in reference["state_dict"].items():
        assert torch.equal(exported["state_dict"][key], value), key

    # SIGTERM: every rank stops after step 3 with status 143, the checkpoint of step 3 is the only one.
    assert preempt_codes == [143, 143], preempt_log[-3000:]
    assert "SIGTERM: saving after optimizer step 3" in preempt_log
    assert "step 3/6" in preempt_log and "step 4/6" not in preempt_log and "exported" not in preempt_log
    assert continued_codes == [0, 0], continued_log[-3000:]
    assert "deepspeed/step3 at epoch 0, micro-batch 3, step 3" in continued_log
    assert _losses(tmp_path / "preempted") == straight
    # Saved at steps 3 (SIGTERM), 4 (epoch end), 5 (wall clock), 6 (end of run).
    assert _tags(tmp_path / "preempted") == {f"step{s}": True for s in (3, 4, 5, 6)}


def test_save_schedule_counts_steps_and_minutes(monkeypatch):
    """One process: the schedule's answers against a fake clock, and SIGTERM caught only between start/close."""
    import signal

    from compclip.trainer import preemption

    now = [100.0]
    monkeypatch.setattr(preemption.time, "monotonic", lambda: now[0])
    before = signal.getsignal(signal.SIGTERM)
    schedule = preemption.SaveSchedule(every_n_steps=5, every_n_minutes=2.0, rank=0).start()
    try:
        answers = []
        for step in range(1, 8):
            now[0] += 50.0  # 50 s a step: 2 minutes have passed at step 3, and again at step 6
            answers.append(schedule.due(step))
        assert answers == [False, False, True, False, True, True, False]
        now[0] += 60.0
        assert schedule.due(8) is False and not schedule.stop  # 110 s since the timed save of step 6
        os.kill(os.getpid(), signal.SIGTERM)  # caught: this test process lives on
        assert schedule.due(9) is True and schedule.stop
    finally:
        schedule.close()
    assert signal.getsignal(signal.SIGTERM) is before


def test_explicit_incomplete_tag_is_refused_naming_the_complete_ones(tmp_path):
    """`--resume <tag>` of an interrupted save: a clear error, not a hint at a different number of ranks."""
    from compclip.runfolder import MARKER, RunFolder, locate

    run = RunFolder(tmp_path / "run")
    ds = run.deepspeed
    for name, complete in (("step1", True), ("step2", True), ("step3", False)):
        (ds / name).mkdir(parents=True)
        (ds / name / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
        if complete:
            (ds / name / MARKER).write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"step3 is incomplete: its save was interrupted .* step1, step2"):
        locate(str(ds / "step3"), run)
    assert locate("latest", run) == (ds, "step2")
    assert locate(str(ds), run) == (ds, "step2")


def test_retention_keeps_the_newest_complete_tags_and_exports(tmp_path):
    """keep=2 after a commit of step5: step4 and step5 stay, so does nothing newer; an incomplete older tag and
    what an interrupted deletion left go; keep_exports=2 keeps the two highest epochs."""
    from compclip.runfolder import MARKER, TRASH, RunFolder
    from compclip.trainer.checkpoint import Checkpointer

    checkpoints = Checkpointer.__new__(Checkpointer)
    checkpoints.rank, checkpoints.world_size, checkpoints.keep, checkpoints.keep_exports = 0, 1, 2, 2
    checkpoints.run = RunFolder(tmp_path)
    checkpoints.dir = tmp_path / "checkpoints"
    checkpoints.ds_dir = checkpoints.dir / "deepspeed"
    for step, complete in ((1, True), (2, False), (3, True), (4, True), (5, True)):
        (checkpoints.ds_dir / f"step{step}").mkdir(parents=True)
        if complete:
            (checkpoints.ds_dir / f"step{step}" / MARKER).write_text("{}")
    (checkpoints.ds_dir / (TRASH + "step0")).mkdir()
    checkpoints.prune()
    assert sorted(p.name for p in checkpoints.ds_dir.iterdir()) == ["step4", "step5"]
    for epoch in (1, 2, 10, 3):
        (checkpoints.dir / f"epoch_{epoch}.pt").write_bytes(b"")
    checkpoints._prune_exports()
    assert sorted(p.name for p in checkpoints.dir.glob("*.pt")) == ["epoch_10.pt", "epoch_3.pt"]
