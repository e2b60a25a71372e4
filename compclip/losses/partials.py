"""Un-normalised loss sums over **local** anchor rows against (possibly gathered) columns.

The kernel-level sum of each loss term, used by ``terms.py`` (columns all-gathered, or the local batch for a
world of one; divided by the global counts, then ``sum_across_ranks``), on which the functional API is built.
Kernel-backed pieces go through ``compclip.kernels.dispatch`` so the Triton kernels serve training and the
functional API alike.

Conventions: ``offset`` is the global index of local row 0; ``*_cols`` are the columns of the whole (global)
batch; inputs are already validated and share one dtype; results are 0-d tensors in the accumulation dtype
(float64 for float64 inputs, float32 otherwise).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from compclip.kernels.dispatch import kernel_op

from ._checks import accumulation_dtype


def _scale(value, dtype: torch.dtype, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    return torch.tensor(float(value), dtype=dtype, device=device)


def _rows(count: int, offset: int, device) -> torch.Tensor:
    return torch.arange(offset, offset + count, device=device)


def multi_negative_sum(image, text, image_cols, text_cols, negative_cols, logit_scale, offset, backend):
    """Σ_i∈local [CE_i(image→[texts; negatives]) + CE_i(text→images)]  (CLIP when ``negative_cols`` is None).

    image, text [b, D]; image_cols, text_cols [B, D]; negative_cols [B, K, D] or None. Target of row i: column
    offset + i. Divide by 2B for the symmetric mean.
    """
    # The negatives are a second column source read in place (no [B + BK, D] concatenated copy).
    negatives = None if negative_cols is None else negative_cols.flatten(0, 1)
    targets = _rows(image.shape[0], offset, image.device)
    op = kernel_op("contrastive_row_loss", backend, (image, text, image_cols, text_cols, negatives, logit_scale))
    image_to_text = op(image, text_cols, logit_scale, targets, extra_columns=negatives)
    text_to_image = op(text, image_cols, logit_scale, targets)
    return image_to_text.sum() + text_to_image.sum()


def imc_sum(image, text, negative_cols, logit_scale, variant, backend):
    """Σ_i∈local CE over [s⟨v_i,t_i⟩ (paper only), s⟨t_i, n_jk⟩ for every (j, k) of the batch].

    paper: target = the image–text logit (passed as the kernel's extra logit, target −1).
    released: no image–text logit; target = flat column 0 (n_00 of the global batch) for every row.
    """
    columns = negative_cols.flatten(0, 1)
    rows = text.shape[0]
    if variant == "paper":
        dtype = accumulation_dtype(image.dtype)
        scale = _scale(logit_scale, dtype, image.device)
        extra = scale * (image.to(dtype) * text.to(dtype)).sum(-1)
        targets = torch.full((rows,), -1, dtype=torch.long, device=text.device)
    else:
        extra = None
        targets = torch.zeros(rows, dtype=torch.long, device=text.device)
    op = kernel_op("contrastive_row_loss", backend, (text, columns, logit_scale, extra))
    return op(text, columns, logit_scale, targets, extra).sum()


def grouped_sum(anchors, positives, negatives, logit_scale, backend):
    """Σ_i −log softmax([s⟨a_i,p_i⟩, s⟨a_i,n_i1⟩ … s⟨a_i,n_iK⟩])[0]  (IGC, TGC)."""
    op = kernel_op("grouped_contrast_row_loss", backend, (anchors, positives, negatives, logit_scale))
    return op(anchors, positives, negatives, logit_scale).sum()


def tgc_released_negatives(negative_cols, offset: int, rows: int):
    """Negatives the released DeGLA code pairs with anchor i: flat rows i + k·B (k < K) of the image-major
    flat list of the whole batch's negatives [B·K, D]. Returns [rows, K, D] for local anchors offset … offset+rows."""
    batch, types = negative_cols.shape[:2]
    flat = negative_cols.flatten(0, 1)
    anchors = _rows(rows, offset, flat.device).unsqueeze(1)
    index = anchors + batch * torch.arange(types, device=flat.device).unsqueeze(0)
    return flat[index]


def cmr_sum(image, text, negatives, valid, logit_scale, threshold, backend):
    """Σ_i Σ_k m_ik · max(0, θ_k + s⟨v_i,n_ik⟩ − s⟨v_i,t_i⟩); θ [K] is a constant. Divide by B·K."""
    op = kernel_op("grouped_scores", backend, (image, text, negatives, logit_scale))
    positive, negative = op(image, text, negatives, logit_scale)
    theta = threshold.detach().to(device=negative.device, dtype=negative.dtype)
    hinge = torch.clamp_min(theta.unsqueeze(0) + negative - positive.unsqueeze(1), 0.0)
    return torch.where(valid, hinge, torch.zeros_like(hinge)).sum()


def threshold_stats(image, text, negatives, valid, logit_scale, backend) -> torch.Tensor:
    """Sufficient statistics of the CE-CLIP threshold, float64 [2 + 2K], no grad (sum them across ranks):
    [Σ_i S_i, B, Σ_i m_ik S_ik (K entries), Σ_i m_ik (K entries)]."""
    with torch.no_grad():
        scale = logit_scale.detach() if isinstance(logit_scale, torch.Tensor) else logit_scale
        op = kernel_op("grouped_scores", backend, (image, text, negatives, scale))
        positive, negative = op(image.detach(), text.detach(), negatives.detach(), scale)
        positive, negative = positive.double(), negative.double()
        mask = valid.to(torch.float64)
        count = torch.tensor([float(positive.shape[0])], dtype=torch.float64, device=positive.device)
        return torch.cat([positive.sum().reshape(1), count, (negative * mask).sum(0), mask.sum(0)])


def threshold_from_stats(stats: torch.Tensor, upper: float, previous: Optional[torch.Tensor]) -> torch.Tensor:
    """θ_k = clamp(mean_i S_i − Σ_i m_ik S_ik / Σ_i m_ik, 0, upper); types with Σ_i m_ik = 0 keep previous[k]."""
    types = (stats.shape[0] - 2) // 2
    negative_sum, valid_count = stats[2 : 2 + types], stats[2 + types :]
    mean_positive = stats[0] / stats[1]
    theta = (mean_positive - negative_sum / valid_count.clamp_min(1.0)).clamp(0.0, float(upper))
    if previous is None:
        previous = torch.zeros_like(theta)
    return torch.where(valid_count > 0, theta, previous.detach().to(theta))


def distill_sum(image, text, negatives, teacher_image, teacher_text, teacher_negatives):
    """Σ ‖v−v*‖² + ‖t−t*‖² + Σ_k ‖n_k−n*_k‖² over rows and dims; the teacher is a constant."""
    dtype = accumulation_dtype(image.dtype)
    total = image.new_zeros((), dtype=dtype)
    for student, teacher in ((image, teacher_image), (text, teacher_text), (negatives, teacher_negatives)):
        total = total + (student.to(dtype) - teacher.detach().to(dtype)).square().sum()
    return total


def sigmoid_sum(rows, columns, logit_scale, logit_bias, positive):
    """Σ_ij −log σ(z_ij (s⟨r_i, c_j⟩ + b)), z = +1 where ``positive`` [rows, columns] else −1 (b = 0 if None)."""
    dtype = accumulation_dtype(rows.dtype)
    logits = _scale(logit_scale, dtype, rows.device) * (rows.to(dtype) @ columns.to(dtype).t())
    if logit_bias is not None:
        logits = logits + _scale(logit_bias, dtype, rows.device)
    sign = torch.where(positive, 1.0, -1.0).to(dtype)
    return -F.logsigmoid(sign * logits).sum()


def siglip_sum(image, text_cols, logit_scale, logit_bias, offset):
    """SigLIP pairs of the local images with every text; image i's own text is text_cols[offset + i]."""
    own = _rows(image.shape[0], offset, image.device).unsqueeze(1)
    positive = own == torch.arange(text_cols.shape[0], device=image.device).unsqueeze(0)
    return sigmoid_sum(image, text_cols, logit_scale, logit_bias, positive)


def npc_sum(image, concept_cols, owner_cols, logit_scale, logit_bias, offset):
    """NPC pairs of the local images with every concept; owner_cols holds global image indices."""
    own = _rows(image.shape[0], offset, image.device).unsqueeze(1)
    positive = own == owner_cols.to(image.device).unsqueeze(0)
    return sigmoid_sum(image, concept_cols, logit_scale, logit_bias, positive)


def npc_phrase_sum(image, concept_cols, owner_cols, key_cols, logit_scale, logit_bias, offset):
    """NPC with same-phrase labels: local image i and concept j are a positive pair when one of image i's own
    concepts has concept j's key (its phrase)."""
    own = _rows(image.shape[0], offset, image.device).unsqueeze(1) == owner_cols.to(image.device).unsqueeze(0)
    keys = key_cols.to(image.device)
    same = keys.unsqueeze(1) == keys.unsqueeze(0)  # [P, P]
    positive = (own.to(torch.float32) @ same.to(torch.float32)) > 0
    return sigmoid_sum(image, concept_cols, logit_scale, logit_bias, positive)


def xac_sum(tokens, concept_cols, owner_cols, logit_scale, logit_bias, temperature, offset, backend):
    """XAC pairs (pooled local image × every concept), summed; owner_cols holds global image indices."""
    op = kernel_op("xac_loss_sum", backend, (tokens, concept_cols, logit_scale, logit_bias))
    return op(tokens, concept_cols, owner_cols, logit_scale, logit_bias, temperature, offset)


def attention_pool(tokens, concepts, temperature, backend):
    op = kernel_op("concept_attention_pool", backend, (tokens, concepts))
    return op(tokens, concepts, temperature)
