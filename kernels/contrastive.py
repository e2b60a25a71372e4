"""Multi-negative contrastive loss (CLIP, NegCLIP, CE-CLIP IMC rows) with an online log-sum-exp.

Forward (per row m of the anchors; s = logit_scale, e = extra_logits, t = targets)::

    x_mn   = s ⟨a_m, c_n⟩                                   logits, never written to memory
    lse_m  = log( [exp(e_m)] + Σ_n exp(x_mn) )              online, one column tile at a time
    loss_m = lse_m − (x_{m,t_m}  if t_m ≥ 0  else  e_m)

Backward (g_m = ∂L/∂loss_m, p_mn = exp(x_mn − lse_m) recomputed from the saved lse, G_mn = g_m (p_mn − 1[n = t_m]))::

    ∂L/∂a_m  = s Σ_n G_mn c_n
    ∂L/∂c_n  = s Σ_m G_mn a_m
    ∂L/∂s    = Σ_m Σ_n G_mn ⟨a_m, c_n⟩ = Σ_m ⟨a_m, Σ_n G_mn c_n⟩
    ∂L/∂e_m  = g_m (exp(e_m − lse_m) − 1[t_m = −1])

Shapes: anchors [M, D], columns [N1, D], extra_columns [N2, D] or None (a second column source, read in place:
the logical columns are [columns; extra_columns], N = N1 + N2; NegCLIP passes texts and negatives.flatten(0, 1)
so that the [B + BK, D] concatenation is never copied), targets [M] long (column index in [0, N), or −1 for the
extra logit, which then must be given), extra_logits [M] or None, logit_scale 0-d tensor or Python float (no
gradient then). Output: [M] float32. Gradients come back per source, in each input's dtype.

Passes (GEMM-equivalents of M·N·D multiply-adds, per direction, forward + backward):

* forward: one kernel, grid over row blocks; each program streams every column tile, recomputes its
  [BLOCK_M, BLOCK_N] logits tile over D in BLOCK_D slices (pipelined loads) and folds it into a running max /
  sum. Saves lse [M]. 1 GEMM.
* backward, deterministic (default; no atomics, every output element has exactly one writer):
  ``dA`` — grid (row blocks × output slices): recompute the tile, G, then acc += G @ C[:, slice]; it also writes
  ∂e and one ∂s partial per program. ``dC`` — grid (column blocks × output slices): recompute, acc += Gᵀ A.
  The output slice is the whole D for D ≤ 1024 (FULL_D), held as one or two power-of-two accumulators
  (768 = 512 + 256), so each kernel recomputes once: 2 + 2 GEMMs, **5 passes in all** (plus the padding of the
  slice to a power of two, none at 512 / 768 / 1024). Beyond 1024, slices of 1024, each repeating the recompute.
* backward, ``deterministic=False``: one kernel; the dA programs also add Gᵀ A of their tile into a float32
  ∂C buffer with atomics (as flash attention's dQ): 1 recompute + 2 gradient GEMMs, **4 passes in all**; the
  float-add order varies run to run.

Memory: besides inputs and gradients, lse [M] float32 and the ∂s partials (one float per dA program): O(M + N).
The [M, N] logits matrix is never materialised. The atomic path adds a float32 [N, D] ∂C buffer (cast per source
at the end). Each backward accumulator is [rows, slice] float32 over 8 warps (64 rows up to 512 wide, 32 rows up
to 1024): about 128 registers a thread for the accumulator alone.

Numerics: tl.dot receives its operands in the storage dtype when the inputs are fp16/bf16 (products exact,
accumulation in float32); float32 inputs use TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set (PyTorch's
rule), else "ieee"; the interpreter always runs float32 "ieee" (it cannot multiply bf16). The gradient GEMMs
take G rounded to the dot dtype, and at real sizes G = g·(p − 1) is tiny (g = 1/2B ≈ 1.5e-5, p ≈ 1e-6 … 1e-1):
fp16 would flush or denormalise it (normal min 6.1e-5). **Rule:** G is multiplied by the power of two
σ = 2^(14 − ceil(log2 max|g|)) before the cast (so |σG| ≤ 2^14 < 65504 and every |G| ≥ 2^-28·max|g| stays a
normal fp16 number), and the float32 accumulator is multiplied by s/σ; σ is computed on the device (no sync) and,
being a power of two, adds no rounding. The same rule runs for bf16 and float32, where it is harmless.
tests/kernels/test_kernel_contrastive_numerics.py checks this sequence at B = 32,768, K = 4, D = 512, s = 100.
Targets are not range-checked (that would need a device sync): an index outside [−1, N) gives a meaningless row.

Limits: any M, N ≥ 1, D ≥ 1 (masking handles non powers of two); offsets are int64; requested blocks are powers of
two, rounded up to 16 (smaller tl.dot blocks do not compile on a GPU). Inputs are made contiguous once on the host
(a copy for non-contiguous views). Register fit (ptxas -v, bf16 and fp16, B = 32,768, 163,840 columns, D = 512 /
768 / 1024, default tiles, ``_blocks``): no spills on sm_90 for any kernel; on sm_80 none for the deterministic
path, while the opt-in atomic dA kernel spills 8 B at D = 512 / 768 and 108 B at D = 1024. The backward kernels
use ~250 registers × 256 threads, i.e. one CTA per SM; the forward ~121 (sm_90), two.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from ._common import (device_arch, Scalar, block_size, contiguous, dot_config, launch, needs_grad,
                      scalar_arg, scalar_grad)


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_cols(c_ptr, x_ptr, cols, offs_d, N1, N, D, stride_c, stride_x, TRANS: tl.constexpr):
    """Rows ``cols`` of the logical column matrix [C; X] (rows < N1 from C, the rest from X), one D slice, in the
    storage dtype, 0 where masked: [len(cols), len(offs_d)], or its transpose when TRANS. Two predicated loads
    with disjoint masks; adding them is exact (one of the two is 0)."""
    in_c = cols < N1
    in_x = (cols >= N1) & (cols < N)
    x_row = tl.where(in_x, cols - N1, 0)
    d_ok = offs_d < D
    if TRANS:
        c = tl.load(c_ptr + cols[None, :] * stride_c + offs_d[:, None], mask=in_c[None, :] & d_ok[:, None], other=0.0)
        x = tl.load(x_ptr + x_row[None, :] * stride_x + offs_d[:, None], mask=in_x[None, :] & d_ok[:, None],
                    other=0.0)
    else:
        c = tl.load(c_ptr + cols[:, None] * stride_c + offs_d[None, :], mask=in_c[:, None] & d_ok[None, :], other=0.0)
        x = tl.load(x_ptr + x_row[:, None] * stride_x + offs_d[None, :], mask=in_x[:, None] & d_ok[None, :],
                    other=0.0)
    return c + x


@triton.jit
def _store_cols(dc_ptr, dx_ptr, cols, offs_d, N1, N, D, value):
    """Store a [len(cols), len(offs_d)] tile of the gradient of [C; X] into the two (contiguous) gradients."""
    in_c = cols < N1
    in_x = (cols >= N1) & (cols < N)
    x_row = tl.where(in_x, cols - N1, 0)
    d_ok = offs_d < D
    tl.store(dc_ptr + cols[:, None] * D + offs_d[None, :], value.to(dc_ptr.dtype.element_ty),
             mask=in_c[:, None] & d_ok[None, :])
    tl.store(dx_ptr + x_row[:, None] * D + offs_d[None, :], value.to(dx_ptr.dtype.element_ty),
             mask=in_x[:, None] & d_ok[None, :])


@triton.jit
def _logit_dots(a_ptr, c_ptr, x_ptr, rows, cols, M, N1, N, D, stride_a, stride_c, stride_x,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr):
    """⟨a_m, c_n⟩ for one tile over the whole D in BLOCK_D slices (pipelined loads): [BLOCK_M, BLOCK_N] float32."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_ok = rows < M
    for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(a_ptr + rows[:, None] * stride_a + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)                  # [BLOCK_M, BLOCK_D]
        c = _load_cols(c_ptr, x_ptr, cols, offs_d, N1, N, D, stride_c, stride_x, True)         # [BLOCK_D, BLOCK_N]
        acc = tl.dot(a.to(DOT_DTYPE), c.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _contrastive_fwd_kernel(
    anchors_ptr, columns_ptr, extra_cols_ptr, scale_ptr, targets_ptr, extra_ptr,     # inputs
    loss_ptr, lse_ptr,                                                               # outputs [M] float32
    M, N1, N, D,                                                                     # shapes (N = N1 + N2)
    stride_a, stride_c, stride_x,                                                    # row strides
    HAS_EXTRA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)          # [BLOCK_M]
    row_valid = rows < M
    scale = tl.load(scale_ptr).to(tl.float32)
    target = tl.load(targets_ptr + rows, mask=row_valid, other=-1).to(tl.int64)     # [BLOCK_M]
    if HAS_EXTRA:
        extra = tl.load(extra_ptr + rows, mask=row_valid, other=0.0).to(tl.float32)
        running_max = extra
        running_sum = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
        target_logit = tl.where(target == -1, extra, 0.0)
    else:
        running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)                              # [BLOCK_N]
        dots = _logit_dots(anchors_ptr, columns_ptr, extra_cols_ptr, rows, cols, M, N1, N, D,
                           stride_a, stride_c, stride_x, BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, PRECISION, STAGES)
        logits = tl.where(cols[None, :] < N, scale * dots, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + \
            tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], logits, 0.0), axis=1)
    lse = running_max + tl.log(running_sum)
    tl.store(lse_ptr + rows, lse, mask=row_valid)
    tl.store(loss_ptr + rows, lse - target_logit, mask=row_valid)


