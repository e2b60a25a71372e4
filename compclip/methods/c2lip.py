"""C2LIP (concept-centric): the contrastive loss (SigLIP's sigmoid loss, or CLIP InfoNCE for models without a
logit bias) + 1.0 concept contrast (NPC) + 0.01 cross-modal attention contrast (XAC). No hard negatives."""
from compclip.losses.modules import PUBLISHED_WEIGHTS

from .base import Method, register


@register("c2lip")
class C2LIP(Method):
    def published_terms(self):
        weights = dict(PUBLISHED_WEIGHTS["c2lip"])
        if not self.has_logit_bias:  # a CLIP tower: InfoNCE in place of SigLIP's sigmoid loss
            weights = {("clip" if name == "siglip" else name): weight for name, weight in weights.items()}
        return weights
