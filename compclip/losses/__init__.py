"""compclip.losses — the loss functions of CE-CLIP, DeGLA and C2LIP.

* The functional API (single process, the whole batch; docs/losses.md): ``clip_loss``, ``negclip_loss``,
  ``ceclip_cmr_loss``, ``ceclip_threshold``, ``ceclip_imc_loss``, ``degla_igc_loss``, ``degla_tgc_loss``,
  ``degla_distill_loss``, ``siglip_loss``, ``c2lip_npc_loss``, ``concept_attention_pool``, ``c2lip_xac_loss``.
* ``compclip.losses.terms``: the same losses on the global batch under data parallelism (``TERMS``,
  ``Features``, ``required_features``, ``CMRThreshold``, ``cmr_threshold``). The math of each term is written
  once, there: the functional API runs the terms on a world of one (``terms.Local``).
* ``compclip.losses.modules``: ``nn.Module`` wrappers — ``CompositionalLoss`` (any weighted terms) and
  ``ClipLoss``, ``NegClipLoss``, ``CEClipLoss``, ``DeGLALoss``, ``C2LIPLoss`` with the published weights.

The terms run the kernel-level ops of ``compclip.kernels`` (Triton or reference, chosen by ``dispatch``) through
``compclip.losses.partials`` (un-normalised sums over local rows against gathered columns).
"""
from . import functional, modules, terms  # noqa: F401
from .functional import (  # noqa: F401
    c2lip_npc_loss,
    c2lip_xac_loss,
    ceclip_cmr_loss,
    ceclip_imc_loss,
    ceclip_threshold,
    clip_loss,
    concept_attention_pool,
    degla_distill_loss,
    degla_igc_loss,
    degla_tgc_loss,
    negclip_loss,
    siglip_loss,
)
from .modules import (  # noqa: F401
    PUBLISHED_WEIGHTS,
    published_weights,
    C2LIPLoss,
    CEClipLoss,
    ClipLoss,
    CompositionalLoss,
    DeGLALoss,
    NegClipLoss,
)
from .terms import TERMS, CMRThreshold, Features, required_features  # noqa: F401

__all__ = functional.__all__ + ["terms", "modules", "TERMS", "Features", "CMRThreshold", "required_features"] \
    + modules.__all__
