"""Grouped contrast: each anchor against its own positive and its own K negatives (DeGLA IGC / TGC, CE-CLIP CMR).

Forward (row i; s = logit_scale)::

    pos_i   = s ⟨a_i, p_i⟩                                 ``grouped_scores`` -> (pos [B], neg [B, K])
    neg_ik  = s ⟨a_i, n_ik⟩
    lse_i   = log( exp(pos_i) + Σ_k exp(neg_ik) )
    loss_i  = lse_i − pos_i                                ``grouped_contrast_row_loss`` -> [B]

The loss is computed as loss_i = (top_i − pos_i) + λ_i, top_i the row maximum and λ_i = lse_i − top_i =
log1p(expm1(pos_i − top_i) + Σ_k exp(neg_ik − top_i)): an exact 0 + log1p(…) when the positive dominates, so a
near-zero loss keeps float32's relative precision (a log-sum-exp rounded near |pos| ≈ 100 would not). The loss
saves λ; the backward recomputes top from the saved scores.

Backward, with per-row coefficients γ_i (of the positive) and γ_ik (of the negatives):

    scores:  γ_i = ∂L/∂pos_i,                         γ_ik = ∂L/∂neg_ik
    loss:    γ_i = g_i expm1(pos_i − top_i − λ_i) = g_i (p_i − 1),  γ_ik = g_i exp(neg_ik − top_i − λ_i)
             (g_i = ∂L/∂loss_i; every γ keeps float32's relative precision, the dominant score's included)

    ∂L/∂a_i  = s (γ_i p_i + Σ_k γ_ik n_ik)
    ∂L/∂p_i  = s γ_i a_i
    ∂L/∂n_ik = s γ_ik a_i
    ∂L/∂s    = Σ_i (γ_i ⟨a_i, p_i⟩ + Σ_k γ_ik ⟨a_i, n_ik⟩)      scores
             = Σ_i Σ_k γ_ik ⟨a_i, n_ik − p_i⟩                    loss (γ_i = −Σ_k γ_ik: no cancellation as p_i → 1)

(the dots are re-accumulated in the backward's D loop, so s = 0 needs no division).

Shapes: anchors [B, D], positives [B, D], negatives [B, K, D]; logit_scale 0-d tensor or Python float.
Outputs float32; gradients in each input's dtype.

Passes: one program per row, D walked in BLOCK_D slices, the row's K negatives as one [BLOCK_K, BLOCK_D] tile.
Forward reads the row's (K + 2)·D inputs once and writes K + 1 scores (+ the loss and λ); the loss saves its
scores ([B] + [B, K] floats, no more than ``grouped_scores`` returns) and λ [B] so the backward is a single pass
too: it reads the (K + 2)·D inputs and K + 2 saved floats once, writes the (K + 2)·D gradients and one ∂s partial
per row (summed on the host). Memory-bound: no tl.dot (K is small). Gradients an input does not need are not
written (HAS_D*; frozen negatives save K·D of the 2·(K + 2)·D element moves of a row).

Limits: any B, K ≥ 1, D ≥ 1; BLOCK_K = next_pow2(K), so a very large K (thousands) would spill — the layouts
this serves have K ≤ 16. Inputs are made contiguous once on the host.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from ._common import (Scalar, _expm1, _log1p, block_size, contiguous, launch, needs_grad, scalar_arg,
                      scalar_grad)


@triton.jit
def _grouped_fwd_kernel(
    anchors_ptr, positives_ptr, negatives_ptr, scale_ptr,    # inputs [B, D], [B, D], [B, K, D], [1]
    pos_ptr, neg_ptr, loss_ptr, lam_ptr,                      # outputs [B], [B, K], loss and λ [B] (or None) float32
    K, D,                                                     # shapes
    WITH_LOSS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_valid = offs_k < K
    pos_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    neg_acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_valid = offs_d < D
        anchor = tl.load(anchors_ptr + row * D + offs_d, mask=d_valid, other=0.0).to(tl.float32)        # [BLOCK_D]
        positive = tl.load(positives_ptr + row * D + offs_d, mask=d_valid, other=0.0).to(tl.float32)    # [BLOCK_D]
        negative = tl.load(negatives_ptr + (row * K + offs_k[:, None]) * D + offs_d[None, :],
                           mask=k_valid[:, None] & d_valid[None, :], other=0.0).to(tl.float32)     # [BLOCK_K, BLOCK_D]
        pos_acc += anchor * positive
        neg_acc += negative * anchor[None, :]
    scale = tl.load(scale_ptr).to(tl.float32)
    pos = scale * tl.sum(pos_acc, axis=0)
    neg = scale * tl.sum(neg_acc, axis=1)                                                        # [BLOCK_K]
    tl.store(pos_ptr + row, pos)
    tl.store(neg_ptr + row * K + offs_k, neg, mask=k_valid)
    if WITH_LOSS:
        neg = tl.where(k_valid, neg, float("-inf"))
        top = tl.maximum(pos, tl.max(neg, axis=0))
        lam = _log1p(_expm1(pos - top) + tl.sum(tl.exp(neg - top), axis=0))          # lse − top
        tl.store(loss_ptr + row, (top - pos) + lam)
        tl.store(lam_ptr + row, lam)


@triton.jit
def _grouped_bwd_kernel(
    anchors_ptr, positives_ptr, negatives_ptr, scale_ptr,     # inputs
    grad_pos_ptr, grad_neg_ptr,                                # scores: ∂L/∂pos [B], ∂L/∂neg [B, K]; loss: saved pos, neg
    grad_loss_ptr, lam_ptr,                                    # loss only (else None): ∂L/∂loss [B], saved λ [B]
    d_anchors_ptr, d_positives_ptr, d_negatives_ptr, scale_partials_ptr,  # outputs (None where not needed)
    K, D,                                                      # shapes
    FROM_LOSS: tl.constexpr, HAS_DA: tl.constexpr, HAS_DP: tl.constexpr, HAS_DN: tl.constexpr,
    HAS_DS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_valid = offs_k < K
    coef_pos = tl.load(grad_pos_ptr + row).to(tl.float32)
    coef_neg = tl.load(grad_neg_ptr + row * K + offs_k, mask=k_valid, other=0.0).to(tl.float32)  # [BLOCK_K]
    if FROM_LOSS:
        grad = tl.load(grad_loss_ptr + row)
        lam = tl.load(lam_ptr + row)
        top = tl.maximum(coef_pos, tl.max(tl.where(k_valid, coef_neg, float("-inf")), axis=0))  # as the forward's
        coef_neg = tl.where(k_valid, grad * tl.exp((coef_neg - top) - lam), 0.0)
        coef_pos = grad * _expm1((coef_pos - top) - lam)                    # g (p − 1), exact as p → 1
    scale = tl.load(scale_ptr).to(tl.float32)
    dot_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)          # Σ_d of the ∂s integrand (module docstring)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_valid = offs_d < D
        tile = k_valid[:, None] & d_valid[None, :]
        anchor = tl.load(anchors_ptr + row * D + offs_d, mask=d_valid, other=0.0).to(tl.float32)        # [BLOCK_D]
        positive = tl.load(positives_ptr + row * D + offs_d, mask=d_valid, other=0.0).to(tl.float32)    # [BLOCK_D]
        negative = tl.load(negatives_ptr + (row * K + offs_k[:, None]) * D + offs_d[None, :],
                           mask=tile, other=0.0).to(tl.float32)                                    # [BLOCK_K, BLOCK_D]
        if HAS_DS:
            if FROM_LOSS:
                dot_acc += anchor * tl.sum(coef_neg[:, None] * (negative - positive[None, :]), axis=0)
            else:
                dot_acc += anchor * (coef_pos * positive + tl.sum(coef_neg[:, None] * negative, axis=0))
        if HAS_DA:
            pull = coef_pos * positive + tl.sum(coef_neg[:, None] * negative, axis=0)              # [BLOCK_D]
            tl.store(d_anchors_ptr + row * D + offs_d, (scale * pull).to(d_anchors_ptr.dtype.element_ty),
                     mask=d_valid)
        if HAS_DP:
            tl.store(d_positives_ptr + row * D + offs_d,
                     (scale * coef_pos * anchor).to(d_positives_ptr.dtype.element_ty), mask=d_valid)
        if HAS_DN:
            tl.store(d_negatives_ptr + (row * K + offs_k[:, None]) * D + offs_d[None, :],
                     (scale * coef_neg[:, None] * anchor[None, :]).to(d_negatives_ptr.dtype.element_ty), mask=tile)
    if HAS_DS:
        tl.store(scale_partials_ptr + row, tl.sum(dot_acc, axis=0))


# --------------------------------------------------------------------------------------------------------------
# Host launchers (no autograd)
# --------------------------------------------------------------------------------------------------------------
def _meta(K: int, D: int, block_d: Optional[int]) -> dict:
    return dict(BLOCK_K=block_size(None, K, 1 << 30, floor=2), BLOCK_D=block_size(block_d, D, 256))


def grouped_forward(anchors, positives, negatives, scale, with_loss: bool, block_d=None):
    """(pos [B], neg [B, K], loss [B] | None, λ = lse − top [B] | None) float32, from contiguous inputs."""
    B, K, D = negatives.shape
    f32 = dict(dtype=torch.float32, device=anchors.device)
    pos, neg = torch.empty(B, **f32), torch.empty(B, K, **f32)
    loss, lam = (torch.empty(B, **f32), torch.empty(B, **f32)) if with_loss else (None, None)
    launch(_grouped_fwd_kernel, (B,),
           anchors, positives, negatives, scale,
           pos, neg, loss, lam,
           K, D,
           WITH_LOSS=with_loss, **_meta(K, D, block_d))
    return pos, neg, loss, lam


def grouped_backward(anchors, positives, negatives, scale, grad_pos, grad_neg, grad_loss=None, lam=None,
                     block_d=None, need=(True,) * 4):
    """(d_anchors, d_positives, d_negatives, d_scale_partials [B]); ``need``: which of (anchors, positives,
    negatives, logit_scale) want a gradient (the others come back None, the partials empty, and are not written).

    Scores mode: ``grad_pos`` [B], ``grad_neg`` [B, K] are the upstream gradients. Loss mode (``grad_loss`` given):
    ``grad_pos`` / ``grad_neg`` are the saved scores and ``lam`` the saved λ.
    """
    B, K, D = negatives.shape
    need_a, need_p, need_n, need_s = need
    d_anchors = torch.empty_like(anchors) if need_a else None
    d_positives = torch.empty_like(positives) if need_p else None
    d_negatives = torch.empty_like(negatives) if need_n else None
    scale_partials = torch.empty(B if need_s else 0, dtype=torch.float32, device=anchors.device)
    if need_a or need_p or need_n or need_s:
        launch(_grouped_bwd_kernel, (B,),
               anchors, positives, negatives, scale,
               grad_pos, grad_neg,
               grad_loss, lam,
               d_anchors, d_positives, d_negatives, scale_partials if need_s else None,
               K, D,
               FROM_LOSS=grad_loss is not None, HAS_DA=need_a, HAS_DP=need_p, HAS_DN=need_n, HAS_DS=need_s,
               **_meta(K, D, block_d))
    return d_anchors, d_positives, d_negatives, scale_partials


def _grads(ctx, d_anchors, d_positives, d_negatives, scale_partials):
    return (d_anchors, d_positives, d_negatives, scalar_grad(scale_partials, ctx.logit_scale, needs_grad(ctx, 3)),
            None)


def _need(ctx):
    return tuple(needs_grad(ctx, i) for i in range(3)) + (needs_grad(ctx, 3) and ctx.logit_scale is not None,)


def _prepare(ctx, anchors, positives, negatives, logit_scale):
    if anchors.dim() != 2 or negatives.dim() != 3 or positives.shape != anchors.shape or \
            negatives.shape[0] != anchors.shape[0] or negatives.shape[2] != anchors.shape[1]:
        raise ValueError(f"anchors [B, D], positives [B, D], negatives [B, K, D] expected, got "
                         f"{tuple(anchors.shape)}, {tuple(positives.shape)}, {tuple(negatives.shape)}")
    anchors, positives, negatives = contiguous(anchors, positives, negatives)
    ctx.logit_scale = logit_scale if isinstance(logit_scale, torch.Tensor) else None
    return anchors, positives, negatives, scalar_arg(logit_scale, anchors.device)


# --------------------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------------------
class GroupedScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, positives, negatives, logit_scale, block_d):
        anchors, positives, negatives, scale = _prepare(ctx, anchors, positives, negatives, logit_scale)
        pos, neg, _, _ = grouped_forward(anchors, positives, negatives, scale, False, block_d)
        ctx.save_for_backward(anchors, positives, negatives, scale)
        ctx.block_d = block_d
        return pos, neg

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pos, grad_neg):
        anchors, positives, negatives, scale = ctx.saved_tensors
        B, K, _ = negatives.shape
        grad_pos = torch.zeros(B, device=anchors.device) if grad_pos is None else grad_pos.float().contiguous()
        grad_neg = torch.zeros(B, K, device=anchors.device) if grad_neg is None else grad_neg.float().contiguous()
        return _grads(ctx, *grouped_backward(anchors, positives, negatives, scale, grad_pos, grad_neg,
                                             block_d=ctx.block_d, need=_need(ctx)))


class GroupedContrastRowLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, positives, negatives, logit_scale, block_d):
        anchors, positives, negatives, scale = _prepare(ctx, anchors, positives, negatives, logit_scale)
        pos, neg, loss, lam = grouped_forward(anchors, positives, negatives, scale, True, block_d)
        ctx.save_for_backward(anchors, positives, negatives, scale, pos, neg, lam)
        ctx.block_d = block_d
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        anchors, positives, negatives, scale, pos, neg, lam = ctx.saved_tensors
        return _grads(ctx, *grouped_backward(anchors, positives, negatives, scale, pos, neg,
                                             grad_loss.float().contiguous(), lam, block_d=ctx.block_d,
                                             need=_need(ctx)))


def grouped_scores(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    logit_scale: Scalar,
    *,
    block_d: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(s⟨a_i, p_i⟩ [B], s⟨a_i, n_ik⟩ [B, K]) float32 (see ``reference.grouped_scores``)."""
    return GroupedScores.apply(anchors, positives, negatives, logit_scale, block_d)


def grouped_contrast_row_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    logit_scale: Scalar,
    *,
    block_d: Optional[int] = None,
) -> torch.Tensor:
    """Per-row −log softmax([s⟨a_i,p_i⟩, s⟨a_i,n_i1⟩ … s⟨a_i,n_iK⟩])[0], [B] float32 (IGC, TGC)."""
    return GroupedContrastRowLoss.apply(anchors, positives, negatives, logit_scale, block_d)
