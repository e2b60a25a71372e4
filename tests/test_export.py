"""compclip-export against the live model: a 2-rank ZeRO-3 DeGLA run (gloo, CPU, the tiny model, towers partly
locked, nothing kept gathered) is probed in its ranks at step 2 right after that step's checkpoint commits: the
embeddings of a fixed batch by the student engine and by the EMA teacher. The export of tag `step2` (mid-epoch),
loaded by stock open_clip from its local folder, gives the same embeddings; the export of the last tag equals the
trainer's own export of the same step bit for bit; the locked parameters are those open_clip's own lock functions
freeze, and they are unchanged after the steps while every other parameter moved. Also the command's errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PROBE_ENV = "COMPCLIP_TEST_PROBE"  # "<step>:<folder>" for install_probe
PROBE_STEP = 2
CAPTIONS = ["a red circle left of a blue square", "a blue square above a green cross", "a big green cross"]
LOCKS = ["--model.lock_image=true", "--model.lock_image_unlocked_groups=1", "--model.lock_text=true",
         "--model.lock_text_unlocked_layers=2"]


def _probe_batch(tokenizer):
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)), tokenizer(CAPTIONS)


def install_probe():
    """fork_world hook, in every rank: rank 0 writes the initial full weights before the first step, and after the
    commit of step PROBE_STEP the normalised embeddings of `_probe_batch` by the live student engine and the live
    EMA teacher (every rank runs the forwards: ZeRO-3 gathers collectively)."""
    from compclip.trainer.engine import full_state_dict
    from compclip.trainer.train import Trainer

    step, out = os.environ[PROBE_ENV].split(":", 1)
    step, out = int(step), Path(out)
    original_train, original_save = Trainer.train, Trainer._save

    def train(self):
        state = full_state_dict(self.clip)
        if self.rank == 0:
            torch.save(state, out / "initial.pt")
        return original_train(self)

    def save(self):
        original_save(self)
        if self.global_step == step and self.checkpoints.saved_step == step and not (out / "probe.pt").exists():
            images, text = _probe_batch(self.tokenizer)
            self.engine.eval()
            with torch.no_grad():
                student, teacher = self.engine(images, text), self.teacher(images, text)
            self.engine.train()
            torch.distributed.barrier()
            if self.rank == 0:
                torch.save({"student": (student.image, student.text), "teacher": (teacher.image, teacher.text)},
                           out / "probe.pt")

    Trainer.train, Trainer._save = train, save


def _locked_names():
    """Parameter names open_clip's own lock_image_tower / lock_text_tower freeze with the test's counts."""
    import open_clip

    from compclip.models import register_model_configs

    register_model_configs()
    model = open_clip.create_model("compclip-tiny")
    model.lock_image_tower(unlocked_groups=1)
    model.lock_text_tower(unlocked_layers=2)
    return {name for name, param in model.named_parameters() if not param.requires_grad}


def _embeddings(folder):
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    images, text = _probe_batch(tokenizer)
    model.eval()
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(text, normalize=True)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    """The 2-rank ZeRO-3 run (3 steps, checkpoints at steps 2 and 3), its probe and its rank logs: made once per
    session, under `-n 2` by the first worker to need it (the other waits on a lock, then reads the same folder).
    The tests only read it: their exports go to their own tmp_path."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder, above the workers' own
    with FileLock(str(shared / "zero3_run.lock")):
        done = shared / "zero3_run.path"
        if done.exists():
            return Path(done.read_text())
        tmp = _run_zero3(tmp_path_factory.mktemp("export"))
        done.write_text(str(tmp))
        return tmp


def _run_zero3(tmp: Path) -> Path:
    (tmp / "probe").mkdir()
    # Nothing stays gathered between forwards, as for a model above DeepSpeed's persistence threshold (the frozen
    # parameters' export then needs a real gather).
    (tmp / "ds.json").write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    argv = ["--config", str(ROOT / "configs" / "degla.yaml"), "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--deepspeed.zero_stage=3", f"--deepspeed.config_file={tmp / 'ds.json'}", "--optim.max_steps=3",
            f"--log.save_every_n_steps={PROBE_STEP}", "--loss.ema_decay=0.5", "--eval_synthetic=false",
            "--threads=1", f"--log.logs={tmp}", "--log.name=run", f"--data.synthetic.root={tmp / 'world'}", *LOCKS]
    plan = [{"argv": argv, "ranks": 2, "env": {PROBE_ENV: f"{PROBE_STEP}:{tmp / 'probe'}"},
             "hook": f"{Path(__file__).resolve()}:install_probe"}]
    (tmp / "plan.json").write_text(json.dumps(plan))
    (tmp / "ranks").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "RANK", "LOCAL_", "WORLD_", "MASTER_"))}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "trainer" / "fork_world.py"), str(tmp / "plan.json"),
                           str(tmp / "results.json"), str(tmp / "ranks")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    logs = "".join((tmp / "ranks" / f"world0_rank{r}.log").read_text()[-3000:] for r in (0, 1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp / "results.json").read_text())[0]["codes"] == [0, 0], logs
    return tmp


