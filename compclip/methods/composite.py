"""Any combination of loss terms, given in `loss.terms` (e.g. DeGLA's terms plus C2LIP's npc/xac)."""
from .base import Method, register


@register("composite")
class Composite(Method):
    default_terms = {}
