"""Helpers shared by more than one kernel module (``contrastive``, ``grouped``, ``xattn_pool``).

They live here, not in one of the kernel modules, so that each kernel module holds only its own kernels, host
launchers, ``autograd.Function`` and public op (the kernel file anatomy of docs/architecture.md), and no kernel
module imports another.

Host side: the ``Scalar`` type of ``logit_scale`` / ``logit_bias`` arguments and how they reach a kernel
(``scalar_arg``) and get their gradient back (``scalar_grad``); power-of-two block sizes (``block_size``); the
tl.dot operand dtype and precision (``dot_config``: storage dtype for fp16/bf16 on a GPU, float32 "ieee"
otherwise, since the interpreter cannot multiply bf16); the GPU the launchers size their grids for
(``device_arch``, ``sm_count``: the tensor's GPU, or the ahead-of-time target off the GPU) and how a streamed axis
is split so that a grid fills it (``split_axis``, ``combine_block``); the power-of-two gradient scale that keeps
16-bit dot operands normal (``pow2_scale``); ``launch`` (skips empty grids, launches on the tensors' GPU through
``device_guard``); rows laid out for vector loads (``aligned_rows``, ``padded_width``); ``contiguous``,
``needs_grad``.

Device side (``@triton.jit``, inlined into the calling kernels): ``_dot_tile`` (an X Yᵀ tile over the whole D in
BLOCK_D slices, float32 accumulation), ``_load_rows`` (a masked [rows, D slice] load in a given dtype),
``_sum_splits_kernel`` (the deterministic combine of per-split float32 partials), ``_log1p`` and ``_expm1``
(accurate near 0; Triton has no portable ones: libdevice's do not run in the interpreter).
"""
from __future__ import annotations

import contextlib
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


# The GPU that launchers tune their tiles and size their grids for when the tensors are not on one: the
# interpreter and the ahead-of-time gate (compclip.kernels.aot sets it per target architecture). The SM counts
# are those of the parts the gate stands for: H100 SXM (132) for sm_90, A100 (108) for sm_80.
TARGET_SMS = {90: 132, 80: 108}
_TARGET_ARCH = {"cc": 90}


def device_arch(tensor: torch.Tensor) -> int:
    """Compute capability x10 of ``tensor``'s GPU, or the AOT/interpreter target (default 90) off the GPU."""
    if tensor.is_cuda:
        major, minor = torch.cuda.get_device_capability(tensor.device)
        return 10 * major + minor
    return _TARGET_ARCH["cc"]


def sm_count(tensor: torch.Tensor) -> int:
    """Streaming multiprocessors of ``tensor``'s GPU, or of the AOT/interpreter target off the GPU."""
    if tensor.is_cuda:
        return torch.cuda.get_device_properties(tensor.device).multi_processor_count
    return TARGET_SMS[_TARGET_ARCH["cc"]]


# A launch should bring at least this many CTAs per SM (issue: "waves"), so that the last, partly filled wave
# costs at most a third of the time and SMs that finish early find more work.
WAVES = 2


