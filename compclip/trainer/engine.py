"""Everything that runs DeepSpeed: the process group and the device (threads, `model.tf32`), `deepspeed.initialize`,
and the places where compclip reaches into a DeepSpeed engine's parameter copies (the logit-scale clamp, the full
fp32 gather for the export, frozen parameters included, the EMA teacher's ZeRO-3 engine and shards), plus
DeepSpeed's own memory estimators for the run plan.

Only this module and `compclip.trainer.checkpoint` import deepspeed, so a DeepSpeed upgrade that moves an internal
(`safe_get_local_fp32_param`, `_hp_mapping`, `ds_tensor`) is fixed here and nowhere else. The DeepSpeed config
itself is generated, with its batch arithmetic, by `compclip.resolve` (no DeepSpeed import is needed for that).

Gradient scale: the global-batch losses give every rank the exact gradient of the global loss w.r.t. its local
features (compclip.distributed); DeepSpeed averages gradients over ranks, so the trainer back-propagates
`loss x world_size` to get their sum back.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from compclip.distributed import cpu_threads, free_port

logger = logging.getLogger("compclip")

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------------------------
# Process group


def single_process_environment() -> None:
    """`python compclip/train.py` without a launcher is a world of one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_process_group() -> None:
    """The default process group through DeepSpeed, with its accelerator's backend (gloo on a CPU)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU inference on first use (~40 s, once per
        # machine); training communicates through torch.distributed/gloo and never calls it.
        try:
            import deepspeed.ops

            builder = accelerator.create_op_builder("ShareMemCommBuilder")
            if builder is not None:
                deepspeed.ops.__compatible_ops__[builder.NAME] = False
        except Exception:  # pragma: no cover - depends on the DeepSpeed build
            pass
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())


def init_distributed(cfg) -> Tuple[int, int, torch.device]:
    """(rank, world size, device) after setting up the process group and, on CPU, the thread count."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    init_process_group()
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "cpu" or (cfg.device == "auto" and accelerator.device_name() == "cpu"):
        device = torch.device("cpu")
    else:
        device = torch.device(accelerator.device_name(local_rank))
        accelerator.set_device(local_rank)
    if device.type == "cpu":
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(cfg.threads or cpu_threads(local_world_size))
    return rank, world_size, device


def configure_tf32(enabled: bool, device: torch.device) -> str:
    """`model.tf32` on a CUDA device: TF32 for float32 matmuls (PyTorch's, and the fused kernels' float32 dots,
    which read the same flag: kernels/_common.py dot_config) and for cuDNN convolutions; returns what it did, for
    the log. Nothing is changed on a CPU."""
    if device.type != "cuda":
        return f"model.tf32: no effect on {device.type}"
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    state = "on" if enabled else "off (IEEE float32)"
    if not torch.cuda.is_available():
        return f"model.tf32: TF32 matmuls and cuDNN convolutions {state}"
    major, minor = torch.cuda.get_device_capability(device)
    name = f"{torch.cuda.get_device_name(device)}, sm_{major}{minor}"
    if enabled and major < 8:
        return f"model.tf32: on, but the GPU ({name}) has no TF32 tensor cores: float32 stays IEEE"
    return f"model.tf32: TF32 matmuls and cuDNN convolutions {state} ({name})"


# --------------------------------------------------------------------------------------------------------------
# The engine


def build_engine(encoder: nn.Module, optimizer, scheduler, ds_config: Dict[str, Any]):
    """(engine, optimizer, scheduler) from deepspeed.initialize over our optimizer and schedule
    (compclip.trainer.optim; the process group already exists)."""
    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(model=encoder, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=ds_config,
                                                           dist_init_required=False)
    return engine, optimizer, scheduler


