"""EMA teacher (DeGLA): θ* ← α θ* + (1 − α) θ after every optimizer step; frozen, eval mode, float32.

Design under DeepSpeed (under ZeRO-3 the teacher is updated shard by shard, with no communication):

* ZeRO 0/1/2: every rank holds the full student parameters (the optimizer state is what is partitioned), so the
  teacher is a plain fp32 module on every rank. It follows the fp32 *master* weights, not the bf16 compute copy
  (`compclip.trainer.engine.fp32_master_sources`): averaging the bf16 copy would add its rounding error (up to 2^-9 relative per weight)
  into every update. Where each rank keeps the whole master (stage 0: DeepSpeed 0.19's FP16_UnfusedOptimizer
  `fp32_groups`, also used for bf16; fp32 training: the parameter itself) the rank updates its whole copy, no
  communication. Under ZeRO 1/2 (DeepSpeedZeroOptimizer, or BF16_Optimizer) each rank owns only a partition of
  the master, linked to every parameter as `param._hp_mapping` (fp32 fragment + its offset in the flattened
  parameter): each rank computes α θ* + (1 − α) θ on the fragments it owns, writes them into a zero-filled flat
  fp32 buffer and one all-reduce(sum) over the data-parallel group assembles the full new teacher on every rank.
  Every element has exactly one non-zero contributor, so the sum is exact (x + 0 = x) and the ranks stay
  bit-identical. Cost per optimizer step: one fp32 all-reduce of the model size (ViT-B/32: 0.6 GB; half that with
  an all-gather of the flat partitions, which would need the teacher stored in DeepSpeed's padded flat layout)
  and a transient fp32 buffer of the model size. Keeping the teacher partition-local and gathering it when used
  saves nothing here: it is used by every step's forward. A checkpoint holds the teacher once, in rank 0's file
  (`state_dict`); a resume loads it there and broadcasts it (`load_state_dict`).
* ZeRO-3: the teacher is itself a ZeRO-3 module — a second DeepSpeed engine without optimizer (ZeRO-Inference),
  fp32. Parameter partitioning in ZeRO-3 depends only on the parameter's shape and the world size, so teacher and
  student shards cover the same elements, and each rank updates its teacher shard (`ds_tensor`) from the fp32
  master shard the optimizer just wrote for the student (`safe_get_local_fp32_param`). The update needs no
  collective; the teacher's forward gathers its shards like any ZeRO-3 forward, and memory stays partitioned.
  A full fp32 copy on every rank would defeat ZeRO-3 for the large models it is used for.

The teacher's fp32 copy matters: with α = 0.9996, one update changes a weight by 4e-4 of the difference, below
bf16 resolution, so a bf16 teacher would never move.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from compclip.distributed import get_rank, get_world_size


def _is_zero3(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id") and hasattr(param, "ds_tensor")


def _mix(out: torch.Tensor, old: torch.Tensor, new: torch.Tensor, alpha: float) -> None:
    """out ← α old + (1 − α) new (`out` may be `old`). α = 0 is a copy of `new`, not 0 × old + new: `old` may hold
    anything before the teacher's first copy, even NaN."""
    if alpha == 0.0:
        out.copy_(new)
    else:
        out.copy_(old).mul_(alpha).add_(new, alpha=1.0 - alpha)


