"""Cross-modal (concept → visual token) attention pooling and the fused C2LIP XAC loss.

Forward, for image i (tokens u_l, l < L) and concept p (c_p); T = temperature, s = logit_scale, b = logit_bias::

    r_pl  = ⟨c_p, u_l⟩                       raw dots             a_pl = softmax_l(r_pl / T)
    w_p   = Σ_l a_pl u_l                      pooled               n_p  = max(‖w_p‖, ε),  v̂_p = w_p / n_p
    concept_attention_pool -> v̂ [B, P, D] (float32)
    z_p   = s ⟨v̂_p, c_p⟩ + b,  y_p = +1 if owner[p] == image_offset + i else −1
    xac_loss_sum -> Σ_i Σ_p softplus(−y_p z_p) = Σ −log σ(y z)          (0-d float32)

**Two routes to the per-pair statistics** (``route=``; default ``choose_route``, the one with fewer passes).
With the image's Gram matrix G = U Uᵀ [L, L] (``G_ll' = ⟨u_l, u_l'⟩``)::

    ⟨w_p, c_p⟩ = Σ_l a_pl r_pl        ‖w_p‖² = Σ_l a_pl h_pl,   h_pl = ⟨w_p, u_l⟩ = (a_p G)_l

* "gram": nothing D-wide per pair is ever formed: R = C Uᵀ (one GEMM of 2·P·L·D per image), H = A G (2·P·L², L/D
  of a pass). Cheap while L is small against D and P (ViT-B/16: L = 196).
* "pooled": the chunk's pooled vectors W = A U [chunk, P, D] go into a workspace (‖w‖² from its float32 tiles,
  h = W Uᵀ): a flat pass each, whatever L (ViT-L/14 at 448 px: L = 1024).

Backward, per pair, from the gradient reaching v̂_p (``dv_p``: the upstream [B, P, D] for pooling; for XAC
``dv_p = γ_p c_p`` with dz_p = −y_p σ(−y_p z_p), γ_p = s dz_p, formed for ∂L = 1 and ∂L applied afterwards)::

    e_pl   = ⟨dv_p, u_l⟩  (XAC: γ_p r_pl)            ⟨w_p, dv_p⟩ = Σ_l a_pl e_pl  (XAC: γ_p ⟨w_p, c_p⟩)
    q_p    = ⟨w_p, dv_p⟩ / n_p³   (0 where ‖w_p‖ ≤ ε: the clamped norm has no gradient)
    ∂w_p   = dv_p / n_p − q_p w_p                                        through the normalisation
    ∂a_pl  = ⟨∂w_p, u_l⟩ = e_pl / n_p − q_p h_pl
    κ_p    = Σ_l a_pl ∂a_pl = ⟨w_p, dv_p⟩ / n_p − q_p ‖w_p‖²           closed form: no extra sweep over L
    ∂r_pl  = a_pl (∂a_pl − κ_p) / T                                      through the softmax
    X_pl   = ∂r_pl  [+ γ_p a_pl / n_p for XAC: the direct path of z through v̂ in ∂c]
    ∂U     = Xᵀ C  [+ (A / n)ᵀ dV for pooling]  −  (q A)ᵀ W,   (q A)ᵀ W = M U with M = Aᵀ diag(q) A [L, L]
    ∂C     = Σ_i X_i U_i
    ∂s     = Σ dz_p ⟨v̂_p, c_p⟩,   ∂b = Σ dz_p      (XAC; per-program partials summed on the host)

((q A)ᵀ W is the −q w part of ∂w carried back to the tokens: "gram" forms it as M U, without W.)

ε = NORM_EPS = 1e-12 (F.normalize's clamp). The temperature is a Python float (no gradient); ``owner`` and
``image_offset`` are integers. Shapes: tokens [B, L, D], concepts [P, D], owner [P] long; logit_scale /
logit_bias 0-d tensors, floats or (bias) None. Gradients come back in each input's dtype.

Kernels. Images are processed in **chunks** of ``chunk`` images (default: as many as fit WORKSPACE_BYTES); per
chunk the [P, L]-per-image quantities live in workspaces (R, X; pooling also E), and G, M ("gram") or W
("pooled"). All loops run over fixed tiles (BLOCK_P concepts × BLOCK_L tokens, D in BLOCK_D steps, outputs
BLOCK_DO wide), so shared memory and registers do not depend on L, P or D. Every grid puts the image on its slowest
axis, so one image's tokens (and G or W) stay in L2 while its concept blocks run.

* ``_xattn_gram_kernel``   G_i = U_i U_iᵀ ("gram")                                  L/P of a pass
* ``_xattn_pair_kernel``   grid (concept blocks × images). Sweep 1: R tiles (K = D) into the workspace, with an
  online log-sum-exp and ⟨w, c⟩ (forward) or the saved lse (backward, which then forms q and κ; pooling also
  E = dV Uᵀ). Sweep 2, per output token tile: h = A G (K = L) or W Uᵀ (K = D), then ‖w‖² and the loss (forward,
  "gram") or X (backward). Saves (lse, ‖w‖², ⟨w,c⟩) per pair: 3·B·P floats, all the backward needs besides the
  inputs. "pooled" runs the two sweeps of the backward as two launches around W.
* ``_xattn_pool_out_kernel`` A U (K = L): v̂ = A U / n (pooling's output), or Σ w² per slice, or W ("pooled") 1
* ``_xattn_mgram_kernel``  M_i = A_iᵀ diag(q_i) A_i (K = P) ("gram")                L/D
* ``_xattn_dtokens_kernel`` ∂U_i = X_iᵀ C − M_i U_i or − (q A)ᵀ W                  1 + L/P or 2
* ``_xattn_dconcepts_kernel`` ∂C += Σ_i X_i U_i (K = chunk·L), chunk after chunk   1

Passes (units of 2·B·P·L·D dot FLOPs), deterministic (every output element has one writer; the cross-chunk sum of
∂C is in chunk order; no atomics). XAC, "gram": forward 1 + L/D + L/P, backward 3 + 2·L/D + 2·L/P, **total
4 + 3·L/D + 3·L/P**: 5.0 at the C2LIP target (B = 768, P = 2304, L = 196, D = 768), 4.3 at L = 50, 7.0 at
L = 577. XAC, "pooled": forward 2 (R, W), backward 6 (R, W, h, Xᵀ C, (qA)ᵀ W, X U), **total 8** for any L; it is
chosen where 3·L/D + 3·L/P > 4 (L > 768 at D = 768, P = 2304), so XAC stays ≤ 8 passes up to any L. Pooling: 3
more passes than XAC on either route (its forward writes v̂, its backward reads dV twice).
``python -m compclip.kernels.passes`` counts them.

Extra memory: the chunk workspaces (≤ WORKSPACE_BYTES unless one image alone needs more) plus 3·B·P floats of
saved statistics, P·D float32 for the ∂C accumulator and the per-program partials. [B, P, D] is never formed by
XAC; [B, P, L] (and, on the "pooled" route, W) exists one chunk at a time.

Limits: any B, L, P ≥ 1 and D ≥ 1 (masking); images per chunk ≤ 65,535 (grid axis); offsets are int64. Requested
blocks must be powers of two ≥ 16 (tl.dot's smallest extent on a GPU). Inputs are made contiguous once on the
host. Numerics: 16-bit inputs feed their own dtype to tl.dot on a GPU, fp32 inputs use tf32 when
``torch.backends.cuda.matmul.allow_tf32`` is set, else "ieee" (``_common.dot_config``); workspaces, softmax and
accumulators are float32, and A, G, W, X, q·A, M are rounded to the dot dtype as they enter a dot (G, M, W and X
are stored in it: what a dot would round anyway). Underflow: attention
probabilities below fp16's 2⁻²⁴ flush to 0 (an absolute error ≤ 2⁻²⁴·L·max‖u‖ on w); XAC's X and M are formed
for ∂L = 1 and ∂L multiplies the float32 accumulators after the dots, so loss scaling or a tiny ∂L cannot flush
them. Overflow (fp16 only): q ∝ 1/n³, so pairs whose pooled vector nearly cancels (n ≲ 0.01 with unit tokens)
can exceed 65,504 in q·A or M; bf16 has fp32's range and no such limit.
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


# --------------------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _ws_tile(ws_ptr, b, rows, cols, P, L):
    """(tile, mask): rows × cols of image b of a chunk workspace [chunk, P, L] in its storage dtype, 0 where
    masked."""
    mask = (rows < P)[:, None] & (cols < L)[None, :]
    return tl.load(ws_ptr + (b * P + rows[:, None]) * L + cols[None, :], mask=mask, other=0.0), mask


@triton.jit
def _attn_tile(scores_ptr, b, rows, cols, P, L, lse, inv_temp):
    """(a, r): attention a = exp(r/T − lse) and the raw dots r for a tile of image b, 0 where masked."""
    raw, mask = _ws_tile(scores_ptr, b, rows, cols, P, L)
    return tl.where(mask, tl.exp(raw * inv_temp - lse[:, None]), 0.0), raw


@triton.jit
def _store_ws(ws_ptr, b, rows, cols, P, L, value):
    tl.store(ws_ptr + (b * P + rows[:, None]) * L + cols[None, :], value.to(ws_ptr.dtype.element_ty),
             mask=(rows < P)[:, None] & (cols < L)[None, :])


@triton.jit
def _xac_logit(norm_sq, w_dot_c, owner_ptr, cidx, P, image, scale, bias):
    """(z, y, valid) for one image and a concept block: z = s⟨v̂, c⟩ + b, y = ±1, valid = concept exists."""
    valid = cidx < P
    owner = tl.load(owner_ptr + cidx, mask=valid, other=-1).to(tl.int64)
    sign = tl.where(owner == image, 1.0, -1.0)
    logit = scale * w_dot_c / tl.maximum(tl.sqrt(norm_sq), NORM_EPS) + bias
    return logit, sign, valid


@triton.jit
def _inv_norm(stats_ptr, idx, ok, BP_TOTAL):
    """1 / max(‖w‖, ε) from the saved ‖w‖² (stats row 1)."""
    norm_sq = tl.load(stats_ptr + BP_TOTAL + idx, mask=ok, other=0.0)
    return 1.0 / tl.maximum(tl.sqrt(norm_sq), NORM_EPS)


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _xattn_gram_kernel(
    tokens_ptr, gram_ptr,                 # tokens [B, L, D]; G workspace [chunk, L, L] float32
    image0, L, D,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    b = tl.program_id(2).to(tl.int64)
    tok_ptr = tokens_ptr + (image0 + b) * L * D
    gram = _dot_tile(tok_ptr, tok_ptr, rows, cols, L, L, D, D, D, BLOCK_L, BLOCK_L, BLOCK_D, DOT_DTYPE, PRECISION)
    _store_ws(gram_ptr, b, rows, cols, L, L, gram)


@triton.jit
def _pair_scalars(stat, total, c_ok, owner_ptr, scale_ptr, bias_ptr, cidx, P, image, w_dot_dv,
                  POOL: tl.constexpr):
    """Backward per-pair scalars from the saved statistics: (1/n, γ, dz, ⟨v̂,c⟩, q, κ); pooling passes ⟨w, dv⟩."""
    norm_sq = tl.load(stat + total, mask=c_ok, other=0.0)
    w_dot_c = tl.load(stat + 2 * total, mask=c_ok, other=0.0)
    norm = tl.sqrt(norm_sq)
    inv_n = 1.0 / tl.maximum(norm, NORM_EPS)
    if POOL:
        gamma = tl.zeros_like(norm)
        dz = gamma
    else:
        scale = tl.load(scale_ptr).to(tl.float32)
        bias = tl.load(bias_ptr).to(tl.float32)
        logit, sign, valid = _xac_logit(norm_sq, w_dot_c, owner_ptr, cidx, P, image, scale, bias)
        dz = tl.where(valid, -sign * tl.sigmoid(-sign * logit), 0.0)          # per unit ∂L: |dz| < 1
        gamma = scale * dz
        w_dot_dv = gamma * w_dot_c
    q = tl.where(norm > NORM_EPS, w_dot_dv * inv_n * inv_n * inv_n, 0.0)
    kappa = w_dot_dv * inv_n - q * norm_sq                                            # Σ_l a_l ∂a_l
    return inv_n, gamma, dz, w_dot_c * inv_n, q, kappa


@triton.jit
def _xattn_pair_kernel(
    tokens_ptr, concepts_ptr, owner_ptr, scale_ptr, bias_ptr, grad_ptr,   # inputs; grad: ∂v̂ [B, P, D] (pool bwd)
    gram_ptr, w_ptr, scores_ptr, e_ptr, x_ptr, q_ptr,    # workspaces: G or W, R, E (pool bwd), X, (q, κ) [2, chunk, P]
    stats_ptr, partials_ptr,                                              # (lse, ‖w‖², ⟨w,c⟩) [3, B, P]; XAC
    image0, chunk, B, L, P, D, inv_temp, image_offset,
    BACKWARD: tl.constexpr, POOL: tl.constexpr, GRAM: tl.constexpr, SWEEP1: tl.constexpr, SWEEP2: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """One image (grid axis 1, slow) × one block of BLOCK_P concepts (axis 0); see the module docstring.

    SWEEP1: R (and the forward's lse, ⟨w,c⟩ online; pooling backward: E) into the workspace; backward: the
    per-pair scalars, (q, κ) stored. SWEEP2: per output token tile, h = (A G) (GRAM) or W Uᵀ (the chunk's
    pooled vectors, in w_ptr), then ‖w‖² (forward, GRAM) or X (backward). partials (XAC): forward (GRAM), the loss
    sum of this program at [image, block]; backward, the ∂s and ∂b partials at [0 | 1, image, block] per unit ∂L."""
    pid_p = tl.program_id(0).to(tl.int64)
    n_blocks = tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    image = image0 + b
    cidx = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)                                    # [BLOCK_P]
    c_ok = cidx < P
    tok_ptr = tokens_ptr + image * L * D
    stat = stats_ptr + image * P + cidx
    total = B * P
    if BACKWARD:
        lse = tl.load(stat, mask=c_ok, other=0.0)
    if SWEEP1:  # ---- R = C Uᵀ tile by tile into the workspace --------------------------------------------------
        w_dot_dv = tl.zeros((BLOCK_P,), dtype=tl.float32)
        if not BACKWARD:
            run_max = tl.full((BLOCK_P,), float("-inf"), dtype=tl.float32)
            run_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
            run_wc = tl.zeros((BLOCK_P,), dtype=tl.float32)                           # Σ exp(r/T − max) r
        for l0 in range(0, L, BLOCK_L):
            lidx = l0 + tl.arange(0, BLOCK_L).to(tl.int64)                            # [BLOCK_L]
            raw = _dot_tile(concepts_ptr, tok_ptr, cidx, lidx, P, L, D, D, D, BLOCK_P, BLOCK_L, BLOCK_D,
                            DOT_DTYPE, PRECISION)                                      # [BLOCK_P, BLOCK_L]
            _store_ws(scores_ptr, b, cidx, lidx, P, L, raw)
            if not BACKWARD:
                scores = tl.where((lidx < L)[None, :], raw * inv_temp, float("-inf"))
                new_max = tl.maximum(run_max, tl.max(scores, axis=1))
                rescale = tl.exp(run_max - new_max)
                weights = tl.exp(scores - new_max[:, None])
                run_sum = run_sum * rescale + tl.sum(weights, axis=1)
                run_wc = run_wc * rescale + tl.sum(weights * raw, axis=1)
                run_max = new_max
        if not BACKWARD:
            lse = run_max + tl.log(run_sum)
            w_dot_c = run_wc / run_sum
        # The tiles just stored are read back below in another thread layout: make them visible to the CTA.
        tl.debug_barrier()
        if BACKWARD:
            if POOL:   # E = dV Uᵀ into its workspace and ⟨w, dv⟩ = Σ_l a_l e_l (its own loop: registers)
                for l0 in range(0, L, BLOCK_L):
                    lidx = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
                    e = _dot_tile(grad_ptr + image * P * D, tok_ptr, cidx, lidx, P, L, D, D, D, BLOCK_P, BLOCK_L,
                                  BLOCK_D, DOT_DTYPE, PRECISION)
                    _store_ws(e_ptr, b, cidx, lidx, P, L, e)
                    attn, _ = _attn_tile(scores_ptr, b, cidx, lidx, P, L, lse, inv_temp)
                    w_dot_dv += tl.sum(attn * e, axis=1)
                tl.debug_barrier()
            inv_n, gamma, dz, cosine, q, kappa = _pair_scalars(stat, total, c_ok, owner_ptr, scale_ptr, bias_ptr,
                                                               cidx, P, image + image_offset, w_dot_dv, POOL)
            tl.store(q_ptr + b * P + cidx, q, mask=c_ok)
            tl.store(q_ptr + (chunk + b) * P + cidx, kappa, mask=c_ok)
            if not POOL:
                out = image * n_blocks + pid_p
                tl.store(partials_ptr + out, tl.sum(dz * cosine, axis=0))
                tl.store(partials_ptr + B * n_blocks + out, tl.sum(dz, axis=0))
    elif BACKWARD:  # the second launch of the pooled-vector route: scalars as the first launch stored them
        inv_n, gamma, dz, cosine, q, kappa = _pair_scalars(stat, total, c_ok, owner_ptr, scale_ptr, bias_ptr,
                                                           cidx, P, image + image_offset,
                                                           tl.zeros((BLOCK_P,), dtype=tl.float32), POOL)
        q = tl.load(q_ptr + b * P + cidx, mask=c_ok, other=0.0)
        kappa = tl.load(q_ptr + (chunk + b) * P + cidx, mask=c_ok, other=0.0)
    if SWEEP2:  # ---- per output token tile: h, then ‖w‖² (forward) or X (backward) ---------------------------
        norm_sq = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for l1 in range(0, L, BLOCK_L):
            lout = l1 + tl.arange(0, BLOCK_L).to(tl.int64)                            # [BLOCK_L]
            if GRAM:       # h = A G over the token tiles
                h = tl.zeros((BLOCK_P, BLOCK_L), dtype=tl.float32)
                for l0 in range(0, L, BLOCK_L):
                    lidx = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
                    attn, _ = _attn_tile(scores_ptr, b, cidx, lidx, P, L, lse, inv_temp)
                    gram, _ = _ws_tile(gram_ptr, b, lidx, lout, L, L)                 # [BLOCK_L, BLOCK_L]
                    h = tl.dot(attn.to(DOT_DTYPE), gram.to(DOT_DTYPE), h, input_precision=PRECISION)
            else:          # h = W Uᵀ over D
                h = _dot_tile(w_ptr + b * P * D, tok_ptr, cidx, lout, P, L, D, D, D, BLOCK_P, BLOCK_L, BLOCK_D,
                              DOT_DTYPE, PRECISION)
            attn, raw = _attn_tile(scores_ptr, b, cidx, lout, P, L, lse, inv_temp)
            if BACKWARD:
                if POOL:
                    e, _ = _ws_tile(e_ptr, b, cidx, lout, P, L)
                else:
                    e = gamma[:, None] * raw
                d_attn = e * inv_n[:, None] - q[:, None] * h
                x = attn * (d_attn - kappa[:, None]) * inv_temp
                if not POOL:
                    x += (gamma * inv_n)[:, None] * attn
                _store_ws(x_ptr, b, cidx, lout, P, L, x)
            else:
                norm_sq += tl.sum(attn * h, axis=1)
    if not BACKWARD:
        tl.store(stat, lse, mask=c_ok)
        tl.store(stat + 2 * total, w_dot_c, mask=c_ok)
        if SWEEP2:
            tl.store(stat + total, norm_sq, mask=c_ok)
            if not POOL:
                scale = tl.load(scale_ptr).to(tl.float32)
                bias = tl.load(bias_ptr).to(tl.float32)
                logit, sign, valid = _xac_logit(norm_sq, w_dot_c, owner_ptr, cidx, P, image + image_offset, scale,
                                                bias)
                margin = -sign * logit                         # −log σ(y z) = softplus(−y z), computed stably
                loss = tl.maximum(margin, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(margin)))
                tl.store(partials_ptr + image * n_blocks + pid_p, tl.sum(tl.where(valid, loss, 0.0), axis=0))


@triton.jit
def _xattn_mgram_kernel(
    scores_ptr, q_ptr, stats_ptr, m_ptr,          # workspaces R, q; saved stats; M workspace [chunk, L, L]
    image0, L, P, inv_temp,
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    b = tl.program_id(2).to(tl.int64)
    acc = tl.zeros((BLOCK_L, BLOCK_L), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        cidx = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        c_ok = cidx < P
        lse = tl.load(stats_ptr + (image0 + b) * P + cidx, mask=c_ok, other=0.0)
        q = tl.load(q_ptr + b * P + cidx, mask=c_ok, other=0.0)
        attn_rows, _ = _attn_tile(scores_ptr, b, cidx, rows, P, L, lse, inv_temp)      # [BLOCK_P, BLOCK_L]
        attn_cols, _ = _attn_tile(scores_ptr, b, cidx, cols, P, L, lse, inv_temp)
        acc = tl.dot(tl.trans(attn_rows).to(DOT_DTYPE), (-q[:, None] * attn_cols).to(DOT_DTYPE), acc,
                     input_precision=PRECISION)                                         # −M
    _store_ws(m_ptr, b, rows, cols, L, L, acc)


@triton.jit
def _xattn_dtokens_kernel(
    tokens_ptr, concepts_ptr, grad_ptr, scores_ptr, x_ptr, m_ptr, stats_ptr,   # grad: ∂L [1] or ∂v̂ [B, P, D]
    w_ptr, q_ptr,                                                              # route W: pooled vectors, q
    d_tokens_ptr,                                                              # [B, L, D]
    image0, B, L, P, D, inv_temp,
    POOL: tl.constexpr, GRAM: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    lidx = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)          # [BLOCK_L]
    offs_o = tl.program_id(1).to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO)       # [BLOCK_DO]
    b = tl.program_id(2).to(tl.int64)
    image = image0 + b
    tok_ptr = tokens_ptr + image * L * D
    acc = tl.zeros((BLOCK_L, BLOCK_DO), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):                                    # Xᵀ C  [+ (A/n)ᵀ dV]
        cidx = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        x, _ = _ws_tile(x_ptr, b, cidx, lidx, P, L)                                  # [BLOCK_P, BLOCK_L]
        concept = _load_rows(concepts_ptr, cidx, offs_o, P, D, D, DOT_DTYPE)          # [BLOCK_P, BLOCK_DO]
        acc = tl.dot(tl.trans(x).to(DOT_DTYPE), concept, acc, input_precision=PRECISION)
    if POOL:                                                           # (A/n)ᵀ dV: its own loop (registers)
        for p0 in range(0, P, BLOCK_P):
            cidx = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
            c_ok = cidx < P
            lse = tl.load(stats_ptr + image * P + cidx, mask=c_ok, other=0.0)
            inv_n = _inv_norm(stats_ptr, image * P + cidx, c_ok, B * P)
            attn, _ = _attn_tile(scores_ptr, b, cidx, lidx, P, L, lse, inv_temp)
            grad_v = _load_rows(grad_ptr + image * P * D, cidx, offs_o, P, D, D, DOT_DTYPE)
            acc = tl.dot(tl.trans(attn * inv_n[:, None]).to(DOT_DTYPE), grad_v, acc,
                         input_precision=PRECISION)
    if GRAM:
        for l0 in range(0, L, BLOCK_L):                                # − M U (M is stored negated)
            lk = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
            m, _ = _ws_tile(m_ptr, b, lidx, lk, L, L)                                # [BLOCK_L, BLOCK_L]
            tok = _load_rows(tok_ptr, lk, offs_o, L, D, D, DOT_DTYPE)                 # [BLOCK_L, BLOCK_DO]
            acc = tl.dot(m.to(DOT_DTYPE), tok, acc, input_precision=PRECISION)
    else:
        for p0 in range(0, P, BLOCK_P):                                # − (q A)ᵀ W
            cidx = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
            c_ok = cidx < P
            lse = tl.load(stats_ptr + image * P + cidx, mask=c_ok, other=0.0)
            q = tl.load(q_ptr + b * P + cidx, mask=c_ok, other=0.0)
            attn, _ = _attn_tile(scores_ptr, b, cidx, lidx, P, L, lse, inv_temp)
            pooled = _load_rows(w_ptr + b * P * D, cidx, offs_o, P, D, D, DOT_DTYPE)  # [BLOCK_P, BLOCK_DO]
            acc = tl.dot(tl.trans(-q[:, None] * attn).to(DOT_DTYPE), pooled, acc, input_precision=PRECISION)
    if POOL:
        grad_loss = 1.0
    else:
        grad_loss = tl.load(grad_ptr).to(tl.float32)
    tl.store(d_tokens_ptr + (image * L + lidx[:, None]) * D + offs_o[None, :],
             (acc * grad_loss).to(d_tokens_ptr.dtype.element_ty),
             mask=(lidx < L)[:, None] & (offs_o < D)[None, :])


@triton.jit
def _xattn_dconcepts_kernel(
    tokens_ptr, grad_ptr, x_ptr, dc_ptr,          # dc: float32 ∂C accumulator [P, D], added to chunk by chunk
    image0, n_images, L, P, D,
    POOL: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_p = tl.program_id(0).to(tl.int64)
    cidx = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_o = tl.program_id(1).to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    acc = tl.zeros((BLOCK_P, BLOCK_DO), dtype=tl.float32)
    for b_i32 in range(0, n_images):
        b = pid_p * 0 + b_i32                          # int64 (a plain .to() fails on the interpreter's int)
        tok_ptr = tokens_ptr + (image0 + b) * L * D
        for l0 in range(0, L, BLOCK_L):
            lidx = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
            x, _ = _ws_tile(x_ptr, b, cidx, lidx, P, L)                              # [BLOCK_P, BLOCK_L]
            tok = _load_rows(tok_ptr, lidx, offs_o, L, D, D, DOT_DTYPE)               # [BLOCK_L, BLOCK_DO]
            acc = tl.dot(x.to(DOT_DTYPE), tok, acc, input_precision=PRECISION)
    if POOL:
        grad_loss = 1.0
    else:
        grad_loss = tl.load(grad_ptr).to(tl.float32)
    ptrs = dc_ptr + cidx[:, None] * D + offs_o[None, :]
    mask = (cidx < P)[:, None] & (offs_o < D)[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc * grad_loss, mask=mask)


@triton.jit
def _xattn_pool_out_kernel(
    tokens_ptr, scores_ptr, stats_ptr, out_ptr,   # out: by OUTPUT (OUT_VHAT / OUT_NORMS / OUT_W, see below)
    image0, B, L, P, D, inv_temp,
    OUTPUT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    cidx = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pid_d = tl.program_id(1).to(tl.int64)
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    b = tl.program_id(2).to(tl.int64)
    image = image0 + b
    c_ok = cidx < P
    mask = c_ok[:, None] & (offs_o < D)[None, :]
    lse = tl.load(stats_ptr + image * P + cidx, mask=c_ok, other=0.0)
    tok_ptr = tokens_ptr + image * L * D
    acc = tl.zeros((BLOCK_P, BLOCK_DO), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        lidx = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
        attn, _ = _attn_tile(scores_ptr, b, cidx, lidx, P, L, lse, inv_temp)         # [BLOCK_P, BLOCK_L]
        tok = _load_rows(tok_ptr, lidx, offs_o, L, D, D, DOT_DTYPE)                   # [BLOCK_L, BLOCK_DO]
        acc = tl.dot(attn.to(DOT_DTYPE), tok, acc, input_precision=PRECISION)
    if OUTPUT == 0:    # OUT_VHAT: v̂ = W / n into [B, P, D] float32
        inv_n = _inv_norm(stats_ptr, image * P + cidx, c_ok, B * P)
        tl.store(out_ptr + (image * P + cidx[:, None]) * D + offs_o[None, :], acc * inv_n[:, None], mask=mask)
    elif OUTPUT == 1:  # OUT_NORMS: Σ_d w² of this D slice into [chunk, P, n_slices] float32
        tl.store(out_ptr + (b * P + cidx) * tl.num_programs(1) + pid_d, tl.sum(acc * acc, axis=1), mask=c_ok)
    else:              # OUT_W: W into the [chunk, P, D] workspace (dot dtype)
        tl.store(out_ptr + (b * P + cidx[:, None]) * D + offs_o[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Host launchers (no autograd)
# --------------------------------------------------------------------------------------------------------------
MIN_BLOCK = 16                 # smallest tl.dot extent on a GPU
WORKSPACE_BYTES = 256 << 20    # default bound on the per-chunk workspaces (R, X, E, G, M or W, q and κ)
MAX_CHUNK = 65_535             # images are grid axis 2 (CUDA's limit on the y/z axes)
OUT_VHAT, OUT_NORMS, OUT_W = 0, 1, 2   # what _xattn_pool_out_kernel writes of A U
NUM_WARPS = 8                  # 64 × 64/128 tiles: wgmma on sm_90, no spills on sm_80/sm_90 (python -m compclip.kernels.aot)


_TORCH_DTYPE = {tl.float16: torch.float16, tl.bfloat16: torch.bfloat16, tl.float32: torch.float32}


ROUTES = ("gram", "pooled")


def choose_route(P: int, L: int, D: int) -> str:
    """The cheaper way to the per-pair statistics: "gram" costs 3·L/D + 3·L/P passes beyond XAC's 4, "pooled"
    (the chunk's pooled vectors W = A U in a workspace) a flat 4 (module docstring)."""
    return "gram" if 3 * L / D + 3 * L / P <= 4 else "pooled"


def workspace_bytes_per_image(P: int, L: int, D: int, pool: bool, route: str, dot_bytes: int = 4,
                              slices: int = 1) -> int:
    """Workspace one image of a chunk needs, bounding forward and backward together. float32: R, E (pooling
    backward), (q, κ), the pooled route's Σ w² per D slice (forward); in the dot dtype (``dot_bytes``), what only
    enters dots: X and either G and M ("gram") or W ("pooled")."""
    f32 = (2 if pool else 1) * P * L + 2 * P + (P * slices if route == "pooled" else 0)
    return 4 * f32 + dot_bytes * (P * L + (2 * L * L if route == "gram" else P * D))


def _meta(tokens, concepts, pool, block_p, block_l, block_d, block_do, chunk, route) -> dict:
    B, L, D = tokens.shape
    P = concepts.shape[0]
    dot_dtype, precision = dot_config(tokens, concepts, follow_tf32=True)
    for name, requested in (("block_p", block_p), ("block_l", block_l), ("block_d", block_d),
                            ("block_do", block_do)):
        if requested is not None and requested < MIN_BLOCK:
            raise ValueError(f"{name} must be >= {MIN_BLOCK} (tl.dot needs M, N, K >= 16 on a GPU), got {requested}")
    route = choose_route(P, L, D) if route is None else route
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    meta = dict(BLOCK_P=block_size(block_p, P, 64), BLOCK_L=block_size(block_l, L, 64),
                BLOCK_D=block_size(block_d, D, 64), BLOCK_DO=block_size(block_do, D, 128),
                DOT_DTYPE=dot_dtype, PRECISION=precision, ws_dtype=_TORCH_DTYPE[dot_dtype], route=route)
    if chunk is None:
        chunk = WORKSPACE_BYTES // workspace_bytes_per_image(P, L, D, pool, route, meta["ws_dtype"].itemsize,
                                                             triton.cdiv(D, meta["BLOCK_DO"]))
    elif chunk < 1:
        raise ValueError(f"chunk must be >= 1 image, got {chunk}")
    meta["chunk"] = max(1, min(int(chunk), B, MAX_CHUNK))
    return meta


def _chunks(B: int, chunk: int):
    for image0 in range(0, B, chunk):
        yield image0, min(chunk, B - image0)


def _tile_meta(meta, *names):
    return {k: meta[k] for k in (*names, "DOT_DTYPE", "PRECISION")}


class _Launcher:
    """The launches of one op call: its tensors, scalars and tiles, so each kernel is launched by what differs."""

    def __init__(self, tokens, concepts, owner, scale, bias, grad, temperature, image_offset, pool, meta):
        self.tokens, self.concepts, self.owner, self.scale, self.bias, self.grad = (tokens, concepts, owner, scale,
                                                                                     bias, grad)
        self.inv_temp, self.image_offset, self.pool, self.meta = 1.0 / temperature, image_offset, pool, meta
        self.B, self.L, self.D = tokens.shape
        self.P = concepts.shape[0]
        self.n_blocks = triton.cdiv(self.P, meta["BLOCK_P"])
        self.n_l, self.n_do = triton.cdiv(self.L, meta["BLOCK_L"]), triton.cdiv(self.D, meta["BLOCK_DO"])

    def gram(self, gram, image0, n):
        launch(_xattn_gram_kernel, (self.n_l, self.n_l, n), self.tokens, gram, image0, self.L, self.D,
               num_warps=NUM_WARPS, **_tile_meta(self.meta, "BLOCK_L", "BLOCK_D"))

    def pairs(self, ws, stats, partials, image0, n, backward, sweep1=True, sweep2=True):
        """ws: dict of the workspaces gram, w, scores, e, x, q (unused ones may be any tensor)."""
        launch(_xattn_pair_kernel, (self.n_blocks, n),
               self.tokens, self.concepts, self.owner, self.scale, self.bias, self.grad,
               ws["gram"], ws["w"], ws["scores"], ws["e"], ws["x"], ws["q"],
               stats, partials,
               image0, self.meta["chunk"], self.B, self.L, self.P, self.D, self.inv_temp, self.image_offset,
               BACKWARD=backward, POOL=self.pool, GRAM=self.meta["route"] == "gram", SWEEP1=sweep1, SWEEP2=sweep2,
               num_warps=NUM_WARPS, **_tile_meta(self.meta, "BLOCK_P", "BLOCK_L", "BLOCK_D"))

    def pooled(self, scores, stats, out, image0, n, output: int):
        """A U for images [image0, image0 + n): ``output`` OUT_VHAT, OUT_NORMS or OUT_W (``_xattn_pool_out_kernel``)."""
        launch(_xattn_pool_out_kernel, (self.n_blocks, self.n_do, n),
               self.tokens, scores, stats, out,
               image0, self.B, self.L, self.P, self.D, self.inv_temp,
               OUTPUT=output, num_warps=NUM_WARPS, **_tile_meta(self.meta, "BLOCK_P", "BLOCK_L", "BLOCK_DO"))


def _xac_loss_rows(stats, owner, scale, bias, first_image: int) -> torch.Tensor:
    """Σ_p softplus(−y z) per image from the statistics [3, n, P] (the pooled route's forward epilogue)."""
    norm_sq, w_dot_c = stats[1], stats[2]
    logits = scale * w_dot_c / norm_sq.sqrt().clamp_min(NORM_EPS.value) + bias
    images = torch.arange(stats.shape[1], device=stats.device) + first_image
    sign = torch.where(owner.view(1, -1) == images.view(-1, 1), 1.0, -1.0)
    return torch.nn.functional.softplus(-sign * logits).sum(1)


def xattn_forward(tokens, concepts, owner, scale, bias, temperature, image_offset, pool: bool, meta):
    """(out, stats): POOL: v̂ [B, P, D] float32, else the loss partials [B, ⌈P/BLOCK_P⌉] float32 (sum them);
    stats = (lse, ‖w‖², ⟨w,c⟩) [3, B, P] float32, what the backward reads."""
    run = _Launcher(tokens, concepts, owner, scale, bias, scale, temperature, image_offset, pool, meta)
    B, L, P, chunk, gram_route = run.B, run.L, run.P, meta["chunk"], meta["route"] == "gram"
    f32 = dict(dtype=torch.float32, device=tokens.device)
    stats = torch.empty(3, B, P, **f32)
    out = torch.empty(B, P, run.D, **f32) if pool else torch.zeros(B, run.n_blocks, **f32)
    scores = torch.empty(chunk, P, L, **f32)
    if gram_route:
        aux = torch.empty(chunk, L, L, dtype=meta["ws_dtype"], device=tokens.device)
    else:
        aux = torch.empty(chunk, P, run.n_do, **f32)   # Σ w² per D slice
    ws = dict(gram=aux, w=aux, scores=scores, e=scores, x=scores, q=scores)
    for image0, n in _chunks(B, chunk):
        if gram_route:
            run.gram(aux, image0, n)
        run.pairs(ws, stats, out, image0, n, backward=False, sweep2=gram_route)
        if not gram_route:   # ‖w‖² from W = A U, formed slice by slice and not stored
            run.pooled(scores, stats, aux, image0, n, OUT_NORMS)
            stats[1, image0:image0 + n] = aux[:n].sum(-1)
            if not pool:
                out[image0:image0 + n, 0] = _xac_loss_rows(stats[:, image0:image0 + n], owner, scale, bias,
                                                           image0 + image_offset)
        if pool:
            run.pooled(scores, stats, out, image0, n, OUT_VHAT)
    return out, stats


def xattn_backward(tokens, concepts, owner, scale, bias, stats, grad, temperature, image_offset, pool: bool, meta,
                   need_tokens: bool = True, need_concepts: bool = True):
    """(d_tokens, d_concepts, d_scale_partials, d_bias_partials); ``grad`` is ∂v̂ [B, P, D] float32 (pooling) or
    ∂L as a 1-element float32 tensor (XAC). A gradient that is not needed comes back as None."""
    run = _Launcher(tokens, concepts, owner, scale, bias, grad, temperature, image_offset, pool, meta)
    B, L, P, D, chunk, gram_route = run.B, run.L, run.P, run.D, meta["chunk"], meta["route"] == "gram"
    f32, dot = dict(dtype=torch.float32, device=tokens.device), dict(dtype=meta["ws_dtype"], device=tokens.device)
    d_tokens = torch.empty_like(tokens) if need_tokens else None
    d_concepts = torch.zeros(P, D, **f32) if need_concepts else None
    partials = torch.zeros(2, B, run.n_blocks, **f32)
    scores, x, q = torch.empty(chunk, P, L, **f32), torch.empty(chunk, P, L, **dot), torch.empty(2, chunk, P, **f32)
    ws = dict(scores=scores, x=x, q=q, e=torch.empty(chunk, P, L, **f32) if pool else scores)
    if gram_route:
        ws.update(gram=torch.empty(chunk, L, L, **dot), m=torch.empty(chunk, L, L, **dot), w=scores)
    else:
        ws.update(w=torch.empty(chunk, P, D, **dot), gram=scores, m=scores)
    for image0, n in _chunks(B, chunk):
        if gram_route:
            run.gram(ws["gram"], image0, n)
            run.pairs(ws, stats, partials, image0, n, backward=True)
        else:   # R and the scalars; W = A U into its workspace; then h = W Uᵀ and X
            run.pairs(ws, stats, partials, image0, n, backward=True, sweep2=False)
            run.pooled(scores, stats, ws["w"], image0, n, OUT_W)
            run.pairs(ws, stats, partials, image0, n, backward=True, sweep1=False)
        if need_tokens:
            if gram_route:
                launch(_xattn_mgram_kernel, (run.n_l, run.n_l, n), scores, q, stats, ws["m"], image0, L, P,
                       run.inv_temp, num_warps=NUM_WARPS, **_tile_meta(meta, "BLOCK_P", "BLOCK_L"))
            launch(_xattn_dtokens_kernel, (run.n_l, run.n_do, n),
                   tokens, concepts, grad, scores, x, ws["m"], stats, ws["w"], q,
                   d_tokens,
                   image0, B, L, P, D, run.inv_temp,
                   POOL=pool, GRAM=gram_route, num_warps=NUM_WARPS,
                   **_tile_meta(meta, "BLOCK_P", "BLOCK_L", "BLOCK_DO"))
        if need_concepts:
            launch(_xattn_dconcepts_kernel, (run.n_blocks, run.n_do),
                   tokens, grad, x, d_concepts,
                   image0, n, L, P, D,
                   POOL=pool, num_warps=NUM_WARPS, **_tile_meta(meta, "BLOCK_P", "BLOCK_L", "BLOCK_DO"))
    if need_concepts:
        d_concepts = d_concepts.to(concepts.dtype)
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
        pooled, stats = xattn_forward(tokens, concepts, zero, zero, zero, temperature, 0, True, meta)
        ctx.save_for_backward(tokens, concepts, stats)
        ctx.temperature, ctx.meta = temperature, meta
        return pooled

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pooled):
        tokens, concepts, stats = ctx.saved_tensors
        zero = scalar_arg(None, tokens.device)
        d_tokens, d_concepts, _, _ = xattn_backward(
            tokens, concepts, zero, zero, zero, stats, grad_pooled.float().contiguous(), ctx.temperature, 0, True,
            ctx.meta, needs_grad(ctx, 0), needs_grad(ctx, 1))
        return d_tokens, d_concepts, None, None


class XACLossSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, concepts, owner, logit_scale, logit_bias, temperature, image_offset, meta):
        tokens, concepts, owner = contiguous(tokens, concepts, owner)
        scale, bias = scalar_arg(logit_scale, tokens.device), scalar_arg(logit_bias, tokens.device)
        partials, stats = xattn_forward(tokens, concepts, owner, scale, bias, temperature, image_offset, False,
                                        meta)
        ctx.save_for_backward(tokens, concepts, owner, scale, bias, stats)
        ctx.scalars = (logit_scale if isinstance(logit_scale, torch.Tensor) else None,
                       logit_bias if isinstance(logit_bias, torch.Tensor) else None)
        ctx.temperature, ctx.image_offset, ctx.meta = temperature, image_offset, meta
        return partials.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        tokens, concepts, owner, scale, bias, stats = ctx.saved_tensors
        grad = grad_loss.float().reshape(1)
        d_tokens, d_concepts, scale_partials, bias_partials = xattn_backward(
            tokens, concepts, owner, scale, bias, stats, grad, ctx.temperature, ctx.image_offset, False, ctx.meta,
            needs_grad(ctx, 0), needs_grad(ctx, 1))
        return (
            d_tokens,
            d_concepts,
            None,
            scalar_grad(scale_partials * grad, ctx.scalars[0], needs_grad(ctx, 3)),
            scalar_grad(bias_partials * grad, ctx.scalars[1], needs_grad(ctx, 4)),
            None, None, None,
        )


