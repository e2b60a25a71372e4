"""Multi-negative contrastive loss (CLIP, NegCLIP, CE-CLIP IMC rows) with an online log-sum-exp.

Forward (per row m of the anchors; s = logit_scale, e = extra_logits, t = targets)::

    x_mn   = s ⟨a_m, c_n⟩                                   logits, never written to memory
    x_mt   = s ⟨a_m, c_t⟩  (t ≥ 0)  or  e_m  (t = −1)       the target logit
    loss_m = log( [exp(e_m)] + Σ_n exp(x_mn) ) − x_mt       = −log p_mt

computed as loss_m = (μ_m − x_mt) + λ_m with μ_m the row maximum, ρ_m = Σ_{n ≠ t} exp(x_mn − μ_m) and
λ_m = lse_m − μ_m = log1p(expm1(x_mt − μ_m) + ρ_m): when the target dominates (p_mt → 1, the loss → 0), x_mt − μ_m
is an exact 0 and the loss keeps float32's relative precision instead of the absolute precision of a log-sum-exp
near |x| (2⁻²³·|x|, 6e-6 at s = 100). The forward saves (μ, λ, d) per row, d_m = ⟨a_m, c_t⟩ (0 for t = −1).

Backward (g_m = ∂L/∂loss_m, G_mn = g_m (p_mn − 1[n = t_m]), recomputed from the saved statistics)::

    p_mn = exp((x_mn − μ_m) − λ_m)  (n ≠ t),    p_mt − 1 = expm1((x_mt − μ_m) − λ_m)
    ∂L/∂a_m  = s Σ_n G_mn c_n
    ∂L/∂c_n  = s Σ_m G_mn a_m
    ∂L/∂s    = Σ_m Σ_n G_mn ⟨a_m, c_n⟩ = Σ_m [ Σ_n G_mn (⟨a_m, c_n⟩ − d_m) − g_m p_me d_m ]
    ∂L/∂e_m  = g_m (p_me − 1[t_m = −1]),   p_me = exp((e_m − μ_m) − λ_m)

Every G_mn then has float32 relative precision, the dominant column's and the target's alike. Σ_n G_mn = −g_m p_me
(0 without an extra logit), so the two forms of ∂s are equal; the second has no cancellation between the
target's term and the others when p_mt → 1 (the first loses it: issue 28's CE-CLIP IMC case, B = 1, K = 4,
D = 40, s = 100, had a relative error of 4.7e-4 on ∂s; the log-sum-exp saved at |x| ≈ 50 was the cause).

Shapes: anchors [M, D], columns [N1, D], extra_columns [N2, D] or None (a second column source, read in place:
the logical columns are [columns; extra_columns], N = N1 + N2; NegCLIP passes texts and negatives.flatten(0, 1)
so that the [B + BK, D] concatenation is never copied), targets [M] long (column index in [0, N), or −1 for the
extra logit, which then must be given), extra_logits [M] or None, logit_scale 0-d tensor or Python float (no
gradient then). Output: [M] float32. Gradients come back per source, in each input's dtype.

Passes (GEMM-equivalents of M·N·D multiply-adds, per direction, forward + backward):

* forward: one kernel, grid (row blocks × column splits); each program streams the column tiles of its split,
  recomputes its [BLOCK_M, BLOCK_N] logits tile over D in BLOCK_D slices (pipelined loads) and folds it into a
  running max, the running Σ exp of the non-target columns and the target's dot. Saves (μ, λ, d) [3, M].
  1 GEMM.
* backward, deterministic (default; no atomics, every output element has exactly one writer):
  ``dA`` — grid (row blocks × output slices × column splits): recompute the tile, G, then acc += G @ C[:, slice];
  it also writes ∂e and one ∂s partial per program. ``dC`` — grid (column blocks × output slices × row splits):
  recompute, acc += Gᵀ A. The output slice is the whole D for D ≤ 1024 (FULL_D), held as one or two
  power-of-two accumulators (768 = 512 + 256), so each kernel recomputes once: 2 + 2 GEMMs, **5 passes in all**
  (plus the padding of the slice to a power of two, none at 512 / 768 / 1024). Beyond 1024, slices of 1024,
  each repeating the recompute.
* backward, ``deterministic=False``: one kernel; the dA programs also add Gᵀ A of their tile into a float32
  ∂C buffer with atomics (as flash attention's dQ): 1 recompute + 2 gradient GEMMs, **4 passes in all**; the
  float-add order varies run to run.
* inputs that need no gradient: no ∂C kernel when neither column source needs one (3 passes), and the dA kernel
  skips its gradient GEMM when only ∂s / ∂e are wanted (anchors frozen: 4 passes), or does not run at all.

**Splits (flash-decoding).** In a data-parallel run the rows are local (M = B / world size) and the columns
global, so a grid over row blocks alone can leave most SMs idle (M = 4,096: 32 forward CTAs on 132 SMs). Each
kernel splits its streamed axis (columns for the forward and dA, rows for dC) into S parts of whole tiles, S
the smallest count that gives every launch WAVES = 2 CTAs per SM (``_common.split_axis``, from M, N and the SM
count of the tensors' GPU; ``splits=`` forces one). Split programs write float32 partials, and a combine kernel
merges them in split order, so the result stays deterministic: the forward's (max, Σ exp, target dot) per row
and split, [3, S, M], merged by ``_contrastive_fwd_combine_kernel``; dA's and dC's [S, rows, D] partial gradients
summed by ``_common._sum_splits_kernel``. The combines do no dots: the pass counts above hold for any S.

Memory: besides inputs and gradients, (μ, λ, d) [3, M] float32 and the ∂s partials (one float per dA program):
O(M + N). With splits, the partials: 3·S·M floats (forward) and S·rows·D float32 (dA or dC), where
S·rows ≈ 2·SMs·BLOCK (e.g. 42 MB at M = 4,096, D = 512 on an H100; none at M = 32,768). The [M, N] logits matrix
is never materialised. The atomic path adds a float32 [N, D] ∂C buffer (cast per source at the end). Each
backward accumulator is [rows, slice] float32 over 8 warps (64 rows up to 512 wide, 32 rows up to 1024): about
128 registers a thread for the accumulator alone.

Numerics: tl.dot receives its operands in the storage dtype when the inputs are fp16/bf16 (products exact,
accumulation in float32); float32 inputs use TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set (PyTorch's
rule), else "ieee"; the interpreter always runs float32 "ieee" (it cannot multiply bf16). The gradient GEMMs
take G rounded to the dot dtype, and at real sizes G = g·(p − 1) is tiny (g = 1/2B ≈ 1.5e-5, p ≈ 1e-6 … 1e-1):
fp16 would flush or denormalise it (normal min 6.1e-5). **Rule:** G is multiplied by the power of two
σ = 2^(14 − ceil(log2 max|g|)) before the cast (so |σG| ≤ 2^14 < 65504 and every |G| ≥ 2^-28·max|g| stays a
normal fp16 number), and the float32 accumulator is multiplied by s/σ; σ is computed on the device (no sync) and,
being a power of two, adds no rounding. The same rule runs for bf16 and float32, where it is harmless.
tests/kernels/test_kernel_contrastive_numerics.py checks this sequence at B = 32,768, K = 4, D = 512, s = 100,
and ∂s against float64 on near-one-hot rows.
Targets are not range-checked (that would need a device sync): an index outside [−1, N) gives a meaningless row.

Limits: any M ≥ 0, N ≥ 1 (or N = 0 with extra logits), D ≥ 1 (masking handles non powers of two); offsets are
int64; requested blocks are powers of two, rounded up to 16 (smaller tl.dot blocks do not compile on a GPU).
The kernels see rows that are contiguous, 16-byte aligned and a multiple of 16 wide: the host copies an input
that is not (a non-contiguous view, a slice that starts mid-allocation, a D such as 500, zero-padded to 512) and
drops the padding from the gradients; vectorised loads need both, and without them the backward kernels spill
(ptxas, M = 12,345, D = 500: 668 B). Register fit (ptxas -v, bf16 and
fp16, default tiles, ``_blocks``; ``python -m compclip.kernels.aot --full``, atomic path included): no spills on
sm_80 or sm_90 for any kernel at D = 512, 768, 1024 or a ragged D. The backward kernels use ~250 registers × 256
threads, i.e. one CTA per SM; the forward ~180, one (two on sm_90 at 128 rows × 64 columns with wgmma).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from ._common import (Scalar, _expm1, _log1p, _sum_splits_kernel, aligned_rows, block_size, combine_block,
                      contiguous, device_arch, dot_config, launch, needs_grad, padded_width, pow2_scale, scalar_arg,
                      scalar_grad, sm_count, split_axis)


# --------------------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_cols(c_ptr, x_ptr, cols, offs_d, N1, N, D, stride_c, stride_x, HAS_X: tl.constexpr, TRANS: tl.constexpr):
    """Rows ``cols`` of the logical column matrix [C; X] (rows < N1 from C, the rest from X when HAS_X), one D
    slice, in the storage dtype, 0 where masked: [len(cols), len(offs_d)], or its transpose when TRANS. Two
    predicated loads with disjoint masks; adding them is exact (one of the two is 0)."""
    in_c = cols < N1
    d_ok = offs_d < D
    if TRANS:
        c = tl.load(c_ptr + cols[None, :] * stride_c + offs_d[:, None], mask=in_c[None, :] & d_ok[:, None], other=0.0)
    else:
        c = tl.load(c_ptr + cols[:, None] * stride_c + offs_d[None, :], mask=in_c[:, None] & d_ok[None, :], other=0.0)
    if HAS_X:
        in_x = (cols >= N1) & (cols < N)
        x_row = tl.where(in_x, cols - N1, 0)
        if TRANS:
            c += tl.load(x_ptr + x_row[None, :] * stride_x + offs_d[:, None], mask=in_x[None, :] & d_ok[:, None],
                         other=0.0)
        else:
            c += tl.load(x_ptr + x_row[:, None] * stride_x + offs_d[None, :], mask=in_x[:, None] & d_ok[None, :],
                         other=0.0)
    return c


@triton.jit
def _store_cols(dc_ptr, dx_ptr, cols, offs_d, N1, N, D, value, HAS_X: tl.constexpr):
    """Store a [len(cols), len(offs_d)] tile of the gradient of [C; X] into the two (contiguous) gradients."""
    d_ok = offs_d < D
    tl.store(dc_ptr + cols[:, None] * D + offs_d[None, :], value.to(dc_ptr.dtype.element_ty),
             mask=(cols < N1)[:, None] & d_ok[None, :])
    if HAS_X:
        in_x = (cols >= N1) & (cols < N)
        x_row = tl.where(in_x, cols - N1, 0)
        tl.store(dx_ptr + x_row[:, None] * D + offs_d[None, :], value.to(dx_ptr.dtype.element_ty),
                 mask=in_x[:, None] & d_ok[None, :])


@triton.jit
def _store_slice(ptr, rows, offs_d, ROWS, D, value):
    """Store a [rows, D slice] tile of a row-major [ROWS, D] matrix in the pointer's dtype."""
    tl.store(ptr + rows[:, None] * D + offs_d[None, :], value.to(ptr.dtype.element_ty),
             mask=(rows < ROWS)[:, None] & (offs_d < D)[None, :])