def deepspeed_model_states(params: int, largest_layer: int, world_size: int, stage: int, offload_optimizer: bool,
                           offload_param: bool) -> int:
    """DeepSpeed's estimate of the per-GPU bytes of 16-bit parameters, gradients and the fp32 optimizer states
    (master, momentum, variance) under ZeRO `stage` (1-2: its ZeRO-2 estimator, which partitions what ZeRO-1 does
    and the gradients; 3: its ZeRO-3 estimator)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    per_node = min(world_size, 8)
    nodes = max(1, world_size // per_node)
    if stage == 3:
        return estimate_zero3_model_states_mem_needs(params, largest_layer, per_node, nodes, offload_optimizer,
                                                     offload_param, zero_init=True)[1]
    return estimate_zero2_model_states_mem_needs(params, per_node, nodes, offload_optimizer)[1]


def zero3_inference_engine(module: nn.Module, train_config: Dict[str, Any]):
    """A ZeRO-3 engine without optimizer (ZeRO-Inference) for a frozen module next to a ZeRO-3 student."""
    import deepspeed

    config = {k: v for k, v in train_config.items()
              if k in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps")}
    # Nothing may stay gathered between forwards: ZeRO-3 keeps small ("persistent") parameters materialised
    # after its first traced step and never re-reads their shard, so shard-local updates would not reach the
    # forward.
    config["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0,
                                   "stage3_model_persistence_threshold": 0}
    engine, *_ = deepspeed.initialize(model=module, config=config)
    return engine


# --------------------------------------------------------------------------------------------------------------
# DeepSpeed's parameter copies


def local_fp32_master(param: nn.Parameter) -> Optional[torch.Tensor]:
    """This rank's fp32 master shard of a ZeRO-3 parameter the optimizer owns, else None."""
    if getattr(param, "_z3_optimizer", None) is None:
        return None
    from deepspeed.utils import safe_get_local_fp32_param

    return safe_get_local_fp32_param(param)


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter]):
    """ZeRO-3 parameters materialised in full inside the block (a collective: every rank enters)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params)):
        yield


def _full_fp32(param: nn.Parameter) -> torch.Tensor:
    """The full fp32 value of a (possibly ZeRO-partitioned) parameter; a collective under ZeRO-3.

    A parameter the optimizer does not own (frozen: a locked tower) has no fp32 master; its value is the compute
    copy, which under ZeRO-3 must be gathered from its shards (DeepSpeed returns None for its master)."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(param)
    if value is None and hasattr(param, "ds_id"):
        with gathered([param]):
            value = param.data.detach().clone()
    elif value is None:
        value = param.data
    return value.detach().float().reshape(getattr(param, "ds_shape", param.shape))


@torch.no_grad()
def clamp_logit_scale(clip: nn.Module, max_scale: float) -> None:
    """exp(logit_scale) <= max_scale, in every copy of the parameter DeepSpeed keeps: the fp32 master the optimizer
    updates (else the next step would start from the unclamped value) and the compute copy the next forward reads.
    Like open_clip, the log-scale is also kept >= 0. Each rank clamps what it holds, so there is no collective
    (and none of DeepSpeed's full-parameter setters, which fail for a parameter smaller than the world size)."""
    param = clip.logit_scale
    upper = math.log(max_scale)
    if hasattr(param, "ds_tensor"):  # ZeRO-3: this rank's shard
        master = local_fp32_master(param)
        if master is not None:
            from deepspeed.utils import safe_set_local_fp32_param

            safe_set_local_fp32_param(param, master.clamp(0, upper))
        param.ds_tensor.data.clamp_(0, upper)
        return
    mapping = getattr(param, "_hp_mapping", None)  # ZeRO 1/2 and DeepSpeed's bf16 optimizer: this rank's fragment
    if mapping is not None:
        mapping.get_hp_fragment().data.clamp_(0, upper)
    param.data.clamp_(0, upper)


