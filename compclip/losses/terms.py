"""The loss terms, once: ``TERMS[name](features, **options) -> 0-d tensor``, on the global batch.

Each term receives the rank's **local** features (a ``Features`` record) and returns the loss of the **global**
batch (all ranks' rows concatenated in rank order), identical on every rank. How:

1. the columns a row is scored against are all-gathered with gradient (``compclip.distributed``);
2. the rank's local rows are scored against them with the kernel-level ops (``partials``, through
   ``compclip.kernels.dispatch``), as an un-normalised sum;
3. the sum is divided by the **global** count (B, 2B, B·K or P) and ``sum_across_ranks`` adds the ranks' parts.

The gradient w.r.t. the local features is then the gradient of the global loss (see ``compclip.distributed``);
shared scalars (``logit_scale``, ``logit_bias``) get this rank's partial gradient, which sums over ranks to the
full one. The trainer back-propagates ``loss * world_size`` because DeepSpeed averages gradients over ranks.

``group`` (every term takes it): a ``torch.distributed`` process group, ``None`` for the default one (a world of
one without a process group), or ``Local(caller)``: this process's features are the whole batch even inside a
distributed job, nothing is communicated, and error messages name ``caller``. The single-process functional API
(``compclip.losses.functional``) is these terms with ``Local``.

Term names (the config's vocabulary) and their options (keyword-only; the math of each is in docs/losses.md):

======== ============================================ =================================================
name     loss                                         options
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

``cmr_threshold`` computes CE-CLIP's threshold θ from a (global) batch; ``CMRThreshold`` keeps it between steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterable, Optional, Set

import torch

from compclip.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    gather_sizes,
    global_row_offset,
    sum_across_ranks,
)

from . import _checks, partials

__all__ = ["Features", "TERMS", "required_features", "CMRThreshold", "cmr_threshold", "Local"]

Tensor = torch.Tensor


@dataclass
class Features:
    """The rank's local features of one step (local batch b, local concept count p; layouts in docs/losses.md).

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


class Local:
    """``group=Local(caller)``: the features are the whole batch (a world of one, even inside a distributed job).

    Error messages name ``caller``; the argument checks report a missing feature by its argument name."""

    def __init__(self, caller: str):
        self.caller = caller

    def __repr__(self) -> str:
        return f"Local({self.caller!r})"


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


def _require(fn: str, features: Features, fields: Iterable[str]) -> None:
    """Check ``features`` is a ``Features`` record holding ``fields`` (``logit_bias`` may be None)."""
    if not isinstance(features, Features):
        raise ValueError(f"{fn}: expected a Features record, got {type(features).__name__}")
    missing = sorted(field for field in fields if field not in _MAY_BE_NONE and getattr(features, field) is None)
    if missing:
        raise ValueError(f"{fn}: the term needs Features.{', Features.'.join(missing)}, got None")


class _Scope:
    """The processes a term sums over, and the name its error messages carry."""

    def __init__(self, term: str, features: Features, group, fn: Optional[str] = None):
        self.local = isinstance(group, Local)
        self.group = None if self.local else group
        if self.local:
            self.name = group.caller
        else:
            self.name = fn or f"terms.{term}"
            _require(self.name, features, _REQUIRED[term])

    def rows(self, local_rows: int) -> "_Rows":
        return _Rows(local_rows, self)

    def sum(self, value: Tensor) -> Tensor:
        """The sum of every rank's ``value`` (forward all-reduce, identity backward)."""
        return value if self.local else sum_across_ranks(value, self.group)


class _Rows:
    """Where this rank's rows of one kind sit in the global batch: every rank's count, the total, own offset."""

    def __init__(self, local_rows: int, scope: _Scope):
        self.scope = scope
        self.count = int(local_rows)
        self.sizes = [int(local_rows)] if scope.local else gather_sizes(local_rows, scope.group)
        self.total = sum(self.sizes)
        self.offset = 0 if scope.local else global_row_offset(local_rows, scope.group, self.sizes)

    def gather(self, tensor: Tensor, grad: bool = True) -> Tensor:
        """Every rank's rows in rank order, differentiably (``grad``) or detached."""
        if self.scope.local:
            return tensor if grad else tensor.detach()
        gather = all_gather_with_grad if grad else all_gather_no_grad
        return gather(tensor, self.scope.group, self.sizes)


