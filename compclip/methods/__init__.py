"""Methods: registry name -> class (what features to compute, which loss terms to sum, stateful hooks)."""
from . import c2lip, ceclip, clip, composite, degla, negclip  # noqa: F401  (registration)
from .base import REGISTRY, Method, build_method, register

__all__ = ["REGISTRY", "Method", "build_method", "register"]
