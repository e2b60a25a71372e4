"""Any combination of loss terms, given in `loss.terms`; without them DeGLA's objective plus C2LIP's concept terms
(npc, xac) at their published weights.

Its weights: compclip.losses.modules.PUBLISHED_WEIGHTS["composite"].
"""
from .base import Method, register


@register("composite")
class Composite(Method):
    label = "DeGLA+NPC/XAC"
