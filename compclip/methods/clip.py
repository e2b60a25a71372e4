"""CLIP fine-tuning baseline: the symmetric InfoNCE (SigLIP's sigmoid loss for models with a logit bias).

Its weights: compclip.losses.modules.PUBLISHED_WEIGHTS["clip"].
"""
from .base import Method, register


@register("clip")
class CLIP(Method):
    label = "CLIP"