def _with_negatives(fn: str, features: Features):
    return _checks.with_negatives(fn, features.image, features.text, features.negatives)


def _concept_columns(scope: _Scope, images: _Rows, features: Features, concepts: Tensor):
    """Gathered concepts (with grad) and their owners as global image indices (no grad)."""
    count = concepts.shape[0]
    owner = _checks.owner_index(scope.name, features.owner, count, images.count)
    rows = scope.rows(count)
    return rows.gather(concepts), rows.gather(owner + images.offset, grad=False)


def _multi_negative(scope: _Scope, features: Features, with_negatives: bool, backend: str) -> Tensor:
    fn = scope.name
    backend = _checks.backend(fn, backend)
    layout = {"image": (features.image, "BD"), "text": (features.text, "BD")}
    if with_negatives:
        layout["negatives"] = (features.negatives, "BKD")
    _, tensors = _checks.prepare(fn, **layout)
    image, text = tensors[:2]
    logit_scale = _checks.scalar(fn, "logit_scale", features.logit_scale)
    rows = scope.rows(image.shape[0])
    negative_cols = rows.gather(tensors[2]) if with_negatives else None
    total = partials.multi_negative_sum(
        image, text, rows.gather(image), rows.gather(text), negative_cols, logit_scale, rows.offset, backend
    )
    return scope.sum(total / (2 * rows.total))


@_term("clip", "image", "text", "logit_scale")
def clip(features: Features, *, backend: str = "auto", group=None) -> Tensor:
    """CLIP InfoNCE on the global batch."""
    return _multi_negative(_Scope("clip", features, group), features, False, backend)


@_term("negclip", "image", "text", "negatives", "logit_scale")
def negclip(features: Features, *, backend: str = "auto", group=None) -> Tensor:
    """NegCLIP multi-negative loss on the global batch: every image against all B texts and B·K negatives."""
    return _multi_negative(_Scope("negclip", features, group), features, True, backend)


def _threshold_tensor(fn: str, threshold) -> Tensor:
    if isinstance(threshold, CMRThreshold):
        return threshold.value
    if threshold is None:
        raise ValueError(f"{fn}: pass threshold=CMRThreshold(...) (or a [K] tensor); got None")
    return threshold


@_term("cmr", "image", "text", "negatives", "valid", "logit_scale")
def cmr(features: Features, *, threshold=None, backend: str = "auto", group=None) -> Tensor:
    """CE-CLIP cross-modal rank loss on the global batch, θ from ``threshold`` (a ``CMRThreshold`` or [K])."""
    scope = _Scope("cmr", features, group)
    fn = scope.name
    backend = _checks.backend(fn, backend)
    sizes, (image, text, negatives) = _with_negatives(fn, features)
    valid = _checks.valid_mask(fn, features.valid, sizes["B"], sizes["K"])
    theta = _checks.per_type(fn, "threshold", _threshold_tensor(fn, threshold), sizes["K"])
    logit_scale = _checks.scalar(fn, "logit_scale", features.logit_scale)
    rows = scope.rows(sizes["B"])
    total = partials.cmr_sum(image, text, negatives, valid, logit_scale, theta, backend)
    return scope.sum(total / max(rows.total * sizes["K"], 1))


def cmr_threshold(features: Features, *, upper: float = 10.0, previous: Optional[Tensor] = None,
                  backend: str = "auto", group=None) -> Tensor:
    """CE-CLIP's threshold from the global batch, float64 [K], no grad (the math: docs/losses.md).

    θ_k = clamp(mean_i S_i − Σ_i m_ik S_ik / Σ_i m_ik, 0, upper); a type without a valid negative in the global
    batch keeps ``previous[k]`` (0 when ``previous`` is None). Ranks all-reduce K + 2 sums, not the features.
    """
    scope = _Scope("cmr", features, group)
    return _threshold(scope, features, upper, previous, backend)


