"""Methods: registry name -> class (what features to compute, which loss terms to sum, stateful hooks).

The registry is the one list of method names: the config checks `loss.method` against it and the study runs its
methods in its order (the baselines first), under each method's `label`.
"""
# isort: off  (the import order is the registry's order)
from . import clip, negclip, ceclip, degla, c2lip, composite  # noqa: F401  (registration)
# isort: on
from .base import REGISTRY, Method, build_method, register

__all__ = ["REGISTRY", "Method", "build_method", "register"]
