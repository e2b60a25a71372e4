"""NegCLIP (Yuksekgonul et al., 2023): every image against all positives and all hard negatives of the batch."""
from compclip.losses.modules import PUBLISHED_WEIGHTS

from .base import Method, register


@register("negclip")
class NegCLIP(Method):
    default_terms = PUBLISHED_WEIGHTS["negclip"]