def _threshold(scope: _Scope, features: Features, upper, previous, backend: str) -> Tensor:
    fn = scope.name
    backend = _checks.backend(fn, backend)
    sizes, (image, text, negatives) = _with_negatives(fn, features)
    valid = _checks.valid_mask(fn, features.valid, sizes["B"], sizes["K"])
    logit_scale = _checks.scalar(fn, "logit_scale", features.logit_scale)
    upper = _checks.positive(fn, "upper", upper)
    if previous is not None:
        previous = _checks.per_type(fn, "previous", previous, sizes["K"])
    stats = scope.sum(partials.threshold_stats(image, text, negatives, valid, logit_scale, backend))
    return partials.threshold_from_stats(stats, upper, previous)


@_term("imc", "image", "text", "negatives", "logit_scale")
def imc(features: Features, *, variant: str = "paper", backend: str = "auto", group=None) -> Tensor:
    """CE-CLIP intra-modal contrast on the global batch: each caption against every negative of the batch."""
    scope = _Scope("imc", features, group)
    fn = scope.name
    backend = _checks.backend(fn, backend)
    variant = _checks.variant(fn, variant)
    sizes, (image, text, negatives) = _with_negatives(fn, features)
    if variant == "released" and sizes["K"] == 0:
        raise ValueError(f"{fn}: variant='released' needs at least one negative (K >= 1), "
                         f"got {tuple(negatives.shape)}")
    logit_scale = _checks.scalar(fn, "logit_scale", features.logit_scale)
    rows = scope.rows(sizes["B"])
    total = partials.imc_sum(image, text, rows.gather(negatives), logit_scale, variant, backend)
    return scope.sum(total / rows.total)


@_term("igc", "image", "text", "negatives", "logit_scale")
def igc(features: Features, *, backend: str = "auto", group=None) -> Tensor:
    """DeGLA image-grounded contrast (own caption + own negatives): rows are independent, nothing is gathered."""
    scope = _Scope("igc", features, group)
    fn = scope.name
    backend = _checks.backend(fn, backend)
    sizes, (image, text, negatives) = _with_negatives(fn, features)
    logit_scale = _checks.scalar(fn, "logit_scale", features.logit_scale)
    rows = scope.rows(sizes["B"])
    return scope.sum(partials.grouped_sum(image, text, negatives, logit_scale, backend) / rows.total)


@_term("tgc", "text", "teacher_text", "negatives")
def tgc(features: Features, *, variant: str = "paper", scale: float = 10.0, backend: str = "auto",
        group=None) -> Tensor:
    """DeGLA text-grounded contrast; ``variant="released"`` draws anchor i's negatives from the global flat list."""
    scope = _Scope("tgc", features, group)
    fn = scope.name
    backend = _checks.backend(fn, backend)
    variant = _checks.variant(fn, variant)
    sizes, (text, teacher_text, negatives) = _checks.prepare(
        fn,
        text=(features.text, "BD"),
        teacher_text=(features.teacher_text, "BD"),
        negatives=(features.negatives, "BKD"),
    )
    scale = _checks.scalar(fn, "scale", scale)
    rows = scope.rows(sizes["B"])
    if variant == "released":
        negatives = partials.tgc_released_negatives(rows.gather(negatives), rows.offset, sizes["B"])
    total = partials.grouped_sum(text, teacher_text.detach(), negatives, scale, backend)
    return scope.sum(total / rows.total)


