"""``nn.Module`` form of the losses: a weighted sum of global-batch terms, for the trainer and for your own loop.

    loss_fn = DeGLALoss()                                   # published weights; or CompositionalLoss({...})
    total, parts = loss_fn(Features(image=v, text=t, logit_scale=s, negatives=n, valid=m,
                                    teacher_image=..., teacher_text=..., teacher_negatives=...))
    (total * world_size).backward()                         # DeepSpeed / DDP average gradients over ranks
    loss_fn.after_step(features)                            # CE-CLIP's threshold, for the next step
    loss_fn.on_epoch_start()                                # CE-CLIP's threshold back to 0

Every term runs on the **global** batch (``compclip.losses.terms``): the value is the same on every rank and
the gradient of each rank's local features is the single-process gradient on the concatenated batch.
A ``cmr`` term brings CE-CLIP's adaptive threshold (``threshold``, a ``CMRThreshold``), kept in the module's
``state_dict`` so that a resumed run continues with it.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping, Optional, Set, Tuple

import torch
from torch import nn

from .terms import TERMS, CMRThreshold, Features, required_features

__all__ = ["PUBLISHED_WEIGHTS", "CompositionalLoss", "ClipLoss", "NegClipLoss", "CEClipLoss", "DeGLALoss",
           "C2LIPLoss"]

# Loss-term weights of the papers (SPEC §1). CE-CLIP's latest script uses 0.3 for imc.
PUBLISHED_WEIGHTS: Dict[str, Dict[str, float]] = {
    "clip": {"clip": 1.0},
    "negclip": {"negclip": 1.0},
    "ceclip": {"negclip": 1.0, "cmr": 0.2, "imc": 0.2},
    "degla": {"negclip": 1.0, "igc": 0.1, "tgc": 0.1, "distill": 0.005},
    "c2lip": {"siglip": 1.0, "npc": 1.0, "xac": 0.01},
}


class CompositionalLoss(nn.Module):
    """Σ weight · ``TERMS[name](features, **options[name])``; returns ``(total, {name: unweighted value})``.

    ``weights``: term name -> weight (terms with weight 0 are dropped). ``options``: term name -> keyword options
    (e.g. ``{"imc": {"variant": "released"}}``). ``backend`` goes to every kernel-backed term that takes one.
    ``num_negatives`` (K) sizes the CE-CLIP threshold and is needed only with a ``cmr`` term.
    """

    def __init__(self, weights: Mapping[str, float], options: Optional[Mapping[str, Mapping[str, Any]]] = None, *,
                 backend: str = "auto", num_negatives: Optional[int] = None, cmr_upper: float = 10.0, group=None):
        super().__init__()
        options = {name: dict(values) for name, values in (options or {}).items()}
        for name in list(weights) + list(options):
            if name not in TERMS:
                raise ValueError(f"loss.terms: unknown term {name!r}; known: {sorted(TERMS)}")
        self.weights: Dict[str, float] = {name: float(w) for name, w in weights.items() if float(w) != 0.0}
        if not self.weights:
            raise ValueError("loss.terms: at least one term needs a non-zero weight")
        self.options = options
        self.backend = backend
        self.group = group
        self.threshold: Optional[CMRThreshold] = None
        if "cmr" in self.weights:
            if not num_negatives:
                raise ValueError("loss.terms.cmr: the CE-CLIP threshold needs num_negatives (K) >= 1")
            self.threshold = CMRThreshold(num_negatives, cmr_upper)
        self.required: Set[str] = set().union(*(required_features(name) for name in self.weights))

    def _options(self, name: str) -> Dict[str, Any]:
        options = dict(self.options.get(name, {}))
        if name == "cmr":
            options.setdefault("threshold", self.threshold)
        parameters = inspect.signature(TERMS[name]).parameters
        if "backend" in parameters:
            options.setdefault("backend", self.backend)
        if self.group is not None:
            options.setdefault("group", self.group)
        return options

    def forward(self, features: Features) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        parts: Dict[str, torch.Tensor] = {}
        total = None
        for name, weight in self.weights.items():
            value = TERMS[name](features, **self._options(name))
            parts[name] = value
            total = value * weight if total is None else total + value * weight
        return total, parts

    def on_epoch_start(self) -> None:
        """CE-CLIP: θ = 0 at the start of every epoch."""
        if self.threshold is not None:
            self.threshold.reset()

    def after_step(self, features: Features) -> None:
        """CE-CLIP: θ from this step's global batch (no grad), used at the next step."""
        if self.threshold is not None:
            detached = Features(**{k: (v.detach() if isinstance(v, torch.Tensor) else v)
                                   for k, v in vars(features).items()})
            self.threshold.update(detached, backend=self.backend, group=self.group)

    def get_extra_state(self) -> Dict[str, Any]:
        return {"threshold": self.threshold.state_dict() if self.threshold is not None else None}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        if self.threshold is not None and state.get("threshold") is not None:
            self.threshold.load_state_dict(state["threshold"])

    def extra_repr(self) -> str:
        return " + ".join(f"{weight:g}*{name}" for name, weight in self.weights.items())


class ClipLoss(CompositionalLoss):
    """CLIP InfoNCE on the global batch."""

    def __init__(self, **kwargs):
        super().__init__(PUBLISHED_WEIGHTS["clip"], **kwargs)


class NegClipLoss(CompositionalLoss):
    """NegCLIP: every image against all positives and all hard negatives of the global batch."""

    def __init__(self, **kwargs):
        super().__init__(PUBLISHED_WEIGHTS["negclip"], **kwargs)


class CEClipLoss(CompositionalLoss):
    """CE-CLIP: NegCLIP + ``cmr_weight`` · CMR (adaptive threshold) + ``imc_weight`` · IMC."""

    def __init__(self, num_negatives: int, cmr_weight: float = 0.2, imc_weight: float = 0.2,
                 imc_variant: str = "paper", **kwargs):
        options = {"imc": {"variant": imc_variant}, **kwargs.pop("options", {})}
        super().__init__({"negclip": 1.0, "cmr": cmr_weight, "imc": imc_weight}, options,
                         num_negatives=num_negatives, **kwargs)


class DeGLALoss(CompositionalLoss):
    """DeGLA: NegCLIP + 0.1 IGC + 0.1 TGC + 0.005 distillation (needs the EMA teacher's features)."""

    def __init__(self, igc_weight: float = 0.1, tgc_weight: float = 0.1, distill_weight: float = 0.005,
                 tgc_variant: str = "paper", tgc_scale: float = 10.0, **kwargs):
        options = {"tgc": {"variant": tgc_variant, "scale": tgc_scale}, **kwargs.pop("options", {})}
        super().__init__({"negclip": 1.0, "igc": igc_weight, "tgc": tgc_weight, "distill": distill_weight},
                         options, **kwargs)


class C2LIPLoss(CompositionalLoss):
    """C2LIP: the contrastive term (``siglip``, or ``clip`` for models without a logit bias) + 1.0 NPC + 0.01 XAC."""

    def __init__(self, contrastive: str = "siglip", npc_weight: float = 1.0, xac_weight: float = 0.01,
                 temperature: float = 1.0, **kwargs):
        if contrastive not in ("siglip", "clip"):
            raise ValueError(f"C2LIPLoss: contrastive must be 'siglip' or 'clip', got {contrastive!r}")
        options = {"xac": {"temperature": temperature}, **kwargs.pop("options", {})}
        super().__init__({contrastive: 1.0, "npc": npc_weight, "xac": xac_weight}, options, **kwargs)
