"""Global-batch loss terms for data-parallel training: ``TERMS[name](features, **options) -> 0-d tensor``.

Each term receives the rank's **local** features (a ``Features`` record) and returns the loss of the **global**
batch (all ranks' rows concatenated in rank order), identical on every rank. How:

1. the columns a row is scored against are all-gathered with gradient (``compclip.distributed``);
2. the rank's local rows are scored against them with the same kernel-level ops as the functional API
   (``partials``, through ``compclip.kernels.dispatch``), as an un-normalised sum;
3. the sum is divided by the **global** count (B, 2B, B·K or P) and ``sum_across_ranks`` adds the ranks' parts.

The gradient w.r.t. the local features is then the gradient of the global loss (see ``compclip.distributed``);
shared scalars (``logit_scale``, ``logit_bias``) get this rank's partial gradient, which sums over ranks to the
full one. The trainer back-propagates ``loss * world_size`` because DeepSpeed averages gradients over ranks.

Term names (the config's vocabulary) and their options (keyword-only; every term also takes ``group=None``):

======== ============================================ =================================================
name     loss (SPEC §1)                                options
======== ============================================ =================================================
clip     CLIP InfoNCE                                  backend
siglip   SigLIP sigmoid loss                           –
negclip  NegCLIP multi-negative                        backend
cmr      CE-CLIP cross-modal rank                      threshold (``CMRThreshold`` or [K] tensor), backend
imc      CE-CLIP intra-modal contrast                  variant ("paper" | "released"), backend
igc      DeGLA image-grounded contrast                 backend
tgc      DeGLA text-grounded contrast                  variant, scale (10.0), backend
distill  DeGLA distillation (summed)                   –
npc      C2LIP concept contrast                        –
xac      C2LIP cross-modal attention contrast          temperature (1.0), backend
======== ============================================ =================================================
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional, Set

import torch

from compclip.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    gather_sizes,
    global_row_offset,
    sum_across_ranks,
)

from . import _checks, partials

__all__ = ["Features", "TERMS", "required_features", "CMRThreshold"]

Tensor = torch.Tensor


@dataclass
class Features:
    """The rank's local features of one step (SPEC §0 shapes with the local batch b and local concept count p).

    ``owner`` indexes **local** images (0..b−1); the terms offset it to global image indices. ``logit_bias`` may
    stay ``None`` (no bias) even for terms that read it. Fields a term does not use may be ``None``.
    """

    image: Optional[Tensor]  # [b, D]
    text: Optional[Tensor]  # [b, D]
    logit_scale: Optional[Tensor]  # 0-d, already exponentiated
    logit_bias: Optional[Tensor] = None  # 0-d or None
    negatives: Optional[Tensor] = None  # [b, K, D]
    valid: Optional[Tensor] = None  # [b, K] bool
    teacher_image: Optional[Tensor] = None  # [b, D]
    teacher_text: Optional[Tensor] = None  # [b, D]
    teacher_negatives: Optional[Tensor] = None  # [b, K, D]
    tokens: Optional[Tensor] = None  # [b, L, D]
    concepts: Optional[Tensor] = None  # [p, D]
    owner: Optional[Tensor] = None  # [p] long, local image index


TERMS: Dict[str, Callable[..., Tensor]] = {}
_REQUIRED: Dict[str, FrozenSet[str]] = {}
_MAY_BE_NONE = {"logit_bias"}


def _term(name: str, *fields: str):
    def register(fn):
        TERMS[name] = fn
        _REQUIRED[name] = frozenset(fields)
        return fn

    return register


def required_features(name: str) -> Set[str]:
    """Names of the ``Features`` fields term ``name`` reads (``logit_bias`` may be None where listed)."""
    if name not in TERMS:
        raise ValueError(f"unknown loss term {name!r}; expected one of {sorted(TERMS)}")
    return set(_REQUIRED[name])


def _require(term: str, features: Features) -> str:
    """Check the fields ``term`` reads are present; return the name used in error messages."""
    if not isinstance(features, Features):
        raise ValueError(f"terms.{term}: expected a Features record, got {type(features).__name__}")
    missing = sorted(
        field for field in _REQUIRED[term] if field not in _MAY_BE_NONE and getattr(features, field) is None
    )
    if missing:
        raise ValueError(f"terms.{term}: the term needs Features.{', Features.'.join(missing)}, got None")
    return f"terms.{term}"


def _with_negatives(fn: str, features: Features):
    return _checks.with_negatives(fn, features.image, features.text, features.negatives)


class _Rows:
    """Where this rank's rows sit in the global batch: every rank's row count, global total, own offset."""

    def __init__(self, local_rows: int, group):
        self.group = group
        self.sizes = gather_sizes(local_rows, group)
        self.total = sum(self.sizes)
        self.offset = global_row_offset(local_rows, group, self.sizes)

    def gather(self, tensor: Tensor) -> Tensor:
        return all_gather_with_grad(tensor, self.group, self.sizes)


def _owners_and_concepts(fn: str, owner: Tensor, images: int, image_offset: int, concepts: Tensor, group):
    """Gathered concepts (with grad) and their owners as global image indices (no grad)."""
    sizes = gather_sizes(concepts.shape[0], group)
    owner = _checks.owner_index(fn, owner, concepts.shape[0], images)
    owner_cols = all_gather_no_grad(owner + image_offset, group, sizes)
    return all_gather_with_grad(concepts, group, sizes), owner_cols


def _multi_negative(term: str, features: Features, with_negatives: bool, backend: str, group) -> Tensor:
    fn = _require(term, features)
    backend = _checks.backend(fn, backend)
    layout = {"image": (features.image, "BD"), "text": (features.text, "BD")}
    if with_negatives:
        layout["negatives"] = (features.negatives, "BKD")
    _, tensors = _checks.prepare(fn, **layout)
    image, text = tensors[:2]
    logit_scale = _checks.scalar(fn, "logit_scale", features.logit_scale)
    rows = _Rows(image.shape[0], group)
    negative_cols = rows.gather(tensors[2]) if with_negatives else None
    total = partials.multi_negative_sum(
        image, text, rows.gather(image), rows.gather(text), negative_cols, logit_scale, rows.offset, backend
    )
    return sum_across_ranks(total / (2 * rows.total), group)


@_term("clip", "image", "text", "logit_scale")
def clip(features: Features, *, backend: str = "auto", group=None) -> Tensor:
    """CLIP InfoNCE on the global batch (``functional.clip_loss``)."""
    return _multi_negative("clip", features, False, backend, group)


@_term("negclip", "image", "text", "negatives", "logit_scale")
def negclip(features: Features, *, backend: str = "auto", group=None) -> Tensor:
    """NegCLIP multi-negative loss on the global batch: every image against all B texts and B·K negatives."""
    return _multi_negative("negclip", features, True, backend, group)


def _threshold_tensor(fn: str, threshold) -> Tensor:
    if isinstance(threshold, CMRThreshold):
        return threshold.value
    if threshold is None:
        raise ValueError(f"{fn}: pass threshold=CMRThreshold(...) (or a [K] tensor); got None")
    return threshold


@_term("cmr", "image", "text", "negatives", "valid", "logit_scale")
def cmr(features: Features, *, threshold=None, backend: str = "auto", group=None) -> Tensor:
    """CE-CLIP cross-modal rank loss on the global batch, θ from ``threshold`` (a ``CMRThreshold`` or [K])."""
    fn = _require("cmr", features)
    backend = _checks.backend(fn, backend)
    sizes, (image, text, negatives) = _with_negatives(fn, features)
    valid = _checks.valid_mask(fn, features.valid, sizes["B"], sizes["K"])
    theta = _checks.per_type(fn, "threshold", _threshold_tensor(fn, threshold), sizes["K"])
    logit_scale = _checks.scalar(fn, "logit_scale", features.logit_scale)
    rows = _Rows(sizes["B"], group)
    total = partials.cmr_sum(image, text, negatives, valid, logit_scale, theta, backend)
    return sum_across_ranks(total / max(rows.total * sizes["K"], 1), group)


@_term("imc", "image", "text", "negatives", "logit_scale")
def imc(features: Features, *, variant: str = "paper", backend: str = "auto", group=None) -> Tensor:
    """CE-CLIP intra-modal contrast on the global batch: each caption against every negative of the batch."""
    fn = _require("imc", features)
    backend = _checks.backend(fn, backend)
    variant = _checks.variant(fn, variant)
    sizes, (image, text, negatives) = _with_negatives(fn, features)
    if variant == "released" and sizes["K"] == 0:
        raise ValueError(f"{fn}: variant='released' needs at least one negative (K >= 1)")
    logit_scale = _checks.scalar(fn, "logit_scale", features.logit_scale)
    rows = _Rows(sizes["B"], group)
    total = partials.imc_sum(image, text, rows.gather(negatives), logit_scale, variant, backend)
    return sum_across_ranks(total / rows.total, group)


@_term("igc", "image", "text", "negatives", "logit_scale")
def igc(features: Features, *, backend: str = "auto", group=None) -> Tensor:
    """DeGLA image-grounded contrast (own caption + own negatives): rows are independent, nothing is gathered."""
    fn = _require("igc", features)
    backend = _checks.backend(fn, backend)
    sizes, (image, text, negatives) = _with_negatives(fn, features)
    logit_scale = _checks.scalar(fn, "logit_scale", features.logit_scale)
    rows = _Rows(sizes["B"], group)
    return sum_across_ranks(partials.grouped_sum(image, text, negatives, logit_scale, backend) / rows.total, group)


@_term("tgc", "text", "teacher_text", "negatives")
def tgc(features: Features, *, variant: str = "paper", scale: float = 10.0, backend: str = "auto",
        group=None) -> Tensor:
    """DeGLA text-grounded contrast; ``variant="released"`` draws anchor i's negatives from the global flat list."""
    fn = _require("tgc", features)
    backend = _checks.backend(fn, backend)
    variant = _checks.variant(fn, variant)
    sizes, (text, teacher_text, negatives) = _checks.prepare(
        fn,
        text=(features.text, "BD"),
        teacher_text=(features.teacher_text, "BD"),
        negatives=(features.negatives, "BKD"),
    )
    scale = _checks.scalar(fn, "scale", scale)
    rows = _Rows(sizes["B"], group)
    if variant == "released":
        negatives = partials.tgc_released_negatives(rows.gather(negatives), rows.offset, sizes["B"])
    total = partials.grouped_sum(text, teacher_text.detach(), negatives, scale, backend)
    return sum_across_ranks(total / rows.total, group)


