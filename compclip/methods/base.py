"""A method = which features to compute + which loss terms to sum, with weights, + stateful hooks.

The hooks are driven by the terms a method uses, not by its name, so any combination of terms (the
`composite` method, or a published method with extra terms in its YAML) gets the same behaviour: a `cmr` term
brings CE-CLIP's adaptive threshold, a `tgc` / `distill` term brings the EMA teacher.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Set, Tuple, Type

import torch

from compclip.losses.modules import CompositionalLoss, published_weights
from compclip.losses.terms import CMRThreshold, Features

REGISTRY: Dict[str, Type["Method"]] = {}

TEACHER_FIELDS = {"teacher_image", "teacher_text", "teacher_negatives"}
TEXT_NEGATIVE_FIELDS = {"negatives", "valid"}


def register(name: str):
    def wrap(cls):
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return wrap


def build_method(loss_cfg, *, num_negatives: int, has_logit_bias: bool) -> "Method":
    if loss_cfg.method not in REGISTRY:
        raise ValueError(f"loss.method: unknown method {loss_cfg.method!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[loss_cfg.method](loss_cfg, num_negatives=num_negatives, has_logit_bias=has_logit_bias)


class Method:
    """Base class: a method is a registered name; its weights are that name's row of the one table
    (`compclip.losses.modules.PUBLISHED_WEIGHTS`) unless `loss.terms` gives them.

    The loss itself is a `compclip.losses.modules.CompositionalLoss` (`objective`): the weighted sum of
    global-batch terms and CE-CLIP's threshold state; the method adds which features to compute."""

    name = "method"
    label = "method"
    """How tables and plots name it (CE-CLIP, DeGLA, ...)."""

    def __init__(self, loss_cfg, *, num_negatives: int, has_logit_bias: bool = False):
        self.has_logit_bias = has_logit_bias
        weights = dict(loss_cfg.terms) if loss_cfg.terms else self.published_terms()
        if not weights:
            raise ValueError(f"loss.terms: method {self.name!r} needs at least one term")
        self.objective = CompositionalLoss(weights, loss_cfg.options, backend=loss_cfg.backend,
                                           num_negatives=num_negatives, cmr_upper=loss_cfg.cmr_upper)
        self.weights: Dict[str, float] = self.objective.weights
        self.threshold: Optional[CMRThreshold] = self.objective.threshold
        self.required: Set[str] = self.objective.required

    def published_terms(self) -> Dict[str, float]:
        """The weights when the config names no terms: the method's published ones, with the model's contrastive
        term (SigLIP needs a logit bias; a model without one uses CLIP InfoNCE in its place, and one with a bias
        SigLIP in place of InfoNCE)."""
        return published_weights(self.name, self.contrastive_term)

    @property
    def contrastive_term(self) -> str:
        """The model's image–text contrastive term: SigLIP's sigmoid loss needs a logit bias, else CLIP InfoNCE."""
        return "siglip" if self.has_logit_bias else "clip"

    # ---- what to compute -------------------------------------------------------------------------------------
    @property
    def needs_teacher(self) -> bool:
        return bool(self.required & TEACHER_FIELDS)

    @property
    def needs_negatives(self) -> bool:
        return bool(self.required & (TEXT_NEGATIVE_FIELDS | {"teacher_negatives"})) or self.threshold is not None

    @property
    def needs_concepts(self) -> bool:
        return bool(self.required & {"concepts", "owner"})

    @property
    def needs_tokens(self) -> bool:
        return "tokens" in self.required

    def features(self, encoder, teacher, batch: Dict[str, Any], dtype: torch.dtype = torch.float32) -> Features:
        """Encode one micro-batch with what this method's terms need: one `encoder` forward (images in the compute
        `dtype`) over positives + the K negatives + the concepts, the visual tokens when a term reads them, and
        the EMA `teacher`'s fp32 embeddings of images, positives and negatives when there is a teacher."""
        out = encoder(batch["images"].to(dtype), batch["text"],
                      batch["negatives"] if self.needs_negatives else None,
                      batch["concepts"] if self.needs_concepts else None,
                      self.needs_tokens)
        features = Features(image=out.image, text=out.text, logit_scale=out.logit_scale,
                            logit_bias=out.logit_bias, negatives=out.negatives,
                            valid=batch["valid"] if self.needs_negatives else None,
                            tokens=out.tokens, concepts=out.concepts,
                            owner=batch["owner"] if self.needs_concepts else None)
        if teacher is not None:
            teacher_out = teacher(batch["images"], batch["text"], batch["negatives"], None, False)  # fp32
            features.teacher_image = teacher_out.image.to(out.image.dtype)
            features.teacher_text = teacher_out.text.to(out.text.dtype)
            features.teacher_negatives = teacher_out.negatives.to(out.negatives.dtype)
        return features

    # ---- the loss --------------------------------------------------------------------------------------------
    def loss(self, features: Features) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(weighted sum, {term: unweighted value}) on the global batch."""
        return self.objective(features)

    # ---- hooks -----------------------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        """CE-CLIP: θ = 0 at the start of every epoch."""
        self.objective.on_epoch_start()

    def after_step(self, features: Features) -> None:
        """After each micro-batch's backward: CE-CLIP's threshold from this global batch, for the next one."""
        self.objective.after_step(features)

    def log_values(self) -> Dict[str, float]:
        if self.threshold is None:
            return {}
        return {f"cmr_threshold/{k}": float(v) for k, v in enumerate(self.threshold.value.tolist())}

    def state_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "weights": dict(self.weights), **self.objective.get_extra_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.objective.set_extra_state(state)

    def describe(self) -> str:
        return f"{self.name}: " + " + ".join(f"{w:g}*{t}" for t, w in self.weights.items())
