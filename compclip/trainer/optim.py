"""The optimizer and the learning-rate schedule, and the length of a run in optimizer steps.

AdamW over open_clip's parameter groups (no weight decay on gains, biases, logit_scale / logit_bias and 1-d
embeddings), with open_clip's cosine schedule: a linear warm-up to the peak, then half a cosine down to 0 (or a
constant after the warm-up). Both are handed to deepspeed.initialize (compclip.trainer.engine.build_engine).

The AdamW is PyTorch's fused implementation (`fused=True`, on CUDA and on the CPU): one pass over each flat fp32
partition ZeRO hands it, where the default per-tensor loop on the CPU makes about ten, two of them into fresh
model-sized temporaries. A device PyTorch has no fused AdamW for gets the default implementation. The two agree to
float32 rounding, not bit for bit.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def lr_lambda(optim_cfg, total_steps: int) -> Callable[[int], float]:
    """The schedule's factor of the peak lr at optimizer step `step` (0-based)."""
    warmup = max(optim_cfg.warmup_steps, 0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim_cfg.schedule == "constant":
            return 1.0
        decay_steps = max(total_steps - warmup, 1)
        progress = min(step - warmup, decay_steps) / decay_steps
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def total_steps(optim_cfg, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: epochs x loader batches per epoch / optim.grad_accumulation, capped by
    optim.max_steps (a cached contrastive step takes one loader batch: its chunks are not accumulation here)."""
    total = optim_cfg.epochs * max(batches_per_epoch // optim_cfg.grad_accumulation, 1)
    return min(total, optim_cfg.max_steps) if optim_cfg.max_steps else total


def build(module: torch.nn.Module, optim_cfg, total: int):
    """(AdamW over `module`'s trainable parameters in open_clip's groups, the LambdaLR of `lr_lambda`)."""
    from compclip.models import parameter_groups

    groups = parameter_groups(module, optim_cfg.weight_decay)
    options = dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    try:
        optimizer = torch.optim.AdamW(groups, fused=True, **options)
    except RuntimeError:  # a device without PyTorch's fused AdamW: its default implementation
        optimizer = torch.optim.AdamW(groups, **options)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim_cfg, total))
