"""EMA teacher (DeGLA): θ* ← α θ* + (1 − α) θ after every optimizer step; frozen, eval mode, float32.

Design under DeepSpeed (SPEC §4: "under ZeRO-3 updated shard by shard with no communication"):

* ZeRO 0/1/2: every rank holds the full student parameters (the optimizer state is what is partitioned), so the
  teacher is a plain fp32 module on every rank and each rank updates its whole copy from its own student
  parameters. The ranks stay identical because their student parameters are identical; nothing is sent.
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

from typing import Callable, Dict, List

import torch
import torch.nn as nn


def _is_zero3(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id") and hasattr(param, "ds_tensor")


class EMATeacher:
    """`module` is the teacher (call it under no_grad); `update(student)` after every optimizer step."""

    def __init__(self, student: nn.Module, build: Callable[[], nn.Module], decay: float,
                 zero3_config: Dict | None = None):
        self.decay = float(decay)
        self.num_updates = 0
        student_params = list(student.parameters())
        self.partitioned = any(_is_zero3(p) for p in student_params)
        teacher = build().float()
        teacher.requires_grad_(False)
        if self.partitioned:
            from compclip.engine import zero3_inference_engine

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
    def _student_values(self) -> List[torch.Tensor]:
        """Per parameter, the local student tensor the teacher's local storage mirrors."""
        values = []
        for teacher_param, student_param in self._pairs:
            if self.partitioned:
                from compclip.engine import local_fp32_master

                master = local_fp32_master(student_param)  # not the (possibly bf16) compute shard
                values.append((master if master is not None else student_param.ds_tensor).detach().reshape(-1))
            else:
                values.append(student_param.detach())
        return values

    def _teacher_storage(self) -> List[torch.Tensor]:
        if self.partitioned:
            return [t.ds_tensor.data.reshape(-1) for t, _ in self._pairs]
        return [t.data for t, _ in self._pairs]

    @torch.no_grad()
    def copy_from(self, student: nn.Module) -> None:
        for storage, value in zip(self._teacher_storage(), self._student_values()):
            storage.copy_(value.to(device=storage.device, dtype=storage.dtype).reshape(storage.shape))

    @torch.no_grad()
    def update(self) -> None:
        """θ* ← α θ* + (1 − α) θ on the local storage only (no collective)."""
        alpha = self.decay
        for storage, value in zip(self._teacher_storage(), self._student_values()):
            value = value.to(device=storage.device, dtype=torch.float32).reshape(storage.shape)
            storage.mul_(alpha).add_(value, alpha=1.0 - alpha)
        self.num_updates += 1

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return (self.engine if self.engine is not None else self.module)(*args, **kwargs)

    # ----------------------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        """This rank's teacher storage (full tensors, or this rank's ZeRO-3 shards)."""
        return {"decay": self.decay, "num_updates": self.num_updates, "partitioned": self.partitioned,
                "storage": [s.detach().cpu().clone() for s in self._teacher_storage()],
                "names": [n for n, _ in self.module.named_parameters()],
                "shapes": [tuple(getattr(p, "ds_shape", p.shape)) for p in self.module.parameters()]}

    @torch.no_grad()
    def load_state_dict(self, state: Dict) -> None:
        if state["partitioned"] != self.partitioned:
            raise ValueError("EMA teacher checkpoint was written with a different ZeRO layout; use init_from")
        for storage, saved in zip(self._teacher_storage(), state["storage"]):
            if storage.numel() != saved.numel():
                raise ValueError("EMA teacher checkpoint shard sizes differ (different world size?); use init_from")
            storage.copy_(saved.reshape(storage.shape))
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
        from compclip.engine import gathered

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
