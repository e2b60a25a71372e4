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

Shapes: anchors [M, D], columns [N, D], targets [M] long (column index, or −1 for the extra logit, which then
must be given), extra_logits [M] or None, logit_scale 0-d tensor or Python float (no gradient then).
Output: [M] float32. Gradients come back in each input's dtype.

Passes (GEMM-equivalents of M·N·D multiply-adds):

* forward: one kernel, grid over row blocks; each program streams every column tile, recomputes its
  [BLOCK_M, BLOCK_N] logits tile over D in BLOCK_D slices and folds it into a running max / sum. Saves lse [M].
  1 GEMM.
* backward: two kernels, both deterministic (no atomics; every output element has exactly one writer).
  ``dA`` — grid (row blocks × output D slices of BLOCK_DO): recompute the tile, G, then acc += G @ C[:, slice];
  it also writes ∂e and one ∂s partial per program (Σ ⟨a, acc⟩ over its slice; summed on the host).
  ``dC`` — grid (column blocks × output D slices): recompute the transposed tile, acc += Gᵀ @ A[:, slice].
  1 + 1 GEMMs of recompute and 1 + 1 of gradient, i.e. 4 GEMMs when D ≤ BLOCK_DO; each further D slice
  repeats the recompute (cost ceil(D / BLOCK_DO) recomputes per kernel), the price of holding only a
  [BLOCK, BLOCK_DO] accumulator on chip for any D. Atomics would save one recompute but make gradients
  run-to-run nondeterministic.

Memory: besides inputs and gradients, lse [M] float32 and the ∂s partials (one float per dA program):
O(M + N). The [M, N] logits matrix is never materialised. Traffic per forward program: its anchor rows once per
column tile (L1/L2-resident) plus every column once.

Numerics: tiles are loaded and converted to float32 at once; tl.dot receives its operands in the storage
dtype when the inputs are fp16/bf16 (products are exact, accumulation in float32; G is rounded to that dtype
for the gradient GEMMs, as flash attention does) and in float32 ("ieee", no TF32) for float32 inputs and under
the interpreter (which cannot multiply bf16). Targets are not range-checked (that would need a device sync):
an index outside [−1, N) gives a meaningless row.

Limits: any M, N ≥ 1, D ≥ 1 (masking handles non powers of two); offsets are int64. Inputs are made contiguous
once on the host (a copy for non-contiguous views).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from ._common import (Scalar, _dot_tile, _load_rows, block_size, contiguous, dot_config, launch, needs_grad,
                      scalar_arg, scalar_grad)


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _contrastive_fwd_kernel(
    anchors_ptr, columns_ptr, scale_ptr, targets_ptr, extra_ptr,    # inputs
    loss_ptr, lse_ptr,                                              # outputs [M] float32
    M, N, D,                                                        # shapes
    stride_a, stride_c,                                             # row strides
    HAS_EXTRA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
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
        dots = _dot_tile(anchors_ptr, columns_ptr, rows, cols, M, N, D, stride_a, stride_c,
                         BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, PRECISION)            # [BLOCK_M, BLOCK_N]
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
    anchors_ptr, columns_ptr, targets_ptr, lse_ptr, grad_ptr, scale,
    rows, cols,                                        # [BLOCK_M], [BLOCK_N] int64
    M, N, D, stride_a, stride_c,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """G = g_m (p_mn − 1[n = t_m]) for one tile, recomputed from the saved lse: [BLOCK_M, BLOCK_N], 0 on padding."""
    row_valid = rows < M
    target = tl.load(targets_ptr + rows, mask=row_valid, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_valid, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=row_valid, other=0.0)                         # 0 on padding rows
    dots = _dot_tile(anchors_ptr, columns_ptr, rows, cols, M, N, D, stride_a, stride_c,
                     BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, PRECISION)                # [BLOCK_M, BLOCK_N]
    prob = tl.where((cols < N)[None, :], tl.exp(scale * dots - lse[:, None]), 0.0)
    return grad[:, None] * (prob - (cols[None, :] == target[:, None]).to(tl.float32))


@triton.jit
def _contrastive_bwd_anchors_kernel(
    anchors_ptr, columns_ptr, scale_ptr, targets_ptr, extra_ptr, lse_ptr, grad_ptr,  # inputs
    d_anchors_ptr, d_extra_ptr, scale_partials_ptr,                                  # outputs
    M, N, D,                                                                         # shapes
    stride_a, stride_c,                                                              # row strides
    HAS_EXTRA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                                    # [BLOCK_M]
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)                                # [BLOCK_DO]
    scale = tl.load(scale_ptr).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)                             # Σ_n G_mn c_n[slice]
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        coef = _grad_coef_tile(anchors_ptr, columns_ptr, targets_ptr, lse_ptr, grad_ptr, scale, rows, cols,
                               M, N, D, stride_a, stride_c, BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, PRECISION)
        cols_out = _load_rows(columns_ptr, cols, offs_o, N, D, stride_c)              # [BLOCK_N, BLOCK_DO]
        acc = tl.dot(coef.to(DOT_DTYPE), cols_out.to(DOT_DTYPE), acc, input_precision=PRECISION)
    anchors_out = _load_rows(anchors_ptr, rows, offs_o, M, D, stride_a)               # [BLOCK_M, BLOCK_DO]
    tl.store(scale_partials_ptr + pid_m * tl.num_programs(1) + pid_d, tl.sum(tl.sum(acc * anchors_out, 1), 0))
    row_valid = rows < M
    tl.store(d_anchors_ptr + rows[:, None] * D + offs_o[None, :], (scale * acc).to(d_anchors_ptr.dtype.element_ty),
             mask=row_valid[:, None] & (offs_o < D)[None, :])
    if HAS_EXTRA:
        target = tl.load(targets_ptr + rows, mask=row_valid, other=-1).to(tl.int64)
        lse = tl.load(lse_ptr + rows, mask=row_valid, other=0.0)
        grad = tl.load(grad_ptr + rows, mask=row_valid, other=0.0)
        extra = tl.load(extra_ptr + rows, mask=row_valid, other=0.0).to(tl.float32)
        d_extra = grad * (tl.exp(extra - lse) - (target == -1).to(tl.float32))
        tl.store(d_extra_ptr + rows, d_extra.to(d_extra_ptr.dtype.element_ty), mask=row_valid & (pid_d == 0))