@triton.jit
def _grad_coef_tile(
    anchors_ptr, columns_ptr, extra_cols_ptr, targets_ptr, lse_ptr, grad_ptr, scale, grad_scale,
    rows, cols,                                        # [BLOCK_M], [BLOCK_N] int64
    M, N1, N, D, stride_a, stride_c, stride_x,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
):
    """σ·G = σ g_m (p_mn − 1[n = t_m]) for one tile, recomputed from the saved lse, already rounded to the dot
    dtype: [BLOCK_M, BLOCK_N], 0 on padding, and the tile's Σ σG·⟨a, c⟩ (float32 scalar). σ = ``grad_scale`` is the
    power of two that keeps σ·G in the normal range of fp16 (see the module docstring); the caller divides its
    float32 accumulators by σ."""
    row_valid = rows < M
    target = tl.load(targets_ptr + rows, mask=row_valid, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_valid, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=row_valid, other=0.0) * grad_scale            # 0 on padding rows
    dots = _logit_dots(anchors_ptr, columns_ptr, extra_cols_ptr, rows, cols, M, N1, N, D,
                       stride_a, stride_c, stride_x, BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, PRECISION, STAGES)
    prob = tl.where((cols < N)[None, :], tl.exp(scale * dots - lse[:, None]), 0.0)
    coef = grad[:, None] * (prob - (cols[None, :] == target[:, None]).to(tl.float32))
    # Σ σG_mn ⟨a_m, c_n⟩ over the tile: σ·∂s from the float32 G and the dots already on chip (no epilogue reload
    # of the anchors, whose [rows, D] float32 copy would not fit next to the accumulator).
    return coef.to(DOT_DTYPE), tl.sum(tl.sum(coef * dots, 1), 0)


