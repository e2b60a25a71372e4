"""compclip.kernels — fused Triton losses for compositional CLIP fine-tuning.

Installed as ``compclip.kernels`` (the repository folder is ``kernels/``). Public API:

* ``reference`` — PyTorch references of every kernel (same signatures).
* ``dispatch``  — backend resolution (``auto`` | ``triton`` | ``torch``) with reasons.
* kernel ops (Triton, autograd-aware), same signatures as their references:
  ``contrastive_row_loss``, ``grouped_scores``, ``grouped_contrast_row_loss``, ``concept_attention_pool``,
  ``xac_loss_sum``. Where triton itself cannot be imported they are simply absent (``dispatch`` then gives the
  reason and the reference serves).
"""
from . import dispatch, reference  # noqa: F401

try:
    from .contrastive import contrastive_row_loss  # noqa: F401
    from .grouped import grouped_contrast_row_loss, grouped_scores  # noqa: F401
    from .xattn_pool import concept_attention_pool, xac_loss_sum  # noqa: F401
except ImportError:  # pragma: no cover - platforms without triton
    pass