class EMATeacher:
    """`module` is the teacher (call it under no_grad); `update()` after every optimizer step.

    `student` is the DeepSpeed engine (preferred: stage 0 with bf16 keeps its fp32 master only in the engine's
    optimizer) or its module (ZeRO 1-3 find the master from the parameters alone)."""

    def __init__(self, student: nn.Module, build: Callable[[], nn.Module], decay: float,
                 zero3_config: Dict | None = None):
        self.decay = float(decay)
        self.num_updates = 0
        self._source = student  # what fp32_master_sources reads (engine or module)
        if hasattr(student, "optimizer") and isinstance(getattr(student, "module", None), nn.Module):
            student = student.module
        student_params = list(student.parameters())
        self.partitioned = any(_is_zero3(p) for p in student_params)
        teacher = build().float()
        teacher.requires_grad_(False)
        if self.partitioned:
            from compclip.trainer.engine import zero3_inference_engine

            if zero3_config is None:
                raise ValueError("EMATeacher: a ZeRO-3 student needs the ZeRO-3 config for its teacher")
            engine = zero3_inference_engine(teacher, zero3_config)
            self.engine = engine
            self.module = engine.module
        else:
            self.engine = None
            self.module = teacher.to(student_params[0].device)
        self.module.eval()
        self._pairs = list(zip(self.module.parameters(), student_params))
        for (t_name, t), (s_name, s) in zip(self.module.named_parameters(), student.named_parameters()):
            if t_name != s_name or tuple(getattr(t, "ds_shape", t.shape)) != tuple(getattr(s, "ds_shape", s.shape)):
                raise ValueError(f"EMATeacher: teacher parameter {t_name} does not match student {s_name}")
        # Parameter-free layers must match too: a teacher with GELU where the student has QuickGELU (OpenAI
        # weights) has the same parameters but computes different features.
        student_types = {name: type(m) for name, m in student.named_modules()}
        for name, module in self.module.named_modules():
            if name in student_types and student_types[name] is not type(module):
                raise ValueError(f"EMATeacher: teacher module {name or '<root>'} is {type(module).__name__}, "
                                 f"the student's is {student_types[name].__name__}")
        self.copy_from(student)

    # ----------------------------------------------------------------------------------------------------------
    def _teacher_storage(self) -> List[torch.Tensor]:
        if self.partitioned:
            return [t.ds_tensor.data.reshape(-1) for t, _ in self._pairs]
        return [t.data for t, _ in self._pairs]

    @torch.no_grad()
    def _blend(self, alpha: float) -> None:
        """storage ← α storage + (1 − α) master on every teacher tensor; α = 0 copies the master."""
        from compclip.trainer.engine import fp32_master_sources

        sources = fp32_master_sources(self._source)
        storages = self._teacher_storage()
        fragments = [i for i, source in enumerate(sources) if source.kind == "fragment"]
        for storage, source in zip(storages, sources):
            if source.kind == "fragment":
                continue
            value = source.tensor.detach().to(device=storage.device, dtype=torch.float32).reshape(storage.shape)
            _mix(storage, storage, value, alpha)
        if not fragments:
            return
        # ZeRO 1/2: the owned fragments blended into a zero-filled flat buffer, summed over the data-parallel
        # group (one non-zero contributor per element: exact), copied back.
        sizes = [storages[i].numel() for i in fragments]
        flat = torch.zeros(sum(sizes), dtype=torch.float32, device=storages[fragments[0]].device)
        offset = 0
        for i, size in zip(fragments, sizes):
            source, storage = sources[i], storages[i].reshape(-1)
            if source.tensor is not None:
                lo, n = source.start, source.tensor.numel()
                master = source.tensor.detach().to(device=flat.device, dtype=torch.float32)
                _mix(flat[offset + lo:offset + lo + n], storage[lo:lo + n], master, alpha)
            offset += size
        group = sources[fragments[0]].group
        if torch.distributed.is_initialized() and torch.distributed.get_world_size(group=group) > 1:
            torch.distributed.all_reduce(flat, group=group)
        for i, piece in zip(fragments, torch.split(flat, sizes)):
            storages[i].copy_(piece.reshape(storages[i].shape))

    @torch.no_grad()
    def copy_from(self, student: nn.Module | None = None) -> None:
        """The teacher becomes the student's fp32 master (a collective under ZeRO 1/2: call on every rank). Every
        element is written, whatever the teacher held: it is built without random draws
        (compclip.models.uninitialized_parameters)."""
        self._blend(0.0)

    @torch.no_grad()
    def update(self) -> None:
        """θ* ← α θ* + (1 − α) θ with θ the fp32 master; under ZeRO 1/2 one all-reduce (call on every rank)."""
        self._blend(self.decay)
        self.num_updates += 1

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return (self.engine if self.engine is not None else self.module)(*args, **kwargs)

    # ----------------------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        """This rank's teacher storage: its ZeRO-3 shards, or under ZeRO 0/1/2, where every rank holds the same full
        tensors, rank 0's only (`storage` is None on the other ranks: one copy on disk, not one per rank).
        The tensors are the teacher's own on the CPU (as `Module.state_dict` gives them), copies from a GPU."""
        replica = not self.partitioned and get_rank() > 0
        return {"decay": self.decay, "num_updates": self.num_updates, "partitioned": self.partitioned,
                "storage": None if replica else [s.detach().cpu() for s in self._teacher_storage()],
                "names": [n for n, _ in self.module.named_parameters()],
                "shapes": [tuple(getattr(p, "ds_shape", p.shape)) for p in self.module.parameters()]}

    @torch.no_grad()
    def load_state_dict(self, state: Dict) -> None:
        """Load `state_dict()`'s result. Under ZeRO 0/1/2 a collective: rank 0 loads its saved tensors and sends
        them to every rank (a rank's own file holds none; one written before holds the same tensors)."""
        if state["partitioned"] != self.partitioned:
            raise ValueError("EMA teacher checkpoint was written with a different ZeRO layout; use init_from")
        replicated = not self.partitioned and get_world_size() > 1
        if state["storage"] is None and not (replicated and get_rank() > 0):
            raise ValueError("EMA teacher checkpoint holds no teacher tensors (another rank's file?)")
        for storage, saved in zip(self._teacher_storage(), state["storage"] or ()):
            if storage.numel() != saved.numel():
                raise ValueError("EMA teacher checkpoint shard sizes differ (different world size?); use init_from")
            storage.copy_(saved.reshape(storage.shape))
        if replicated:
            for storage in self._teacher_storage():
                torch.distributed.broadcast(storage, src=0)
        self.num_updates = state["num_updates"]

    @torch.no_grad()
    def load_full(self, full: Dict[str, torch.Tensor]) -> None:
        """Load full (consolidated) teacher weights, whatever this run's layout."""
        for (name, param), storage in zip(self.module.named_parameters(), self._teacher_storage()):
            value = full[name].float().reshape(-1)
            if self.partitioned:
                numel = storage.numel()
                start = numel * torch.distributed.get_rank()
                piece = value[start:start + numel]
                storage.zero_()
                storage[:piece.numel()].copy_(piece)
            else:
                storage.copy_(value.reshape(storage.shape))

    def full_parameters(self) -> Dict[str, torch.Tensor]:
        """Full fp32 teacher weights (a collective under ZeRO-3: call on every rank)."""
        if not self.partitioned:
            return {n: p.detach().cpu().clone() for n, p in self.module.named_parameters()}
        from compclip.trainer.engine import gathered

        out = {}
        for name, param in self.module.named_parameters():
            with gathered([param]):
                out[name] = param.detach().cpu().clone()
        return out


def consolidate_shards(per_rank_states: List[Dict]) -> Dict[str, torch.Tensor]:
    """Full teacher weights from every rank's `state_dict()` (ZeRO-3 shards are contiguous slices of the flat
    parameter in rank order, padded at the end)."""
    first = per_rank_states[0]
    out = {}
    for index, (name, shape) in enumerate(zip(first["names"], first["shapes"])):
        if not first["partitioned"]:
            out[name] = first["storage"][index].reshape(shape)
            continue
        flat = torch.cat([state["storage"][index].reshape(-1) for state in per_rank_states])
        numel = 1
        for dim in shape:
            numel *= dim
        out[name] = flat[:numel].reshape(shape)
    return out


def build_teacher(engine, build: Callable[[], nn.Module], decay: float, ds_config: Dict,
                  init_state: Optional[Dict[str, torch.Tensor]] = None) -> "EMATeacher":
    """The EMA teacher of a DeepSpeed student `engine` (`build` makes an untrained copy of the student's module);
    `init_state`: consolidated teacher weights of an `init_from` checkpoint."""
    teacher = EMATeacher(engine, build, decay, zero3_config=ds_config)
    if init_state is not None:
        teacher.load_full(init_state)
    return teacher