@triton.jit
def _contrastive_bwd_anchors_kernel(
    anchors_ptr, columns_ptr, extra_cols_ptr, scale_ptr, grad_scale_ptr,             # inputs
    targets_ptr, extra_ptr, lse_ptr, grad_ptr,
    d_anchors_ptr, d_extra_ptr, scale_partials_ptr, d_cols_acc_ptr,                  # outputs
    M, N1, N, D,                                                                     # shapes
    stride_a, stride_c, stride_x,                                                    # row strides
    HAS_EXTRA: tl.constexpr, ATOMIC_DC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, BLOCK_DO2: tl.constexpr, HAS_DO2: tl.constexpr, SLICE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
):
    """∂A for BLOCK_M rows and one output slice of SLICE = BLOCK_DO (+ BLOCK_DO2) columns of D (the whole D when
    D ≤ 1024). ATOMIC_DC: also add Gᵀ A for the same slice into the float32 ∂C buffer with atomics."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                                    # [BLOCK_M]
    row_valid = rows < M
    offs_1 = pid_d * SLICE + tl.arange(0, BLOCK_DO)                                   # [BLOCK_DO]
    offs_2 = pid_d * SLICE + BLOCK_DO + tl.arange(0, BLOCK_DO2)                       # [BLOCK_DO2]
    scale = tl.load(scale_ptr).to(tl.float32)
    grad_scale = tl.load(grad_scale_ptr)
    unscale = scale / grad_scale
    acc1 = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)                            # σ Σ_n G_mn c_n[slice]
    acc2 = tl.zeros((BLOCK_M, BLOCK_DO2), dtype=tl.float32)
    partial = 0.0                                                                     # σ·∂s of these rows
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        coef, tile_partial = _grad_coef_tile(anchors_ptr, columns_ptr, extra_cols_ptr, targets_ptr, lse_ptr, grad_ptr, scale,
                               grad_scale, rows, cols, M, N1, N, D, stride_a, stride_c, stride_x,
                               BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, PRECISION, STAGES)
        partial += tile_partial
        c1 = _load_cols(columns_ptr, extra_cols_ptr, cols, offs_1, N1, N, D, stride_c, stride_x, False)
        acc1 = tl.dot(coef, c1.to(DOT_DTYPE), acc1, input_precision=PRECISION)
        if HAS_DO2:
            c2 = _load_cols(columns_ptr, extra_cols_ptr, cols, offs_2, N1, N, D, stride_c, stride_x, False)
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
    tl.store(d_anchors_ptr + rows[:, None] * D + offs_1[None, :],
             (unscale * acc1).to(d_anchors_ptr.dtype.element_ty), mask=row_valid[:, None] & (offs_1 < D)[None, :])
    if HAS_DO2:
        tl.store(d_anchors_ptr + rows[:, None] * D + offs_2[None, :],
                 (unscale * acc2).to(d_anchors_ptr.dtype.element_ty), mask=row_valid[:, None] & (offs_2 < D)[None, :])
    # Every output slice recomputed the same G: the first one reports the partial, the others 0.
    tl.store(scale_partials_ptr + pid_m * tl.num_programs(1) + pid_d, tl.where(pid_d == 0, partial / grad_scale, 0.0))
    if HAS_EXTRA:
        target = tl.load(targets_ptr + rows, mask=row_valid, other=-1).to(tl.int64)
        lse = tl.load(lse_ptr + rows, mask=row_valid, other=0.0)
        grad = tl.load(grad_ptr + rows, mask=row_valid, other=0.0)
        extra = tl.load(extra_ptr + rows, mask=row_valid, other=0.0).to(tl.float32)
        d_extra = grad * (tl.exp(extra - lse) - (target == -1).to(tl.float32))
        tl.store(d_extra_ptr + rows, d_extra.to(d_extra_ptr.dtype.element_ty), mask=row_valid & (pid_d == 0))


@triton.jit
def _contrastive_bwd_columns_kernel(
    anchors_ptr, columns_ptr, extra_cols_ptr, scale_ptr, grad_scale_ptr, targets_ptr, lse_ptr, grad_ptr,  # inputs
    d_columns_ptr, d_extra_cols_ptr,                                      # outputs [N1, D], [N − N1, D]
    M, N1, N, D,                                                          # shapes
    stride_a, stride_c, stride_x,                                         # row strides
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, BLOCK_DO2: tl.constexpr, HAS_DO2: tl.constexpr, SLICE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
):
    """∂C for BLOCK_N columns (of either source) and one output slice of D; one writer per element."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                                    # [BLOCK_N]
    offs_1 = pid_d * SLICE + tl.arange(0, BLOCK_DO)
    offs_2 = pid_d * SLICE + BLOCK_DO + tl.arange(0, BLOCK_DO2)
    scale = tl.load(scale_ptr).to(tl.float32)
    grad_scale = tl.load(grad_scale_ptr)
    acc1 = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)                            # σ Σ_m G_mn a_m[slice]
    acc2 = tl.zeros((BLOCK_N, BLOCK_DO2), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        coef, _ = _grad_coef_tile(anchors_ptr, columns_ptr, extra_cols_ptr, targets_ptr, lse_ptr, grad_ptr, scale,
                                  grad_scale, rows, cols, M, N1, N, D, stride_a, stride_c, stride_x,
                                  BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, PRECISION, STAGES)
        a1 = tl.load(anchors_ptr + rows[:, None] * stride_a + offs_1[None, :],
                     mask=(rows < M)[:, None] & (offs_1 < D)[None, :], other=0.0)      # [BLOCK_M, BLOCK_DO]
        acc1 = tl.dot(tl.trans(coef), a1.to(DOT_DTYPE), acc1, input_precision=PRECISION)
        if HAS_DO2:
            a2 = tl.load(anchors_ptr + rows[:, None] * stride_a + offs_2[None, :],
                         mask=(rows < M)[:, None] & (offs_2 < D)[None, :], other=0.0)
            acc2 = tl.dot(tl.trans(coef), a2.to(DOT_DTYPE), acc2, input_precision=PRECISION)
    unscale = scale / grad_scale
    _store_cols(d_columns_ptr, d_extra_cols_ptr, cols, offs_1, N1, N, D, unscale * acc1)
    if HAS_DO2:
        _store_cols(d_columns_ptr, d_extra_cols_ptr, cols, offs_2, N1, N, D, unscale * acc2)


# --------------------------------------------------------------------------------------------------------------
# Host launchers (no autograd)
# --------------------------------------------------------------------------------------------------------------
FULL_D = 1024          # widest D whose gradient accumulator stays on chip in one piece (see the docstring)


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
            arch: int = 90) -> dict:
    """Tile sizes of the kernels: {"fwd": …, "bwd_a": …, "bwd_c": …, "out": the output-D slice}.

    Chosen so that every kernel compiles without register spills for bf16/fp16 on sm_80 and sm_90 at D ≤ 1024
    (ptxas -v; see "Register fit" in the module docstring). The backward accumulator is [rows, SLICE] float32 over
    8 warps, 64 rows up to SLICE = 512 (128 registers a thread), 32 rows beyond (≤ 1024 wide, again ≤ 128); the
    streamed dimension (columns in dA, anchors in dC) is narrow, 32 (16 beyond SLICE = 768), since its
    [streamed, SLICE] operand tile is what pushes a kernel past 255 registers; the dC recompute reads D in slices
    of 32. The atomic dA kernel also holds a [streamed, SLICE] float32 Gᵀ A tile: half the rows, streamed 16.
    ``arch``: compute capability ×10 of the device (90 on the CPU / interpreter)."""
    out = _out_slices(D, block_do)
    wide = out["SLICE"] > 512
    if deterministic:
        acc_rows, streamed = (32, 16 if out["SLICE"] > 768 else 32) if wide else (64, 32)
        if arch < 90:                  # mma.sync (sm_80) needs more registers than wgmma for the same dA tiles
            streamed_a = 16
        else:
            streamed_a = streamed
    else:
        acc_rows, streamed = (16 if wide else 32), 16
        streamed_a = streamed
    return dict(
        fwd=dict(BLOCK_M=block_size(block_m, M, 128), BLOCK_N=block_size(block_n, N, 64),
                 BLOCK_D=block_size(block_d, D, 64)),
        bwd_a=dict(BLOCK_M=block_size(block_m, M, acc_rows), BLOCK_N=block_size(block_n, N, streamed_a),
                   BLOCK_D=block_size(block_d, D, 64)),
        bwd_c=dict(BLOCK_M=block_size(block_m, M, streamed), BLOCK_N=block_size(block_n, N, acc_rows),
                   BLOCK_D=block_size(block_d, D, 32)),
        out=out,
    )


