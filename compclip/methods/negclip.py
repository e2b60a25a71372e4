"""NegCLIP (Yuksekgonul et al., 2023): every image against all positives and all hard negatives of the batch.

Its weights: compclip.losses.modules.PUBLISHED_WEIGHTS["negclip"].
"""
from .base import Method, register


@register("negclip")
class NegCLIP(Method):
    label = "NegCLIP"