@triton.jit
def _contrastive_bwd_columns_kernel(
    anchors_ptr, columns_ptr, scale_ptr, targets_ptr, lse_ptr, grad_ptr,  # inputs
    d_columns_ptr,                                                        # output [N, D]
    M, N, D,                                                              # shapes
    stride_a, stride_c,                                                   # row strides
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                                    # [BLOCK_N]
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)                                # [BLOCK_DO]
    scale = tl.load(scale_ptr).to(tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)                             # Σ_m G_mn a_m[slice]
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        coef = _grad_coef_tile(anchors_ptr, columns_ptr, targets_ptr, lse_ptr, grad_ptr, scale, rows, cols,
                               M, N, D, stride_a, stride_c, BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, PRECISION)
        anchors_out = _load_rows(anchors_ptr, rows, offs_o, M, D, stride_a)           # [BLOCK_M, BLOCK_DO]
        acc = tl.dot(tl.trans(coef).to(DOT_DTYPE), anchors_out.to(DOT_DTYPE), acc, input_precision=PRECISION)
    tl.store(d_columns_ptr + cols[:, None] * D + offs_o[None, :], (scale * acc).to(d_columns_ptr.dtype.element_ty),
             mask=(cols < N)[:, None] & (offs_o < D)[None, :])


# --------------------------------------------------------------------------------------------------------------
# Host launchers (no autograd)
# --------------------------------------------------------------------------------------------------------------
def _blocks(M: int, N: int, D: int, block_m, block_n, block_d, block_do) -> dict:
    return dict(
        BLOCK_M=block_size(block_m, M, 64),
        BLOCK_N=block_size(block_n, N, 64),
        BLOCK_D=block_size(block_d, D, 64),
        BLOCK_DO=block_size(block_do, D, 256),
    )


