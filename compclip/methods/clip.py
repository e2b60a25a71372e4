"""CLIP fine-tuning baseline: the symmetric InfoNCE (SigLIP's sigmoid loss for models with a logit bias)."""
from .base import Method, register


@register("clip")
class CLIP(Method):
    def published_terms(self):
        return {"siglip": 1.0} if self.has_logit_bias else {"clip": 1.0}
