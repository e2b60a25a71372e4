"""NegCLIP (Yuksekgonul et al., 2023): every image against all positives and all hard negatives of the batch."""
from .base import PUBLISHED_WEIGHTS, Method, register


@register("negclip")
class NegCLIP(Method):
    default_terms = PUBLISHED_WEIGHTS["negclip"]
