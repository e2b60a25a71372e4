"""C2LIP (concept-centric): the contrastive loss (SigLIP's sigmoid loss, or CLIP InfoNCE for models without a
logit bias) + 1.0 concept contrast (NPC) + 0.01 cross-modal attention contrast (XAC). No hard negatives.

Its weights: compclip.losses.modules.PUBLISHED_WEIGHTS["c2lip"].
"""
from .base import Method, register


@register("c2lip")
class C2LIP(Method):
    label = "C2LIP"
