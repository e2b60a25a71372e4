"""Bad inputs raise ValueError naming the argument and the shapes; backend selection and its failures."""
import pytest
import torch

import compclip.kernels as kernels
import compclip.losses as losses
from compclip.kernels import dispatch
from loss_oracles import make_batch

B = make_batch(B=3, K=2, D=4, P=4, L=2, seed=7)
v, t, n, m, s, bias = B["image"], B["text"], B["negatives"], B["valid"], B["logit_scale"], B["logit_bias"]
u, c, owner = B["tokens"], B["concepts"], B["owner"]
theta = torch.zeros(2, dtype=torch.float64)

BAD = {
    "batch mismatch": (lambda: losses.clip_loss(v, t[:2], s), r"text has shape \(2, 4\) but image .*B must agree"),
    "width mismatch": (lambda: losses.negclip_loss(v, t, n[..., :3], s), r"negatives .* D must agree"),
    "negatives rank": (lambda: losses.negclip_loss(v, t, n[:, 0], s), r"negatives must have shape \[B, K, D\]"),
    "negatives batch": (lambda: losses.degla_igc_loss(v, t, n[:2], s), r"negatives has shape \(2, 2, 4\)"),
    "integer features": (lambda: losses.clip_loss(v.long(), t, s), r"image must be float64, float32"),
    "not a tensor": (lambda: losses.clip_loss(v.tolist(), t, s), r"image must be a tensor"),
    "empty batch": (lambda: losses.clip_loss(v[:0], t[:0], s), r"empty"),
    "vector scale": (lambda: losses.clip_loss(v, t, torch.ones(2)), r"logit_scale must be a scalar .*\(2,\)"),
    "integer scale": (lambda: losses.clip_loss(v, t, torch.tensor(3)), r"logit_scale must be a floating tensor"),
    "missing scale": (lambda: losses.clip_loss(v, t, None), r"logit_scale is required"),
    "vector bias": (lambda: losses.siglip_loss(v, t, s, torch.ones(3)), r"logit_bias must be a scalar"),
    "valid dtype": (lambda: losses.ceclip_cmr_loss(v, t, n, m.float(), s, theta), r"valid must be a bool tensor"),
    "valid shape": (lambda: losses.ceclip_cmr_loss(v, t, n, m[:, :1], s, theta), r"valid must have shape \[B, K\]"),
    "threshold shape": (lambda: losses.ceclip_cmr_loss(v, t, n, m, s, torch.zeros(3)),
                        r"threshold must have shape \[K\] = \(2,\), got \(3,\)"),
    "threshold type": (lambda: losses.ceclip_cmr_loss(v, t, n, m, s, [0.0, 0.0]), r"threshold must be a float"),
    "previous shape": (lambda: losses.ceclip_threshold(v, t, n, m, s, previous=torch.zeros(1)),
                       r"previous must have shape \[K\]"),
    "upper": (lambda: losses.ceclip_threshold(v, t, n, m, s, upper=-1.0), r"upper must be a positive number"),
    "imc variant": (lambda: losses.ceclip_imc_loss(v, t, n, s, variant="authors"), r"unknown variant 'authors'"),
    "tgc variant": (lambda: losses.degla_tgc_loss(t, t, n, variant="Paper"), r"unknown variant 'Paper'"),
    "released imc without negatives": (lambda: losses.ceclip_imc_loss(v, t, n[:, :0], s, variant="released"),
                                       r"K >= 1"),
    "backend": (lambda: losses.clip_loss(v, t, s, backend="cuda"), r"clip_loss: unknown backend 'cuda'"),
    "owner dtype": (lambda: losses.c2lip_npc_loss(v, c, owner.float(), s, bias), r"owner must be an integer"),
    "owner bool": (lambda: losses.c2lip_npc_loss(v, c, owner > 0, s, bias), r"owner must be an integer"),
    "owner range": (lambda: losses.c2lip_npc_loss(v, c, owner + 3, s, bias), r"owner values must index the B = 3"),
    "owner negative": (lambda: losses.c2lip_xac_loss(u, c, owner - 5, s, bias), r"owner values must index"),
    "owner length": (lambda: losses.c2lip_npc_loss(v, c, owner[:2], s, bias), r"owner must have shape \[P\]"),
    "tokens rank": (lambda: losses.c2lip_xac_loss(u[:, 0], c, owner, s, bias), r"tokens must have shape \[B, L, D\]"),
    "concept width": (lambda: losses.concept_attention_pool(u, c[:, :3]), r"concepts .* D must agree"),
    "temperature": (lambda: losses.concept_attention_pool(u, c, 0.0), r"temperature must be a positive number"),
    "devices": (lambda: losses.clip_loss(v, t.to("meta"), s), r"different devices"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_value_error(case):
    call, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        call()


# Every function with a backend argument, and the kernel-level op it runs.
BACKEND_CALLS = {
    "clip_loss": ("contrastive_row_loss",
                  lambda x, **kw: losses.clip_loss(x["image"], x["text"], x["logit_scale"], **kw)),
    "negclip_loss": ("contrastive_row_loss", lambda x, **kw: losses.negclip_loss(
        x["image"], x["text"], x["negatives"], x["logit_scale"], **kw)),
    "ceclip_imc_loss": ("contrastive_row_loss", lambda x, **kw: losses.ceclip_imc_loss(
        x["image"], x["text"], x["negatives"], x["logit_scale"], **kw)),
    "degla_igc_loss": ("grouped_contrast_row_loss", lambda x, **kw: losses.degla_igc_loss(
        x["image"], x["text"], x["negatives"], x["logit_scale"], **kw)),
    "degla_tgc_loss": ("grouped_contrast_row_loss",
                       lambda x, **kw: losses.degla_tgc_loss(x["text"], x["teacher_text"], x["negatives"], **kw)),
    "concept_attention_pool": ("concept_attention_pool",
                               lambda x, **kw: losses.concept_attention_pool(x["tokens"], x["concepts"], **kw)),
    "c2lip_xac_loss": ("xac_loss_sum", lambda x, **kw: losses.c2lip_xac_loss(
        x["tokens"], x["concepts"], x["owner"], x["logit_scale"], x["logit_bias"], **kw)),
}
FLOAT32 = {name: value.float() if value.is_floating_point() else value for name, value in B.items()}


@pytest.mark.parametrize("fn", sorted(BACKEND_CALLS))
def test_triton_backend_without_the_kernel_names_it(fn, monkeypatch):
    op, call = BACKEND_CALLS[fn]
    monkeypatch.delattr(kernels, op, raising=False)
    with pytest.raises(RuntimeError, match=rf"{op}: backend='triton' cannot run: .*compclip\.kernels\.{op} is not"):
        call(FLOAT32, backend="triton")
    call(FLOAT32, backend="auto")  # CPU tensors: the reference, whatever the kernels' state
    assert dispatch.resolved_backends()[op] == "torch"


@pytest.mark.parametrize("fn", sorted(BACKEND_CALLS))
def test_triton_backend_calls_the_exported_op(fn, monkeypatch):
    """``backend="triton"`` runs ``compclip.kernels.<op>``, looked up at call time (a spy stands in for it)."""
    if dispatch.triton_available() or not dispatch.interpreter_enabled():
        pytest.skip("triton cannot run here (not importable, or no GPU and TRITON_INTERPRET unset)")
    op, call = BACKEND_CALLS[fn]
    reference = getattr(kernels.reference, op)
    calls = []

    def spy(*args, **kwargs):
        calls.append(op)
        return reference(*args, **kwargs)

    monkeypatch.setattr(kernels, op, spy, raising=False)
    expected = call(FLOAT32, backend="torch")
    assert calls == []
    torch.testing.assert_close(call(FLOAT32, backend="triton"), expected)
    assert calls


@pytest.mark.parametrize("fn", sorted(BACKEND_CALLS))
def test_float64_cannot_take_the_triton_backend(fn):
    with pytest.raises(RuntimeError, match="float64"):
        BACKEND_CALLS[fn][1](B, backend="triton")
