"""One step's bookkeeping, shared by the plain micro-batch step (compclip.trainer.train) and the cached contrastive
step (compclip.trainer.gradcache): what a step produced (`StepOutput`), the guard that skips a non-finite loss and
stops a run that keeps producing them (`NonFiniteGuard`), and what follows every DeepSpeed step (`finish_step`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict

import torch

from compclip.trainer import engine

logger = logging.getLogger("compclip")


@dataclass
class StepOutput:
    """What one micro-batch (or one cached contrastive step) of training produced."""

    loss: torch.Tensor  # the weighted global loss (detach before keeping it)
    parts: Dict[str, torch.Tensor]  # unweighted value of every term
    features: Any  # compclip.losses.terms.Features of this micro-batch
    boundary: bool  # an optimizer step happened
    samples: int  # images in the global micro-batch

    def scalars(self) -> Dict[str, float]:
        return {"loss": float(self.loss.detach()), **{f"loss/{k}": float(v.detach()) for k, v in self.parts.items()}}


class NonFiniteGuard:
    """Counts non-finite losses in a row: `ok(...)` is False for one (the step is then skipped and logged); the
    `limit`-th in a row stops the run. The loss is global, so every rank takes the same branch."""

    def __init__(self, limit: int, metrics, count: int = 0):
        self.limit, self.metrics, self.count = limit, metrics, count

    def ok(self, loss: torch.Tensor, parts: Dict[str, torch.Tensor], epoch: int, micro: int, step: int) -> bool:
        if torch.isfinite(loss.detach()).item():
            self.count = 0
            return True
        self.count += 1
        logger.warning("non-finite loss %s at epoch %d micro-batch %d: step skipped (%s)", loss.item(), epoch,
                       micro, {k: float(v.detach()) for k, v in parts.items()})
        self.metrics.write(step, {"nonfinite_loss": 1, "epoch": epoch})
        if self.count >= self.limit:
            raise RuntimeError(f"{self.count} non-finite losses in a row (max_nonfinite={self.limit}); stopping at "
                               f"step {step}. Lower optim.lr, use bf16 instead of fp16, or check the data.")
        return False


def finish_step(deepspeed_engine, method, teacher, features, boundary: bool, logit_scale_max: float) -> None:
    """After a DeepSpeed step, cached (pass (d)) or a plain micro-batch's: the method's hook (CE-CLIP's threshold)
    and, at an accumulation boundary, the logit-scale clamp and the EMA teacher's update."""
    method.after_step(features)
    if boundary:
        engine.clamp_logit_scale(deepspeed_engine.module.clip, logit_scale_max)
        if teacher is not None:
            teacher.update()