@triton.jit
def _logit_dots(a_ptr, c_ptr, x_ptr, rows, cols, M, N1, N, D, stride_a, stride_c, stride_x, HAS_X: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr):
    """⟨a_m, c_n⟩ for one tile over the whole D in BLOCK_D slices (pipelined loads): [BLOCK_M, BLOCK_N] float32."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_ok = rows < M
    for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(a_ptr + rows[:, None] * stride_a + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)                  # [BLOCK_M, BLOCK_D]
        c = _load_cols(c_ptr, x_ptr, cols, offs_d, N1, N, D, stride_c, stride_x, HAS_X, True)  # [BLOCK_D, BLOCK_N]
        acc = tl.dot(a.to(DOT_DTYPE), c.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _row_finish(run_max, rest, target_dot, target, scale, extra, HAS_EXTRA: tl.constexpr):
    """(loss, μ, λ) of a row from its running max over the columns, ρ = Σ_{n ≠ t} exp(x_n − max) and the
    target's dot; the extra logit e (if any) joins here. μ = the row maximum, λ = lse − μ =
    log1p(expm1(x_t − μ) + ρ) and loss = (μ − x_t) + λ: an exact 0 + log1p(ρ) when the target is the maximum, so
    a dominant target keeps a loss of float32 relative precision."""
    target_logit = scale * target_dot          # bitwise the logit the running max saw: same product
    if HAS_EXTRA:
        top = tl.maximum(run_max, extra)
        rest = rest * tl.exp(run_max - top) + tl.where(target == -1, 0.0, tl.exp(extra - top))
        target_logit = tl.where(target == -1, extra, target_logit)
    else:
        top = run_max
    lam = _log1p(_expm1(target_logit - top) + rest)
    return (top - target_logit) + lam, top, lam


@triton.jit
def _store_row(loss_ptr, stats_ptr, rows, M, run_max, rest, target_dot, target, scale, extra,
               HAS_EXTRA: tl.constexpr):
    """Store a row's loss and the statistics the backward needs, (μ, λ, d) [3, M]."""
    valid = rows < M
    loss, top, lam = _row_finish(run_max, rest, target_dot, target, scale, extra, HAS_EXTRA)
    tl.store(loss_ptr + rows, loss, mask=valid)
    tl.store(stats_ptr + rows, top, mask=valid)
    tl.store(stats_ptr + M + rows, lam, mask=valid)
    tl.store(stats_ptr + 2 * M + rows, target_dot, mask=valid)


