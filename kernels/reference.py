"""PyTorch references of every compclip kernel, with the kernels' exact signatures.

These are the ground truth the Triton kernels are tested against, and the ``backend="torch"`` path of
``compclip.losses``. They materialise everything (logits, pooled tensors) and are meant to be obviously right,
not fast. Arithmetic runs in float32 for fp16/bf16/fp32 inputs and in float64 for float64 inputs; outputs are in
that accumulation dtype.

Shared conventions
------------------
* ``logit_scale`` is the *already exponentiated* scale s (a 0-d tensor that may require grad, or a Python float).
* ``logit_bias`` is a 0-d tensor, a float, or ``None`` (no bias).
* L2 normalisation is ``v / max(||v||, 1e-12)`` (``torch.nn.functional.normalize``'s rule).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

Scalar = Union[torch.Tensor, float]

NORM_EPS = 1e-12


def accumulation_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any floating input is float64, else float32."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _as(t: Scalar, dtype: torch.dtype, device) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.to(dtype)
    return torch.tensor(float(t), dtype=dtype, device=device)


def contrastive_row_loss(
    anchors: torch.Tensor,
    columns: torch.Tensor,
    logit_scale: Scalar,
    targets: torch.Tensor,
    extra_logits: Optional[torch.Tensor] = None,
    extra_columns: Optional[torch.Tensor] = None,
    deterministic: bool = True,
) -> torch.Tensor:
    """Per-row softmax cross-entropy of ``s · anchors · columnsᵀ``.

    ``extra_columns`` [N2, D] (optional): a second column source, appended after ``columns`` (column N + j is
    ``extra_columns[j]``); the Triton kernel reads it in place, here it is simply concatenated.
    ``deterministic`` is accepted for signature parity with the kernel (whose ``False`` picks its atomic
    backward); the reference is always deterministic.

    anchors [M, D], columns [N, D], targets [M] long. ``targets[m]`` is a column index in [0, N), or -1 to mean
    the row's extra logit. ``extra_logits`` [M] (optional) is one more logit per row that takes part in the
    log-sum-exp (IMC's image–text positive); it receives a gradient.

        loss_m = log( [exp(e_m)] + Σ_n exp(s⟨a_m, c_n⟩) ) − (s⟨a_m, c_{t_m}⟩  or  e_m if t_m = −1)

    Returns [M] in the accumulation dtype.
    """
    if extra_columns is not None:
        columns = torch.cat([columns, extra_columns])
    dtype = accumulation_dtype(anchors, columns, extra_logits)
    scale = _as(logit_scale, dtype, anchors.device)
    logits = scale * (anchors.to(dtype) @ columns.to(dtype).t())
    targets = targets.long()
    if extra_logits is not None:
        logits = torch.cat([extra_logits.to(dtype).unsqueeze(1), logits], dim=1)
        targets = targets + 1
    return F.cross_entropy(logits, targets, reduction="none")


def grouped_scores(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    logit_scale: Scalar,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores of each anchor against its own positive and its own K negatives.

    anchors [B, D], positives [B, D], negatives [B, K, D] -> (s⟨a_i, p_i⟩ [B], s⟨a_i, n_ik⟩ [B, K]).
    """
    dtype = accumulation_dtype(anchors, positives, negatives)
    scale = _as(logit_scale, dtype, anchors.device)
    a = anchors.to(dtype)
    pos = scale * (a * positives.to(dtype)).sum(-1)
    neg = scale * torch.einsum("bd,bkd->bk", a, negatives.to(dtype))
    return pos, neg


def grouped_contrast_row_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    logit_scale: Scalar,
) -> torch.Tensor:
    """Per-row loss −log softmax([s⟨a_i,p_i⟩, s⟨a_i,n_i1⟩ … s⟨a_i,n_iK⟩])[0]  (IGC, TGC). Returns [B]."""
    pos, neg = grouped_scores(anchors, positives, negatives, logit_scale)
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1)
    return torch.logsumexp(logits, dim=1) - pos


def concept_attention_pool(
    tokens: torch.Tensor,
    concepts: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Parameter-free cross-modal attention pooling.

    tokens u [B, L, D] (L2-normalised visual tokens), concepts c [P, D] ->
        a_ipl = softmax_l(⟨u_il, c_p⟩ / T),  v̂_ip = normalize(Σ_l a_ipl u_il)      -> [B, P, D]
    """
    dtype = accumulation_dtype(tokens, concepts)
    u = tokens.to(dtype)
    scores = torch.einsum("bld,pd->bpl", u, concepts.to(dtype)) / temperature
    attn = torch.softmax(scores, dim=-1)
    pooled = torch.einsum("bpl,bld->bpd", attn, u)
    return F.normalize(pooled, dim=-1, eps=NORM_EPS)


def xac_loss_sum(
    tokens: torch.Tensor,
    concepts: torch.Tensor,
    owner: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Optional[Scalar] = None,
    temperature: float = 1.0,
    image_offset: int = 0,
) -> torch.Tensor:
    """Sum over all (image, concept) pairs of the sigmoid loss on the pooled image (XAC, unnormalised).

        Σ_i Σ_p −log σ( y_ip (s⟨v̂_ip, c_p⟩ + b) ),   y_ip = +1 if owner[p] == image_offset + i else −1

    tokens [B, L, D], concepts [P, D], owner [P] long (global image index). ``image_offset`` is the global index
    of local image 0 (data parallel: local images against gathered concepts). Returns a 0-d tensor.
    """
    dtype = accumulation_dtype(tokens, concepts)
    pooled = concept_attention_pool(tokens, concepts, temperature)
    c = concepts.to(dtype)
    logits = _as(logit_scale, dtype, tokens.device) * (pooled * c.unsqueeze(0)).sum(-1)  # [B, P]
    if logit_bias is not None:
        logits = logits + _as(logit_bias, dtype, tokens.device)
    image_ids = torch.arange(tokens.shape[0], device=tokens.device) + image_offset
    labels = torch.where(owner.view(1, -1) == image_ids.view(-1, 1), 1.0, -1.0).to(dtype)
    return -F.logsigmoid(labels * logits).sum()
