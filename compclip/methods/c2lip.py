"""C2LIP (concept-centric): the contrastive loss (SigLIP's sigmoid loss, or CLIP InfoNCE for models without a
logit bias) + 1.0 concept contrast (NPC) + 0.01 cross-modal attention contrast (XAC). No hard negatives."""
from compclip.losses.modules import published_weights

from .base import Method, register


@register("c2lip")
class C2LIP(Method):
    def published_terms(self):
        return published_weights("c2lip", self.contrastive_term)  # a CLIP tower: InfoNCE in place of SigLIP's