@_term("distill", "image", "text", "negatives", "teacher_image", "teacher_text", "teacher_negatives")
def distill(features: Features, *, group=None) -> Tensor:
    """DeGLA distillation, summed over the global batch (each rank sums its own rows)."""
    scope = _Scope("distill", features, group)
    _, tensors = _checks.prepare(
        scope.name,
        image=(features.image, "BD"),
        text=(features.text, "BD"),
        negatives=(features.negatives, "BKD"),
        teacher_image=(features.teacher_image, "BD"),
        teacher_text=(features.teacher_text, "BD"),
        teacher_negatives=(features.teacher_negatives, "BKD"),
    )
    return scope.sum(partials.distill_sum(*tensors))


def _scale_and_bias(fn: str, features: Features):
    logit_scale = _checks.scalar(fn, "logit_scale", features.logit_scale)
    return logit_scale, _checks.scalar(fn, "logit_bias", features.logit_bias, allow_none=True)


@_term("siglip", "image", "text", "logit_scale", "logit_bias")
def siglip(features: Features, *, group=None) -> Tensor:
    """SigLIP sigmoid loss on the global batch: local images against every text."""
    scope = _Scope("siglip", features, group)
    fn = scope.name
    sizes, (image, text) = _checks.prepare(fn, image=(features.image, "BD"), text=(features.text, "BD"))
    logit_scale, logit_bias = _scale_and_bias(fn, features)
    rows = scope.rows(sizes["B"])
    total = partials.siglip_sum(image, rows.gather(text), logit_scale, logit_bias, rows.offset)
    return scope.sum(total / rows.total)


@_term("npc", "image", "concepts", "owner", "logit_scale", "logit_bias")
def npc(features: Features, *, group=None) -> Tensor:
    """C2LIP concept contrast on the global batch: local images against every concept of every rank."""
    scope = _Scope("npc", features, group)
    fn = scope.name
    sizes, (image, concepts) = _checks.prepare(
        fn, image=(features.image, "BD"), concepts=(features.concepts, "PD")
    )
    images = scope.rows(sizes["B"])
    concept_cols, owner_cols = _concept_columns(scope, images, features, concepts)
    logit_scale, logit_bias = _scale_and_bias(fn, features)
    total = partials.npc_sum(image, concept_cols, owner_cols, logit_scale, logit_bias, images.offset)
    return scope.sum(total / max(concept_cols.shape[0], 1))


@_term("xac", "tokens", "concepts", "owner", "logit_scale", "logit_bias")
def xac(features: Features, *, temperature: float = 1.0, backend: str = "auto", group=None) -> Tensor:
    """C2LIP XAC on the global batch: each rank pools its own images' tokens against every gathered concept."""
    scope = _Scope("xac", features, group)
    fn = scope.name
    backend = _checks.backend(fn, backend)
    sizes, (tokens, concepts) = _checks.prepare(
        fn, tokens=(features.tokens, "BLD"), concepts=(features.concepts, "PD")
    )
    images = scope.rows(sizes["B"])
    concept_cols, owner_cols = _concept_columns(scope, images, features, concepts)
    logit_scale, logit_bias = _scale_and_bias(fn, features)
    temperature = _checks.positive(fn, "temperature", temperature)
    total = partials.xac_sum(
        tokens, concept_cols, owner_cols, logit_scale, logit_bias, temperature, images.offset, backend
    )
    return scope.sum(total / max(concept_cols.shape[0], 1))


class CMRThreshold:
    """CE-CLIP's adaptive per-type threshold θ [K] for the ``cmr`` term.

    ``value`` starts at 0 and is reset to 0 at every epoch start (``reset``). After each optimizer step
    ``update(features)`` sets it to ``cmr_threshold`` of the **global** batch (no grad), used at the next step; a
    type without a valid negative in the global batch keeps its value. ``value`` is float64 (tiny; exact in
    float64 tests) and follows the features' device.
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
        scope = _Scope("cmr", features, group, fn="CMRThreshold.update")
        sizes, _ = _with_negatives(scope.name, features)
        if sizes["K"] != self.num_types:
            raise ValueError(f"{scope.name}: negatives have K = {sizes['K']} types, "
                             f"the threshold has {self.num_types}")
        self.value = _threshold(scope, features, self.upper, self.value, backend)
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
