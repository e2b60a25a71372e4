"""compclip.kernels — fused Triton losses for compositional CLIP fine-tuning.

Installed as ``compclip.kernels`` (the repository folder is ``kernels/``). Public API:

* ``reference`` — PyTorch references of every kernel (same signatures).
* ``dispatch``  — backend resolution (``auto`` | ``triton`` | ``torch``) with reasons.
* kernel ops (Triton, autograd-aware), same signatures as their references:
  ``contrastive_row_loss``, ``grouped_scores``, ``grouped_contrast_row_loss``, ``concept_attention_pool``,
  ``xac_loss_sum``. Where triton itself cannot be imported they are absent (``dispatch`` logs the reason and the
  reference serves); an import error inside a kernel module is raised, never hidden.
"""
from . import dispatch, reference  # noqa: F401

# Only a missing (or unimportable) Triton is a reason to run without the kernel ops; dispatch logs it and every op
# then resolves to the reference. An error inside a kernel module itself is a bug and must surface here.
_TRITON_MISSING = dispatch.triton_available()
if _TRITON_MISSING is None:
    from .contrastive import contrastive_row_loss  # noqa: F401
    from .grouped import grouped_contrast_row_loss, grouped_scores  # noqa: F401
    from .xattn_pool import concept_attention_pool, xac_loss_sum  # noqa: F401
else:  # pragma: no cover - platforms without triton
    dispatch.logger.warning("compclip.kernels: Triton ops not loaded, the PyTorch references serve: %s",
                            _TRITON_MISSING)