STAGES = 3             # software-pipelining depth of the D loop of every logits recompute
NUM_WARPS = 8


def _dot_config(*tensors):
    return dot_config(*tensors, follow_tf32=True)


def grad_scale_of(grad: torch.Tensor) -> torch.Tensor:
    """σ = 2^(14 − ceil(log2 max|g|)), a 1-element float32 device tensor (no host sync). Since |p − 1[n = t]| ≤ 1,
    |σ·G| ≤ 2^14 < 65504 (fp16 max), and σ·G stays a normal fp16 number down to |G| = 2^-28 · max|g|."""
    peak = grad.abs().amax().reshape(1).clamp(min=2.0 ** -100, max=2.0 ** 100)
    return torch.exp2(14.0 - torch.ceil(torch.log2(peak)))


def contrastive_forward(anchors, columns, extra_columns, scale, targets, extra, blocks):
    """(loss [M], lse [M]) float32; all tensors contiguous, ``scale`` a 1-element float32 tensor; the columns are
    [columns; extra_columns] (extra_columns may be None)."""
    M, D = anchors.shape
    N1 = columns.shape[0]
    second = extra_columns if extra_columns is not None else columns
    N = N1 + (extra_columns.shape[0] if extra_columns is not None else 0)
    loss = torch.empty(M, dtype=torch.float32, device=anchors.device)
    lse = torch.empty_like(loss)
    dot_dtype, precision = _dot_config(anchors, columns, second)
    meta = blocks["fwd"]
    launch(_contrastive_fwd_kernel, (triton.cdiv(M, meta["BLOCK_M"]),),
        anchors, columns, second, scale, targets, extra if extra is not None else lse,
        loss, lse,
        M, N1, N, D,
        anchors.stride(0), columns.stride(0), second.stride(0),
        HAS_EXTRA=extra is not None, **meta,
        DOT_DTYPE=dot_dtype, PRECISION=precision, STAGES=STAGES, num_warps=NUM_WARPS,
    )
    return loss, lse