@_term("distill", "image", "text", "negatives", "teacher_image", "teacher_text", "teacher_negatives")
def distill(features: Features, *, group=None) -> Tensor:
    """DeGLA distillation, summed over the global batch (each rank sums its own rows)."""
    fn = _require("distill", features)
    _, tensors = _checks.prepare(
        fn,
        image=(features.image, "BD"),
        text=(features.text, "BD"),
        negatives=(features.negatives, "BKD"),
        teacher_image=(features.teacher_image, "BD"),
        teacher_text=(features.teacher_text, "BD"),
        teacher_negatives=(features.teacher_negatives, "BKD"),
    )
    return sum_across_ranks(partials.distill_sum(*tensors), group)


@_term("siglip", "image", "text", "logit_scale", "logit_bias")
def siglip(features: Features, *, group=None) -> Tensor:
    """SigLIP sigmoid loss on the global batch: local images against every text."""
    fn = _require("siglip", features)
    sizes, (image, text) = _checks.prepare(fn, image=(features.image, "BD"), text=(features.text, "BD"))
    logit_scale = _checks.scalar(fn, "logit_scale", features.logit_scale)
    logit_bias = _checks.scalar(fn, "logit_bias", features.logit_bias, allow_none=True)
    rows = _Rows(sizes["B"], group)
    total = partials.siglip_sum(image, rows.gather(text), logit_scale, logit_bias, rows.offset)
    return sum_across_ranks(total / rows.total, group)


