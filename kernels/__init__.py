"""compclip.kernels — fused Triton losses for compositional CLIP fine-tuning.

Installed as ``compclip.kernels`` (the repository folder is ``kernels/``). Public API:

* ``reference`` — PyTorch references of every kernel (same signatures).
* ``dispatch``  — backend resolution (``auto`` | ``triton`` | ``torch``) with reasons.
* kernel ops (Triton, autograd-aware), same signatures as their references:
  ``contrastive_row_loss``, ``grouped_scores``, ``grouped_contrast_row_loss``, ``concept_attention_pool``,
  ``xac_loss_sum``.
"""
from . import dispatch, reference  # noqa: F401
