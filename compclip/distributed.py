"""Data-parallel helpers for global-batch losses (``torch.distributed`` only, no DeepSpeed).

Everything here works without an initialised process group: the world is then one process, gathers return their
input and reductions are the identity, so single-process code and tests run the same code path.

Gradient contract (see ``docs/internals.md``). A global-batch loss is computed on every rank r as
``L = sum_across_ranks(L_r)`` where ``L_r`` scores the rank's **local** rows against **gathered** columns.

* ``all_gather_with_grad``: forward concatenates every rank's rows (dim 0, in rank order); backward all-reduces
  (SUM) the gradient of the gathered tensor and keeps this rank's slice. With ``sum_across_ranks`` having an
  identity backward, the gradient reaching a rank's local features is Σ_r ∂L_r/∂x_local = ∂L/∂x_local, the
  single-process gradient on the concatenated batch.
* Parameters shared by all ranks (``logit_scale``) get the rank's partial ∂L_r/∂s; their sum over ranks is ∂L/∂s.
  DeepSpeed averages parameter gradients, hence the trainer back-propagates ``loss * world_size``.

The backward uses ``all_reduce`` (not ``reduce_scatter``, which gloo lacks): it moves W× more bytes than a
reduce-scatter would, which is negligible next to the features themselves for the [B, D] tensors gathered here.

Ranks may hold different numbers of rows (concepts per batch vary): sizes are exchanged first (one tiny
all_gather, skipped when the caller passes ``sizes``) and unequal shards are zero-padded for the collective.
"""
from __future__ import annotations

import os
import socket
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "is_initialized",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "free_port",
    "cpu_threads",
    "gather_sizes",
    "global_row_offset",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "sum_across_ranks",
    "barrier",
    "any_across_ranks",
]


def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group=None) -> int:
    """This process's rank in ``group`` (0 without a process group)."""
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group=None) -> int:
    """Number of processes in ``group`` (1 without a process group)."""
    return dist.get_world_size(group) if is_initialized() else 1


def is_distributed(group=None) -> bool:
    """True when collectives over ``group`` involve more than one process."""
    return get_world_size(group) > 1


def free_port() -> int:
    """A TCP port free on this host now, for MASTER_PORT of a world set up here (tests, single-process runs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_threads(processes: int = 1) -> int:
    """torch CPU threads for each of `processes` processes sharing this machine: the environment's
    OMP_NUM_THREADS when it is set to a positive integer (the user's or a scheduler's choice), else the cores
    divided among the processes. Oversubscribed OpenMP threads spin rather than sleep, so a shared core costs far
    more than its share."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return max(1, (os.cpu_count() or 1) // max(1, processes))


def barrier(group=None) -> None:
    if is_distributed(group):
        dist.barrier(group=group)


def any_across_ranks(flags: Sequence[bool], group=None) -> List[bool]:
    """Per flag, whether it is set on any rank of ``group`` (one small all-reduce MAX; ``flags`` without one)."""
    if not is_distributed(group):
        return [bool(f) for f in flags]
    values = torch.tensor([float(bool(f)) for f in flags], device=_communication_device(group))
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in values.tolist()]


def _communication_device(group) -> torch.device:
    """Device for small bookkeeping tensors: NCCL only moves CUDA tensors, gloo prefers CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_sizes(local_rows: int, group=None) -> List[int]:
    """Row counts of every rank of ``group``, in rank order (``[local_rows]`` without a process group)."""
    if not is_distributed(group):
        return [int(local_rows)]
    size = torch.tensor([int(local_rows)], dtype=torch.long, device=_communication_device(group))
    sizes = [torch.empty_like(size) for _ in range(get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    return [int(s.item()) for s in sizes]


def global_row_offset(local_rows: int, group=None, sizes: Optional[Sequence[int]] = None) -> int:
    """Global index of this rank's first row when every rank's rows are concatenated in rank order."""
    if sizes is None:
        sizes = gather_sizes(local_rows, group)
    return int(sum(sizes[: get_rank(group)]))


def _checked_sizes(x: torch.Tensor, group, sizes: Optional[Sequence[int]]) -> List[int]:
    if sizes is None:
        return gather_sizes(x.shape[0], group)
    sizes = [int(s) for s in sizes]
    world, rank = get_world_size(group), get_rank(group)
    if len(sizes) != world or sizes[rank] != x.shape[0]:
        raise ValueError(
            f"sizes={sizes} do not describe this gather: world size {world}, rank {rank} holds {x.shape[0]} rows"
        )
    return sizes


def _gather_rows(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 (no autograd)."""
    is_bool = x.dtype == torch.bool
    if is_bool:  # not every backend reduces / gathers bool tensors
        x = x.to(torch.uint8)
    x = x.contiguous()
    longest = max(sizes)
    if all(s == longest for s in sizes):
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x, group=group)
    else:
        padded = x.new_zeros((longest,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        parts = [part[:rows] for part, rows in zip(parts, sizes)]
    gathered = torch.cat(parts, dim=0)
    return gathered.bool() if is_bool else gathered


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group = group
        ctx.start = int(sum(sizes[: get_rank(group)]))
        ctx.rows = x.shape[0]
        return _gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad_gathered):
        grad = grad_gathered.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.start + ctx.rows], None, None


def all_gather_with_grad(x: torch.Tensor, group=None, sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Concatenate ``x`` [n_r, ...] of every rank along dim 0 -> [Σ n_r, ...], differentiably.

    Backward: the gathered gradient is summed over ranks and this rank's slice is returned (see module docstring).
    Ranks may hold different ``n_r``. ``sizes`` (every rank's row count, e.g. from ``gather_sizes``) saves the
    size exchange when several tensors with the same rows are gathered.
    """
    if not is_distributed(group):
        return x
    return _AllGatherWithGrad.apply(x, group, tuple(_checked_sizes(x, group, sizes)))


def all_gather_no_grad(x: torch.Tensor, group=None, sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Like ``all_gather_with_grad`` but detached (teacher features, owners, masks; any dtype, bool included)."""
    if not is_distributed(group):
        return x.detach()
    with torch.no_grad():
        return _gather_rows(x.detach(), _checked_sizes(x, group, sizes), group)


class _SumAcrossRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return grad_total, None


def sum_across_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    """Forward: all-reduce SUM (every rank gets the total). Backward: identity (each rank owns its summand)."""
    if not is_distributed(group):
        return x
    return _SumAcrossRanks.apply(x, group)
