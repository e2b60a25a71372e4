"""Helpers shared by more than one kernel module (``contrastive``, ``grouped``, ``xattn_pool``).

They live here, not in one of the kernel modules, so that each kernel module holds only its own kernels, host
launchers, ``autograd.Function`` and public op (the kernel file anatomy of docs/architecture.md), and no kernel
module imports another.

Host side: the ``Scalar`` type of ``logit_scale`` / ``logit_bias`` arguments and how they reach a kernel
(``scalar_arg``) and get their gradient back (``scalar_grad``); power-of-two block sizes (``block_size``); the
tl.dot operand dtype and precision (``dot_config``: storage dtype for fp16/bf16 on a GPU, float32 "ieee"
otherwise, since the interpreter cannot multiply bf16); ``launch`` (skips empty grids), ``contiguous``,
``needs_grad``.

Device side (``@triton.jit``, inlined into the calling kernels): ``_dot_tile`` (an X Yᵀ tile over the whole D in
BLOCK_D slices, float32 accumulation) and ``_load_rows`` (a masked [rows, D slice] load in a given dtype).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from .dispatch import interpreter_enabled

Scalar = Union[torch.Tensor, float]

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# --------------------------------------------------------------------------------------------------------------
# Host helpers
# --------------------------------------------------------------------------------------------------------------
def block_size(requested: Optional[int], extent: int, default: int, floor: int = 16) -> int:
    """A power-of-two block: ``requested`` if given, else the smaller of ``default`` and the padded extent.

    Blocks that feed tl.dot must be ≥ 16 on a GPU (a block of 8 fails to compile), so a requested block below
    ``floor`` is rounded up to it; the interpreter would accept it, but a test must not pass on a shape the GPU
    cannot compile."""
    if requested is not None:
        if requested < 1 or requested & (requested - 1):
            raise ValueError(f"block sizes must be powers of two, got {requested}")
        return max(requested, floor)
    return max(floor, min(default, triton.next_power_of_2(max(extent, 1))))


def dot_config(*tensors: torch.Tensor, follow_tf32: bool = False) -> Tuple[tl.dtype, str]:
    """(dtype of tl.dot operands, input_precision): the shared 16-bit storage dtype on a GPU, else float32/ieee.

    ``follow_tf32``: float32 inputs on a GPU use "tf32" when ``torch.backends.cuda.matmul.allow_tf32`` is set
    (PyTorch's own rule for float32 matmuls); the interpreter always gets "ieee"."""
    dtypes = {t.dtype for t in tensors}
    if not interpreter_enabled() and len(dtypes) == 1:
        (dtype,) = dtypes
        if dtype in (torch.float16, torch.bfloat16):
            # input_precision only matters for float32 operands; 16-bit ones get Triton's default.
            return _TL_DTYPES[dtype], "tf32"
        if dtype == torch.float32 and follow_tf32 and torch.backends.cuda.matmul.allow_tf32:
            return tl.float32, "tf32"
    return tl.float32, "ieee"


def scalar_arg(value: Optional[Scalar], device: torch.device) -> torch.Tensor:
    """A 1-element float32 device tensor holding a scale / bias (0 for None); the kernels read it by pointer,
    so a CUDA scalar never has to be synchronised to the host."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(1).to(device=device, dtype=torch.float32)
    return torch.full((1,), 0.0 if value is None else float(value), dtype=torch.float32, device=device)


def scalar_grad(partials: torch.Tensor, like: Optional[Scalar], needed: bool) -> Optional[torch.Tensor]:
    """Sum per-program partials into the gradient of a 0-d (or 1-element) tensor input; None where not needed."""
    if not needed or not isinstance(like, torch.Tensor):
        return None
    return partials.sum().reshape(like.shape).to(like.dtype)


def needs_grad(ctx, index: int) -> bool:
    return bool(ctx.needs_input_grad[index])


# The compute capability (x10) that launchers tune their tiles for when the tensors are not on a GPU: the
# interpreter and the ahead-of-time gate (compclip.kernels.aot sets it per target architecture).
_TARGET_ARCH = {"cc": 90}


def device_arch(tensor: torch.Tensor) -> int:
    """Compute capability x10 of ``tensor``'s GPU, or the AOT/interpreter target (default 90) off the GPU."""
    if tensor.is_cuda:
        major, minor = torch.cuda.get_device_capability(tensor.device)
        return 10 * major + minor
    return _TARGET_ARCH["cc"]


def launch(kernel, grid: Tuple[int, ...], *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``, skipped for an empty grid (a zero-size input)."""
    if all(g > 0 for g in grid):
        kernel[grid](*args, **meta)


def contiguous(*tensors: Optional[torch.Tensor]) -> Sequence[Optional[torch.Tensor]]:
    return [t if t is None else t.contiguous() for t in tensors]


# --------------------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _dot_tile(
    x_ptr, y_ptr,                      # data: X [X_ROWS, D], Y [Y_ROWS, D], row-major, unit column stride
    x_idx, y_idx,                      # [BLOCK_X], [BLOCK_Y] int64 row indices
    X_ROWS, Y_ROWS, D,                 # shapes
    stride_x, stride_y,                # row strides
    BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """X[x_idx] @ Y[y_idx]ᵀ over the whole D, in BLOCK_D slices: [BLOCK_X, BLOCK_Y] float32 (0 where masked)."""
    acc = tl.zeros((BLOCK_X, BLOCK_Y), dtype=tl.float32)
    x_valid = x_idx < X_ROWS
    y_valid = y_idx < Y_ROWS
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_valid = offs_d < D
        # [BLOCK_X, BLOCK_D]
        x = tl.load(x_ptr + x_idx[:, None] * stride_x + offs_d[None, :],
                    mask=x_valid[:, None] & d_valid[None, :], other=0.0)
        # [BLOCK_D, BLOCK_Y], loaded transposed
        y = tl.load(y_ptr + y_idx[None, :] * stride_y + offs_d[:, None],
                    mask=y_valid[None, :] & d_valid[:, None], other=0.0)
        acc = tl.dot(x.to(DOT_DTYPE), y.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _load_rows(ptr, idx, offs_d, ROWS, D, stride, DTYPE: tl.constexpr):
    """[len(idx), len(offs_d)] slice of a row-major [ROWS, D] matrix in ``DTYPE`` (e.g. a tl.dot operand's), 0
    where masked."""
    mask = (idx < ROWS)[:, None] & (offs_d < D)[None, :]
    return tl.load(ptr + idx[:, None] * stride + offs_d[None, :], mask=mask, other=0.0).to(DTYPE)
