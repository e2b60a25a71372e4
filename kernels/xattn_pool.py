"""Cross-modal (concept → visual token) attention pooling and the fused C2LIP XAC loss.

Forward, for image i (tokens u_il, l < L) and concept p (c_p); T = temperature, s = logit_scale, b = logit_bias::

    r_pl  = ⟨c_p, u_il⟩                      raw dots             a_pl = softmax_l(r_pl / T)
    w_p   = Σ_l a_pl u_il                     pooled               n_p  = max(‖w_p‖, ε),  v̂_p = w_p / n_p
    concept_attention_pool -> v̂ [B, P, D] (float32)
    z_p   = s ⟨v̂_p, c_p⟩ + b,  y_p = +1 if owner[p] == image_offset + i else −1
    xac_loss_sum -> Σ_i Σ_p softplus(−y_p z_p) = Σ −log σ(y z)          (0-d float32)

Backward, per pair, from the gradient reaching v̂_p (``dv_p``: the upstream [B, P, D] for the pooling op; for XAC
``dv_p = γ_p c_p`` with dz_p = −g y_p σ(−y_p z_p), γ_p = s dz_p, g = ∂L/∂loss)::

    q_p    = ⟨w_p, dv_p⟩ / n_p³   (0 where ‖w_p‖ ≤ ε: the clamped norm has no gradient)
    ∂w_p   = dv_p / n_p − q_p w_p                                         through the normalisation
    ∂a_pl  = ⟨∂w_p, u_il⟩ = e_pl / n_p − q_p h_pl,  e_pl = ⟨dv_p, u_il⟩, h_pl = ⟨w_p, u_il⟩
    ∂r_pl  = a_pl (∂a_pl − Σ_l' a_pl' ∂a_pl') / T                          through the softmax
    ∂u_il  = Σ_p (a_pl ∂w_p + ∂r_pl c_p)          (summed over the concepts of every image)
    ∂c_p   = Σ_i (Σ_l ∂r_pl u_il  [+ γ_p w_p / n_p for XAC, the direct path of z])
    ∂s     = Σ dz_p ⟨v̂_p, c_p⟩,   ∂b = Σ dz_p      (XAC; per-image partials summed on the host)

For XAC the [BP, L] quantities collapse: e = γ r and ⟨w, dv⟩ = γ ⟨w, c⟩, so nothing [B, P, D]-shaped is read
or written. ε = NORM_EPS = 1e-12 (F.normalize's clamp). The temperature is a Python float (no gradient);
``owner`` and ``image_offset`` are integers.

Shapes: tokens [B, L, D], concepts [P, D], owner [P] long; logit_scale / logit_bias 0-d tensors, floats or (bias)
None. Gradients come back in each input's dtype.

Passes (units of 2·B·P·L·D dot FLOPs; nDO = ⌈D / BLOCK_DO⌉). Every program handles one image against one block
of BLOCK_P concepts; its [BLOCK_P, BLOCK_L] scores, attention, h and e stay on chip; the image's tokens are
streamed in BLOCK_D slices. Per (image, concept block) the statistics take two D sweeps: r (then the softmax),
then w slice by slice for ‖w‖², ⟨w, c⟩ (and h, e in the backward).

* forward (one kernel, grid concept blocks × images, image on the slow axis so its L·D tokens stay in L2 while
  its concept blocks run): r + w = 2 passes. XAC writes one loss partial per program (summed on the host:
  B·⌈P/BLOCK_P⌉ floats); pooling makes a third sweep writing v̂ (its output, the only [B, P, D] tensor): 3.
* backward: two kernels, deterministic, no atomics, no partial tensors beyond B floats:
  ``d tokens`` — grid output D slices of BLOCK_DO × images; loops over concept blocks; accumulates
  Aᵀ ∂W + ∂Rᵀ C into an on-chip [BLOCK_L, BLOCK_DO] tile (and the ∂s, ∂b partials per image);
  ``d concepts`` — grid concept blocks × output D slices; loops over images; accumulates ∂R U (+ γ W / n) into
  [BLOCK_P, BLOCK_DO]. Each output D slice recomputes the statistics (r, w, h; pooling also e): 3·nDO + 3 and
  3·nDO + 1 passes (pooling 4·nDO + 3, 4·nDO + 1), the price of a bounded on-chip accumulator for any D.
* totals (XAC): 6·nDO + 6, i.e. 24 at D = 768 with BLOCK_DO = 256 (L ≤ 128) and 150 with BLOCK_DO = 32 (L > 128,
  the default with which both backward kernels compile without spills on sm_80 and sm_90 at L = 196, D = 768,
  per ``python -m compclip.kernels.aot``). The budget (docs/kernels.md) is 8: not met; the per-pair statistics are
  recomputed for every D slice. A redesign (L tiles with an online softmax, statistics kept across D slices) is
  still open.

Extra memory: O(B·⌈P/BLOCK_P⌉) floats; [B, P, D] is never materialised by XAC.

Limits. L is held in one tile (BLOCK_L = next_pow2(L) ≥ 16); shared memory and registers grow with it. Measured
with ptxas (bf16, 8 warps, default blocks, D ∈ {512, 768}): L ≤ 256 fits the shared memory of sm_80 and sm_90
(without spills since BLOCK_DO = 32 for L > 128; with BLOCK_DO = 64 the backward spilled ≈ 0.1–0.7 KB/thread); L in (256, 512] fits both with 1.7–6 KB/thread of
spills; L > 512 (BLOCK_L = 1024) needs 256 KB in the d-tokens kernel and does not launch on either. Concept
blocks are 16–32 rows, so the 16-bit dots of the statistics run as mma.sync on sm_90 (wgmma only in d tokens).
B ≤ 65,535 per call (images are grid axis 1).
The interpreter (CPU) runs any L, B, P ≥ 1 and D ≥ 1 (masking). Requested blocks must be powers of two ≥ 16
(tl.dot's smallest extent on a GPU). Inputs are made contiguous once on the host. tl.dot numerics as in
``contrastive.py``: 16-bit inputs feed their own dtype to tl.dot on a GPU (softmax, statistics and accumulators
in fp32; attention and gradient tiles are cast to the input dtype), fp32 inputs use tf32 on a GPU and ieee in
the interpreter (``_common.dot_config``). Underflow rule for fp16 operands: attention probabilities are ≤ 1 and
those below 2⁻²⁴ flush to 0, an absolute error ≤ 2⁻²⁴·L·max‖u‖ on w; XAC gradient tiles are formed for ∂L = 1
(|dz| < 1) and ∂L multiplies the fp32 accumulators after the dots, so loss scaling or a tiny ∂L cannot flush
them; pooling's ∂v̂ is cast as given (bf16 inputs have fp32's exponent range and need no rule).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from ._common import (Scalar, _dot_tile, _load_rows, block_size, contiguous, dot_config, launch, needs_grad,
                      scalar_arg, scalar_grad)

# F.normalize's clamp, v / max(‖v‖, NORM_EPS) (reference.NORM_EPS); also where q's gradient is cut off.
NORM_EPS: tl.constexpr = tl.constexpr(1e-12)


@triton.jit
def _pair_stats(
    tok_ptr, concepts_ptr, dv_ptr,         # one image's tokens [L, D]; concepts [P, D]; its ∂v̂ rows [P, D] (POOL_GRAD)
    cidx, lidx,                            # [BLOCK_P], [BLOCK_L] int64
    L, P, D, inv_temp,
    NEED_H: tl.constexpr, POOL_GRAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """(attn, r, ‖w‖², ⟨w,c⟩, h, ⟨w,dv⟩, e) for one image and one concept block; see the module docstring."""
    # [BLOCK_P, BLOCK_L] raw dots r = C Uᵀ
    raw = _dot_tile(concepts_ptr, tok_ptr, cidx, lidx, P, L, D, D, D, BLOCK_P, BLOCK_L, BLOCK_D, DOT_DTYPE, PRECISION)
    scores = tl.where((lidx < L)[None, :], raw * inv_temp, float("-inf"))
    attn = tl.exp(scores - tl.max(scores, axis=1)[:, None])
    attn = attn / tl.sum(attn, axis=1)[:, None]                                       # [BLOCK_P, BLOCK_L]
    norm_sq = tl.zeros((BLOCK_P,), dtype=tl.float32)
    w_dot_c = tl.zeros((BLOCK_P,), dtype=tl.float32)
    w_dot_dv = tl.zeros((BLOCK_P,), dtype=tl.float32)
    h = tl.zeros((BLOCK_P, BLOCK_L), dtype=tl.float32)                               # ⟨w_p, u_l⟩
    e = tl.zeros((BLOCK_P, BLOCK_L), dtype=tl.float32)                               # ⟨dv_p, u_l⟩
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        tok = _load_rows(tok_ptr, lidx, offs_d, L, D, D).to(DOT_DTYPE)                  # [BLOCK_L, BLOCK_D]
        concept = _load_rows(concepts_ptr, cidx, offs_d, P, D, D)                        # [BLOCK_P, BLOCK_D]
        pooled = tl.dot(attn.to(DOT_DTYPE), tok, input_precision=PRECISION)              # [BLOCK_P, BLOCK_D]
        norm_sq += tl.sum(pooled * pooled, axis=1)
        w_dot_c += tl.sum(pooled * concept, axis=1)
        if NEED_H:
            h = tl.dot(pooled.to(DOT_DTYPE), tl.trans(tok), h, input_precision=PRECISION)
        if POOL_GRAD:
            grad_v = _load_rows(dv_ptr, cidx, offs_d, P, D, D)                           # [BLOCK_P, BLOCK_D]
            w_dot_dv += tl.sum(pooled * grad_v, axis=1)
            e = tl.dot(grad_v.to(DOT_DTYPE), tl.trans(tok), e, input_precision=PRECISION)
    return attn, raw, norm_sq, w_dot_c, h, w_dot_dv, e


@triton.jit
def _xac_logit(norm_sq, w_dot_c, owner_ptr, cidx, P, image, scale, bias):
    """(z, y, valid) for one image and a concept block: z = s⟨v̂, c⟩ + b, y = ±1, valid = concept exists."""
    valid = cidx < P
    owner = tl.load(owner_ptr + cidx, mask=valid, other=-1).to(tl.int64)
    sign = tl.where(owner == image, 1.0, -1.0)
    logit = scale * w_dot_c / tl.maximum(tl.sqrt(norm_sq), NORM_EPS) + bias
    return logit, sign, valid


@triton.jit
def _pair_grads(
    tok_ptr, concepts_ptr, dv_ptr, owner_ptr, cidx, lidx, image,
    L, P, D, inv_temp, scale, bias,
    POOL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """(attn, ∂r, 1/n, q, γ, dz, ⟨v̂,c⟩) for one image and a concept block (γ, dz, ⟨v̂,c⟩ are 0 for pooling)."""
    attn, raw, norm_sq, w_dot_c, h, w_dot_dv, e = _pair_stats(
        tok_ptr, concepts_ptr, dv_ptr, cidx, lidx, L, P, D, inv_temp, True, POOL,
        BLOCK_P, BLOCK_L, BLOCK_D, DOT_DTYPE, PRECISION)
    norm = tl.sqrt(norm_sq)
    inv_n = 1.0 / tl.maximum(norm, NORM_EPS)
    cosine = w_dot_c * inv_n
    if POOL:
        gamma = tl.zeros((BLOCK_P,), dtype=tl.float32)
        dz = gamma
    else:
        logit, sign, valid = _xac_logit(norm_sq, w_dot_c, owner_ptr, cidx, P, image, scale, bias)
        dz = tl.where(valid, -sign * tl.sigmoid(-sign * logit), 0.0)        # per unit ∂L: |dz| < 1
        gamma = scale * dz
        w_dot_dv = gamma * w_dot_c
        e = gamma[:, None] * raw
    q = tl.where(norm > NORM_EPS, w_dot_dv * inv_n * inv_n * inv_n, 0.0)
    d_attn = e * inv_n[:, None] - q[:, None] * h                                      # [BLOCK_P, BLOCK_L]
    d_raw = attn * (d_attn - tl.sum(attn * d_attn, axis=1)[:, None]) * inv_temp
    return attn, d_raw, inv_n, q, gamma, dz, cosine


@triton.jit
def _xattn_fwd_kernel(
    tokens_ptr, concepts_ptr, owner_ptr, scale_ptr, bias_ptr,  # inputs
    out_ptr,                                                     # POOL: v̂ [B, P, D]; else loss partials [B, nP]
    L, P, D, inv_temp, image_offset,                             # shapes, scalars
    POOL: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_p = tl.program_id(0).to(tl.int64)     # concept block: fast axis, so one image's tokens stay in L2
    image = tl.program_id(1).to(tl.int64)
    cidx = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)                                    # [BLOCK_P]
    lidx = tl.arange(0, BLOCK_L).to(tl.int64)                                         # [BLOCK_L]
    tok_ptr = tokens_ptr + image * L * D
    attn, raw, norm_sq, w_dot_c, h, w_dot_dv, e = _pair_stats(
        tok_ptr, concepts_ptr, concepts_ptr, cidx, lidx, L, P, D, inv_temp, False, False,
        BLOCK_P, BLOCK_L, BLOCK_D, DOT_DTYPE, PRECISION)
    if POOL:
        inv_n = 1.0 / tl.maximum(tl.sqrt(norm_sq), NORM_EPS)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            tok = _load_rows(tok_ptr, lidx, offs_d, L, D, D)                             # [BLOCK_L, BLOCK_D]
            pooled = tl.dot(attn.to(DOT_DTYPE), tok.to(DOT_DTYPE), input_precision=PRECISION)
            tl.store(out_ptr + (image * P + cidx[:, None]) * D + offs_d[None, :], pooled * inv_n[:, None],
                     mask=(cidx < P)[:, None] & (offs_d < D)[None, :])
    else:
        scale = tl.load(scale_ptr).to(tl.float32)
        bias = tl.load(bias_ptr).to(tl.float32)
        logit, sign, valid = _xac_logit(norm_sq, w_dot_c, owner_ptr, cidx, P, image + image_offset, scale, bias)
        margin = -sign * logit                                 # −log σ(y z) = softplus(−y z), computed stably
        loss = tl.maximum(margin, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(margin)))
        tl.store(out_ptr + image * tl.num_programs(0) + pid_p, tl.sum(tl.where(valid, loss, 0.0), axis=0))


@triton.jit
def _xattn_bwd_tokens_kernel(
    tokens_ptr, concepts_ptr, owner_ptr, scale_ptr, bias_ptr, grad_ptr,   # inputs; grad: ∂v̂ [B,P,D] or ∂L [1]
    d_tokens_ptr, scale_partials_ptr, bias_partials_ptr,                  # outputs [B, L, D], [B], [B]
    L, P, D, inv_temp, image_offset,
    POOL: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_d = tl.program_id(0).to(tl.int64)     # output D slice: fast axis, so one image's tokens stay in L2
    image = tl.program_id(1).to(tl.int64)
    lidx = tl.arange(0, BLOCK_L).to(tl.int64)                                         # [BLOCK_L]
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)                                # [BLOCK_DO]
    tok_ptr = tokens_ptr + image * L * D
    dv_ptr = grad_ptr + image * P * D
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    # XAC: the gradient tiles are built for ∂L = 1 and the fp32 accumulators scaled by ∂L after the dots, so a
    # small upstream gradient cannot underflow a 16-bit dot operand (pooling's ∂v̂ goes in as it is).
    if POOL:
        grad_loss = 1.0
    else:
        grad_loss = tl.load(grad_ptr).to(tl.float32)
    tok_out = _load_rows(tok_ptr, lidx, offs_o, L, D, D).to(DOT_DTYPE)                # [BLOCK_L, BLOCK_DO]
    acc = tl.zeros((BLOCK_L, BLOCK_DO), dtype=tl.float32)                             # ∂u_l[slice]
    scale_acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        cidx = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        attn, d_raw, inv_n, q, gamma, dz, cosine = _pair_grads(
            tok_ptr, concepts_ptr, dv_ptr, owner_ptr, cidx, lidx, image + image_offset,
            L, P, D, inv_temp, scale, bias, POOL, BLOCK_P, BLOCK_L, BLOCK_D, DOT_DTYPE, PRECISION)
        concept_out = _load_rows(concepts_ptr, cidx, offs_o, P, D, D)                    # [BLOCK_P, BLOCK_DO]
        pooled_out = tl.dot(attn.to(DOT_DTYPE), tok_out, input_precision=PRECISION)      # [BLOCK_P, BLOCK_DO]
        if POOL:
            grad_v = _load_rows(dv_ptr, cidx, offs_o, P, D, D)
        else:
            grad_v = gamma[:, None] * concept_out
        d_pooled = grad_v * inv_n[:, None] - q[:, None] * pooled_out
        acc = tl.dot(tl.trans(attn).to(DOT_DTYPE), d_pooled.to(DOT_DTYPE), acc, input_precision=PRECISION)
        acc = tl.dot(tl.trans(d_raw).to(DOT_DTYPE), concept_out.to(DOT_DTYPE), acc, input_precision=PRECISION)
        scale_acc += dz * cosine
        bias_acc += dz
    tl.store(d_tokens_ptr + (image * L + lidx[:, None]) * D + offs_o[None, :],
             (acc * grad_loss).to(d_tokens_ptr.dtype.element_ty), mask=(lidx < L)[:, None] & (offs_o < D)[None, :])
    if not POOL:
        tl.store(scale_partials_ptr + image, tl.sum(scale_acc, axis=0) * grad_loss, mask=pid_d == 0)
        tl.store(bias_partials_ptr + image, tl.sum(bias_acc, axis=0) * grad_loss, mask=pid_d == 0)


@triton.jit
def _xattn_bwd_concepts_kernel(
    tokens_ptr, concepts_ptr, owner_ptr, scale_ptr, bias_ptr, grad_ptr,   # inputs
    d_concepts_ptr,                                                       # output [P, D]
    B, L, P, D, inv_temp, image_offset,
    POOL: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_p = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    cidx = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)                                    # [BLOCK_P]
    lidx = tl.arange(0, BLOCK_L).to(tl.int64)                                         # [BLOCK_L]
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)                                # [BLOCK_DO]
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    # XAC: the gradient tiles are built for ∂L = 1 and the fp32 accumulators scaled by ∂L after the dots, so a
    # small upstream gradient cannot underflow a 16-bit dot operand (pooling's ∂v̂ goes in as it is).
    if POOL:
        grad_loss = 1.0
    else:
        grad_loss = tl.load(grad_ptr).to(tl.float32)
    acc = tl.zeros((BLOCK_P, BLOCK_DO), dtype=tl.float32)                             # ∂c_p[slice]
    for image_i32 in range(0, B):
        image = pid_p * 0 + image_i32                  # int64 (a plain .to() fails on the interpreter's int)
        tok_ptr = tokens_ptr + image * L * D
        attn, d_raw, inv_n, q, gamma, dz, cosine = _pair_grads(
            tok_ptr, concepts_ptr, grad_ptr + image * P * D, owner_ptr, cidx, lidx, image + image_offset,
            L, P, D, inv_temp, scale, bias, POOL, BLOCK_P, BLOCK_L, BLOCK_D, DOT_DTYPE, PRECISION)
        tok_out = _load_rows(tok_ptr, lidx, offs_o, L, D, D).to(DOT_DTYPE)           # [BLOCK_L, BLOCK_DO]
        if POOL:
            direct = d_raw
        else:                                          # γ w / n = Σ_l (γ a_l / n) u_l: fold into one GEMM
            direct = d_raw + (gamma * inv_n)[:, None] * attn
        acc = tl.dot(direct.to(DOT_DTYPE), tok_out, acc, input_precision=PRECISION)
    tl.store(d_concepts_ptr + cidx[:, None] * D + offs_o[None, :],
             (acc * grad_loss).to(d_concepts_ptr.dtype.element_ty), mask=(cidx < P)[:, None] & (offs_o < D)[None, :])


# --------------------------------------------------------------------------------------------------------------
# Host launchers (no autograd)
# --------------------------------------------------------------------------------------------------------------
MIN_BLOCK = 16   # smallest tl.dot extent on a GPU


def _meta(tokens, concepts, block_p, block_d, block_do) -> dict:
    _, L, D = tokens.shape
    P = concepts.shape[0]
    dot_dtype, precision = dot_config(tokens, concepts)
    for name, requested in (("block_p", block_p), ("block_d", block_d), ("block_do", block_do)):
        if requested is not None and requested < MIN_BLOCK:
            raise ValueError(f"{name} must be >= {MIN_BLOCK} (tl.dot needs M, N, K >= 16 on a GPU), got {requested}")
    block_l = block_size(None, L, 1 << 30)
    long_l = block_l > 128
    # Six [BLOCK_P, BLOCK_L] float32 tiles live at once in the backward and the d-tokens accumulator is
    # [BLOCK_L, BLOCK_DO]: fewer concepts, thinner D slices for long L (BLOCK_DO=32 is what compiles without
    # spills on sm_80 and sm_90 at L=196, D=768 per the AOT gate; it costs 24 D slices, see the pass table).
    return dict(BLOCK_P=block_size(block_p, P, 16 if long_l else 32), BLOCK_L=block_l,
                BLOCK_D=block_size(block_d, D, 32 if long_l else 64),
                BLOCK_DO=block_size(block_do, D, 32 if long_l else 256),
                DOT_DTYPE=dot_dtype, PRECISION=precision)


def xattn_forward(tokens, concepts, owner, scale, bias, temperature, image_offset, pool: bool, meta):
    """POOL: v̂ [B, P, D] float32; else the loss partials [B, ⌈P/BLOCK_P⌉] float32 (sum them)."""
    B, L, D = tokens.shape
    P = concepts.shape[0]
    n_blocks = triton.cdiv(P, meta["BLOCK_P"])
    shape = (B, P, D) if pool else (B, n_blocks)
    out = torch.empty(shape, dtype=torch.float32, device=tokens.device)
    fwd_meta = {k: v for k, v in meta.items() if k != "BLOCK_DO"}
    launch(_xattn_fwd_kernel, (n_blocks, B),
           tokens, concepts, owner, scale, bias,
           out,
           L, P, D, 1.0 / temperature, image_offset,
           POOL=pool, num_warps=8, **fwd_meta)
    return out


def xattn_backward(tokens, concepts, owner, scale, bias, grad, temperature, image_offset, pool: bool, meta):
    """(d_tokens, d_concepts, d_scale_partials [B], d_bias_partials [B]); ``grad`` is ∂v̂ [B, P, D] float32
    (pooling) or ∂L as a 1-element float32 tensor (XAC)."""
    B, L, D = tokens.shape
    P = concepts.shape[0]
    d_tokens, d_concepts = torch.empty_like(tokens), torch.empty_like(concepts)
    partials = torch.zeros(2, B, dtype=torch.float32, device=tokens.device)
    d_slices = triton.cdiv(D, meta["BLOCK_DO"])
    common = (owner, scale, bias, grad)
    launch(_xattn_bwd_tokens_kernel, (d_slices, B),
           tokens, concepts, *common,
           d_tokens, partials[0], partials[1],
           L, P, D, 1.0 / temperature, image_offset,
           POOL=pool, num_warps=8, **meta)
    launch(_xattn_bwd_concepts_kernel, (triton.cdiv(P, meta["BLOCK_P"]), d_slices),
           tokens, concepts, *common,
           d_concepts,
           B, L, P, D, 1.0 / temperature, image_offset,
           POOL=pool, num_warps=8, **meta)
    return d_tokens, d_concepts, partials[0], partials[1]


def _check(tokens, concepts):
    if tokens.dim() != 3 or concepts.dim() != 2 or tokens.shape[2] != concepts.shape[1]:
        raise ValueError(f"tokens [B, L, D] and concepts [P, D] expected, got {tuple(tokens.shape)} and "
                         f"{tuple(concepts.shape)}")
    if tokens.shape[1] == 0:
        raise ValueError("attention pooling needs at least one token per image")


# --------------------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------------------
class ConceptAttentionPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, concepts, temperature, meta):
        tokens, concepts = contiguous(tokens, concepts)
        zero = scalar_arg(None, tokens.device)
        pooled = xattn_forward(tokens, concepts, zero, zero, zero, temperature, 0, True, meta)
        ctx.save_for_backward(tokens, concepts)
        ctx.temperature, ctx.meta = temperature, meta
        return pooled

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pooled):
        tokens, concepts = ctx.saved_tensors
        zero = scalar_arg(None, tokens.device)
        d_tokens, d_concepts, _, _ = xattn_backward(tokens, concepts, zero, zero, zero,
                                                    grad_pooled.float().contiguous(), ctx.temperature, 0, True,
                                                    ctx.meta)
        return (d_tokens if needs_grad(ctx, 0) else None, d_concepts if needs_grad(ctx, 1) else None, None, None)


class XACLossSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, concepts, owner, logit_scale, logit_bias, temperature, image_offset, meta):
        tokens, concepts, owner = contiguous(tokens, concepts, owner)
        scale, bias = scalar_arg(logit_scale, tokens.device), scalar_arg(logit_bias, tokens.device)
        partials = xattn_forward(tokens, concepts, owner, scale, bias, temperature, image_offset, False, meta)
        ctx.save_for_backward(tokens, concepts, owner, scale, bias)
        ctx.scalars = (logit_scale if isinstance(logit_scale, torch.Tensor) else None,
                       logit_bias if isinstance(logit_bias, torch.Tensor) else None)
        ctx.temperature, ctx.image_offset, ctx.meta = temperature, image_offset, meta
        return partials.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        tokens, concepts, owner, scale, bias = ctx.saved_tensors
        d_tokens, d_concepts, scale_partials, bias_partials = xattn_backward(
            tokens, concepts, owner, scale, bias, grad_loss.float().reshape(1), ctx.temperature, ctx.image_offset,
            False, ctx.meta)
        return (
            d_tokens if needs_grad(ctx, 0) else None,
            d_concepts if needs_grad(ctx, 1) else None,
            None,
            scalar_grad(scale_partials, ctx.scalars[0], needs_grad(ctx, 3)),
            scalar_grad(bias_partials, ctx.scalars[1], needs_grad(ctx, 4)),
            None, None, None,
        )


def concept_attention_pool(
    tokens: torch.Tensor,
    concepts: torch.Tensor,
    temperature: float = 1.0,
    *,
    block_p: Optional[int] = None,
    block_d: Optional[int] = None,
    block_do: Optional[int] = None,
) -> torch.Tensor:
    """normalize(Σ_l softmax_l(⟨u_il, c_p⟩ / T) u_il): tokens [B, L, D], concepts [P, D] -> [B, P, D] float32."""
    _check(tokens, concepts)
    meta = _meta(tokens, concepts, block_p, block_d, block_do)
    return ConceptAttentionPool.apply(tokens, concepts, float(temperature), meta)


def xac_loss_sum(
    tokens: torch.Tensor,
    concepts: torch.Tensor,
    owner: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Optional[Scalar] = None,
    temperature: float = 1.0,
    image_offset: int = 0,
    *,
    block_p: Optional[int] = None,
    block_d: Optional[int] = None,
    block_do: Optional[int] = None,
) -> torch.Tensor:
    """Σ_i Σ_p −log σ(y_ip (s⟨v̂_ip, c_p⟩ + b)) without materialising v̂ (see ``reference.xac_loss_sum``); 0-d float32."""
    _check(tokens, concepts)
    if owner.shape != concepts.shape[:1]:
        raise ValueError(f"owner must have shape [P] = {tuple(concepts.shape[:1])}, got {tuple(owner.shape)}")
    meta = _meta(tokens, concepts, block_p, block_d, block_do)
    return XACLossSum.apply(tokens, concepts, owner, logit_scale, logit_bias, float(temperature), int(image_offset),
                            meta)
