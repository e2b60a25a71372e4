"""C2LIP (concept-centric): the contrastive loss (SigLIP's sigmoid loss, or CLIP InfoNCE for models without a
logit bias) + 1.0 concept contrast (NPC) + 0.01 cross-modal attention contrast (XAC). No hard negatives."""
from .base import Method, register


@register("c2lip")
class C2LIP(Method):
    def published_terms(self):
        return {"siglip" if self.has_logit_bias else "clip": 1.0, "npc": 1.0, "xac": 0.01}