@pytest.mark.slow
def test_export_of_a_mid_run_zero3_tag_gives_the_live_embeddings(zero3_run, tmp_path):
    from compclip.export import main

    run = zero3_run / "run"
    probe = torch.load(zero3_run / "probe" / "probe.pt", weights_only=True)
    for teacher in (False, True):
        exported = main([str(run), "--tag", f"step{PROBE_STEP}", "--out", str(tmp_path / f"teacher{teacher}")]
                        + (["--teacher"] if teacher else []))
        assert exported.global_step == PROBE_STEP and exported.epoch == 1  # mid-epoch: 4 steps per epoch
        image, text = _embeddings(exported.folder)
        live_image, live_text = probe["teacher" if teacher else "student"]
        torch.testing.assert_close(image, live_image, rtol=0, atol=2e-6)
        torch.testing.assert_close(text, live_text, rtol=0, atol=2e-6)
    # the teacher is not the student (decay 0.5 moved it half way per step)
    assert (probe["teacher"][0] - probe["student"][0]).abs().max() > 1e-4
    card = (Path(exported.folder) / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: open_clip\n") and "EMA teacher" in card and "| `tgc` | 0.1 |" in card


@pytest.mark.slow
def test_locked_parameters_stay_and_the_last_tag_equals_the_trainers_export(zero3_run, tmp_path):
    from compclip.export import export_run

    run = zero3_run / "run"
    initial = torch.load(zero3_run / "probe" / "initial.pt", weights_only=True)
    trainer_export = torch.load(run / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]
    student = export_run(str(run), out=str(tmp_path / "student")).checkpoint
    teacher = export_run(str(run), out=str(tmp_path / "teacher"), teacher=True).checkpoint
    student, teacher = (torch.load(path, weights_only=True)["state_dict"] for path in (student, teacher))
    assert student.keys() == trainer_export.keys() == initial.keys()
    for key in student:  # the consolidated tag step3 is the trainer's own gathered export of step 3
        assert torch.equal(student[key], trainer_export[key]), key
    locked = _locked_names()
    assert locked and "visual.proj" not in locked and "text_projection" not in locked
    trained = {name for name, _ in _tiny_model().named_parameters()} - locked
    for key in locked:
        assert torch.equal(student[key], initial[key]) and torch.equal(teacher[key], initial[key]), key
    for key in trained:
        assert not torch.equal(student[key], initial[key]), key
        assert not torch.equal(teacher[key], initial[key]) and not torch.equal(teacher[key], student[key]), key


def _tiny_model():
    import open_clip

    from compclip.models import register_model_configs

    register_model_configs()
    return open_clip.create_model("compclip-tiny")


def test_a_damaged_tag_is_passed_over_by_default_and_refused_when_named(zero3_run, tmp_path, capsys):
    """The export checks a tag's files against its completion marker as a resume does (runfolder.verify)."""
    import shutil

    from compclip.export import export_run, main

    run = tmp_path / "run"
    shutil.copytree(zero3_run / "run", run)
    shard = sorted((run / "checkpoints" / "deepspeed" / "step3").glob("*optim_states.pt"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    exported = export_run(str(run), out=str(tmp_path / "default"))
    assert exported.tag == "step2" and exported.global_step == 2
    with pytest.raises(SystemExit) as info:
        main([str(run), "--tag", "step3", "--out", str(tmp_path / "named")])
    error = capsys.readouterr().err
    assert info.value.code == 2 and shard.name in error and "truncated" in error, error


def test_export_errors_name_the_problem(tmp_path, capsys):
    from compclip.export import main

    for argv, expected in (([str(tmp_path / "nothing")], "no such folder"),
                           ([str(tmp_path)], "not a training run folder")):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2 and expected in capsys.readouterr().err
