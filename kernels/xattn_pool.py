"""Cross-modal (concept → visual token) attention pooling and the fused C2LIP XAC loss.

Forward, for image i (tokens u_l, l < L) and concept p (c_p); T = temperature, s = logit_scale, b = logit_bias::

    r_pl  = ⟨c_p, u_l⟩                       raw dots             a_pl = softmax_l(r_pl / T)
    w_p   = Σ_l a_pl u_l                      pooled               n_p  = max(‖w_p‖, ε),  v̂_p = w_p / n_p
    concept_attention_pool -> v̂ [B, P, D] (float32)
    z_p   = s ⟨v̂_p, c_p⟩ + b,  y_p = +1 if owner[p] == image_offset + i else −1
    xac_loss_sum -> Σ_i Σ_p softplus(−y_p z_p) = Σ −log σ(y z)          (0-d float32)

**Two routes to the per-pair statistics** (``route=``; default ``choose_route``, the one with fewer executed
passes). With the image's Gram matrix G = U Uᵀ [L, L] (``G_ll' = ⟨u_l, u_l'⟩``)::

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

Kernels (the fused-attention tutorial's shape: a forward, a backward-statistics and backward-gradient kernels,
sharing ``@triton.jit`` helpers; what a launch does not use is a ``None`` pointer behind a ``HAS_*`` flag).
Images are processed in **chunks** of ``chunk`` images (default: as many as fit WORKSPACE_BYTES); per chunk the
[P, L]-per-image quantities live in workspaces (R, X; pooling also E), and G, M ("gram") or W ("pooled"). All
loops run over fixed tiles (BLOCK_P concepts × BLOCK_L tokens, D in BLOCK_D steps, outputs BLOCK_DO wide), so
shared memory and registers do not depend on L, P or D. Every grid puts the image on its slowest axis, so one
image's tokens (and G or W) stay in L2 while its concept blocks run.

* ``_xattn_gram_kernel``       G_i = U_i U_iᵀ ("gram")                                          L/P of a pass
* ``_xattn_fwd_kernel``        grid (concept blocks × images): R tiles (K = D) into the workspace with an online
  log-sum-exp and ⟨w, c⟩; "gram": then per token tile h = A G (K = L), ‖w‖² and the XAC loss. Saves (lse, ‖w‖²,
  ⟨w, c⟩) per pair: 3·B·P floats, all the backward needs besides the inputs.        1 (+ L/D)
* ``_xattn_pool_out_kernel``   A U (K = L): v̂ = A U / n (pooling's output), or Σ w² per slice, or W ("pooled") 1
* ``_xattn_bwd_stats_kernel``  grid (concept blocks × images): R again; pooling: E = dV Uᵀ (K = D) and ⟨w, dv⟩;
  the per-pair scalars (q, κ, γ) into a workspace; XAC: the ∂s, ∂b partials.         1 (+ 1 pooling)
* ``_xattn_bwd_coef_kernel``   grid (concept blocks × images): per token tile h = A G (K = L) or W Uᵀ (K = D),
  then X.                                                                            L/D or 1
* ``_xattn_mgram_kernel``      M_i = A_iᵀ diag(q_i) A_i (K = P) ("gram")                        L/D
* ``_xattn_dtokens_kernel``    ∂U_i = X_iᵀ C − M_i U_i or − (q A)ᵀ W  [+ (A/n)ᵀ dV]            1 + L/P or 2 (+1)
* ``_xattn_dconcepts_kernel``  ∂C += Σ_i X_i U_i (K = L per image), chunk after chunk; the chunk's images are
  split over S programs per output tile (float32 partials, summed in split order by ``_sum_splits_kernel``) when
  the P × D output tiles alone would not fill the GPU twice (P = 2,304, D = 768: 216 tiles).   1

Passes (units of 2·B·P·L·D dot FLOPs), deterministic (every output element has one writer; the cross-chunk and
cross-split sums of ∂C are in a fixed order; no atomics). XAC, "gram": forward 1 + L/D + L/P, backward
3 + 2·L/D + 2·L/P, **total 4 + 3·L/D + 3·L/P** (useful work): 5.0 at the C2LIP target (B = 768, P = 2304,
L = 196, D = 768), 4.3 at L = 50, 7.0 at L = 577. XAC, "pooled": forward 2 (R, W), backward 6 (R, W, h, Xᵀ C,
(qA)ᵀ W, X U), **total 8** for any L. Pooling: 3 more passes than XAC on either route (its forward writes v̂, its
backward reads dV twice). **Executed** work counts the padding of L to BLOCK_L (and of P, D to their tiles):
``executed_passes`` gives both; BLOCK_L is 64 or 32, whichever pads L less (``choose_block_l``: 196 → 224, 577 →
608, 50 → 64), and the route is the one with fewer executed passes, which keeps XAC ≤ 8 executed passes at
P = 2304, D = 768 for every L (5.9 at L = 196, 7.6 at L = 577, 8.0 at L = 1024). ``python -m
compclip.kernels.passes`` counts them. Gradients an input does not need are not computed: frozen tokens skip M
and ∂U, frozen concepts ∂C, and with both frozen (∂s, ∂b only) X is not formed either.

Extra memory: the chunk workspaces (≤ WORKSPACE_BYTES unless one image alone needs more) plus 3·B·P floats of
saved statistics, P·D float32 for the ∂C accumulator (and S·P·D for its split partials), and the per-program
partials. [B, P, D] is never formed by XAC; [B, P, L] (and, on the "pooled" route, W) exists one chunk at a time.

Limits: any B, L, P ≥ 1 and D ≥ 1 (masking; B = 0 and P = 0 give empty results); images per chunk ≤ 65,535 (grid
axis); offsets are int64. Requested blocks must be powers of two ≥ 16 (tl.dot's smallest extent on a GPU). Inputs
are made contiguous once on the host. Numerics: 16-bit inputs feed their own dtype to tl.dot on a GPU, fp32
inputs use tf32 when ``torch.backends.cuda.matmul.allow_tf32`` is set, else "ieee" (``_common.dot_config``);
workspaces, softmax and accumulators are float32, and A, G, W, X, q·A, M are rounded to the dot dtype as they
enter a dot (G, M, W and X are stored in it: what a dot would round anyway). Underflow: attention probabilities
below fp16's 2⁻²⁴ flush to 0 (an absolute error ≤ 2⁻²⁴·L·max‖u‖ on w). Every gradient quantity that reaches a
16-bit operand is scaled into fp16's normal range first: XAC forms X and M for ∂L = 1 (|γ| ≤ s) and applies ∂L to
the float32 accumulators after the dots; pooling multiplies dV by σ = 2^(−ceil(log2 max|dV|)) as it loads it
(|σ dV| ≤ 1, so X, q·A and M are formed at the magnitudes XAC's are) and its accumulators by 1/σ at the store;
being a power of two, σ adds no rounding. (Without σ, a mean-reduced pooling loss at B = 768, P = 2,304,
D = 768 has |dV| ≈ 7e-10, below fp16's smallest subnormal: X, E and (A/n)ᵀ dV would be 0;
tests/kernels/test_kernel_xattn_numerics.py.) Overflow (fp16 only): q ∝ 1/n³, so pairs whose pooled vector
nearly cancels (n ≲ 0.01 with unit tokens) can exceed 65,504 in q·A or M; bf16 has fp32's range and no such limit.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from ._common import (Scalar, _dot_tile, _load_rows, _sum_splits_kernel, block_size, combine_block, contiguous,
                      dot_config, launch, needs_grad, pow2_scale, scalar_arg, scalar_grad, sm_count, split_axis)

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
def _xac_logit(norm_sq, w_dot_c, owner_ptr, scale_ptr, bias_ptr, cidx, P, image, HAS_BIAS: tl.constexpr):
    """(z, y, valid) for one image and a concept block: z = s⟨v̂, c⟩ + b, y = ±1, valid = concept exists."""
    valid = cidx < P
    owner = tl.load(owner_ptr + cidx, mask=valid, other=-1).to(tl.int64)
    sign = tl.where(owner == image, 1.0, -1.0)
    logit = tl.load(scale_ptr).to(tl.float32) * w_dot_c / tl.maximum(tl.sqrt(norm_sq), NORM_EPS)
    if HAS_BIAS:
        logit += tl.load(bias_ptr).to(tl.float32)
    return logit, sign, valid


@triton.jit
def _inv_norm(stats_ptr, idx, ok, BP_TOTAL):
    """1 / max(‖w‖, ε) from the saved ‖w‖² (stats row 1)."""
    norm_sq = tl.load(stats_ptr + BP_TOTAL + idx, mask=ok, other=0.0)
    return 1.0 / tl.maximum(tl.sqrt(norm_sq), NORM_EPS)


@triton.jit
def _pair_program(tokens_ptr, image0, L, D, P, BLOCK_P: tl.constexpr):
    """The (concept block, image) of a program of the pair kernels (axis 0: concept blocks, axis 1: the chunk's
    images): (pid_p, b = image in the chunk, image, concept indices [BLOCK_P], their mask, the image's tokens)."""
    pid_p = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    image = image0 + b
    cidx = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    return pid_p, b, image, cidx, cidx < P, tokens_ptr + image * L * D


@triton.jit
def _score_sweep(concepts_ptr, tok_ptr, scores_ptr, b, cidx, P, L, D, inv_temp, ONLINE: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """R = C Uᵀ for one concept block of image b, token tile by token tile (K = D), into the R workspace.
    ONLINE (forward): also the softmax statistics by an online sweep, (lse, ⟨w, c⟩ = Σ_l a_l r_l); else zeros."""
    run_max = tl.full((BLOCK_P,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    run_wc = tl.zeros((BLOCK_P,), dtype=tl.float32)                                   # Σ exp(r/T − max) r
    for l0 in range(0, L, BLOCK_L):
        lidx = l0 + tl.arange(0, BLOCK_L).to(tl.int64)                                # [BLOCK_L]
        raw = _dot_tile(concepts_ptr, tok_ptr, cidx, lidx, P, L, D, D, D, 1.0, BLOCK_P, BLOCK_L, BLOCK_D,
                        DOT_DTYPE, PRECISION, False)                                  # [BLOCK_P, BLOCK_L]
        _store_ws(scores_ptr, b, cidx, lidx, P, L, raw)
        if ONLINE:
            scores = tl.where((lidx < L)[None, :], raw * inv_temp, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(scores, axis=1))
            rescale = tl.exp(run_max - new_max)
            weights = tl.exp(scores - new_max[:, None])
            run_sum = run_sum * rescale + tl.sum(weights, axis=1)
            run_wc = run_wc * rescale + tl.sum(weights * raw, axis=1)
            run_max = new_max
    # The tiles just stored are read back by the caller in another thread layout: make them visible to the CTA.
    tl.debug_barrier()
    if ONLINE:
        lse = run_max + tl.log(run_sum)
        w_dot_c = run_wc / run_sum
    else:
        lse = run_sum
        w_dot_c = run_sum
    return lse, w_dot_c


@triton.jit
def _h_tile(scores_ptr, gram_ptr, w_ptr, tok_ptr, b, cidx, lout, lse, P, L, D, inv_temp, HAS_GRAM: tl.constexpr,
            BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
            DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """h = ⟨w_p, u_l⟩ for a concept block and the output token tile ``lout`` of image b: A G over the token tiles
    (HAS_GRAM, K = L) or W Uᵀ over D (the chunk's pooled vectors in ``w_ptr``): [BLOCK_P, BLOCK_L] float32."""
    if HAS_GRAM:
        h = tl.zeros((BLOCK_P, BLOCK_L), dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
            lidx = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
            attn, _ = _attn_tile(scores_ptr, b, cidx, lidx, P, L, lse, inv_temp)      # [BLOCK_P, BLOCK_L]
            gram, _ = _ws_tile(gram_ptr, b, lidx, lout, L, L)                         # [BLOCK_L, BLOCK_L]
            h = tl.dot(attn.to(DOT_DTYPE), gram.to(DOT_DTYPE), h, input_precision=PRECISION)
    else:
        h = _dot_tile(w_ptr + b * P * D, tok_ptr, cidx, lout, P, L, D, D, D, 1.0, BLOCK_P, BLOCK_L, BLOCK_D,
                      DOT_DTYPE, PRECISION, False)
    return h


# --------------------------------------------------------------------------------------------------------------
# Kernels: forward
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _xattn_gram_kernel(
    tokens_ptr, gram_ptr,                 # tokens [B, L, D]; G workspace [chunk, L, L] (dot dtype)
    image0, L, D,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    b = tl.program_id(2).to(tl.int64)
    tok_ptr = tokens_ptr + (image0 + b) * L * D
    gram = _dot_tile(tok_ptr, tok_ptr, rows, cols, L, L, D, D, D, 1.0, BLOCK_L, BLOCK_L, BLOCK_D, DOT_DTYPE,
                     PRECISION, False)
    _store_ws(gram_ptr, b, rows, cols, L, L, gram)


@triton.jit
def _xattn_fwd_kernel(
    tokens_ptr, concepts_ptr, owner_ptr, scale_ptr, bias_ptr,   # inputs; owner, scale (bias): XAC only, else None
    scores_ptr, gram_ptr,                  # workspaces: R [chunk, P, L] float32; G [chunk, L, L] (HAS_GRAM) or None
    stats_ptr, loss_ptr,                   # out: (lse, ‖w‖², ⟨w,c⟩) [3, B, P]; XAC loss partials [B, blocks] or None
    image0, B, L, P, D, inv_temp, image_offset,
    HAS_GRAM: tl.constexpr, HAS_LOSS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """One block of BLOCK_P concepts (axis 0) × one image (axis 1, slow): R, lse, ⟨w, c⟩; HAS_GRAM: also ‖w‖² and
    (HAS_LOSS) this program's XAC loss sum. Without HAS_GRAM, ‖w‖² comes from W (``_xattn_pool_out_kernel``)."""
    pid_p, b, image, cidx, c_ok, tok_ptr = _pair_program(tokens_ptr, image0, L, D, P, BLOCK_P)
    stat = stats_ptr + image * P + cidx
    lse, w_dot_c = _score_sweep(concepts_ptr, tok_ptr, scores_ptr, b, cidx, P, L, D, inv_temp, True,
                                BLOCK_P, BLOCK_L, BLOCK_D, DOT_DTYPE, PRECISION)
    tl.store(stat, lse, mask=c_ok)
    tl.store(stat + 2 * B * P, w_dot_c, mask=c_ok)
    if HAS_GRAM:   # ‖w‖² = Σ_l a_l h_l, per output token tile
        norm_sq = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for l1 in range(0, L, BLOCK_L):
            lout = l1 + tl.arange(0, BLOCK_L).to(tl.int64)                            # [BLOCK_L]
            h = _h_tile(scores_ptr, gram_ptr, None, tok_ptr, b, cidx, lout, lse, P, L, D, inv_temp, True,
                        BLOCK_P, BLOCK_L, BLOCK_D, DOT_DTYPE, PRECISION)
            attn, _ = _attn_tile(scores_ptr, b, cidx, lout, P, L, lse, inv_temp)
            norm_sq += tl.sum(attn * h, axis=1)
        tl.store(stat + B * P, norm_sq, mask=c_ok)
        if HAS_LOSS:
            logit, sign, valid = _xac_logit(norm_sq, w_dot_c, owner_ptr, scale_ptr, bias_ptr, cidx, P,
                                            image + image_offset, HAS_BIAS)
            margin = -sign * logit                         # −log σ(y z) = softplus(−y z), computed stably
            loss = tl.maximum(margin, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(margin)))
            tl.store(loss_ptr + image * tl.num_programs(0) + pid_p, tl.sum(tl.where(valid, loss, 0.0), axis=0))


@triton.jit
def _xattn_pool_out_kernel(
    tokens_ptr, scores_ptr, stats_ptr, out_ptr,   # out: by OUTPUT (OUT_VHAT / OUT_NORMS / OUT_W, see below)
    image0, B, L, P, D, inv_temp,
    OUTPUT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """A U for a concept block (axis 0), one D slice (axis 1) and one image (axis 2, slow)."""
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
# Kernels: backward statistics
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _xattn_bwd_stats_kernel(
    tokens_ptr, concepts_ptr, owner_ptr, scale_ptr, bias_ptr,   # inputs; owner, scale (bias): XAC only, else None
    dv_ptr, grad_scale_ptr,                # pooling: ∂v̂ [B, P, D] (HAS_DV, else None); [σ on dV, factor at the stores]
    scores_ptr, e_ptr, pair_ptr,           # workspaces: R; E [chunk, P, L] float32 (HAS_DV) or None; (q, κ, γ) [3, chunk, P]
    stats_ptr, partials_ptr,               # saved (lse, ‖w‖², ⟨w,c⟩) [3, B, P]; XAC (∂s, ∂b) partials [2, B, blocks] or None
    image0, chunk, B, L, P, D, inv_temp, image_offset,
    HAS_DV: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """One concept block (axis 0) × one image (axis 1): R again, pooling's E = σdV Uᵀ, and the per-pair scalars
    q, κ, γ (module docstring; pooling: σ-scaled; XAC: per unit ∂L), stored for the gradient kernels."""
    pid_p, b, image, cidx, c_ok, tok_ptr = _pair_program(tokens_ptr, image0, L, D, P, BLOCK_P)
    stat = stats_ptr + image * P + cidx
    lse = tl.load(stat, mask=c_ok, other=0.0)
    norm_sq = tl.load(stat + B * P, mask=c_ok, other=0.0)
    w_dot_c = tl.load(stat + 2 * B * P, mask=c_ok, other=0.0)
    norm = tl.sqrt(norm_sq)
    inv_n = 1.0 / tl.maximum(norm, NORM_EPS)
    _score_sweep(concepts_ptr, tok_ptr, scores_ptr, b, cidx, P, L, D, inv_temp, False,
                 BLOCK_P, BLOCK_L, BLOCK_D, DOT_DTYPE, PRECISION)
    if HAS_DV:     # E = σdV Uᵀ into its workspace and ⟨w, σdv⟩ = Σ_l a_l e_l
        sigma = tl.load(grad_scale_ptr)
        w_dot_dv = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
            lidx = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
            e = _dot_tile(dv_ptr + image * P * D, tok_ptr, cidx, lidx, P, L, D, D, D, sigma, BLOCK_P, BLOCK_L,
                          BLOCK_D, DOT_DTYPE, PRECISION, True)
            _store_ws(e_ptr, b, cidx, lidx, P, L, e)
            attn, _ = _attn_tile(scores_ptr, b, cidx, lidx, P, L, lse, inv_temp)
            w_dot_dv += tl.sum(attn * e, axis=1)
        gamma = tl.zeros((BLOCK_P,), dtype=tl.float32)
    else:          # XAC: dv = γ c, so e = γ r and ⟨w, dv⟩ = γ ⟨w, c⟩
        logit, sign, valid = _xac_logit(norm_sq, w_dot_c, owner_ptr, scale_ptr, bias_ptr, cidx, P,
                                        image + image_offset, HAS_BIAS)
        dz = tl.where(valid, -sign * tl.sigmoid(-sign * logit), 0.0)          # per unit ∂L: |dz| < 1
        gamma = tl.load(scale_ptr).to(tl.float32) * dz
        w_dot_dv = gamma * w_dot_c
        out = image * tl.num_programs(0) + pid_p
        tl.store(partials_ptr + out, tl.sum(dz * w_dot_c * inv_n, axis=0))            # Σ dz ⟨v̂, c⟩
        tl.store(partials_ptr + B * tl.num_programs(0) + out, tl.sum(dz, axis=0))
    q = tl.where(norm > NORM_EPS, w_dot_dv * inv_n * inv_n * inv_n, 0.0)
    kappa = w_dot_dv * inv_n - q * norm_sq                                            # Σ_l a_l ∂a_l
    tl.store(pair_ptr + b * P + cidx, q, mask=c_ok)
    tl.store(pair_ptr + (chunk + b) * P + cidx, kappa, mask=c_ok)
    tl.store(pair_ptr + (2 * chunk + b) * P + cidx, gamma, mask=c_ok)


# --------------------------------------------------------------------------------------------------------------
# Kernels: backward gradients
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _xattn_bwd_coef_kernel(
    tokens_ptr, scores_ptr, e_ptr, pair_ptr,   # R, E (HAS_DV, else None), (q, κ, γ) [3, chunk, P]
    gram_ptr, w_ptr,                           # G [chunk, L, L] (HAS_GRAM) or W [chunk, P, D] (else); the other None
    stats_ptr, x_ptr,                          # saved statistics; out: X [chunk, P, L] (dot dtype)
    image0, chunk, B, L, P, D, inv_temp,
    HAS_DV: tl.constexpr, HAS_GRAM: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """X = ∂r [+ γ a / n] for one concept block (axis 0) × one image (axis 1), per output token tile."""
    pid_p, b, image, cidx, c_ok, tok_ptr = _pair_program(tokens_ptr, image0, L, D, P, BLOCK_P)
    lse = tl.load(stats_ptr + image * P + cidx, mask=c_ok, other=0.0)
    inv_n = _inv_norm(stats_ptr, image * P + cidx, c_ok, B * P)
    q = tl.load(pair_ptr + b * P + cidx, mask=c_ok, other=0.0)
    kappa = tl.load(pair_ptr + (chunk + b) * P + cidx, mask=c_ok, other=0.0)
    gamma = tl.load(pair_ptr + (2 * chunk + b) * P + cidx, mask=c_ok, other=0.0)
    for l1 in range(0, L, BLOCK_L):
        lout = l1 + tl.arange(0, BLOCK_L).to(tl.int64)                                # [BLOCK_L]
        h = _h_tile(scores_ptr, gram_ptr, w_ptr, tok_ptr, b, cidx, lout, lse, P, L, D, inv_temp, HAS_GRAM,
                    BLOCK_P, BLOCK_L, BLOCK_D, DOT_DTYPE, PRECISION)
        attn, raw = _attn_tile(scores_ptr, b, cidx, lout, P, L, lse, inv_temp)
        if HAS_DV:
            e, _ = _ws_tile(e_ptr, b, cidx, lout, P, L)
        else:
            e = gamma[:, None] * raw
        d_attn = e * inv_n[:, None] - q[:, None] * h
        x = attn * (d_attn - kappa[:, None]) * inv_temp
        if not HAS_DV:
            x += (gamma * inv_n)[:, None] * attn
        _store_ws(x_ptr, b, cidx, lout, P, L, x)


@triton.jit
def _xattn_mgram_kernel(
    scores_ptr, pair_ptr, stats_ptr, m_ptr,       # workspaces R, (q, …); saved stats; out: −M [chunk, L, L]
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
        q = tl.load(pair_ptr + b * P + cidx, mask=c_ok, other=0.0)
        attn_rows, _ = _attn_tile(scores_ptr, b, cidx, rows, P, L, lse, inv_temp)      # [BLOCK_P, BLOCK_L]
        attn_cols, _ = _attn_tile(scores_ptr, b, cidx, cols, P, L, lse, inv_temp)
        acc = tl.dot(tl.trans(attn_rows).to(DOT_DTYPE), (-q[:, None] * attn_cols).to(DOT_DTYPE), acc,
                     input_precision=PRECISION)                                         # −M
    _store_ws(m_ptr, b, rows, cols, L, L, acc)


@triton.jit
def _xattn_dtokens_kernel(
    tokens_ptr, concepts_ptr, dv_ptr, grad_scale_ptr,    # dv: ∂v̂ [B, P, D] (HAS_DV) or None; [σ, factor]
    scores_ptr, x_ptr, pair_ptr, stats_ptr,              # R, X, (q, …), saved statistics
    m_ptr, w_ptr,                                        # −M [chunk, L, L] (HAS_GRAM) or W [chunk, P, D]; other None
    d_tokens_ptr,                                        # out [B, L, D]
    image0, B, L, P, D, inv_temp,
    HAS_DV: tl.constexpr, HAS_GRAM: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """∂U for a token tile (axis 0), one D slice (axis 1) and one image (axis 2)."""
    lidx = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)          # [BLOCK_L]
    offs_o = tl.program_id(1).to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO)       # [BLOCK_DO]
    b = tl.program_id(2).to(tl.int64)
    image = image0 + b
    tok_ptr = tokens_ptr + image * L * D
    acc = tl.zeros((BLOCK_L, BLOCK_DO), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):                                    # Xᵀ C
        cidx = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        x, _ = _ws_tile(x_ptr, b, cidx, lidx, P, L)                                  # [BLOCK_P, BLOCK_L]
        concept = _load_rows(concepts_ptr, cidx, offs_o, P, D, D, DOT_DTYPE)          # [BLOCK_P, BLOCK_DO]
        acc = tl.dot(tl.trans(x).to(DOT_DTYPE), concept, acc, input_precision=PRECISION)
    if HAS_DV:                                                         # (A/n)ᵀ σdV: its own loop (registers)
        sigma = tl.load(grad_scale_ptr)
        for p0 in range(0, P, BLOCK_P):
            cidx = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
            c_ok = cidx < P
            lse = tl.load(stats_ptr + image * P + cidx, mask=c_ok, other=0.0)
            inv_n = _inv_norm(stats_ptr, image * P + cidx, c_ok, B * P)
            attn, _ = _attn_tile(scores_ptr, b, cidx, lidx, P, L, lse, inv_temp)
            grad_v = _load_rows(dv_ptr + image * P * D, cidx, offs_o, P, D, D, tl.float32) * sigma
            acc = tl.dot(tl.trans(attn * inv_n[:, None]).to(DOT_DTYPE), grad_v.to(DOT_DTYPE), acc,
                         input_precision=PRECISION)
    if HAS_GRAM:
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
            q = tl.load(pair_ptr + b * P + cidx, mask=c_ok, other=0.0)
            attn, _ = _attn_tile(scores_ptr, b, cidx, lidx, P, L, lse, inv_temp)
            pooled = _load_rows(w_ptr + b * P * D, cidx, offs_o, P, D, D, DOT_DTYPE)  # [BLOCK_P, BLOCK_DO]
            acc = tl.dot(tl.trans(-q[:, None] * attn).to(DOT_DTYPE), pooled, acc, input_precision=PRECISION)
    factor = tl.load(grad_scale_ptr + 1)                               # XAC: ∂L; pooling: 1/σ
    tl.store(d_tokens_ptr + (image * L + lidx[:, None]) * D + offs_o[None, :],
             (acc * factor).to(d_tokens_ptr.dtype.element_ty),
             mask=(lidx < L)[:, None] & (offs_o < D)[None, :])


@triton.jit
def _xattn_dconcepts_kernel(
    tokens_ptr, x_ptr, grad_scale_ptr, dc_ptr,    # dc: the float32 ∂C accumulator [P, D], or (SPLIT) partials [S, P, D]
    image0, n_images, split_images, L, P, D,
    SPLIT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Σ_i X_i U_i for a concept block (axis 0), one D slice (axis 1), over the chunk's images of one split
    (axis 2): added to the accumulator, or (SPLIT) written as this split's partial."""
    pid_p = tl.program_id(0).to(tl.int64)
    cidx = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_o = tl.program_id(1).to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    split = tl.program_id(2)
    acc = tl.zeros((BLOCK_P, BLOCK_DO), dtype=tl.float32)
    first = split * split_images
    for b_i32 in range(first, tl.minimum(first + split_images, n_images)):
        b = pid_p * 0 + b_i32                          # int64 (a plain .to() fails on the interpreter's int)
        tok_ptr = tokens_ptr + (image0 + b) * L * D
        for l0 in range(0, L, BLOCK_L):
            lidx = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
            x, _ = _ws_tile(x_ptr, b, cidx, lidx, P, L)                              # [BLOCK_P, BLOCK_L]
            tok = _load_rows(tok_ptr, lidx, offs_o, L, D, D, DOT_DTYPE)               # [BLOCK_L, BLOCK_DO]
            acc = tl.dot(x.to(DOT_DTYPE), tok, acc, input_precision=PRECISION)
    acc = acc * tl.load(grad_scale_ptr + 1)                            # XAC: ∂L; pooling: 1/σ
    mask = (cidx < P)[:, None] & (offs_o < D)[None, :]
    if SPLIT:
        tl.store(dc_ptr + (split.to(tl.int64) * P + cidx[:, None]) * D + offs_o[None, :], acc, mask=mask)
    else:
        ptrs = dc_ptr + cidx[:, None] * D + offs_o[None, :]
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc, mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Host launchers (no autograd)
# --------------------------------------------------------------------------------------------------------------
MIN_BLOCK = 16                 # smallest tl.dot extent on a GPU
WORKSPACE_BYTES = 256 << 20    # default bound on the per-chunk workspaces (R, X, E, G, M or W, q, κ and γ)
MAX_CHUNK = 65_535             # images are grid axis 2 (CUDA's limit on the y/z axes)
OUT_VHAT, OUT_NORMS, OUT_W = 0, 1, 2   # what _xattn_pool_out_kernel writes of A U
NUM_WARPS = 8                  # 64 × 64/128 tiles: wgmma on sm_90, no spills on sm_80/sm_90 (python -m compclip.kernels.aot)
BLOCK_L_CHOICES = (64, 32)     # token tiles: 16 would pad less but halves the intensity of the K = D loops again

_TORCH_DTYPE = {tl.float16: torch.float16, tl.bfloat16: torch.bfloat16, tl.float32: torch.float32}

ROUTES = ("gram", "pooled")


def choose_block_l(L: int, requested: Optional[int] = None) -> int:
    """Token tile: ``requested``, or the one of BLOCK_L_CHOICES that pads L least (the larger on a tie): 64 for
    L = 50 (both pad to 64) and 1024, 32 for L = 196 / 197 (224, not 256), 257 (288) and 577 (608). Small L get
    the smallest power of two ≥ 16 that covers them."""
    if requested is not None:
        return block_size(requested, L, requested)
    if L <= BLOCK_L_CHOICES[-1]:
        return block_size(None, L, BLOCK_L_CHOICES[-1])
    return min(BLOCK_L_CHOICES, key=lambda b: (triton.cdiv(L, b) * b, -b))


def _padded(extent: int, block: int) -> int:
    return triton.cdiv(extent, block) * block


def executed_passes(op: str, P: int, L: int, D: int, route: str, tiles: Optional[dict] = None,
                    need_tokens: bool = True, need_concepts: bool = True) -> dict:
    """Dot FLOPs the kernels execute, in passes of 2·B·P·L·D: {"forward", "backward", "total"} with the padding of
    P, L and D to their tiles (``tiles``: BLOCK_P, BLOCK_L, BLOCK_D, BLOCK_DO; the defaults of ``_tiles``), and
    the same without padding under "useful_*". One term per tl.dot loop of the kernels above (extents are the
    dot's M, N and K); ``tests/kernels/test_kernel_passes.py`` checks the executed count against the
    interpreter's."""
    if tiles is None:
        tiles = default_tiles(P, L, D)
    pool = op.split("[")[0] == "concept_attention_pool"
    need_x = need_tokens or need_concepts

    def count(p, l, d_k, d_o):
        # p, l: padded P and L; d_k: D padded by BLOCK_D (K loops over D); d_o: D padded by BLOCK_DO (outputs)
        gram, r_pass = l * l * d_k, p * l * d_k
        forward = r_pass
        backward = r_pass + (p * l * d_k if pool else 0)                         # R again, E
        if pool:
            forward += p * l * d_o                                               # v̂ = A U / n
        if route == "gram":
            forward += gram + p * l * l                                          # G, h = A G
            backward += (gram + p * l * l) if need_x else 0                      # G, h in X
            backward += (l * l * p + l * l * d_o) if need_tokens else 0          # M, M U
        else:
            forward += p * l * d_o                                               # W (‖w‖² per slice)
            backward += (p * l * d_o + p * l * d_k) if need_x else 0             # W, h = W Uᵀ
            backward += l * p * d_o if need_tokens else 0                        # (qA)ᵀ W
        backward += l * p * d_o if need_tokens else 0                            # Xᵀ C
        backward += l * p * d_o if need_tokens and pool else 0                   # (A/n)ᵀ dV
        backward += p * l * d_o if need_concepts else 0                          # X U
        unit = max(P * L * D, 1)
        return forward / unit, backward / unit

    fwd, bwd = count(_padded(P, tiles["BLOCK_P"]), _padded(L, tiles["BLOCK_L"]), _padded(D, tiles["BLOCK_D"]),
                     _padded(D, tiles["BLOCK_DO"]))
    useful_fwd, useful_bwd = count(P, L, D, D)
    return dict(forward=fwd, backward=bwd, total=fwd + bwd, useful_forward=useful_fwd, useful_backward=useful_bwd,
                useful_total=useful_fwd + useful_bwd)


def default_tiles(P: int, L: int, D: int, block_p=None, block_l=None, block_d=None, block_do=None) -> dict:
    return dict(BLOCK_P=block_size(block_p, P, 64), BLOCK_L=choose_block_l(L, block_l),
                BLOCK_D=block_size(block_d, D, 64), BLOCK_DO=block_size(block_do, D, 128))


def choose_route(P: int, L: int, D: int, tiles: Optional[dict] = None) -> str:
    """The route with fewer executed passes of XAC (padding included; "gram" on a tie: it keeps less memory).
    Useful work: "gram" costs 3·L/D + 3·L/P passes beyond XAC's 4, "pooled" a flat 4 (module docstring)."""
    gram = executed_passes("xac_loss_sum", P, L, D, "gram", tiles)["total"]
    pooled = executed_passes("xac_loss_sum", P, L, D, "pooled", tiles)["total"]
    return "gram" if gram <= pooled + 1e-9 else "pooled"


def workspace_bytes_per_image(P: int, L: int, D: int, pool: bool, route: str, dot_bytes: int = 4,
                              slices: int = 1) -> int:
    """Workspace one image of a chunk needs, bounding forward and backward together. float32: R, E (pooling
    backward), (q, κ, γ), the pooled route's Σ w² per D slice (forward); in the dot dtype (``dot_bytes``), what
    only enters dots: X and either G and M ("gram") or W ("pooled")."""
    f32 = (2 if pool else 1) * P * L + 3 * P + (P * slices if route == "pooled" else 0)
    return 4 * f32 + dot_bytes * (P * L + (2 * L * L if route == "gram" else P * D))


def _tiles(tokens, concepts, pool, block_p, block_l, block_d, block_do, chunk, route) -> dict:
    """Tiles, route, images per chunk, dot dtype and the SM count (for the ∂C split) of one op call."""
    B, L, D = tokens.shape
    P = concepts.shape[0]
    dot_dtype, precision = dot_config(tokens, concepts, follow_tf32=True)
    for name, requested in (("block_p", block_p), ("block_l", block_l), ("block_d", block_d),
                            ("block_do", block_do)):
        if requested is not None and requested < MIN_BLOCK:
            raise ValueError(f"{name} must be >= {MIN_BLOCK} (tl.dot needs M, N, K >= 16 on a GPU), got {requested}")
    meta = default_tiles(P, L, D, block_p, block_l, block_d, block_do)
    route = choose_route(P, L, D, meta) if route is None else route
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    meta.update(DOT_DTYPE=dot_dtype, PRECISION=precision, ws_dtype=_TORCH_DTYPE[dot_dtype], route=route,
                sms=sm_count(tokens))
    if chunk is None:
        chunk = WORKSPACE_BYTES // max(1, workspace_bytes_per_image(P, L, D, pool, route, meta["ws_dtype"].itemsize,
                                                                    triton.cdiv(D, meta["BLOCK_DO"])))
    elif chunk < 1:
        raise ValueError(f"chunk must be >= 1 image, got {chunk}")
    chunk = max(1, min(int(chunk), max(B, 1), MAX_CHUNK))
    # Chunks of (nearly) equal size: a last chunk of a few images would be a launch that fills no GPU.
    meta["chunk"] = triton.cdiv(max(B, 1), triton.cdiv(max(B, 1), chunk))
    return meta


def _chunks(B: int, chunk: int):
    for image0 in range(0, B, chunk):
        yield image0, min(chunk, B - image0)


def _coef_stages(meta) -> int:
    """Software-pipelining depth of X's kernel: on the "gram" route its A G loop, multi-buffered at 64-token tiles
    next to the [64, 64] float32 tiles of h, A, E and X, spills on sm_80 (ptxas: 80 B at 3 stages, 0 at 1); one
    stage there, where L ≤ 64 leaves nothing to pipeline anyway (longer L take 32-token tiles or the pooled
    route, whose D loop keeps the default 3)."""
    return 1 if meta["route"] == "gram" and meta["BLOCK_L"] >= 64 else 3


def _tile_meta(meta, *names):
    return {k: meta[k] for k in (*names, "DOT_DTYPE", "PRECISION")}


def _xac_loss_rows(stats, owner, scale, bias, first_image: int) -> torch.Tensor:
    """Σ_p softplus(−y z) per image from the statistics [3, n, P] (the pooled route's forward epilogue)."""
    norm_sq, w_dot_c = stats[1], stats[2]
    logits = scale * w_dot_c / norm_sq.sqrt().clamp_min(NORM_EPS.value)
    if bias is not None:
        logits = logits + bias
    images = torch.arange(stats.shape[1], device=stats.device) + first_image
    sign = torch.where(owner.view(1, -1) == images.view(-1, 1), 1.0, -1.0)
    return torch.nn.functional.softplus(-sign * logits).sum(1)


def xattn_forward(tokens, concepts, owner, scale, bias, temperature, image_offset, meta):
    """(out, stats): pooling (``owner`` None): v̂ [B, P, D] float32; XAC: the loss partials [B, ⌈P/BLOCK_P⌉]
    float32 (sum them). stats = (lse, ‖w‖², ⟨w,c⟩) [3, B, P] float32, what the backward reads. ``bias`` may be
    None (no bias)."""
    B, L, D = tokens.shape
    P = concepts.shape[0]
    pool, gram_route, chunk = owner is None, meta["route"] == "gram", meta["chunk"]
    n_blocks, n_do = triton.cdiv(P, meta["BLOCK_P"]), triton.cdiv(D, meta["BLOCK_DO"])
    inv_temp = 1.0 / temperature
    f32 = dict(dtype=torch.float32, device=tokens.device)
    stats = torch.empty(3, B, P, **f32)
    out = torch.empty(B, P, D, **f32) if pool else torch.zeros(B, n_blocks, **f32)
    scores = torch.empty(chunk, P, L, **f32)
    gram = torch.empty(chunk, L, L, dtype=meta["ws_dtype"], device=tokens.device) if gram_route else None
    norms = None if gram_route else torch.empty(chunk, P, n_do, **f32)       # Σ w² per D slice
    xac = None if pool else (owner, scale, bias)
    for image0, n in _chunks(B, chunk):
        if gram_route:
            launch(_xattn_gram_kernel, (triton.cdiv(L, meta["BLOCK_L"]),) * 2 + (n,), tokens, gram, image0, L, D,
                   num_warps=NUM_WARPS, **_tile_meta(meta, "BLOCK_L", "BLOCK_D"))
        launch(_xattn_fwd_kernel, (n_blocks, n),
               tokens, concepts, *(xac or (None, None, None)),
               scores, gram,
               stats, out if gram_route and not pool else None,
               image0, B, L, P, D, inv_temp, image_offset,
               HAS_GRAM=gram_route, HAS_LOSS=not pool, HAS_BIAS=bias is not None, num_warps=NUM_WARPS,
               **_tile_meta(meta, "BLOCK_P", "BLOCK_L", "BLOCK_D"))
        if not gram_route:   # ‖w‖² from W = A U, formed slice by slice and not stored
            _pool_out(tokens, scores, stats, norms, image0, n, OUT_NORMS, meta, inv_temp)
            stats[1, image0:image0 + n] = norms[:n].sum(-1)
            if not pool and n_blocks:
                out[image0:image0 + n, 0] = _xac_loss_rows(stats[:, image0:image0 + n], owner, scale, bias,
                                                           image0 + image_offset)
        if pool:
            _pool_out(tokens, scores, stats, out, image0, n, OUT_VHAT, meta, inv_temp)
    return out, stats


def _pool_out(tokens, scores, stats, out, image0, n, output, meta, inv_temp):
    """A U for images [image0, image0 + n) of a chunk: ``output`` OUT_VHAT, OUT_NORMS or OUT_W."""
    B, L, D = tokens.shape
    P = stats.shape[2]
    launch(_xattn_pool_out_kernel, (triton.cdiv(P, meta["BLOCK_P"]), triton.cdiv(D, meta["BLOCK_DO"]), n),
           tokens, scores, stats, out,
           image0, B, L, P, D, inv_temp,
           OUTPUT=output, num_warps=NUM_WARPS, **_tile_meta(meta, "BLOCK_P", "BLOCK_L", "BLOCK_DO"))


def xattn_backward(tokens, concepts, owner, scale, bias, stats, dv, grad_scale, temperature, image_offset, meta,
                   need=(True, True, True)):
    """(d_tokens, d_concepts, d_scale_partials, d_bias_partials). Pooling (``owner`` None): ``dv`` is ∂v̂
    [B, P, D] float32 and ``grad_scale`` = [σ, 1/σ]; XAC: ``dv`` None and ``grad_scale`` = [1, ∂L]. ``need``:
    (tokens, concepts, scale or bias) want a gradient; what is not needed comes back None (partials: empty) and
    the kernels only it needs do not run."""
    B, L, D = tokens.shape
    P = concepts.shape[0]
    need_tokens, need_concepts, need_scalars = need
    pool, gram_route, chunk, sms = owner is None, meta["route"] == "gram", meta["chunk"], meta["sms"]
    n_blocks, n_l, n_do = (triton.cdiv(P, meta["BLOCK_P"]), triton.cdiv(L, meta["BLOCK_L"]),
                           triton.cdiv(D, meta["BLOCK_DO"]))
    inv_temp = 1.0 / temperature
    f32, dot = dict(dtype=torch.float32, device=tokens.device), dict(dtype=meta["ws_dtype"], device=tokens.device)
    need_x = need_tokens or need_concepts
    d_tokens = torch.empty_like(tokens) if need_tokens else None
    d_concepts = torch.zeros(P, D, **f32) if need_concepts else None
    partials = torch.zeros(2, B, n_blocks, **f32) if not pool else torch.zeros(2, 0, **f32)
    if not (need_x or (need_scalars and not pool)):
        return d_tokens, d_concepts, partials[0], partials[1]
    scores, pair = torch.empty(chunk, P, L, **f32), torch.empty(3, chunk, P, **f32)
    e = torch.empty(chunk, P, L, **f32) if pool else None
    x = torch.empty(chunk, P, L, **dot) if need_x else None
    gram = torch.empty(chunk, L, L, **dot) if gram_route and need_x else None
    m = torch.empty(chunk, L, L, **dot) if gram_route and need_tokens else None
    w = torch.empty(chunk, P, D, **dot) if not gram_route and need_x else None
    # ∂C: the P × D output tiles alone may not fill the GPU; the chunk's images are then split (split-K)
    splits, split_images = split_axis(n_blocks * n_do, chunk, 1, sms)
    dc_partials = torch.empty(splits, P, D, **f32) if need_concepts and splits > 1 else None
    xac = None if pool else (owner, scale, bias)
    pairs_meta = dict(num_warps=NUM_WARPS, **_tile_meta(meta, "BLOCK_P", "BLOCK_L", "BLOCK_D"))
    for image0, n in _chunks(B, chunk):
        launch(_xattn_bwd_stats_kernel, (n_blocks, n),
               tokens, concepts, *(xac or (None, None, None)), dv, grad_scale,
               scores, e, pair,
               stats, None if pool else partials,
               image0, chunk, B, L, P, D, inv_temp, image_offset,
               HAS_DV=pool, HAS_BIAS=bias is not None, **pairs_meta)
        if not need_x:
            continue
        if gram_route:
            launch(_xattn_gram_kernel, (n_l, n_l, n), tokens, gram, image0, L, D,
                   num_warps=NUM_WARPS, **_tile_meta(meta, "BLOCK_L", "BLOCK_D"))
        else:
            _pool_out(tokens, scores, stats, w, image0, n, OUT_W, meta, inv_temp)
        launch(_xattn_bwd_coef_kernel, (n_blocks, n),
               tokens, scores, e, pair,
               gram, w,
               stats, x,
               image0, chunk, B, L, P, D, inv_temp,
               HAS_DV=pool, HAS_GRAM=gram_route, num_stages=_coef_stages(meta), **pairs_meta)
        if need_tokens:
            if gram_route:
                launch(_xattn_mgram_kernel, (n_l, n_l, n), scores, pair, stats, m, image0, L, P, inv_temp,
                       num_warps=NUM_WARPS, **_tile_meta(meta, "BLOCK_P", "BLOCK_L"))
            launch(_xattn_dtokens_kernel, (n_l, n_do, n),
                   tokens, concepts, dv, grad_scale,
                   scores, x, pair, stats,
                   m, w,
                   d_tokens,
                   image0, B, L, P, D, inv_temp,
                   HAS_DV=pool, HAS_GRAM=gram_route, num_warps=NUM_WARPS,
                   **_tile_meta(meta, "BLOCK_P", "BLOCK_L", "BLOCK_DO"))
        if need_concepts:
            chunk_splits, chunk_images = split_axis(n_blocks * n_do, n, 1, sms, splits)
            launch(_xattn_dconcepts_kernel, (n_blocks, n_do, chunk_splits),
                   tokens, x, grad_scale, dc_partials if chunk_splits > 1 else d_concepts,
                   image0, n, chunk_images, L, P, D,
                   SPLIT=chunk_splits > 1, num_warps=NUM_WARPS, **_tile_meta(meta, "BLOCK_P", "BLOCK_L", "BLOCK_DO"))
            if chunk_splits > 1:
                block = combine_block(P * D, sms, 128, 1024)
                launch(_sum_splits_kernel, (triton.cdiv(P * D, block),),
                       dc_partials, d_concepts, None,
                       chunk_splits, P, P, D,
                       HAS_OUT2=False, ACCUMULATE=True, BLOCK=block)
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
        pooled, stats = xattn_forward(tokens, concepts, None, None, None, temperature, 0, meta)
        ctx.save_for_backward(tokens, concepts, stats)
        ctx.temperature, ctx.meta = temperature, meta
        return pooled

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pooled):
        tokens, concepts, stats = ctx.saved_tensors
        dv = grad_pooled.float().contiguous()
        # σ brings max|dV| to (1/2, 1] before dV meets a 16-bit operand; the stores multiply by 1/σ (docstring)
        sigma = pow2_scale(dv, 0)
        d_tokens, d_concepts, _, _ = xattn_backward(
            tokens, concepts, None, None, None, stats, dv, torch.cat([sigma, 1.0 / sigma]), ctx.temperature, 0,
            ctx.meta, (needs_grad(ctx, 0), needs_grad(ctx, 1), False))
        return d_tokens, d_concepts, None, None


class XACLossSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, concepts, owner, logit_scale, logit_bias, temperature, image_offset, meta):
        tokens, concepts, owner = contiguous(tokens, concepts, owner)
        scale = scalar_arg(logit_scale, tokens.device)
        bias = None if logit_bias is None else scalar_arg(logit_bias, tokens.device)
        partials, stats = xattn_forward(tokens, concepts, owner, scale, bias, temperature, image_offset, meta)
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
        need_scalars = (needs_grad(ctx, 3) and ctx.scalars[0] is not None) or \
            (needs_grad(ctx, 4) and ctx.scalars[1] is not None)
        d_tokens, d_concepts, scale_partials, bias_partials = xattn_backward(
            tokens, concepts, owner, scale, bias, stats, None, torch.cat([torch.ones_like(grad), grad]),
            ctx.temperature, ctx.image_offset, ctx.meta, (needs_grad(ctx, 0), needs_grad(ctx, 1), need_scalars))
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
    meta = _tiles(tokens, concepts, True, block_p, block_l, block_d, block_do, chunk, route)
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
    meta = _tiles(tokens, concepts, False, block_p, block_l, block_d, block_do, chunk, route)
    return XACLossSum.apply(tokens, concepts, owner, logit_scale, logit_bias, float(temperature), int(image_offset),
                            meta)
