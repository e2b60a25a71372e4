"""Backend choice for every kernel-backed op: ``auto`` | ``triton`` | ``torch``, with the reasons a kernel cannot run.

* ``torch``  — always the PyTorch reference (``compclip.kernels.reference``).
* ``triton`` — the Triton kernel, or a ``RuntimeError`` that lists every reason it cannot run here.
* ``auto``   — Triton for CUDA tensors when nothing rules it out, else the reference. When ``auto`` falls back for
  CUDA tensors, the reasons are logged once per op, so a silently slow run cannot hide.

Every resolution is recorded; ``resolved_backends()`` returns ``{op: backend}`` for the trainer to log at step 0.
Nothing here touches the GPU driver at import time.
"""
from __future__ import annotations

import logging
import os
import importlib
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

logger = logging.getLogger("compclip.kernels")

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_resolved: Dict[str, str] = {}
_warned: set = set()


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> Optional[str]:
    """None if triton imports, else the reason it does not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the platform
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def unavailable_reasons(tensors: Iterable[Optional[torch.Tensor]], extra: Iterable[str] = ()) -> List[str]:
    """Every reason the Triton kernels cannot run on these tensors (empty list: they can)."""
    reasons: List[str] = []
    missing = triton_available()
    if missing:
        reasons.append(missing)
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    devices = {t.device.type for t in tensors}
    if len({t.device for t in tensors}) > 1:
        reasons.append(f"inputs are on different devices ({sorted(str(t.device) for t in tensors)})")
    if "cuda" not in devices and not interpreter_enabled():
        reasons.append(
            f"inputs are on {sorted(devices) or ['?']}, not CUDA, and TRITON_INTERPRET=1 is not set "
            "(the kernels run on the CPU only in Triton's interpreter)"
        )
    for t in tensors:
        if t.is_floating_point() and t.dim() > 0 and t.dtype not in KERNEL_DTYPES:
            reasons.append(f"dtype {t.dtype} is not supported by the kernels (float32, float16, bfloat16; "
                           "float64 runs on the reference)")
            break
    reasons.extend(extra)
    return reasons


def resolve(op: str, backend: str, tensors: Iterable[Optional[torch.Tensor]], extra: Iterable[str] = ()) -> str:
    """Return ``"triton"`` or ``"torch"`` for ``op`` on these inputs; raise for ``backend="triton"`` that cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS}")
    tensors = list(tensors)
    if backend == "torch":
        choice = "torch"
    else:
        reasons = unavailable_reasons(tensors, extra)
        if backend == "triton":
            if reasons:
                raise RuntimeError(f"{op}: backend='triton' cannot run: " + "; ".join(reasons))
            choice = "triton"
        else:
            on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)
            if on_cuda and not reasons:
                choice = "triton"
            else:
                choice = "torch"
                if on_cuda and op not in _warned:
                    _warned.add(op)
                    logger.warning("%s: falling back to the PyTorch reference: %s", op, "; ".join(reasons))
    _resolved[op] = choice
    return choice


def resolved_backends() -> Dict[str, str]:
    """``{op: "triton" | "torch"}`` for every op resolved so far in this process."""
    return dict(_resolved)


def kernel_op(name: str, backend: str, tensors: Sequence) -> Callable:
    """The implementation of kernel-level op ``name`` that ``dispatch.resolve`` picks for these tensors.

    The Triton op is looked up on ``compclip.kernels`` at call time, so this works before and after the kernels
    are exported; a missing one is a reason like any other (``"triton"`` raises naming it, ``"auto"`` falls back).
    """
    from . import reference  # lazy: compclip.kernels imports this module first

    triton_op = getattr(importlib.import_module(__package__), name, None)  # compclip.kernels
    missing = [] if callable(triton_op) else [
        f"the Triton op compclip.kernels.{name} is not available (not exported by compclip.kernels)"
    ]
    if resolve(name, backend, tensors, missing) == "triton":
        return triton_op
    return getattr(reference, name)
