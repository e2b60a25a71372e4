"""CE-CLIP (Zhang et al., 2024): NegCLIP term + 0.2 cross-modal rank (adaptive per-type threshold) + 0.2
intra-modal contrast (the authors' latest script uses 0.3 for IMC; set it in the YAML).

Its weights: compclip.losses.modules.PUBLISHED_WEIGHTS["ceclip"].
"""
from .base import Method, register


@register("ceclip")
class CEClip(Method):
    label = "CE-CLIP"