def split_axis(base_ctas: int, extent: int, block: int, sms: int, requested: Optional[int] = None) -> Tuple[int, int]:
    """(splits, elements per split) of a streamed axis of ``extent`` walked in ``block`` tiles, so that
    ``base_ctas`` × splits ≥ WAVES × ``sms`` (flash-decoding's split-K): every split gets the same whole number of
    tiles (the last one fewer) and none is empty. ``requested``: that many splits at most (clamped to the tile
    count; tests use it)."""
    tiles = max(triton.cdiv(extent, block), 1)
    if requested is not None:
        if requested < 1:
            raise ValueError(f"splits must be >= 1, got {requested}")
        per_split = triton.cdiv(tiles, min(requested, tiles))
    else:
        want = triton.cdiv(WAVES * sms, max(base_ctas, 1))
        per_split = max(tiles // want, 1)        # rounding the share down keeps splits ≥ want
    return triton.cdiv(tiles, per_split), per_split * block


def combine_block(elements: int, sms: int, low: int = 16, high: int = 1024) -> int:
    """Power-of-two block of an elementwise combine: the largest one in [low, high] that still gives WAVES × sms
    programs (``low`` when even that cannot)."""
    target = max(elements // (WAVES * sms), 1)
    return max(low, min(high, 1 << (target.bit_length() - 1)))


def pow2_scale(values: torch.Tensor, top: int) -> torch.Tensor:
    """2^(top − ceil(log2 max|values|)) as a 1-element float32 device tensor (no host sync): multiplying by it
    brings the largest |value| into (2^(top−1), 2^top], and, being a power of two, adds no rounding. 1 for an
    empty tensor."""
    if values.numel() == 0:
        return torch.ones(1, dtype=torch.float32, device=values.device)
    peak = values.detach().abs().amax().float().reshape(1).clamp(min=2.0 ** -100, max=2.0 ** 100)
    return torch.exp2(top - torch.ceil(torch.log2(peak)))


def device_guard(device: Optional[torch.device]):
    """``torch.cuda.device(device)`` for a CUDA device, else a no-op: Triton launches on the *current* CUDA
    device, which need not be the one the tensors live on."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid: Tuple[int, ...], *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` on the GPU of its first tensor argument; skipped for an empty grid (a
    zero-size input). Every kernel of this package is launched through here (tests/kernels checks it)."""
    if all(g > 0 for g in grid):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        with device_guard(device):
            kernel[grid](*args, **meta)


def contiguous(*tensors: Optional[torch.Tensor]) -> Sequence[Optional[torch.Tensor]]:
    return [t if t is None else t.contiguous() for t in tensors]


# Triton's launcher specialises a pointer on 16-byte alignment and an integer on divisibility by 16; only then can
# a row tile be loaded with vector instructions, and the scalar loads otherwise emitted cost registers.
ALIGN = 16


def padded_width(width: int) -> int:
    """``width`` rounded up to a multiple of ALIGN elements."""
    return triton.cdiv(width, ALIGN) * ALIGN


def aligned_rows(tensor: Optional[torch.Tensor], width: int) -> Optional[torch.Tensor]:
    """``tensor`` [..., D] as a contiguous tensor whose data pointer is 16-byte aligned and whose rows are
    ``width`` ≥ D wide, zero-padded (zeros add nothing to a dot product): ``tensor`` itself when it already is, else
    one copy (a slice that starts mid-allocation, a non-contiguous view, or a D that is not a multiple of 16)."""
    if tensor is None:
        return None
    if tensor.is_contiguous() and tensor.shape[-1] == width and tensor.data_ptr() % ALIGN == 0:
        return tensor
    out = tensor.new_zeros(*tensor.shape[:-1], width)
    out[..., :tensor.shape[-1]] = tensor
    return out


# --------------------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _dot_tile(
    x_ptr, y_ptr,                      # data: X [X_ROWS, D], Y [Y_ROWS, D], row-major, unit column stride
    x_idx, y_idx,                      # [BLOCK_X], [BLOCK_Y] int64 row indices
    X_ROWS, Y_ROWS, D,                 # shapes
    stride_x, stride_y,                # row strides
    x_scale,                           # float32 factor on X before the cast to DOT_DTYPE (used when SCALE_X)
    BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SCALE_X: tl.constexpr,
):
    """X[x_idx] @ Y[y_idx]ᵀ over the whole D, in BLOCK_D slices: [BLOCK_X, BLOCK_Y] float32 (0 where masked).
    SCALE_X: X is multiplied by ``x_scale`` in float32 before it is rounded to the dot dtype (a gradient scaled
    into fp16's normal range)."""
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
        if SCALE_X:
            x = x.to(tl.float32) * x_scale
        acc = tl.dot(x.to(DOT_DTYPE), y.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _load_rows(ptr, idx, offs_d, ROWS, D, stride, DTYPE: tl.constexpr):
    """[len(idx), len(offs_d)] slice of a row-major [ROWS, D] matrix in ``DTYPE`` (e.g. a tl.dot operand's), 0
    where masked."""
    mask = (idx < ROWS)[:, None] & (offs_d < D)[None, :]
    return tl.load(ptr + idx[:, None] * stride + offs_d[None, :], mask=mask, other=0.0).to(DTYPE)


@triton.jit
def _log1p(x):
    """log(1 + x), accurate for small |x| (Goldberg: log(u)·x/(u − 1) with u = 1 + x rounded)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / tl.where(u == 1.0, 1.0, u - 1.0))


@triton.jit
def _expm1(x):
    """exp(x) − 1, accurate for small |x| (Kahan: (u − 1)·x / log(u) with u = exp(x) rounded; the rounding of u
    cancels between numerator and denominator). For x ≤ 0, which is every use here (exp(x) may overflow above
    88)."""
    u = tl.exp(x)
    um1 = u - 1.0
    plain = (u == 1.0) | (um1 == -1.0)                   # x itself, or −1: the quotient would be 0/0 or ·/−inf
    quotient = um1 * x / tl.where(plain, 1.0, tl.log(u))
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, quotient))


@triton.jit
def _sum_splits_kernel(
    partials_ptr, out_ptr, out2_ptr,   # partials [S, ROWS, D] float32; out [ROWS1, D]; out2 [ROWS − ROWS1, D] or None
    S, ROWS, ROWS1, D,                 # splits, rows in all, rows that go to out
    HAS_OUT2: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr,
):
    """out (+)= Σ_s partials[s] in split order (deterministic), cast to the output's dtype; rows ≥ ROWS1 go to
    out2. ACCUMULATE: add to out's values (a float32 accumulator) instead of overwriting them."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)          # flat [ROWS·D] index
    total = ROWS * D
    valid = offs < total
    if ACCUMULATE:
        acc = tl.load(out_ptr + offs, mask=valid & (offs < ROWS1 * D), other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(partials_ptr + s * total + offs, mask=valid, other=0.0)
    first = offs < ROWS1 * D
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=valid & first)
    if HAS_OUT2:
        tl.store(out2_ptr + (offs - ROWS1 * D), acc.to(out2_ptr.dtype.element_ty), mask=valid & ~first)