def contrastive_backward(anchors, columns, extra_columns, scale, targets, extra, lse, grad, blocks,
                         deterministic: bool = True):
    """(d_anchors, d_columns, d_extra_columns or None, d_scale_partials, d_extra or None); grad [M] float32."""
    M, D = anchors.shape
    N1 = columns.shape[0]
    second = extra_columns if extra_columns is not None else columns
    N = N1 + (extra_columns.shape[0] if extra_columns is not None else 0)
    dot_dtype, precision = _dot_config(anchors, columns, second)
    grad_scale = grad_scale_of(grad)
    d_anchors = torch.empty_like(anchors)
    d_extra = torch.empty_like(extra) if extra is not None else None
    out = blocks["out"]
    d_slices = triton.cdiv(D, out["SLICE"])
    meta_a = blocks["bwd_a"]
    grid_a = (triton.cdiv(M, meta_a["BLOCK_M"]), d_slices)
    scale_partials = torch.empty(grid_a[0] * grid_a[1], dtype=torch.float32, device=anchors.device)
    common = dict(**out, DOT_DTYPE=dot_dtype, PRECISION=precision, STAGES=STAGES, num_warps=NUM_WARPS)
    # The atomic path accumulates ∂[C; X] in one float32 buffer (the atomics need it), cast per source at the end.
    d_cols_acc = torch.zeros((N, D), dtype=torch.float32, device=anchors.device) if not deterministic else lse
    launch(_contrastive_bwd_anchors_kernel, grid_a,
        anchors, columns, second, scale, grad_scale, targets, extra if extra is not None else lse, lse, grad,
        d_anchors, d_extra if d_extra is not None else lse, scale_partials, d_cols_acc,
        M, N1, N, D,
        anchors.stride(0), columns.stride(0), second.stride(0),
        HAS_EXTRA=extra is not None, ATOMIC_DC=not deterministic, **meta_a, **common,
    )
    if deterministic:
        d_columns = torch.empty_like(columns)
        d_extra_columns = torch.empty_like(extra_columns) if extra_columns is not None else None
        meta_c = blocks["bwd_c"]
        launch(_contrastive_bwd_columns_kernel, (triton.cdiv(N, meta_c["BLOCK_N"]), d_slices),
            anchors, columns, second, scale, grad_scale, targets, lse, grad,
            d_columns, d_extra_columns if d_extra_columns is not None else d_columns,
            M, N1, N, D,
            anchors.stride(0), columns.stride(0), second.stride(0),
            **meta_c, **common,
        )
    else:
        d_columns = d_cols_acc[:N1].to(columns.dtype)
        d_extra_columns = d_cols_acc[N1:].to(extra_columns.dtype) if extra_columns is not None else None
    return d_anchors, d_columns, d_extra_columns, scale_partials, d_extra


