"""A contrastive batch beyond memory: one optimizer step over `optim.contrastive_batch` samples by gradient caching.

`data.batch_size` is the per-rank chunk that fits in memory; the loader yields each rank's share of the contrastive
batch (contrastive_batch / world samples) and `CachedStep.step` trains on it in four passes:

(a) every chunk through the student (and the EMA teacher, where the method has one) without autograd, keeping only
    the features the terms read (image, text, negatives, concepts, tokens, the teacher's embeddings) and the RNG
    state before each chunk;
(b) the method's global-batch loss (the usual terms and kernels: they all-gather across ranks) on the features of
    every chunk concatenated in the loader's order, and its gradient with respect to each of them and to the
    exponentiated logit scale / logit bias;
(c) per chunk, the RNG state of (a) restored (dropout and drop-path draw the same numbers), a re-forward with
    autograd and a DeepSpeed backward of the surrogate sum_f <f, dL/df> (logit scale and bias on the first chunk),
    then `engine.step()`: DeepSpeed's gradient accumulation (`gradient_accumulation_steps` = chunks per step)
    collects the chunks, so ZeRO 1-3, bf16 / fp16 and gradient clipping see one ordinary step;
(d) after the last chunk's (boundary) step: CE-CLIP's threshold from the global batch, the logit-scale clamp and
    the EMA update, as after a plain step.

The parameter gradient is the one of a step whose micro-batch is the whole contrastive batch (to rounding): dL/dθ =
sum_chunks (df/dθ)ᵀ dL/df. Memory: the cached features (and their gradients) of the rank's rows, B/world x (2 + K
+ concepts) x D, plus for XAC the visual tokens B/world x L x D in the compute dtype; activations of one chunk.
Time: about one extra forward per step (1.3-1.5x a plain step of the same contrastive batch, were it to fit).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch

from compclip.data import to_device
from compclip.losses.terms import Features
from compclip.rng import rng_state, set_rng_state
from compclip.trainer.engine import COMPUTE_DTYPES
from compclip.trainer.step import StepOutput, finish_step

GRAD_FIELDS = ("image", "text", "negatives", "tokens", "concepts")  # per-row features with a gradient
SCALAR_FIELDS = ("logit_scale", "logit_bias")  # shared: one value per step, its gradient applied once


def split_batch(batch: Dict[str, Any], chunk: int) -> List[Dict[str, Any]]:
    """A collated batch (docs/internals.md) as consecutive chunks of `chunk` samples; concepts go with their owner
    image (owners re-indexed within the chunk), per-batch values (skip counts) stay on the first chunk."""
    rows = batch["images"].shape[0]
    if rows % chunk:
        raise ValueError(f"gradcache: a batch of {rows} samples does not split into chunks of data.batch_size={chunk}")
    owner = batch.get("owner")
    pieces = []
    for start in range(0, rows, chunk):
        piece = {}
        for key, value in batch.items():
            if key in ("concepts", "owner"):
                continue
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
                piece[key] = value[start:start + chunk]
            else:
                piece[key] = value if start == 0 else type(value)()
        if owner is not None:
            mine = (owner >= start) & (owner < start + chunk)
            piece["concepts"], piece["owner"] = batch["concepts"][mine], owner[mine] - start
        pieces.append(piece)
    return pieces


def concat_features(parts: List[Features], rows: List[int]) -> Features:
    """The chunks' features as one rank's features: rows concatenated in chunk order, owners offset to the
    concatenated images, the logit scale / bias of the first chunk (the same parameter in every chunk)."""
    out = {}
    for field in dataclasses.fields(Features):
        values = [getattr(part, field.name) for part in parts]
        if values[0] is None or field.name in SCALAR_FIELDS:
            out[field.name] = values[0]
        elif field.name == "owner":
            offsets = [sum(rows[:i]) for i in range(len(rows))]
            out["owner"] = torch.cat([value + offset for value, offset in zip(values, offsets)])
        else:
            out[field.name] = torch.cat(values)
    return Features(**out)


def feature_gradients(method, cached: Features):
    """(loss, parts, {field: dL/dfield}) of the method's global-batch loss on `cached` (pass (b)); every term
    all-gathers, so every rank takes part. A field the loss does not reach gets a zero gradient."""
    leaves = {}
    features = dataclasses.replace(cached)
    for name in GRAD_FIELDS + SCALAR_FIELDS:
        value = getattr(cached, name)
        if value is not None:
            leaves[name] = value.detach().requires_grad_(True)
            setattr(features, name, leaves[name])
    with torch.enable_grad():
        loss, parts = method.loss(features)
        if not torch.isfinite(loss.detach()).item():
            return loss.detach(), {k: v.detach() for k, v in parts.items()}, None
        loss.backward()
    grads = {name: leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for name, leaf in leaves.items()}
    return loss.detach(), {k: v.detach() for k, v in parts.items()}, grads


def row_counts(parts: List[Features]) -> Dict[str, List[int]]:
    """Per gradient field, the rows each chunk contributed (to split the gradients of pass (b) back)."""
    return {name: [getattr(part, name).shape[0] for part in parts] for name in GRAD_FIELDS
            if getattr(parts[0], name) is not None}


def chunk_gradients(grads: Dict[str, torch.Tensor], rows: Dict[str, List[int]], index: int):
    """The slice of the step's feature gradients that belongs to chunk `index` (scalars: on chunk 0, else 0, so
    that every chunk's graph reaches the same parameters)."""
    out = {}
    for name, grad in grads.items():
        if name in SCALAR_FIELDS:
            out[name] = grad if index == 0 else torch.zeros_like(grad)
            continue
        start = sum(rows[name][:index])
        out[name] = grad[start:start + rows[name][index]]
    return out