@_term("npc", "image", "concepts", "owner", "logit_scale", "logit_bias")
def npc(features: Features, *, group=None) -> Tensor:
    """C2LIP concept contrast on the global batch: local images against every concept of every rank."""
    fn = _require("npc", features)
    sizes, (image, concepts) = _checks.prepare(
        fn, image=(features.image, "BD"), concepts=(features.concepts, "PD")
    )
    logit_scale = _checks.scalar(fn, "logit_scale", features.logit_scale)
    logit_bias = _checks.scalar(fn, "logit_bias", features.logit_bias, allow_none=True)
    images = _Rows(sizes["B"], group)
    concept_cols, owner_cols = _owners_and_concepts(
        fn, features.owner, sizes["B"], images.offset, concepts, group
    )
    total = partials.npc_sum(image, concept_cols, owner_cols, logit_scale, logit_bias, images.offset)
    return sum_across_ranks(total / max(concept_cols.shape[0], 1), group)


@_term("xac", "tokens", "concepts", "owner", "logit_scale", "logit_bias")
def xac(features: Features, *, temperature: float = 1.0, backend: str = "auto", group=None) -> Tensor:
    """C2LIP XAC on the global batch: each rank pools its own images' tokens against every gathered concept."""
    fn = _require("xac", features)
    backend = _checks.backend(fn, backend)
    sizes, (tokens, concepts) = _checks.prepare(
        fn, tokens=(features.tokens, "BLD"), concepts=(features.concepts, "PD")
    )
    logit_scale = _checks.scalar(fn, "logit_scale", features.logit_scale)
    logit_bias = _checks.scalar(fn, "logit_bias", features.logit_bias, allow_none=True)
    temperature = _checks.positive(fn, "temperature", temperature)
    images = _Rows(sizes["B"], group)
    concept_cols, owner_cols = _owners_and_concepts(
        fn, features.owner, sizes["B"], images.offset, concepts, group
    )
    total = partials.xac_sum(
        tokens, concept_cols, owner_cols, logit_scale, logit_bias, temperature, images.offset, backend
    )
    return sum_across_ranks(total / max(concept_cols.shape[0], 1), group)