# --------------------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------------------
class ContrastiveRowLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, columns, extra_columns, logit_scale, targets, extra_logits, blocks, deterministic):
        anchors, columns, extra_columns, targets, extra_logits = contiguous(
            anchors, columns, extra_columns, targets, extra_logits)
        scale = scalar_arg(logit_scale, anchors.device)
        loss, lse = contrastive_forward(anchors, columns, extra_columns, scale, targets, extra_logits, blocks)
        ctx.save_for_backward(anchors, columns, extra_columns, scale, targets, extra_logits, lse)
        ctx.logit_scale = logit_scale if isinstance(logit_scale, torch.Tensor) else None
        ctx.blocks = blocks
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        anchors, columns, extra_columns, scale, targets, extra_logits, lse = ctx.saved_tensors
        grad = grad_loss.to(torch.float32).contiguous()
        d_anchors, d_columns, d_extra_columns, partials, d_extra = contrastive_backward(
            anchors, columns, extra_columns, scale, targets, extra_logits, lse, grad, ctx.blocks,
            ctx.deterministic)
        return (
            d_anchors if needs_grad(ctx, 0) else None,
            d_columns if needs_grad(ctx, 1) else None,
            d_extra_columns if needs_grad(ctx, 2) else None,
            scalar_grad(partials, ctx.logit_scale, needs_grad(ctx, 3)),
            None,
            d_extra if needs_grad(ctx, 5) else None,
            None,
            None,
        )


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
) -> torch.Tensor:
    """Per-row softmax cross-entropy of ``s · anchors · [columns; extra_columns]ᵀ`` (see
    ``reference.contrastive_row_loss``).

    anchors [M, D], columns [N1, D], extra_columns [N2, D] or None (a second column source, read in place: no
    concatenation; column index N1 + j is extra_columns[j]), targets [M] long (column index or −1 = the extra
    logit), extra_logits [M] or None. Returns [M] float32. ``deterministic=False`` accumulates ∂columns with
    float32 atomics in the ∂anchors kernel (one recompute fewer, run-to-run bitwise differences). ``block_*``
    override the tile sizes (powers of two, rounded up to 16; tests use small ones).
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
    blocks = _blocks(M, N, D, block_m, block_n, block_d, block_do, deterministic, device_arch(anchors))
    return ContrastiveRowLoss.apply(anchors, columns, extra_columns, logit_scale, targets, extra_logits, blocks,
                                    deterministic)
