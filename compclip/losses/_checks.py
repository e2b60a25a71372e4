"""Input validation shared by the functional API and the global-batch terms.

Every error is a ``ValueError`` that names the function, the argument and the shapes involved, so a wrong batch
layout fails at the call with a readable message instead of deep inside a kernel.
"""
from __future__ import annotations

import numbers
from functools import reduce
from typing import Dict, Optional, Tuple

import torch

from compclip.kernels.dispatch import BACKENDS  # noqa: F401  (one list: the kernels own the backends)

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
VARIANTS = ("paper", "released")


def features(fn: str, layout: Dict[str, Tuple[Optional[torch.Tensor], str]]) -> Dict[str, int]:
    """Check floating feature tensors against symbolic layouts and return the bound sizes.

    ``layout`` maps an argument name to ``(tensor, symbols)``, e.g. ``{"image": (image, "BD"),
    "negatives": (negatives, "BKD")}``: each tensor must have one dimension per symbol, and every symbol must mean
    the same size in every argument. All tensors must share a device.
    """
    bound: Dict[str, Tuple[int, str, tuple]] = {}
    devices = set()
    for name, (tensor, symbols) in layout.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{fn}: {name} must be a tensor [{', '.join(symbols)}], got {type(tensor).__name__}")
        if tensor.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{fn}: {name} must be float64, float32, float16 or bfloat16, got {tensor.dtype}")
        if tensor.dim() != len(symbols):
            raise ValueError(
                f"{fn}: {name} must have shape [{', '.join(symbols)}], got {tuple(tensor.shape)}"
            )
        for symbol, size in zip(symbols, tensor.shape):
            if symbol in bound and bound[symbol][0] != size:
                first_size, first_name, first_shape = bound[symbol]
                raise ValueError(
                    f"{fn}: {name} has shape {tuple(tensor.shape)} but {first_name} has shape {first_shape}: "
                    f"{symbol} must agree ({size} vs {first_size})"
                )
            bound.setdefault(symbol, (size, name, tuple(tensor.shape)))
        devices.add(tensor.device)
    if len(devices) > 1:
        raise ValueError(f"{fn}: inputs are on different devices ({sorted(str(d) for d in devices)})")
    if bound.get("B", (1,))[0] == 0:
        raise ValueError(f"{fn}: the batch is empty (B = 0)")
    return {symbol: entry[0] for symbol, entry in bound.items()}


def prepare(fn: str, **layout):
    """``features`` on ``name=(tensor, symbols)`` pairs; returns (sizes, the tensors cast to one dtype, in order)."""
    sizes = features(fn, layout)
    tensors = [tensor for tensor, _ in layout.values()]
    dtype = common_dtype(*tensors)
    return sizes, [tensor.to(dtype) for tensor in tensors]


def with_negatives(fn: str, image, text, negatives):
    """``prepare`` for the common image [B, D], text [B, D], negatives [B, K, D] triple."""
    return prepare(fn, image=(image, "BD"), text=(text, "BD"), negatives=(negatives, "BKD"))


def common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype every feature is cast to (kernels take one input dtype): type promotion over the inputs."""
    return reduce(torch.promote_types, [t.dtype for t in tensors])


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def scalar(fn: str, name: str, value, allow_none: bool = False):
    """A 0-d tensor (a one-element tensor is reshaped to 0-d, keeping its graph) or a Python float."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{fn}: {name} is required (a 0-d tensor or a float), got None")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{fn}: {name} must be a scalar (0-d tensor), got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{fn}: {name} must be a floating tensor, got {value.dtype}")
        return value.reshape(())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{fn}: {name} must be a 0-d tensor or a float, got {type(value).__name__}")


def valid_mask(fn: str, valid, batch: int, types: int) -> torch.Tensor:
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        kind = valid.dtype if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(f"{fn}: valid must be a bool tensor [B, K], got {kind}")
    if tuple(valid.shape) != (batch, types):
        raise ValueError(f"{fn}: valid must have shape [B, K] = {(batch, types)}, got {tuple(valid.shape)}")
    return valid


def per_type(fn: str, name: str, value, types: int) -> torch.Tensor:
    """A float vector [K] with one entry per negative type (CE-CLIP thresholds)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{fn}: {name} must be a float tensor [K], got {kind}")
    if tuple(value.shape) != (types,):
        raise ValueError(f"{fn}: {name} must have shape [K] = ({types},), got {tuple(value.shape)}")
    return value


def owner_index(fn: str, owner, concepts: int, images: int) -> torch.Tensor:
    """owner [P]: integer index of each concept's image, in [0, images)."""
    if not isinstance(owner, torch.Tensor):
        raise ValueError(f"{fn}: owner must be an integer tensor [P], got {type(owner).__name__}")
    if owner.is_floating_point() or owner.is_complex() or owner.dtype == torch.bool:
        raise ValueError(f"{fn}: owner must be an integer tensor (image index per concept), got {owner.dtype}")
    if tuple(owner.shape) != (concepts,):
        raise ValueError(f"{fn}: owner must have shape [P] = ({concepts},), got {tuple(owner.shape)}")
    if owner.numel():
        low, high = int(owner.min()), int(owner.max())
        if low < 0 or high >= images:
            raise ValueError(f"{fn}: owner values must index the B = {images} images, got range [{low}, {high}]")
    return owner.long()


def backend(fn: str, value: str) -> str:
    if value not in BACKENDS:
        raise ValueError(f"{fn}: unknown backend {value!r}; expected one of {BACKENDS}")
    return value


def variant(fn: str, value: str) -> str:
    if value not in VARIANTS:
        raise ValueError(f"{fn}: unknown variant {value!r}; expected one of {VARIANTS}")
    return value


def positive(fn: str, name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        value = scalar(fn, name, value)
        value = float(value)
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{fn}: {name} must be a positive number, got {value!r}")
    return float(value)