def concept_attention_pool(
    tokens: torch.Tensor,
    concepts: torch.Tensor,
    temperature: float = 1.0,
    *,
    block_p: Optional[int] = None,
    block_l: Optional[int] = None,
    block_d: Optional[int] = None,
    block_do: Optional[int] = None,
    chunk: Optional[int] = None,
    route: Optional[str] = None,
) -> torch.Tensor:
    """normalize(Σ_l softmax_l(⟨u_il, c_p⟩ / T) u_il): tokens [B, L, D], concepts [P, D] -> [B, P, D] float32.

    ``chunk``: images per workspace chunk (default: as many as fit ``WORKSPACE_BYTES``); ``route``: "gram" or
    "pooled" (default: ``choose_route``, the one with fewer passes)."""
    _check(tokens, concepts)
    meta = _meta(tokens, concepts, True, block_p, block_l, block_d, block_do, chunk, route)
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
    block_l: Optional[int] = None,
    block_d: Optional[int] = None,
    block_do: Optional[int] = None,
    chunk: Optional[int] = None,
    route: Optional[str] = None,
) -> torch.Tensor:
    """Σ_i Σ_p −log σ(y_ip (s⟨v̂_ip, c_p⟩ + b)) without materialising v̂ (see ``reference.xac_loss_sum``); 0-d float32.

    ``chunk``: images per workspace chunk (default: as many as fit ``WORKSPACE_BYTES``); ``route``: "gram" or
    "pooled" (default: ``choose_route``, the one with fewer passes)."""
    _check(tokens, concepts)
    if owner.shape != concepts.shape[:1]:
        raise ValueError(f"owner must have shape [P] = {tuple(concepts.shape[:1])}, got {tuple(owner.shape)}")
    meta = _meta(tokens, concepts, False, block_p, block_l, block_d, block_do, chunk, route)
    return XACLossSum.apply(tokens, concepts, owner, logit_scale, logit_bias, float(temperature), int(image_offset),
                            meta)