def surrogate(features: Features, grads: Dict[str, torch.Tensor]) -> torch.Tensor:
    """sum_f <f, g_f>, accumulated in fp32 at least (bf16 features: the products are not rounded to bf16): its
    gradient with respect to each feature f is g_f, so its backward through the encoder is the loss's backward
    through this chunk."""
    total = torch.zeros((), dtype=torch.float32, device=features.logit_scale.device)
    for name, grad in grads.items():
        value = getattr(features, name)
        wide = torch.promote_types(value.dtype, torch.float32)
        total = total + (value.to(wide) * grad.to(wide)).sum()
    return total


class CachedStep:
    """One optimizer step over the rank's share of `optim.contrastive_batch` in chunks of `data.batch_size`
    (module docstring). `engine` is the DeepSpeed engine (its gradient accumulation = the chunks of a step)."""

    def __init__(self, engine, method, teacher, *, chunk: int, world_size: int, device: torch.device,
                 dtype: torch.dtype, logit_scale_max: float):
        self.engine, self.method, self.teacher = engine, method, teacher
        self.chunk, self.world_size, self.device, self.dtype = chunk, world_size, device, dtype
        self.logit_scale_max = logit_scale_max

    @classmethod
    def build(cls, cfg, engine, method, teacher, device: torch.device, world_size: int) -> Optional["CachedStep"]:
        """The cached step when `optim.contrastive_batch` is set, else None (the plain step)."""
        if cfg.optim.contrastive_batch <= 0:
            return None
        return cls(engine, method, teacher, chunk=cfg.data.batch_size, world_size=world_size, device=device,
                   dtype=COMPUTE_DTYPES[cfg.deepspeed.precision], logit_scale_max=cfg.optim.logit_scale_max)

    @torch.no_grad()
    def cache(self, chunks: List[Dict[str, Any]]):
        """Pass (a): every chunk's features (student and teacher) without autograd, and the RNG state before it."""
        states, cached = [], []
        for chunk in chunks:
            states.append(rng_state(self.device, host=False))
            cached.append(self.method.features(self.engine, self.teacher, to_device(chunk, self.device), self.dtype))
        return states, cached

    def backward_chunks(self, chunks, states, rows: Dict[str, List[int]], grads) -> bool:
        """Pass (c): per chunk, the RNG of (a), a re-forward with autograd, the DeepSpeed backward of the surrogate
        and `engine.step()`; the RNG then continues from where (a) left it. True if the last step was a boundary."""
        after = rng_state(self.device, host=False)
        boundary = False
        for index, chunk in enumerate(chunks):
            set_rng_state(states[index], self.device)
            features = self.method.features(self.engine, None, to_device(chunk, self.device), self.dtype)
            # DeepSpeed averages over ranks (x world_size) and would divide by the chunks (scale_wrt_gas=False): the
            # loss is already the global one.
            self.engine.backward(surrogate(features, chunk_gradients(grads, rows, index)) * self.world_size,
                                 scale_wrt_gas=False)
            boundary = self.engine.is_gradient_accumulation_boundary()
            self.engine.step()
        set_rng_state(after, self.device)
        return boundary

    def step(self, batch: Dict[str, Any], guard, where: Tuple[int, int, int]) -> Optional[StepOutput]:
        """Passes (a)-(d) on the rank's loader batch; None (nothing stepped) when the loss is not finite, as
        `NonFiniteGuard.ok(loss, parts, *where)` (epoch, micro-batch, step) decides."""
        chunks = split_batch(batch, self.chunk)
        states, cached = self.cache(chunks)
        features = concat_features(cached, [chunk["images"].shape[0] for chunk in chunks])
        rows, cached = row_counts(cached), None  # the chunks' own copies go: only the concatenation stays
        loss, parts, grads = feature_gradients(self.method, features)
        if not guard.ok(loss, parts, *where):
            return None
        boundary = self.backward_chunks(chunks, states, rows, grads)
        finish_step(self.engine, self.method, self.teacher, features, boundary, self.logit_scale_max)
        return StepOutput(loss, parts, features, boundary, batch["images"].shape[0] * self.world_size)
