"""Locked towers in real DeepSpeed runs (one process, the tiny model, DeGLA with its EMA teacher), and compclip-export
of the same runs: ZeRO-0 in bf16 with the image tower locked (stage 0 keeps bf16's fp32 masters in its optimizer
only), ZeRO-1 in fp32 with the text tower partly locked (DeepSpeed saves no frozen parameters for stage 1). The
frozen parameters are those open_clip's own lock functions freeze; they are unchanged after the steps, in the
student and the teacher, and every other parameter moved. The export of the last tag equals the trainer's live
weights bit for bit, the student's and the teacher's. wandb is hidden: training must not import it.
(ZeRO-3 with two ranks: tests/test_export.py.)"""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CASES = {
    "zero0-bf16-image": (["--deepspeed.zero_stage=0", "--deepspeed.precision=bf16", "--model.lock_image=true"],
                         dict(image=0)),
    "zero1-fp32-text": (["--deepspeed.zero_stage=1", "--model.lock_text=true", "--model.lock_text_unlocked_layers=1"],
                        dict(text=1)),
}


def _open_clip_locked(image=None, text=None):
    """Names open_clip's lock_image_tower / lock_text_tower freeze on the tiny model (None: that tower unlocked)."""
    import open_clip

    from compclip.models import register_model_configs

    register_model_configs()
    model = open_clip.create_model("compclip-tiny")
    if image is not None:
        model.lock_image_tower(unlocked_groups=image)
    if text is not None:
        model.lock_text_tower(unlocked_layers=text)
    return {name for name, p in model.named_parameters() if not p.requires_grad}, \
        {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize("case", list(CASES))
def test_locked_parameters_stay_through_training_and_the_export(case, tmp_path, one_process, monkeypatch):
    from compclip.export import export_run
    from compclip.train import main
    from compclip.trainer.engine import full_state_dict
    from compclip.trainer.train import Trainer

    monkeypatch.setitem(sys.modules, "wandb", None)  # training never needs wandb: importing it would fail here
    seen = {}
    original = Trainer.train

    def train(self):
        seen["trainer"], seen["initial"] = self, full_state_dict(self.clip, self.engine)
        seen["teacher_initial"] = self.teacher.full_parameters()
        return original(self)

    def close(self):  # the trained state, read before the engines are released
        seen["live"], seen["teacher_live"] = full_state_dict(self.clip, self.engine), self.teacher.full_parameters()
        return original_close(self)

    original_close = Trainer.close
    monkeypatch.setattr(Trainer, "train", train)
    monkeypatch.setattr(Trainer, "close", close)
    flags, locks = CASES[case]
    main(["--config", str(ROOT / "configs" / "degla.yaml"), "--config", str(ROOT / "configs" / "tiny.yaml"),
          "--optim.max_steps=3", "--loss.ema_decay=0.5", "--eval_synthetic=false", "--threads=1",
          f"--log.logs={tmp_path}", "--log.name=run", f"--data.synthetic.root={tmp_path.parent / 'synthetic-yaml'}",
          *flags])
    trainer = seen["trainer"]
    live = seen["live"]
    live_teacher = {k[len("clip."):]: v for k, v in seen["teacher_live"].items()}
    initial_teacher = {k[len("clip."):]: v for k, v in seen["teacher_initial"].items()}
    frozen, names = _open_clip_locked(**locks)
    assert {n for n, p in trainer.clip.named_parameters() if not p.requires_grad} == frozen
    assert frozen and frozen < names
    for name in names:
        changed = not torch.equal(live[name], seen["initial"][name])
        teacher_changed = not torch.equal(live_teacher[name], initial_teacher[name])
        assert changed == teacher_changed == (name not in frozen), name

    student = torch.load(export_run(str(tmp_path / "run")).checkpoint, weights_only=True)["state_dict"]
    teacher = torch.load(export_run(str(tmp_path / "run"), teacher=True).checkpoint, weights_only=True)["state_dict"]
    for name in live:
        assert torch.equal(student[name], live[name]), name
    for name in names:
        assert torch.equal(teacher[name], live_teacher[name].reshape(teacher[name].shape)), name
    if "bf16" in case:  # the fp32 masters, not the bf16 compute copy
        trained = [live[name] for name in names - frozen]
        assert any(not torch.equal(value, value.bfloat16().float()) for value in trained)
