"""Kills at every stage of a save, retention, preemption by SIGTERM during a step and during an evaluation, lines of
descent and damaged checkpoints, with two real gloo ranks (CPU, fp32, ZeRO-3, DeGLA with its EMA teacher, the tiny
model).

Every world runs in `fork_world.py`: forked ranks of one process that imported the trainer once, killed by the
real signals (`compclip.trainer.faults`), all worlds in one plan (one launch). The reference is one straight run;
every other run continues from what a killed run left on disk, and must log the straight run's losses bit for bit.

The kill chain (one run folder, each world resumes the previous one and is killed at the next stage):

    world  resumes from        killed at (COMPCLIP_FAULT)      leaves (keep_checkpoints=2)
    1      -                   save:before_states:2            step1
    2      step1               save:after_states:3             step1 step2 step3(incomplete)
    3      step2 (skips 3)     save:after_extras:5             step3 step4 step5(incomplete)   <- 5th save
    4      step4 (skips 5)     save:after_marker:5             step3 step4 step5(complete, no pointer)
    5      step5               save:after_pointer:6            step3 step4 step5 step6
    6      step6               - (nothing left to train: exports)

Evaluation and lineage (one run folder `lineage`, evaluating the synthetic world at every epoch end, 4 batches of
images, then texts):

    world  resumes from        what happens                                      leaves
    E1     -                   SIGTERM to rank 1 alone at the 3rd batch of the   step3 step4(evaluation pending)
                               epoch-1 evaluation: stops, saves step 4, 143
    E2     latest = step4      runs the pending evaluation again, trains 5, 6    step3 step4 step6
    L1     step3 (older)       starts line 1 (step4, step6 moved to abandoned/), step3 step4' step5(incomplete)
                               killed at save:after_states:5
    (step4' of line 1: rank 1's optimizer shard truncated)
    X      step4' explicitly   refused: exit status 2, naming the shard
    L2     latest              step4' fails verification: falls back to step3,   step5'' step6'' (line 2)
                               starts line 2 (step4' deleted: keep_abandoned=false)
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
EVALUATED = ("--eval_synthetic=true", "--eval.batch_size=4", "--eval.progress=false")
SHARD = "*zero_pp_rank_1_mp_rank_00_optim_states.pt"  # rank 1's ZeRO-3 optimizer shard


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
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    return [(r["codes"], (logs / f"world{i}_rank0.log").read_text()) for i, r in enumerate(results)]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir):
    """{step: row} of metrics.jsonl; a step logged again by a resumed run counts as its last value."""
    return {row["step"]: {k: v for k, v in row.items() if k.startswith("loss")} for row in _rows(run_dir)
            if "loss" in row}


def _every_loss(run_dir):
    """[(step, losses)] of every loss row of metrics.jsonl, a step logged again by a resumed run included."""
    return [(row["step"], {k: v for k, v in row.items() if k.startswith("loss")}) for row in _rows(run_dir)
            if "loss" in row]


def _evaluations(run_dir):
    """[(step, {eval/...: value})] of every evaluation row of metrics.jsonl, in order."""
    return [(row["step"], {k: v for k, v in row.items() if k.startswith("eval/")}) for row in _rows(run_dir)
            if any(k.startswith("eval/") for k in row)]


def _tags(run_dir):
    ds = run_dir / "checkpoints" / "deepspeed"
    return {p.name: (p / "compclip_complete.json").is_file() for p in ds.iterdir() if p.is_dir()
            and p.name.startswith("step")}


def _marker(tag_dir):
    return json.loads((tag_dir / "compclip_complete.json").read_text())


def _plan(tmp_path):
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
    # Evaluation and lineage (module docstring).
    lineage = _args(tmp_path, "lineage", *EVALUATED, "--log.save_every_n_steps=3")
    ds = tmp_path / "lineage" / "checkpoints" / "deepspeed"
    line = ["--log.save_every_n_steps=1", keep]
    plan += [{"argv": lineage, "ranks": 2, "env": {"COMPCLIP_FAULT": "sigterm_eval:3:1"}},
             {"argv": lineage + ["--resume", "latest"], "ranks": 2},
             {"argv": lineage + line + ["--resume", str(ds / "step3")], "ranks": 2,
              "env": {"COMPCLIP_FAULT": "save:after_states:5"}},
             {"argv": lineage + ["--resume", str(ds / "step4")], "ranks": 2,
              "damage": [["truncate", str(ds / "step4" / SHARD)]]},
             {"argv": lineage + line + ["--resume", "latest", "--log.keep_abandoned=false"], "ranks": 2}]
    return plan


@pytest.mark.cost(85)
def test_faults_of_two_zero3_ranks_continue_the_straight_run(tmp_path):
    worlds = _run_worlds(tmp_path, _plan(tmp_path))
    (straight_codes, _), chain = worlds[0], worlds[1:1 + len(CHAIN)]
    preempted, lineage = worlds[1 + len(CHAIN):3 + len(CHAIN)], worlds[3 + len(CHAIN):]
    assert straight_codes == [0, 0]
    straight = _losses(tmp_path / "straight")
    assert sorted(straight) == list(range(1, STEPS + 1))
    # Retention: 6 saves, the newest 2 complete tags are left.
    assert _tags(tmp_path / "straight") == {"step5": True, "step6": True}
    _check_kill_chain(tmp_path, chain, straight)
    _check_sigterm_during_a_step(tmp_path, preempted, straight)
    _check_sigterm_during_an_evaluation(tmp_path, lineage[:2], straight)
    _check_lineage_and_damage(tmp_path, lineage[2:], straight)


def _check_kill_chain(tmp_path, chain, straight):
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


def _check_sigterm_during_a_step(tmp_path, preempted, straight):
    (preempt_codes, preempt_log), (continued_codes, continued_log) = preempted
    # SIGTERM: every rank stops after step 3 with status 143, the checkpoint of step 3 is the only one.
    assert preempt_codes == [143, 143], preempt_log[-3000:]
    assert "SIGTERM: saving after optimizer step 3" in preempt_log
    assert "step 3/6" in preempt_log and "step 4/6" not in preempt_log and "exported" not in preempt_log
    assert continued_codes == [0, 0], continued_log[-3000:]
    assert "deepspeed/step3 at epoch 0, micro-batch 3, step 3" in continued_log
    assert _losses(tmp_path / "preempted") == straight
    # Saved at steps 3 (SIGTERM), 4 (epoch end), 5 (wall clock), 6 (end of run).
    assert _tags(tmp_path / "preempted") == {f"step{s}": True for s in (3, 4, 5, 6)}



def _check_sigterm_during_an_evaluation(tmp_path, worlds, straight):
    (stopped_codes, stopped_log), (resumed_codes, resumed_log) = worlds
    run = tmp_path / "lineage"
    # Rank 1 alone got the signal while it waited for rank 0's evaluation: rank 0 stopped before its 3rd batch
    # (2 batches of 4 images done), the finished step 4 was saved, and both ranks exited 143.
    assert stopped_codes == [143, 143], stopped_log[-3000:]
    assert "evaluation epoch_1: SIGTERM, stopped after 8 images and 0 texts" in stopped_log, stopped_log[-3000:]
    assert "step 4/6" in stopped_log and "step 5/6" not in stopped_log
    abandoned = run / "checkpoints" / "deepspeed" / "abandoned" / "line1"  # where line 1 moved it (below)
    for rank in (0, 1):
        extras = torch.load(abandoned / "step4" / f"compclip_rank{rank}.pt", map_location="cpu", weights_only=True)
        assert extras["pending_evaluation"] == {"label": "epoch_1", "epoch": 1}
    # The resume runs that evaluation first, then trains on.
    assert resumed_codes == [0, 0], resumed_log[-3000:]
    assert "deepspeed/step4 at epoch 1, micro-batch 0, step 4" in resumed_log
    assert resumed_log.index("evaluation epoch_1 (") < resumed_log.index("step 5/6")
    # Every evaluation row: epoch 1 (step 4) by E2, L1 and L2, the end (step 6) by E2 and L2; none by E1. The same
    # weights give the same numbers, whether the evaluation was a resumed one or a fresh epoch end.
    evaluations = _evaluations(run)
    assert [step for step, _ in evaluations] == [4, 6, 4, 4, 6]
    assert evaluations[0][1] == evaluations[2][1] == evaluations[3][1] and evaluations[1][1] == evaluations[4][1]
    for step, losses in _every_loss(run):
        assert losses == straight[step], step


def _check_lineage_and_damage(tmp_path, worlds, straight):
    (line1_codes, line1_log), (refused_codes, refused_log), (line2_codes, line2_log) = worlds
    ds = tmp_path / "lineage" / "checkpoints" / "deepspeed"
    # Resuming step3 while step4 and step6 exist starts line 1; they are moved, not counted by the retention.
    assert line1_codes[0] == -9 and 0 not in line1_codes, line1_log[-3000:]
    assert "deepspeed/step3 at epoch 0, micro-batch 3, step 3" in line1_log
    assert "line 1 of this run starts at" in line1_log
    assert sorted(p.name for p in (ds / "abandoned" / "line1").iterdir()) == ["step4", "step6"]
    # The damaged tag asked for explicitly: refused on every rank, naming the file.
    assert refused_codes == [2, 2], refused_log[-3000:]
    assert "configuration error: resume:" in refused_log and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in \
        refused_log and "(truncated)" in refused_log, refused_log[-3000:]
    # `--resume latest` follows line 1 (its step4, not line 0's step6), finds the shard truncated, warns naming
    # it, falls back to step3 and starts line 2; keep_abandoned=false deletes the damaged tag.
    assert line2_codes == [0, 0], line2_log[-3000:]
    warning = next(line for line in line2_log.splitlines() if "fails verification" in line)
    assert "deepspeed/step4 fails verification" in warning and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in \
        warning and "(truncated)" in warning and "falling back to" in warning and warning.endswith(
            "deepspeed/step3, the previous complete tag of its line"), warning
    assert "deepspeed/step3 at epoch 0, micro-batch 3, step 3" in line2_log
    assert "line 2 of this run starts at" in line2_log and "log.keep_abandoned=false: deleted" in line2_log
    assert _tags(tmp_path / "lineage") == {"step5": True, "step6": True}  # keep_checkpoints=2 on line 2
    assert not (ds / "abandoned" / "line2").exists()
    step5, step6 = _marker(ds / "step5"), _marker(ds / "step6")
    assert step6["parent"] == {"tag": "step5", "id": step5["id"]} and step5["parent"]["tag"] == "step4"
    assert step5["line"] == step6["line"] == 2
    assert json.loads((ds / "compclip_line.json").read_text()) == {"line": 2, "start": "step3"}
    assert (ds / "compclip_latest").read_text() == "step6"


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
