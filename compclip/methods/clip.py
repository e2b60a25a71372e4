"""CLIP fine-tuning baseline: the symmetric InfoNCE (SigLIP's sigmoid loss for models with a logit bias)."""
from compclip.losses.modules import published_weights

from .base import Method, register


@register("clip")
class CLIP(Method):
    def published_terms(self):
        return published_weights("clip", self.contrastive_term)
