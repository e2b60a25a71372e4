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


# ---- split streamed axes (flash-decoding), inputs without gradients, empty batches ------------------------------
@pytest.mark.parametrize("deterministic, splits", [(True, 1), (True, 2), (True, 3), (False, 3)])
def test_split_columns_and_rows(splits, deterministic):
    # 5 column tiles and 2 row tiles of 16: the forward and ∂A split the columns (2: 3 + 2 tiles, 3: 2 + 2 + 1),
    # ∂C the rows (clamped to the 2 row tiles); splits=1 is the path without partials. Two sources, extra logits.
    g = torch.Generator().manual_seed(splits)
    anchors, texts, negatives = unit(20, 16, generator=g), unit(30, 16, generator=g), unit(45, 16, generator=g)
    targets = torch.tensor([-1, 0, 3, -1, 74, 4, -1, 2, 10, 31] * 2)
    extra = 10.0 * torch.randn(20, generator=g).tanh()
    blocks = dict(SMALL, splits=splits)
    check_parity(_two_source_reference, _two_source_kernel(deterministic, blocks),
                 [anchors, texts, negatives, torch.tensor(20.0), targets, extra], torch.float32)


def test_default_splits_fill_two_waves_and_are_deterministic():
    """Default splits come from M, N and the SM count (132 on the interpreter's sm_90 target): at M = 32 rows the
    forward and ∂A split 64 columns into 4 tiles of 16, ∂C 2 row tiles, and two runs agree bitwise."""
    blocks = contrastive._blocks(32, 64, 16, 16, 16, 16, 16, sms=132)
    assert [blocks["splits"][k][0] for k in ("fwd", "bwd_a", "bwd_c")] == [4, 4, 2]
    anchors, columns, targets, _ = _case("negclip", 32, 16, 3, 16, torch.float32)
    runs = []
    for _ in range(2):
        leaves = [anchors.clone().requires_grad_(), columns.clone().requires_grad_(),
                  torch.tensor(30.0, requires_grad=True)]
        loss = contrastive_row_loss(leaves[0], leaves[1], leaves[2], targets, **SMALL)
        (loss * torch.linspace(0.5, 1.5, 32)).sum().backward()
        runs.append([loss.detach()] + [leaf.grad for leaf in leaves])
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    expected = reference.contrastive_row_loss(anchors, columns, 30.0, targets)
    torch.testing.assert_close(runs[0][0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("split_of", [
    (1, 1, 64), (3, 1, 64), (264, 64, 1), (200, 10, 2),
])
def test_split_axis_gives_two_waves(split_of):
    from compclip.kernels._common import WAVES, split_axis
    base, tiles, expected = split_of                 # 132 SMs; a streamed axis of ``tiles`` tiles of 16
    splits, per_split = split_axis(base, tiles * 16 - 3, 16, 132)
    assert splits == min(expected, tiles) and per_split % 16 == 0
    assert base * splits >= WAVES * 132 or splits == tiles
    assert (splits - 1) * per_split < tiles * 16 - 3 <= splits * per_split      # no empty split, all covered


@pytest.mark.parametrize("frozen", [("columns", "extra_columns"), ("anchors",), ("anchors", "logit_scale"),
                                    ("columns",), ("anchors", "columns", "extra_columns", "extra_logits")])
@pytest.mark.parametrize("deterministic", [True, False])
def test_inputs_without_gradient(frozen, deterministic):
    """Each subset of frozen inputs: the others' gradients equal the reference's, the frozen get None."""
    g = torch.Generator().manual_seed(7)
    values = dict(anchors=unit(9, 21, generator=g), columns=unit(5, 21, generator=g),
                  extra_columns=unit(15, 21, generator=g), logit_scale=torch.tensor(20.0),
                  extra_logits=10.0 * torch.randn(9, generator=g).tanh())
    targets = torch.tensor([-1, 0, 3, -1, 19, 4, -1, 2, 10])
    grads = {}
    for name, fn in (("reference", _two_source_reference), ("kernel", _two_source_kernel(deterministic, SMALL))):
        leaves = {k: v.clone().requires_grad_(k not in frozen) for k, v in values.items()}
        loss = fn(leaves["anchors"], leaves["columns"], leaves["extra_columns"], leaves["logit_scale"], targets,
                  leaves["extra_logits"])
        (loss * torch.linspace(0.5, 1.5, 9)).sum().backward()
        grads[name] = {k: leaf.grad for k, leaf in leaves.items()}
    for key in values:
        if key in frozen:
            assert grads["kernel"][key] is None, key
        else:
            torch.testing.assert_close(grads["kernel"][key], grads["reference"][key], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{key}: {m}")


def test_empty_batch():
    """M = 0 local rows (a rank without anchors): an empty loss, zero gradients for the columns and the scale."""
    anchors = torch.zeros(0, 19, requires_grad=True)
    columns = unit(13, 19).requires_grad_()
    scale = torch.tensor(30.0, requires_grad=True)
    loss = contrastive_row_loss(anchors, columns, scale, torch.zeros(0, dtype=torch.long), **SMALL)
    assert loss.shape == (0,)
    loss.sum().backward()
    assert anchors.grad.shape == (0, 19)
    assert torch.equal(columns.grad, torch.zeros_like(columns)) and scale.grad.item() == 0.0


def test_misaligned_slices_and_ragged_width_are_realigned():
    """A slice that starts one element into its allocation (data pointer not 16-byte aligned) and D = 19 (rows not
    a multiple of 16 wide): the host copies them into aligned rows padded to 32, and the gradients come back in the
    input's shape."""
    from compclip.kernels._common import aligned_rows

    def misaligned(t):
        return torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape)     # differentiable, offset by 4 bytes

    probe = misaligned(torch.ones(5, 19))
    assert probe.data_ptr() % 16 != 0 and aligned_rows(probe, 32).data_ptr() % 16 == 0
    assert aligned_rows(probe, 32).shape == (5, 32) and torch.equal(aligned_rows(probe, 32)[:, 19:], torch.zeros(5, 13))

    def kernel(anchors, columns, logit_scale, targets):
        return contrastive_row_loss(misaligned(anchors), misaligned(columns), logit_scale, targets, **SMALL)
    anchors, columns, targets, _ = _case("clip", 7, 13, 0, 19, torch.float32)
    check_parity(reference.contrastive_row_loss, kernel, [anchors, columns, torch.tensor(30.0), targets],
                 torch.float32)