def full_state_dict(clip: nn.Module, engine=None) -> Dict[str, torch.Tensor]:
    """open_clip state dict with full fp32 parameters (gathered under ZeRO-3: call on every rank), 0-dim
    parameters back in their stock shape (compclip.models.promote_zero_dim_parameters). `engine`: the DeepSpeed
    engine of `clip`, where stage 0 with bf16 keeps its fp32 masters (nothing on the parameters points to them)."""
    params = dict(clip.named_parameters())
    masters = _stage0_masters(getattr(engine, "optimizer", None))
    zero_dim = set(getattr(clip, "_compclip_zero_dim", ()))
    out = {}
    for key, value in clip.state_dict().items():
        if key in params and id(params[key]) in masters:
            out[key] = masters[id(params[key])].detach().float().cpu().clone().reshape(params[key].shape)
        else:
            out[key] = _full_fp32(params[key]).cpu().clone() if key in params else value.detach().cpu().clone()
        if key in zero_dim:
            out[key] = out[key].reshape(())
    return out


def _stage0_masters(optimizer) -> Dict[int, torch.Tensor]:
    """{id(compute parameter): its fp32 master} of DeepSpeed's stage-0 FP16_(Unfused)Optimizer (bf16 or fp16
    without ZeRO: `fp16_groups` -> `fp32_groups`); {} for any other optimizer."""
    masters = {}
    lp_groups, hp_groups = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if lp_groups is not None and hp_groups is not None and not hasattr(optimizer, "bit16_groups"):
        for lp_group, hp_group in zip(lp_groups, hp_groups):
            if isinstance(hp_group, (list, tuple)) and len(hp_group) == len(lp_group):
                masters.update({id(lp): hp for lp, hp in zip(lp_group, hp_group)})
    return masters


@dataclass
class MasterSource:
    """Where one parameter's fp32 master lives on this rank.

    kind `full`: `tensor` is the whole fp32 master (shape of the parameter); `fragment`: `tensor` is the slice of
    the flattened parameter at `[start, start + numel)` this rank's ZeRO 1/2 partition owns (None when it owns
    none), `group` the data-parallel group whose ranks own the rest; `zero3`: `tensor` is this rank's fp32 shard."""

    kind: str
    tensor: Optional[torch.Tensor]
    start: int = 0
    group: object = None


def fp32_master_sources(engine) -> List[MasterSource]:
    """Per parameter of `engine.module` (or of a module, when given one), the fp32 master weights DeepSpeed's
    optimizer steps on this rank (DeepSpeed 0.19.7):

    * ZeRO-3: `safe_get_local_fp32_param` (the optimizer's fp32 shard), else the parameter's own shard;
    * ZeRO 1/2 and BF16_Optimizer: the `_hp_mapping` both optimizers link to every bit16 parameter
      (`link_hp_params` over `single_partition_of_fp32_groups` / `fp32_groups_flat_partition`);
    * stage 0 with bf16 or fp16: the FP16_(Unfused)Optimizer's per-parameter fp32 copies (`fp16_groups` ->
      `fp32_groups`; only these need the engine: nothing on the parameter points to them);
    * otherwise (fp32 training, frozen parameters): the parameter itself."""
    module = getattr(engine, "module", engine)
    stage0_masters = _stage0_masters(getattr(engine, "optimizer", None))
    sources = []
    for param in module.parameters():
        if hasattr(param, "ds_id") and hasattr(param, "ds_tensor"):  # ZeRO-3 partitioned
            from deepspeed.utils import safe_get_local_fp32_param

            master = None
            if getattr(param, "_z3_optimizer", None) is not None:
                master = safe_get_local_fp32_param(param)
            sources.append(MasterSource("zero3", (master if master is not None else param.ds_tensor).reshape(-1)))
        elif hasattr(param, "_hp_mapping"):
            mapping = param._hp_mapping
            if mapping is None:
                sources.append(MasterSource("fragment", None, 0, param._dp_group))
            else:
                sources.append(MasterSource("fragment", mapping.get_hp_fragment().reshape(-1),
                                            mapping.lp_fragment_address.start, param._dp_group))
        elif id(param) in stage0_masters:
            sources.append(MasterSource("full", stage0_masters[id(param)]))
        else:
            sources.append(MasterSource("full", param))
    return sources