def contrastive_forward(anchors, columns, scale, targets, extra, blocks) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss [M], lse [M]) float32; all tensors contiguous, ``scale`` a 1-element float32 tensor."""
    M, D = anchors.shape
    N = columns.shape[0]
    loss = torch.empty(M, dtype=torch.float32, device=anchors.device)
    lse = torch.empty_like(loss)
    dot_dtype, precision = dot_config(anchors, columns)
    launch(_contrastive_fwd_kernel, (triton.cdiv(M, blocks["BLOCK_M"]),),
        anchors, columns, scale, targets, extra if extra is not None else lse,
        loss, lse,
        M, N, D,
        anchors.stride(0), columns.stride(0),
        HAS_EXTRA=extra is not None,
        BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"], BLOCK_D=blocks["BLOCK_D"],
        DOT_DTYPE=dot_dtype, PRECISION=precision,
    )
    return loss, lse


def contrastive_backward(anchors, columns, scale, targets, extra, lse, grad, blocks):
    """(d_anchors, d_columns, d_scale_partials, d_extra or None); grad [M] float32 contiguous."""
    M, D = anchors.shape
    N = columns.shape[0]
    dot_dtype, precision = dot_config(anchors, columns)
    d_anchors = torch.empty_like(anchors)
    d_columns = torch.empty_like(columns)
    d_extra = torch.empty_like(extra) if extra is not None else None
    d_slices = triton.cdiv(D, blocks["BLOCK_DO"])
    grid_a = (triton.cdiv(M, blocks["BLOCK_M"]), d_slices)
    scale_partials = torch.empty(grid_a[0] * grid_a[1], dtype=torch.float32, device=anchors.device)
    # 8 warps: the [BLOCK, BLOCK_DO] float32 accumulator is 64 KiB at the default 64 × 256.
    common = dict(BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"], BLOCK_D=blocks["BLOCK_D"],
                  BLOCK_DO=blocks["BLOCK_DO"], DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=8)
    launch(_contrastive_bwd_anchors_kernel, grid_a,
        anchors, columns, scale, targets, extra if extra is not None else lse, lse, grad,
        d_anchors, d_extra if d_extra is not None else lse, scale_partials,
        M, N, D,
        anchors.stride(0), columns.stride(0),
        HAS_EXTRA=extra is not None, **common,
    )
    grid_c = (triton.cdiv(N, blocks["BLOCK_N"]), d_slices)
    launch(_contrastive_bwd_columns_kernel, grid_c,
        anchors, columns, scale, targets, lse, grad,
        d_columns,
        M, N, D,
        anchors.stride(0), columns.stride(0),
        **common,
    )
    return d_anchors, d_columns, scale_partials, d_extra


# --------------------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------------------
class ContrastiveRowLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, columns, logit_scale, targets, extra_logits, blocks):
        anchors, columns, targets, extra_logits = contiguous(anchors, columns, targets, extra_logits)
        scale = scalar_arg(logit_scale, anchors.device)
        loss, lse = contrastive_forward(anchors, columns, scale, targets, extra_logits, blocks)
        ctx.save_for_backward(anchors, columns, scale, targets, extra_logits, lse)
        ctx.logit_scale = logit_scale if isinstance(logit_scale, torch.Tensor) else None
        ctx.blocks = blocks
        ctx.mark_non_differentiable(lse)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        anchors, columns, scale, targets, extra_logits, lse = ctx.saved_tensors
        grad = grad_loss.to(torch.float32).contiguous()
        d_anchors, d_columns, partials, d_extra = contrastive_backward(
            anchors, columns, scale, targets, extra_logits, lse, grad, ctx.blocks)
        return (
            d_anchors if needs_grad(ctx, 0) else None,
            d_columns if needs_grad(ctx, 1) else None,
            scalar_grad(partials, ctx.logit_scale, needs_grad(ctx, 2)),
            None,
            d_extra if needs_grad(ctx, 4) else None,
            None,
        )


def contrastive_row_loss(
    anchors: torch.Tensor,
    columns: torch.Tensor,
    logit_scale: Scalar,
    targets: torch.Tensor,
    extra_logits: Optional[torch.Tensor] = None,
    *,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    block_d: Optional[int] = None,
    block_do: Optional[int] = None,
) -> torch.Tensor:
    """Per-row softmax cross-entropy of ``s · anchors · columnsᵀ`` (see ``reference.contrastive_row_loss``).

    anchors [M, D], columns [N, D], targets [M] long (column index or −1 = the extra logit), extra_logits [M]
    or None. Returns [M] float32. ``block_*`` override the tile sizes (powers of two; tests use small ones).
    """
    if anchors.dim() != 2 or columns.dim() != 2 or anchors.shape[1] != columns.shape[1]:
        raise ValueError(f"anchors [M, D] and columns [N, D] expected, got {tuple(anchors.shape)} and "
                         f"{tuple(columns.shape)}")
    if targets.shape != anchors.shape[:1] or (extra_logits is not None and extra_logits.shape != targets.shape):
        raise ValueError("targets (and extra_logits) must have shape [M]")
    M, D = anchors.shape
    N = columns.shape[0]
    if N == 0 and extra_logits is None:
        raise ValueError("contrastive_row_loss needs at least one column or an extra logit per row")
    blocks = _blocks(M, N, D, block_m, block_n, block_d, block_do)
    return ContrastiveRowLoss.apply(anchors, columns, logit_scale, targets, extra_logits, blocks)
