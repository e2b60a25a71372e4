"""DeGLA (Hu et al., 2025): L_base (NegCLIP) + 0.1 image-grounded + 0.1 text-grounded contrast + 0.005
distillation from a frozen EMA teacher (α = 0.9996, `loss.ema_decay`).

Its weights: compclip.losses.modules.PUBLISHED_WEIGHTS["degla"].
"""
from .base import Method, register


@register("degla")
class DeGLA(Method):
    label = "DeGLA"
