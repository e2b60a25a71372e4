"""contrastive_row_loss (Triton, interpreter on the CPU) against reference.contrastive_row_loss."""
import functools

import pytest
import torch

from compclip.kernels import contrastive, contrastive_row_loss, reference
from kernel_parity import check_parity, unit

SMALL = dict(block_m=16, block_n=16, block_d=16, block_do=16)   # several tiles / D slices at test sizes


def _case(kind: str, M: int, B: int, K: int, D: int, dtype, seed: int = 0):
    """(anchors, columns, targets, extra_logits) of one usage of the op; B images, K negatives each."""
    g = torch.Generator().manual_seed(seed)
    if kind == "clip":                     # plain rows against columns, target = own column
        return unit(M, D, dtype=dtype, generator=g), unit(B, D, dtype=dtype, generator=g), torch.arange(M), None
    if kind == "negclip":                  # image vs [positives; flattened negatives], target column i
        columns = torch.cat([unit(B, D, generator=g), unit(B * K, D, generator=g)]).to(dtype)
        return unit(M, D, dtype=dtype, generator=g), columns, torch.arange(M), None
    if kind == "imc_paper":                # text vs flat negatives + the image–text positive as extra logit
        extra = 10.0 * (unit(M, D, generator=g) * unit(M, D, generator=g)).sum(-1)
        return (unit(M, D, dtype=dtype, generator=g), unit(B * K, D, dtype=dtype, generator=g),
                torch.full((M,), -1), extra.to(dtype))
    if kind == "imc_released":             # every row's target is column 0
        return (unit(M, D, dtype=dtype, generator=g), unit(B * K, D, dtype=dtype, generator=g),
                torch.zeros(M, dtype=torch.long), None)
    if kind == "data_parallel":            # rank 1's local rows vs the gathered batch: targets offset + i
        offset = B - M
        return (unit(M, D, dtype=dtype, generator=g), unit(B, D, dtype=dtype, generator=g),
                offset + torch.arange(M), None)
    raise ValueError(kind)


def _run(kind, M, B, K, D, scale, dtype=torch.float32, non_contiguous=(), **blocks):
    anchors, columns, targets, extra = _case(kind, M, B, K, D, dtype)
    logit_scale = torch.tensor(scale)
    check_parity(reference.contrastive_row_loss, functools.partial(contrastive_row_loss, **blocks),
                 [anchors, columns, logit_scale, targets, extra], dtype, non_contiguous)


def test_one_row_default_blocks():
    _run("clip", M=1, B=1, K=0, D=5, scale=1.0)


@pytest.mark.parametrize("kind, M, B, K, D, scale", [
    ("clip", 7, 13, 0, 19, 100.0),          # M < N, odd D, the largest logit scale
    ("negclip", 7, 7, 3, 33, 100.0),        # N = 28: two column tiles, D = 33: three D slices
    ("imc_paper", 7, 7, 3, 19, 10.0),       # targets −1 with extra logits (gradient to the extras)
    ("imc_released", 9, 4, 5, 19, 1.0),
    ("data_parallel", 20, 37, 0, 17, 30.0),  # two row tiles, three column tiles, targets offset by 17
])
def test_row_kinds_multi_tile(kind, M, B, K, D, scale):
    _run(kind, M, B, K, D, scale, **SMALL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["negclip", "imc_paper"])
def test_half_precision(kind, dtype):
    _run(kind, M=5, B=5, K=3, D=19, scale=30.0, dtype=dtype, **SMALL)


def test_non_contiguous_inputs():
    _run("negclip", M=5, B=5, K=3, D=19, scale=10.0, non_contiguous=(0, 1), **SMALL)


def test_python_float_scale_and_frozen_inputs():
    anchors, columns, targets, _ = _case("clip", 6, 9, 0, 19, torch.float32)
    columns.requires_grad_()
    loss = contrastive_row_loss(anchors, columns, 20.0, targets, **SMALL)
    expected = reference.contrastive_row_loss(anchors, columns.detach(), 20.0, targets)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    loss.sum().backward()
    assert columns.grad is not None and anchors.grad is None


