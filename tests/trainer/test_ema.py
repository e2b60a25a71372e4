"""compclip.trainer.ema without DeepSpeed: the teacher must compute what the student computes."""
import pytest
import torch

from compclip.models import Encoder, build_model


def test_ema_teacher_refuses_a_teacher_with_another_activation():
    """Same parameters, different parameter-free layers (GELU vs QuickGELU): the teacher would compute other
    features, so it is an error rather than a silent mismatch; a matching teacher starts equal to the student."""
    from compclip.trainer.ema import EMATeacher

    torch.manual_seed(0)
    student = Encoder(build_model("compclip-tiny", force_quick_gelu=True)[0])
    with pytest.raises(ValueError, match="QuickGELU"):
        EMATeacher(student, lambda: Encoder(build_model("compclip-tiny", load_weights=False)[0]), 0.9996)
    teacher = EMATeacher(student, lambda: Encoder(build_model("compclip-tiny", force_quick_gelu=True)[0]), 0.9996)
    images = torch.randn(2, 3, 64, 64)
    text = build_model("compclip-tiny")[3](["a red circle", "a blue square"])
    with torch.no_grad():
        want = student.eval()(images, text)
    got = teacher(images, text)
    assert not teacher.module.training
    torch.testing.assert_close(got.image, want.image)
    torch.testing.assert_close(got.text, want.text)


def test_the_teacher_starts_as_a_copy_whatever_its_storage_held():
    """The teacher is built without random draws (its storage holds whatever memory held); the start copies the
    student into it, so even NaN in every teacher element leaves nothing behind (0 x NaN would)."""
    from compclip.trainer.ema import EMATeacher

    torch.manual_seed(0)
    student = Encoder(build_model("compclip-tiny")[0])

    def poisoned():
        teacher = Encoder(build_model("compclip-tiny", load_weights=False, initialize=False)[0])
        for param in teacher.parameters():
            param.data.fill_(float("nan"))
        return teacher

    teacher = EMATeacher(student, poisoned, 0.9)
    for (name, t), s in zip(teacher.module.named_parameters(), student.parameters()):
        assert torch.equal(t, s), name