@triton.jit
def _row_state(targets_ptr, stats_ptr, grad_ptr, extra_ptr, rows, M, scale, sigma, HAS_EXTRA: tl.constexpr):
    """Per-row constants of the backward: (t, d = target dot, μ, λ, σg, σG of the target = σg·expm1(x_t − μ − λ)).
    x_t − μ is an exact 0 when the target is the maximum (same product as the forward's)."""
    valid = rows < M
    target = tl.load(targets_ptr + rows, mask=valid, other=-1).to(tl.int64)
    top = tl.load(stats_ptr + rows, mask=valid, other=0.0)
    lam = tl.load(stats_ptr + M + rows, mask=valid, other=0.0)
    target_dot = tl.load(stats_ptr + 2 * M + rows, mask=valid, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=valid, other=0.0) * sigma                  # 0 on padding rows
    target_logit = scale * target_dot
    if HAS_EXTRA:
        extra = tl.load(extra_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        target_logit = tl.where(target == -1, extra, target_logit)
    return target, target_dot, top, lam, grad, grad * _expm1((target_logit - top) - lam)


@triton.jit
def _grad_coef_tile(
    anchors_ptr, columns_ptr, extra_cols_ptr, scale,
    target, target_dot, top, lam, grad, target_coef,                  # _row_state of ``rows``
    rows, cols,                                                       # [BLOCK_M], [BLOCK_N] int64
    M, N1, N, D, stride_a, stride_c, stride_x, HAS_X: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
):
    """σ·G = σ g_m (p_mn − 1[n = t_m]) for one tile, recomputed, rounded to the dot dtype: [BLOCK_M, BLOCK_N], 0 on
    padding; and the tile's Σ σG·(⟨a, c⟩ − d) (float32 scalar, the ∂s partial of the module docstring). σ is the
    power of two that keeps σG in the normal range of fp16; the caller divides its float32 accumulators by σ."""
    dots = _logit_dots(anchors_ptr, columns_ptr, extra_cols_ptr, rows, cols, M, N1, N, D,
                       stride_a, stride_c, stride_x, HAS_X, BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, PRECISION, STAGES)
    prob = tl.exp((scale * dots - top[:, None]) - lam[:, None])            # log_softmax as (x − μ) − λ
    is_target = cols[None, :] == target[:, None]
    coef = tl.where(is_target, target_coef[:, None], tl.where((cols < N)[None, :], grad[:, None] * prob, 0.0))
    # ∂s from the float32 G and the dots already on chip (no epilogue reload of the anchors, whose [rows, D]
    # float32 copy would not fit next to the accumulator).
    return coef.to(DOT_DTYPE), tl.sum(tl.sum(coef * (dots - target_dot[:, None]), 1), 0)


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _contrastive_fwd_kernel(
    anchors_ptr, columns_ptr, extra_cols_ptr, scale_ptr, targets_ptr, extra_ptr,     # inputs (extra_*: or None)
    loss_ptr, stats_ptr, partials_ptr,            # outputs: loss [M], (μ, λ, d) [3, M] (SPLIT: None), or
    #                                               the split's partials (max, ρ, d) [3, S, M] (else None)
    M, N1, N, D, split_cols,                      # shapes (N = N1 + N2); columns per split, a multiple of BLOCK_N
    stride_a, stride_c, stride_x,                 # row strides
    HAS_X: tl.constexpr, HAS_EXTRA: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
):
    """BLOCK_M rows (axis 0) against the columns of one split (axis 1): the loss, or the split's partials."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)          # [BLOCK_M]
    split = tl.program_id(1).to(tl.int64)
    row_valid = rows < M
    scale = tl.load(scale_ptr).to(tl.float32)
    target = tl.load(targets_ptr + rows, mask=row_valid, other=-1).to(tl.int64)     # [BLOCK_M]
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    rest = tl.zeros((BLOCK_M,), dtype=tl.float32)                                   # Σ_{n ≠ t} exp(x − max)
    target_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_start = split * split_cols
    for n0 in range(n_start, tl.minimum(n_start + split_cols, N), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)                              # [BLOCK_N]
        dots = _logit_dots(anchors_ptr, columns_ptr, extra_cols_ptr, rows, cols, M, N1, N, D,
                           stride_a, stride_c, stride_x, HAS_X, BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, PRECISION, STAGES)
        logits = tl.where((cols < N)[None, :], scale * dots, float("-inf"))
        is_target = cols[None, :] == target[:, None]
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        rest = rest * tl.exp(run_max - new_max) + \
            tl.sum(tl.where(is_target, 0.0, tl.exp(logits - new_max[:, None])), axis=1)
        target_dot += tl.sum(tl.where(is_target, dots, 0.0), axis=1)               # exact: one nonzero term
        run_max = new_max
    if SPLIT:
        stride_s = tl.num_programs(1).to(tl.int64) * M
        tl.store(partials_ptr + split * M + rows, run_max, mask=row_valid)
        tl.store(partials_ptr + stride_s + split * M + rows, rest, mask=row_valid)
        tl.store(partials_ptr + 2 * stride_s + split * M + rows, target_dot, mask=row_valid)
    else:
        extra = 0.0
        if HAS_EXTRA:
            extra = tl.load(extra_ptr + rows, mask=row_valid, other=0.0).to(tl.float32)
        _store_row(loss_ptr, stats_ptr, rows, M, run_max, rest, target_dot, target, scale, extra, HAS_EXTRA)


@triton.jit
def _contrastive_fwd_combine_kernel(
    partials_ptr, scale_ptr, targets_ptr, extra_ptr,       # partials [3, S, M]; extra logits [M] or None
    loss_ptr, stats_ptr,                                   # outputs: loss [M], (μ, λ, d) [3, M] float32
    M, S,
    HAS_EXTRA: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merge the S column splits of BLOCK_M rows in split order: max, rescaled Σ exp, the target's dot."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < M
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    rest = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for s in range(0, S):
        split_max = tl.load(partials_ptr + s * M + rows, mask=valid, other=0.0)
        new_max = tl.maximum(run_max, split_max)
        rest = rest * tl.exp(run_max - new_max) + \
            tl.load(partials_ptr + (S + s) * M + rows, mask=valid, other=0.0) * tl.exp(split_max - new_max)
        target_dot += tl.load(partials_ptr + (2 * S + s) * M + rows, mask=valid, other=0.0)
        run_max = new_max
    scale = tl.load(scale_ptr).to(tl.float32)
    target = tl.load(targets_ptr + rows, mask=valid, other=-1).to(tl.int64)
    extra = 0.0
    if HAS_EXTRA:
        extra = tl.load(extra_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    _store_row(loss_ptr, stats_ptr, rows, M, run_max, rest, target_dot, target, scale, extra, HAS_EXTRA)


@triton.jit
def _contrastive_bwd_anchors_kernel(
    anchors_ptr, columns_ptr, extra_cols_ptr, scale_ptr, sigma_ptr,                   # inputs
    targets_ptr, extra_ptr, stats_ptr, grad_ptr,                                      # extra_ptr: or None
    d_anchors_ptr, d_extra_ptr, scale_partials_ptr, d_cols_acc_ptr,  # outputs; d_anchors: [M, D] or, SPLIT,
    #                                                                  float32 partials [S, M, D]; unused ones None
    M, N1, N, D, split_cols,                                                          # shapes; columns per split
    stride_a, stride_c, stride_x,                                                     # row strides
    HAS_X: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_DA: tl.constexpr, SPLIT: tl.constexpr,
    ATOMIC_DC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, BLOCK_DO2: tl.constexpr, HAS_DO2: tl.constexpr, SLICE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
):
    """∂A for BLOCK_M rows (axis 0), one output slice of SLICE = BLOCK_DO (+ BLOCK_DO2) columns of D (axis 1; the
    whole D when D ≤ 1024), over the columns of one split (axis 2); ∂s partials and ∂e on output slice 0.
    HAS_DA = False: only ∂s / ∂e (the anchors need no gradient). ATOMIC_DC: also add Gᵀ A for the same slice into
    the float32 ∂C buffer with atomics."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                                    # [BLOCK_M]
    row_valid = rows < M
    offs_1 = pid_d * SLICE + tl.arange(0, BLOCK_DO)                                   # [BLOCK_DO]
    offs_2 = pid_d * SLICE + BLOCK_DO + tl.arange(0, BLOCK_DO2)                       # [BLOCK_DO2]
    scale = tl.load(scale_ptr).to(tl.float32)
    sigma = tl.load(sigma_ptr)
    unscale = scale / sigma
    target, target_dot, top, lam, grad, target_coef = _row_state(
        targets_ptr, stats_ptr, grad_ptr, extra_ptr, rows, M, scale, sigma, HAS_EXTRA)
    acc1 = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)                            # σ Σ_n G_mn c_n[slice]
    acc2 = tl.zeros((BLOCK_M, BLOCK_DO2), dtype=tl.float32)
    partial = 0.0                                                                     # σ·∂s of these rows
    n_start = split * split_cols
    for n0 in range(n_start, tl.minimum(n_start + split_cols, N), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        coef, tile_partial = _grad_coef_tile(anchors_ptr, columns_ptr, extra_cols_ptr, scale, target, target_dot,
                                             top, lam, grad, target_coef, rows, cols, M, N1, N, D,
                                             stride_a, stride_c, stride_x, HAS_X, BLOCK_M, BLOCK_N, BLOCK_D,
                                             DOT_DTYPE, PRECISION, STAGES)
        partial += tile_partial
        if HAS_DA:
            c1 = _load_cols(columns_ptr, extra_cols_ptr, cols, offs_1, N1, N, D, stride_c, stride_x, HAS_X, False)
            acc1 = tl.dot(coef, c1.to(DOT_DTYPE), acc1, input_precision=PRECISION)
            if HAS_DO2:
                c2 = _load_cols(columns_ptr, extra_cols_ptr, cols, offs_2, N1, N, D, stride_c, stride_x, HAS_X, False)
                acc2 = tl.dot(coef, c2.to(DOT_DTYPE), acc2, input_precision=PRECISION)
        if ATOMIC_DC:
            col_ok = (cols < N)[:, None]
            a1 = tl.load(anchors_ptr + rows[:, None] * stride_a + offs_1[None, :],
                         mask=row_valid[:, None] & (offs_1 < D)[None, :], other=0.0)
            part1 = tl.dot(tl.trans(coef), a1.to(DOT_DTYPE), input_precision=PRECISION)   # [BLOCK_N, BLOCK_DO]
            tl.atomic_add(d_cols_acc_ptr + cols[:, None] * D + offs_1[None, :], unscale * part1,
                          mask=col_ok & (offs_1 < D)[None, :], sem="relaxed")
            if HAS_DO2:
                a2 = tl.load(anchors_ptr + rows[:, None] * stride_a + offs_2[None, :],
                             mask=row_valid[:, None] & (offs_2 < D)[None, :], other=0.0)
                part2 = tl.dot(tl.trans(coef), a2.to(DOT_DTYPE), input_precision=PRECISION)
                tl.atomic_add(d_cols_acc_ptr + cols[:, None] * D + offs_2[None, :], unscale * part2,
                              mask=col_ok & (offs_2 < D)[None, :], sem="relaxed")
    if HAS_DA:
        d_out = d_anchors_ptr + split * M * D          # SPLIT: this split's float32 partial; else split = 0
        _store_slice(d_out, rows, offs_1, M, D, unscale * acc1)
        if HAS_DO2:
            _store_slice(d_out, rows, offs_2, M, D, unscale * acc2)
    if pid_d == 0:   # every output slice recomputed the same G: slice 0 reports ∂s and ∂e
        partial = partial / sigma
        if HAS_EXTRA:
            # p_e = exp(e − μ − λ); for t = −1 the extra logit is the target: ∂e = σG of the target / σ
            extra = tl.load(extra_ptr + rows, mask=row_valid, other=0.0).to(tl.float32)
            p_extra = tl.exp((extra - top) - lam)
            g = grad / sigma
            d_extra = tl.where(target == -1, target_coef / sigma, g * p_extra)
            # Σ_n G_mn = −g p_e for t ≥ 0 (module docstring): the ∂s term of the reference dot d, once per row
            partial += tl.sum(tl.where((target >= 0) & row_valid & (split == 0), -g * p_extra * target_dot, 0.0),
                              axis=0)
            tl.store(d_extra_ptr + rows, d_extra.to(d_extra_ptr.dtype.element_ty), mask=row_valid & (split == 0))
        tl.store(scale_partials_ptr + split * tl.num_programs(0) + pid_m, partial)


@triton.jit
def _contrastive_bwd_columns_kernel(
    anchors_ptr, columns_ptr, extra_cols_ptr, scale_ptr, sigma_ptr,                   # inputs
    targets_ptr, extra_ptr, stats_ptr, grad_ptr,                                      # extra_ptr: or None
    d_columns_ptr, d_extra_cols_ptr,       # outputs [N1, D], [N − N1, D] (or None); SPLIT: partials [S, N, D], None
    M, N1, N, D, split_rows,                                                          # shapes; rows per split
    stride_a, stride_c, stride_x,                                                     # row strides
    HAS_X: tl.constexpr, HAS_EXTRA: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, BLOCK_DO2: tl.constexpr, HAS_DO2: tl.constexpr, SLICE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
):
    """∂C for BLOCK_N columns of either source (axis 0) and one output slice of D (axis 1), over the rows of one
    split (axis 2); one writer per element (per split)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                                    # [BLOCK_N]
    offs_1 = pid_d * SLICE + tl.arange(0, BLOCK_DO)
    offs_2 = pid_d * SLICE + BLOCK_DO + tl.arange(0, BLOCK_DO2)
    scale = tl.load(scale_ptr).to(tl.float32)
    sigma = tl.load(sigma_ptr)
    acc1 = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)                            # σ Σ_m G_mn a_m[slice]
    acc2 = tl.zeros((BLOCK_N, BLOCK_DO2), dtype=tl.float32)
    m_start = split * split_rows
    for m0 in range(m_start, tl.minimum(m_start + split_rows, M), BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        target, target_dot, top, lam, grad, target_coef = _row_state(
            targets_ptr, stats_ptr, grad_ptr, extra_ptr, rows, M, scale, sigma, HAS_EXTRA)
        coef, _ = _grad_coef_tile(anchors_ptr, columns_ptr, extra_cols_ptr, scale, target, target_dot, top, lam,
                                  grad, target_coef, rows, cols, M, N1, N, D, stride_a, stride_c, stride_x,
                                  HAS_X, BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, PRECISION, STAGES)
        a1 = tl.load(anchors_ptr + rows[:, None] * stride_a + offs_1[None, :],
                     mask=(rows < M)[:, None] & (offs_1 < D)[None, :], other=0.0)      # [BLOCK_M, BLOCK_DO]
        acc1 = tl.dot(tl.trans(coef), a1.to(DOT_DTYPE), acc1, input_precision=PRECISION)
        if HAS_DO2:
            a2 = tl.load(anchors_ptr + rows[:, None] * stride_a + offs_2[None, :],
                         mask=(rows < M)[:, None] & (offs_2 < D)[None, :], other=0.0)
            acc2 = tl.dot(tl.trans(coef), a2.to(DOT_DTYPE), acc2, input_precision=PRECISION)
    unscale = scale / sigma
    if SPLIT:
        d_out = d_columns_ptr + split * N * D
        _store_slice(d_out, cols, offs_1, N, D, unscale * acc1)
        if HAS_DO2:
            _store_slice(d_out, cols, offs_2, N, D, unscale * acc2)
    else:
        _store_cols(d_columns_ptr, d_extra_cols_ptr, cols, offs_1, N1, N, D, unscale * acc1, HAS_X)
        if HAS_DO2:
            _store_cols(d_columns_ptr, d_extra_cols_ptr, cols, offs_2, N1, N, D, unscale * acc2, HAS_X)


# --------------------------------------------------------------------------------------------------------------
# Host launchers (no autograd)
# --------------------------------------------------------------------------------------------------------------
FULL_D = 1024          # widest D whose gradient accumulator stays on chip in one piece (see the docstring)
STAGES = 3             # software-pipelining depth of the D loop of every logits recompute
NUM_WARPS = 8


def _out_slices(D: int, block_do: Optional[int]) -> dict:
    """Output-D slice of the backward kernels: BLOCK_DO (+ BLOCK_DO2), both powers of two.

    Default: the whole D for D ≤ FULL_D, as the sum of at most two powers of two that covers it with the least
    padding (768 = 512 + 256, 600 → 512 + 128, 1000 → 1024), so the recompute runs once per kernel;
    beyond FULL_D, slices of FULL_D. ``block_do``: one slice of that width (tests use it for several slices)."""
    if block_do is not None:
        first, second = block_size(block_do, D, block_do), 0
    elif D > FULL_D:
        first, second = FULL_D, 0
    else:
        first = max(16, triton.next_power_of_2(D))
        second = 0
        if first > 16 and D <= 3 * first // 4:            # a half and a quarter-or-less cover D
            first //= 2
            second = max(16, triton.next_power_of_2(D - first))
    return dict(BLOCK_DO=first, BLOCK_DO2=max(second, 16), HAS_DO2=second > 0, SLICE=first + second)


def _blocks(M: int, N: int, D: int, block_m, block_n, block_d, block_do, deterministic: bool = True,
            arch: int = 90, sms: int = 132, splits: Optional[int] = None) -> dict:
    """Tile sizes and splits of the kernels: {"fwd", "bwd_a", "bwd_c": tiles, "out": the output-D slice,
    "splits": {"fwd" | "bwd_a" | "bwd_c": (S, elements of the streamed axis per split)}}.

    Tiles are chosen so that every kernel compiles without register spills for bf16/fp16 on sm_80 and sm_90 at
    D ≤ 1024 (ptxas -v; see "Register fit" in the module docstring). The backward accumulator is [rows, SLICE]
    float32 over 8 warps, 64 rows up to SLICE = 512 (128 registers a thread), 32 rows beyond (≤ 1024 wide, again
    ≤ 128); the streamed dimension (columns in dA, anchors in dC) is narrow, 32 (16 beyond SLICE = 768), since its
    [streamed, SLICE] operand tile is what pushes a kernel past 255 registers; the dC recompute reads D in slices
    of 32. The atomic dA kernel also holds a [streamed, SLICE] float32 Gᵀ A tile: half the rows, streamed 16; on
    sm_80 16 rows, and output slices of 512 beyond D = 768 (one recompute more: 5 passes at D = 1024, as the
    deterministic path).
    ``arch``: compute capability ×10 of the device (90 on the CPU / interpreter); ``sms``: its SM count, which
    sets the splits (``_common.split_axis``); ``splits``: force that many for every kernel."""
    out = _out_slices(D, block_do)
    if not deterministic and arch < 90 and out["SLICE"] > 768 and block_do is None:
        out = _out_slices(D, 512)      # sm_80 cannot hold the atomic dA kernel's two [16, 1024] float32 tiles
    wide = out["SLICE"] > 512
    if deterministic:
        acc_rows, streamed = (32, 16 if out["SLICE"] > 768 else 32) if wide else (64, 32)
        if arch < 90:                  # mma.sync (sm_80) needs more registers than wgmma for the same dA tiles
            streamed_a = 16
        else:
            streamed_a = streamed
    else:
        acc_rows, streamed = (16 if wide or arch < 90 else 32), 16
        streamed_a = streamed
    tiles = dict(
        fwd=dict(BLOCK_M=block_size(block_m, M, 128), BLOCK_N=block_size(block_n, N, 64),
                 BLOCK_D=block_size(block_d, D, 64)),
        bwd_a=dict(BLOCK_M=block_size(block_m, M, acc_rows), BLOCK_N=block_size(block_n, N, streamed_a),
                   BLOCK_D=block_size(block_d, D, 64)),
        bwd_c=dict(BLOCK_M=block_size(block_m, M, streamed), BLOCK_N=block_size(block_n, N, acc_rows),
                   BLOCK_D=block_size(block_d, D, 32)),
        out=out,
    )
    d_slices = triton.cdiv(D, out["SLICE"])
    fwd, bwd_a, bwd_c = tiles["fwd"], tiles["bwd_a"], tiles["bwd_c"]
    tiles["splits"] = dict(
        fwd=split_axis(triton.cdiv(M, fwd["BLOCK_M"]), N, fwd["BLOCK_N"], sms, splits),
        bwd_a=split_axis(triton.cdiv(M, bwd_a["BLOCK_M"]) * d_slices, N, bwd_a["BLOCK_N"], sms, splits),
        bwd_c=split_axis(triton.cdiv(N, bwd_c["BLOCK_N"]) * d_slices, M, bwd_c["BLOCK_M"], sms, splits),
    )
    tiles["sms"] = sms
    return tiles


def _dot_config(*tensors):
    return dot_config(*tensors, follow_tf32=True)


def _present(*tensors):
    return [t for t in tensors if t is not None]


def _n_columns(columns, extra_columns) -> int:
    return columns.shape[0] + (extra_columns.shape[0] if extra_columns is not None else 0)


def _strides(anchors, columns, extra_columns):
    """Row strides of the three sources (0 for an absent second column source)."""
    return anchors.stride(0), columns.stride(0), extra_columns.stride(0) if extra_columns is not None else 0


def grad_scale_of(grad: torch.Tensor) -> torch.Tensor:
    """σ = 2^(14 − ceil(log2 max|g|)), a 1-element float32 device tensor (no host sync). Since |p − 1[n = t]| ≤ 1,
    |σ·G| ≤ 2^14 < 65504 (fp16 max), and σ·G stays a normal fp16 number down to |G| = 2^-28 · max|g|."""
    return pow2_scale(grad, 14)


def _sum_splits(partials: torch.Tensor, out: torch.Tensor, out2: Optional[torch.Tensor], sms: int) -> None:
    """out (and out2, for rows ≥ len(out)) = Σ_s partials[s], in split order."""
    S, rows, D = partials.shape
    block = combine_block(rows * D, sms, 128, 1024)
    launch(_sum_splits_kernel, (triton.cdiv(rows * D, block),),
           partials, out, out2,
           S, rows, out.shape[0], D,
           HAS_OUT2=out2 is not None, ACCUMULATE=False, BLOCK=block)


def contrastive_forward(anchors, columns, extra_columns, scale, targets, extra, blocks):
    """(loss [M], stats [3, M]: μ, λ, target dot) float32; all tensors contiguous, ``scale`` a 1-element float32
    tensor; the columns are [columns; extra_columns] (extra_columns may be None)."""
    M, D = anchors.shape
    N1, N = columns.shape[0], _n_columns(columns, extra_columns)
    f32 = dict(dtype=torch.float32, device=anchors.device)
    loss, stats = torch.empty(M, **f32), torch.empty(3, M, **f32)
    dot_dtype, precision = _dot_config(*_present(anchors, columns, extra_columns))
    meta = blocks["fwd"]
    splits, split_cols = blocks["splits"]["fwd"]
    partials = torch.empty(3, splits, M, **f32) if splits > 1 else None
    launch(_contrastive_fwd_kernel, (triton.cdiv(M, meta["BLOCK_M"]), splits),
        anchors, columns, extra_columns, scale, targets, extra,
        None if partials is not None else loss, None if partials is not None else stats, partials,
        M, N1, N, D, split_cols,
        *_strides(anchors, columns, extra_columns),
        HAS_X=extra_columns is not None, HAS_EXTRA=extra is not None, SPLIT=partials is not None, **meta,
        DOT_DTYPE=dot_dtype, PRECISION=precision, STAGES=STAGES, num_warps=NUM_WARPS,
    )
    if partials is not None:
        block = combine_block(M, blocks["sms"], 2, 128)
        launch(_contrastive_fwd_combine_kernel, (triton.cdiv(M, block),),
               partials, scale, targets, extra,
               loss, stats,
               M, splits,
               HAS_EXTRA=extra is not None, BLOCK_M=block)
    return loss, stats


def contrastive_backward(anchors, columns, extra_columns, scale, targets, extra, stats, grad, blocks,
                         deterministic: bool = True, need=(True,) * 5):
    """(d_anchors, d_columns, d_extra_columns, d_scale_partials, d_extra); grad [M] float32. ``need``: which of
    (anchors, columns, extra_columns, logit_scale, extra_logits) want a gradient; the others come back as None
    (the scale partials as an empty tensor) and the kernels that only they need do not run."""
    need_a, need_c, need_x, need_s, need_e = need
    need_c, need_x = need_c, need_x and extra_columns is not None
    need_e = need_e and extra is not None
    M, D = anchors.shape
    N1, N = columns.shape[0], _n_columns(columns, extra_columns)
    sms = blocks["sms"]
    f32 = dict(dtype=torch.float32, device=anchors.device)
    dot_dtype, precision = _dot_config(*_present(anchors, columns, extra_columns))
    sigma = grad_scale_of(grad)
    out = blocks["out"]
    d_slices = triton.cdiv(D, out["SLICE"])
    common = dict(**out, HAS_X=extra_columns is not None, HAS_EXTRA=extra is not None, DOT_DTYPE=dot_dtype,
                  PRECISION=precision, STAGES=STAGES, num_warps=NUM_WARPS)
    strides = _strides(anchors, columns, extra_columns)
    inputs = (anchors, columns, extra_columns, scale, sigma, targets, extra, stats, grad)
    columns_by_atomics = not deterministic and (need_c or need_x)
    d_anchors = d_columns = d_extra_columns = d_extra = None
    scale_partials = torch.zeros(0, **f32)

    if need_a or need_s or need_e or columns_by_atomics:
        meta = blocks["bwd_a"]
        splits, split_cols = blocks["splits"]["bwd_a"]
        slices = d_slices if need_a or columns_by_atomics else 1
        grid = (triton.cdiv(M, meta["BLOCK_M"]), slices, splits)
        d_anchors = torch.empty_like(anchors) if need_a else None
        partials = torch.empty(splits, M, D, **f32) if need_a and splits > 1 else None
        d_extra = torch.empty_like(extra) if extra is not None else None
        scale_partials = torch.empty(grid[0] * splits, **f32)
        # The atomic path accumulates ∂[C; X] in one float32 buffer (the atomics need it), cast per source after.
        d_cols_acc = torch.zeros((N, D), **f32) if columns_by_atomics else None
        launch(_contrastive_bwd_anchors_kernel, grid,
            *inputs,
            partials if partials is not None else d_anchors, d_extra, scale_partials, d_cols_acc,
            M, N1, N, D, split_cols,
            *strides,
            HAS_DA=need_a, SPLIT=partials is not None, ATOMIC_DC=columns_by_atomics,
            **meta, **common,
        )
        if partials is not None:
            _sum_splits(partials, d_anchors, None, sms)
        if columns_by_atomics:
            d_columns = d_cols_acc[:N1].to(columns.dtype) if need_c else None
            d_extra_columns = d_cols_acc[N1:].to(extra_columns.dtype) if need_x else None
    if deterministic and (need_c or need_x):
        meta = blocks["bwd_c"]
        splits, split_rows = blocks["splits"]["bwd_c"]
        d_columns = torch.empty_like(columns)
        d_extra_columns = torch.empty_like(extra_columns) if extra_columns is not None else None
        partials = torch.empty(splits, N, D, **f32) if splits > 1 else None
        launch(_contrastive_bwd_columns_kernel, (triton.cdiv(N, meta["BLOCK_N"]), d_slices, splits),
            *inputs,
            partials if partials is not None else d_columns, None if partials is not None else d_extra_columns,
            M, N1, N, D, split_rows,
            *strides,
            SPLIT=partials is not None, **meta, **common,
        )
        if partials is not None:
            _sum_splits(partials, d_columns, d_extra_columns, sms)
    return (d_anchors, d_columns if need_c else None, d_extra_columns if need_x else None, scale_partials,
            d_extra if need_e else None)


# --------------------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------------------
class ContrastiveRowLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, columns, extra_columns, logit_scale, targets, extra_logits, blocks, deterministic):
        # Rows 16-byte aligned and a multiple of 16 wide (zero-padded: the dots are unchanged), so every kernel
        # loads vectors; ptxas reports spills for the scalar loads of a ragged D or a misaligned slice otherwise.
        ctx.width = anchors.shape[1]
        anchors, columns, extra_columns = (aligned_rows(t, padded_width(ctx.width))
                                           for t in (anchors, columns, extra_columns))
        targets, extra_logits = contiguous(targets, extra_logits)
        scale = scalar_arg(logit_scale, anchors.device)
        loss, stats = contrastive_forward(anchors, columns, extra_columns, scale, targets, extra_logits, blocks)
        ctx.save_for_backward(anchors, columns, extra_columns, scale, targets, extra_logits, stats)
        ctx.logit_scale = logit_scale if isinstance(logit_scale, torch.Tensor) else None
        ctx.blocks = blocks
        ctx.deterministic = deterministic
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        anchors, columns, extra_columns, scale, targets, extra_logits, stats = ctx.saved_tensors
        need = tuple(needs_grad(ctx, i) for i in (0, 1, 2, 3, 5))
        grad = grad_loss.to(torch.float32).contiguous()
        d_anchors, d_columns, d_extra_columns, partials, d_extra = contrastive_backward(
            anchors, columns, extra_columns, scale, targets, extra_logits, stats, grad, ctx.blocks,
            ctx.deterministic, need)
        if anchors.shape[1] != ctx.width:      # drop the padding columns
            d_anchors, d_columns, d_extra_columns = (None if g is None else g[:, :ctx.width].contiguous()
                                                     for g in (d_anchors, d_columns, d_extra_columns))
        return (d_anchors, d_columns, d_extra_columns, scalar_grad(partials, ctx.logit_scale, need[3]), None,
                d_extra, None, None)


def contrastive_row_loss(
    anchors: torch.Tensor,
    columns: torch.Tensor,
    logit_scale: Scalar,
    targets: torch.Tensor,
    extra_logits: Optional[torch.Tensor] = None,
    extra_columns: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    *,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    block_d: Optional[int] = None,
    block_do: Optional[int] = None,
    splits: Optional[int] = None,
) -> torch.Tensor:
    """Per-row softmax cross-entropy of ``s · anchors · [columns; extra_columns]ᵀ`` (see
    ``reference.contrastive_row_loss``).

    anchors [M, D], columns [N1, D], extra_columns [N2, D] or None (a second column source, read in place: no
    concatenation; column index N1 + j is extra_columns[j]), targets [M] long (column index or −1 = the extra
    logit), extra_logits [M] or None. Returns [M] float32. ``deterministic=False`` accumulates ∂columns with
    float32 atomics in the ∂anchors kernel (one recompute fewer, run-to-run bitwise differences). ``block_*``
    override the tile sizes (powers of two, rounded up to 16; tests use small ones); ``splits`` the number of
    parts each kernel's streamed axis is split into (default: enough for two waves of CTAs on the GPU).
    """
    if anchors.dim() != 2 or columns.dim() != 2 or anchors.shape[1] != columns.shape[1]:
        raise ValueError(f"anchors [M, D] and columns [N, D] expected, got {tuple(anchors.shape)} and "
                         f"{tuple(columns.shape)}")
    if extra_columns is not None and (extra_columns.dim() != 2 or extra_columns.shape[1] != columns.shape[1]
                                      or extra_columns.dtype != columns.dtype):
        raise ValueError(f"extra_columns [N2, D] of the columns' dtype expected, got {tuple(extra_columns.shape)} "
                         f"{extra_columns.dtype}")
    if targets.shape != anchors.shape[:1] or (extra_logits is not None and extra_logits.shape != targets.shape):
        raise ValueError("targets (and extra_logits) must have shape [M]")
    M, D = anchors.shape
    N = columns.shape[0] + (extra_columns.shape[0] if extra_columns is not None else 0)
    if N == 0 and extra_logits is None:
        raise ValueError("contrastive_row_loss needs at least one column or an extra logit per row")
    blocks = _blocks(M, N, padded_width(D), block_m, block_n, block_d, block_do, deterministic,
                     device_arch(anchors), sm_count(anchors), splits)
    return ContrastiveRowLoss.apply(anchors, columns, extra_columns, logit_scale, targets, extra_logits, blocks,
                                    deterministic)