def test_shape_errors():
    with pytest.raises(ValueError):
        contrastive_row_loss(torch.zeros(3, 4), torch.zeros(5, 6), 1.0, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        contrastive_row_loss(torch.zeros(3, 4), torch.zeros(5, 4), 1.0, torch.zeros(2, dtype=torch.long))


def test_wide_embedding_default_blocks():
    _run("negclip", M=3, B=3, K=1, D=1030, scale=100.0)      # D > 1024, not a power of two: 5 D slices


# ---- two column sources, both backward paths ----------------------------------------------------------------
def _two_source_reference(anchors, columns, extra_columns, logit_scale, targets, extra):
    return reference.contrastive_row_loss(anchors, columns, logit_scale, targets, extra, extra_columns=extra_columns)


def _two_source_kernel(deterministic, blocks):
    def run(anchors, columns, extra_columns, logit_scale, targets, extra):
        return contrastive_row_loss(anchors, columns, logit_scale, targets, extra, extra_columns=extra_columns,
                                    deterministic=deterministic, **blocks)
    return run


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M, B, K, D, blocks", [
    (7, 7, 3, 33, SMALL),            # N = 7 + 21: a column tile straddles the two sources; three D slices
    (20, 13, 2, 19, SMALL),          # two row tiles, D not a multiple of 8
    (5, 6, 4, 37, {}),               # default blocks: one output slice of 32 + 16 (the two-accumulator path)
    (3, 3, 1, 100, {}),              # default blocks: one 128-wide slice (D not a power of two nor a multiple of 8)
])
def test_two_sources(M, B, K, D, blocks, dtype, deterministic):
    g = torch.Generator().manual_seed(M * 1000 + D)
    anchors, texts, negatives = unit(M, D, generator=g), unit(B, D, generator=g), unit(B * K, D, generator=g)
    targets = torch.randint(0, B, (M,), generator=g)
    check_parity(_two_source_reference, _two_source_kernel(deterministic, blocks),
                 [anchors.to(dtype), texts.to(dtype), negatives.to(dtype), torch.tensor(30.0), targets, None], dtype)


@pytest.mark.parametrize("deterministic", [True, False])
def test_two_sources_with_extra_logits(deterministic):
    g = torch.Generator().manual_seed(3)
    anchors, texts, negatives = unit(9, 21, generator=g), unit(5, 21, generator=g), unit(15, 21, generator=g)
    targets = torch.tensor([-1, 0, 3, -1, 19, 4, -1, 2, 10])       # extra logit, first and second source
    extra = 10.0 * torch.randn(9, generator=g).tanh()
    check_parity(_two_source_reference, _two_source_kernel(deterministic, SMALL),
                 [anchors, texts, negatives, torch.tensor(20.0), targets, extra], torch.float32)


def test_small_requested_blocks_are_rounded_up():
    blocks = contrastive._blocks(40, 40, 40, 8, 4, 8, 8)
    assert all(v >= 16 for kernel in ("fwd", "bwd_a", "bwd_c") for v in blocks[kernel].values())
    assert blocks["out"]["BLOCK_DO"] == 16


@pytest.mark.parametrize("D, slice_", [(512, 512), (768, 768), (1024, 1024), (600, 640), (1030, 1024)])
def test_default_output_slice_covers_d_once(D, slice_):
    """Up to D = 1024 the backward kernels hold the whole D: one recompute per kernel (5 passes in all)."""
    out = contrastive._blocks(32768, 163840, D, None, None, None, None)["out"]
    assert out["SLICE"] == slice_ and out["SLICE"] >= min(D, contrastive.FULL_D)


@pytest.mark.parametrize("allow_tf32, expected", [(True, "tf32"), (False, "ieee")])
def test_float32_dots_follow_allow_tf32(monkeypatch, allow_tf32, expected):
    """On a GPU float32 inputs use TF32 exactly when PyTorch's matmul flag allows it; 16-bit inputs keep their
    storage dtype; the interpreter always gets float32 "ieee"."""
    from compclip.kernels import _common
    # torch's matmul flags are properties of a module object: monkeypatch cannot undo them, so restore by hand.
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        x = torch.zeros(2, 2)
        assert contrastive._dot_config(x, x)[1] == "ieee"                    # interpreter
        monkeypatch.setattr(_common, "interpreter_enabled", lambda: False)
        assert contrastive._dot_config(x, x)[1] == expected
        assert _common.dot_config(x, x)[1] == "ieee"                         # other kernels: unchanged default
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert contrastive._dot_config(x.half(), x.half())[0] == _common.tl.float16
