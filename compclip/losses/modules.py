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

__all__ = ["PUBLISHED_WEIGHTS", "published_weights", "CompositionalLoss", "ClipLoss", "NegClipLoss", "CEClipLoss",
           "DeGLALoss", "C2LIPLoss"]

# Loss-term weights of the papers (docs/losses.md): the one table that the loss classes below and
# compclip.methods read. CE-CLIP's latest script uses 0.3 for imc.
PUBLISHED_WEIGHTS: Dict[str, Dict[str, float]] = {
    "clip": {"clip": 1.0},
    "negclip": {"negclip": 1.0},
    "ceclip": {"negclip": 1.0, "cmr": 0.2, "imc": 0.2},
    "degla": {"negclip": 1.0, "igc": 0.1, "tgc": 0.1, "distill": 0.005},
    "c2lip": {"siglip": 1.0, "npc": 1.0, "xac": 0.01},
}
# DeGLA's objective plus C2LIP's concept terms at their published weights (configs/composite.yaml).
PUBLISHED_WEIGHTS["composite"] = {**PUBLISHED_WEIGHTS["degla"],
                                  **{term: PUBLISHED_WEIGHTS["c2lip"][term] for term in ("npc", "xac")}}
CONTRASTIVE_TERMS = ("clip", "siglip")


def published_weights(method: str, contrastive: Optional[str] = None, **weights: Optional[float]) -> Dict[str, float]:
    """``PUBLISHED_WEIGHTS[method]``, with each ``term=weight`` that is not None in place of the published one.

    ``contrastive`` ("clip" or "siglip") replaces the method's contrastive term, keeping its weight: SigLIP's
    sigmoid loss needs a logit bias, so a model without one uses CLIP InfoNCE, and one with a bias may use SigLIP.
    """
    if method not in PUBLISHED_WEIGHTS:
        raise ValueError(f"published_weights: unknown method {method!r}; expected one of {sorted(PUBLISHED_WEIGHTS)}")
    table = dict(PUBLISHED_WEIGHTS[method])
    unknown = sorted(set(weights) - set(table))
    if unknown:
        raise ValueError(f"published_weights: {method} has no term {unknown[0]!r}; its terms: {sorted(table)}")
    table.update({term: float(weight) for term, weight in weights.items() if weight is not None})
    if contrastive is not None:
        if contrastive not in CONTRASTIVE_TERMS:
            raise ValueError(f"contrastive must be one of {CONTRASTIVE_TERMS}, got {contrastive!r}")
        table = {(contrastive if term in CONTRASTIVE_TERMS else term): w for term, w in table.items()}
    return table


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
        super().__init__(published_weights("clip"), **kwargs)


class NegClipLoss(CompositionalLoss):
    """NegCLIP: every image against all positives and all hard negatives of the global batch."""

    def __init__(self, **kwargs):
        super().__init__(published_weights("negclip"), **kwargs)


def _with_options(term: str, values: Dict[str, Any], kwargs: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``{term: values}`` (entries that are None left to the term's defaults) merged under ``kwargs["options"]``."""
    return {term: {k: v for k, v in values.items() if v is not None}, **kwargs.pop("options", {})}


class CEClipLoss(CompositionalLoss):
    """CE-CLIP: NegCLIP + ``cmr_weight`` · CMR (adaptive threshold) + ``imc_weight`` · IMC.

    A weight left None is the published one (``PUBLISHED_WEIGHTS["ceclip"]``)."""

    def __init__(self, num_negatives: int, cmr_weight: Optional[float] = None, imc_weight: Optional[float] = None,
                 imc_variant: str = "paper", **kwargs):
        options = _with_options("imc", {"variant": imc_variant}, kwargs)
        super().__init__(published_weights("ceclip", cmr=cmr_weight, imc=imc_weight), options,
                         num_negatives=num_negatives, **kwargs)


class DeGLALoss(CompositionalLoss):
    """DeGLA: NegCLIP + IGC + TGC + distillation (needs the EMA teacher's features).

    A weight left None is the published one (``PUBLISHED_WEIGHTS["degla"]``); ``tgc_scale`` None is the ``tgc``
    term's scale (10)."""

    def __init__(self, igc_weight: Optional[float] = None, tgc_weight: Optional[float] = None,
                 distill_weight: Optional[float] = None, tgc_variant: str = "paper",
                 tgc_scale: Optional[float] = None, **kwargs):
        options = _with_options("tgc", {"variant": tgc_variant, "scale": tgc_scale}, kwargs)
        weights = published_weights("degla", igc=igc_weight, tgc=tgc_weight, distill=distill_weight)
        super().__init__(weights, options, **kwargs)


class C2LIPLoss(CompositionalLoss):
    """C2LIP: the contrastive term (``siglip``, or ``clip`` for models without a logit bias) + NPC + XAC.

    A weight left None is the published one (``PUBLISHED_WEIGHTS["c2lip"]``); ``temperature`` None is the ``xac``
    term's temperature (1)."""

    def __init__(self, contrastive: str = "siglip", npc_weight: Optional[float] = None,
                 xac_weight: Optional[float] = None, temperature: Optional[float] = None, **kwargs):
        if contrastive not in CONTRASTIVE_TERMS:
            raise ValueError(f"C2LIPLoss: contrastive must be 'siglip' or 'clip', got {contrastive!r}")
        options = _with_options("xac", {"temperature": temperature}, kwargs)
        weights = published_weights("c2lip", contrastive, npc=npc_weight, xac=xac_weight)
        super().__init__(weights, options, **kwargs)
