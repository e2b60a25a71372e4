"""The implementations each benchmark compares, behind one calling convention per op.

Contrastive ops take ``(image, text, negatives_or_None, logit_scale)`` and return the symmetric loss:
* ``torch``     — compclip's materialised PyTorch reference (``backend="torch"``);
* ``triton``    — compclip's fused kernels (``backend="triton"``);
* ``linear_ce`` — ``torch.nn.functional.linear_cross_entropy`` with chunking, once per direction;
* ``infcl``     — Inf-CL's ``cal_inf_loss`` (plain CLIP only, CUDA only, when ``inf-cl`` is installed).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

import compclip.losses as losses


def _negclip(backend: str) -> Callable:
    def loss(image, text, negatives, logit_scale):
        if negatives is None:
            return losses.clip_loss(image, text, logit_scale, backend=backend)
        return losses.negclip_loss(image, text, negatives, logit_scale, backend=backend)

    return loss


def _linear_ce(image, text, negatives, logit_scale):
    options = torch.nn.LinearCrossEntropyOptions()
    targets = torch.arange(image.shape[0], device=image.device)
    columns = text if negatives is None else torch.cat([text, negatives.flatten(0, 1)])
    image_to_text = F.linear_cross_entropy(image * logit_scale.to(image.dtype), columns, targets, options=options)
    text_to_image = F.linear_cross_entropy(text * logit_scale.to(text.dtype), image, targets, options=options)
    return 0.5 * (image_to_text + text_to_image)


def _infcl() -> Optional[Callable]:
    try:
        from inf_cl import cal_inf_loss
    except Exception:
        return None

    def loss(image, text, negatives, logit_scale):
        if negatives is not None:
            raise ValueError("Inf-CL has no hard negatives")
        # Inf-CL computes one direction per call; the symmetric CLIP loss is the mean of both.
        return 0.5 * (cal_inf_loss(image, text, scale=logit_scale) + cal_inf_loss(text, image, scale=logit_scale))

    return loss


def contrastive_providers() -> Dict[str, Optional[Callable]]:
    return {"torch": _negclip("torch"), "triton": _negclip("triton"), "linear_ce": _linear_ce, "infcl": _infcl()}