class CMRThreshold:
    """CE-CLIP's adaptive per-type threshold θ [K] for the ``cmr`` term.

    ``value`` starts at 0 and is reset to 0 at every epoch start (``reset``). After each optimizer step
    ``update(features)`` sets θ_k = clamp(mean_i S_i − Σ_i m_ik S_ik / Σ_i m_ik, 0, upper) from the **global**
    batch (no grad), used at the next step; a type without a valid negative in the global batch keeps its value.
    Globally this needs only K + 2 sums, so ranks all-reduce those instead of gathering the features.
    ``value`` is float64 (tiny; exact in float64 tests) and follows the features' device.
    """

    def __init__(self, num_types: int, upper: float = 10.0):
        if int(num_types) < 0:
            raise ValueError(f"CMRThreshold: num_types must be >= 0, got {num_types}")
        self.num_types = int(num_types)
        self.upper = _checks.positive("CMRThreshold", "upper", upper)
        self.value = torch.zeros(self.num_types, dtype=torch.float64)

    def reset(self) -> None:
        """Epoch start: θ = 0."""
        self.value = torch.zeros_like(self.value)

    @torch.no_grad()
    def update(self, features: Features, *, backend: str = "auto", group=None) -> Tensor:
        """Recompute θ from this step's global batch; returns the new ``value``."""
        fn = "CMRThreshold.update"
        for field in ("image", "text", "negatives", "valid", "logit_scale"):
            if getattr(features, field) is None:
                raise ValueError(f"{fn}: needs Features.{field}, got None")
        backend = _checks.backend(fn, backend)
        sizes, (image, text, negatives) = _with_negatives(fn, features)
        if sizes["K"] != self.num_types:
            raise ValueError(f"{fn}: negatives have K = {sizes['K']} types, the threshold has {self.num_types}")
        valid = _checks.valid_mask(fn, features.valid, sizes["B"], sizes["K"])
        logit_scale = _checks.scalar(fn, "logit_scale", features.logit_scale)
        stats = partials.threshold_stats(image, text, negatives, valid, logit_scale, backend)
        stats = sum_across_ranks(stats, group)
        self.value = partials.threshold_from_stats(stats, self.upper, self.value)
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value.detach().cpu().clone(), "upper": self.upper, "num_types": self.num_types}

    def load_state_dict(self, state: dict) -> None:
        value = torch.as_tensor(state["value"], dtype=torch.float64)
        if tuple(value.shape) != (self.num_types,):
            raise ValueError(f"CMRThreshold.load_state_dict: value has shape {tuple(value.shape)}, "
                             f"expected ({self.num_types},)")
        self.value = value.to(self.value.device)
        self.upper = float(state.get("upper", self.upper))

    def __repr__(self) -> str:
        return f"CMRThreshold(num_types={self.num_types}, upper={self.upper}, value={self.value.tolist()})"
