"""Everything that knows DeepSpeed: the process group, the generated DeepSpeed config and its batch arithmetic,
the optimizer and schedule handed to `deepspeed.initialize`, and the places where compclip reaches into a
DeepSpeed engine's parameter copies (the logit-scale clamp, the full fp32 gather for the export, the EMA
teacher's ZeRO-3 engine and shards).

Only this module and `compclip.checkpoint` import deepspeed, so a DeepSpeed upgrade that moves an internal
(`safe_get_local_fp32_param`, `_hp_mapping`, `ds_tensor`) is fixed here and nowhere else.

Batch arithmetic: `train_batch_size = data.batch_size x optim.grad_accumulation x world_size` (DeepSpeed checks
the product); `global_batch_size`, when given, fixes the left side and `data.batch_size` is derived from it. With
`optim.contrastive_batch` the accumulation is the chunks of one cached step (compclip.gradcache):
`train_batch_size = optim.contrastive_batch`, `data.batch_size` the chunk.

Gradient scale: the global-batch losses give every rank the exact gradient of the global loss w.r.t. its local
features (compclip.distributed); DeepSpeed averages gradients over ranks, so the trainer back-propagates
`loss x world_size` to get their sum back.
"""
from __future__ import annotations

from dataclasses import dataclass

import contextlib
import json
import logging
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from compclip.config import ConfigError, TrainConfig, _merge
from compclip.distributed import free_port

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


def init_distributed(cfg: TrainConfig) -> Tuple[int, int, torch.device]:
    """(rank, world size, device) after setting up the process group and, on CPU, the thread count."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    init_process_group()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "cpu" or (cfg.device == "auto" and accelerator.device_name() == "cpu"):
        device = torch.device("cpu")
    else:
        device = torch.device(accelerator.device_name(local_rank))
        accelerator.set_device(local_rank)
    if device.type == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // local_world))
    return rank, world, device


# --------------------------------------------------------------------------------------------------------------
# The DeepSpeed config


def run_config(cfg: TrainConfig, world_size: int) -> Dict[str, Any]:
    """`apply_global_batch`, then `deepspeed_config` with a warning per value an explicit file changed."""
    apply_global_batch(cfg, world_size)
    config, differences = deepspeed_config(cfg, world_size)
    for line in differences:
        logger.warning("deepspeed config: %s", line)
    return config


def apply_global_batch(cfg: TrainConfig, world_size: int) -> None:
    """Resolve `global_batch_size` into the per-rank micro-batch `data.batch_size` (with `optim.contrastive_batch`
    that is the chunk, given as such: a global batch must then equal the contrastive batch)."""
    if cfg.optim.contrastive_batch > 0:
        if cfg.global_batch_size > 0 and cfg.global_batch_size != cfg.optim.contrastive_batch:
            raise ConfigError(f"global_batch_size {cfg.global_batch_size} != optim.contrastive_batch "
                              f"{cfg.optim.contrastive_batch}: with a contrastive batch, data.batch_size is the "
                              "per-rank chunk; leave global_batch_size at 0 or equal to it")
        accumulation_steps(cfg, world_size)  # checks the divisibility
        return
    if cfg.global_batch_size <= 0:
        return
    per_step = world_size * cfg.optim.grad_accumulation
    if cfg.global_batch_size % per_step:
        raise ConfigError(f"global_batch_size {cfg.global_batch_size} is not divisible by world size {world_size} "
                          f"x optim.grad_accumulation {cfg.optim.grad_accumulation}")
    cfg.data.batch_size = cfg.global_batch_size // per_step


def accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches DeepSpeed accumulates per optimizer step: `optim.grad_accumulation`, or with
    `optim.contrastive_batch` the chunks of one cached step (compclip.gradcache): contrastive / (chunk x world)."""
    contrastive = cfg.optim.contrastive_batch
    if contrastive <= 0:
        return cfg.optim.grad_accumulation
    per_chunk = cfg.data.batch_size * world_size
    if contrastive % per_chunk:
        raise ConfigError(f"optim.contrastive_batch {contrastive} is not a multiple of data.batch_size "
                          f"{cfg.data.batch_size} x world size {world_size} = {per_chunk}")
    return contrastive // per_chunk


def deepspeed_config(cfg: TrainConfig, world_size: int) -> Tuple[Dict[str, Any], List[str]]:
    """The DeepSpeed config for `cfg`, and the list of differences an explicit config file made.

    The optimizer and the schedule are built by the trainer (torch AdamW with open_clip's parameter groups and a
    LambdaLR) and handed to deepspeed.initialize, so no `optimizer`/`scheduler` section is generated; a file that
    has one is reported and that section is honoured by DeepSpeed instead of ours.
    """
    ds = _generated_config(cfg, world_size)
    if not cfg.deepspeed.config_file:
        return ds, []
    return _with_file(cfg, ds, world_size)


def _generated_config(cfg: TrainConfig, world_size: int) -> Dict[str, Any]:
    """The config compclip generates from `cfg` alone."""
    micro = cfg.data.batch_size
    accumulation = accumulation_steps(cfg, world_size)
    ds: Dict[str, Any] = {
        "train_batch_size": micro * accumulation * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.optim.grad_clip,
        "steps_per_print": 10 ** 9,  # our own logs carry the numbers
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        # A torch AdamW works with offload only when DeepSpeed is told not to insist on its CPUAdam.
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
    }
    if cfg.deepspeed.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.deepspeed.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                      "min_loss_scale": 1}
    zero = ds["zero_optimization"]
    if cfg.deepspeed.zero_stage >= 1:
        zero.update({"overlap_comm": False, "contiguous_gradients": True})
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if cfg.deepspeed.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if cfg.deepspeed.zero_stage == 3:
        # Full fp32 weights are gathered by compclip for the export; DeepSpeed's 16-bit gather is not needed.
        zero["stage3_gather_16bit_weights_on_model_save"] = False

    return ds


def _with_file(cfg: TrainConfig, ds: Dict[str, Any], world_size: int) -> Tuple[Dict[str, Any], List[str]]:
    """`ds` overlaid with `deepspeed.config_file`, checked against the data loader's batch arithmetic."""
    micro, accumulation = cfg.data.batch_size, accumulation_steps(cfg, world_size)
    try:
        with open(cfg.deepspeed.config_file, encoding="utf-8") as fh:
            explicit = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config_file {cfg.deepspeed.config_file}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config_file {cfg.deepspeed.config_file}: not valid JSON: {exc}") from None
    differences = _differences(ds, explicit)
    ds = _merge(ds, explicit)
    # "auto" values are DeepSpeed/HF conventions for "fill in from the trainer": ours fill them.
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if ds.get(key) == "auto":
            ds[key] = {"train_batch_size": micro * accumulation * world_size,
                       "train_micro_batch_size_per_gpu": micro,
                       "gradient_accumulation_steps": accumulation}[key]
    batch = ds["train_batch_size"]
    product = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    if batch != product:
        raise ConfigError(
            f"deepspeed config {cfg.deepspeed.config_file}: train_batch_size {batch} != micro batch "
            f"{ds['train_micro_batch_size_per_gpu']} x accumulation {ds['gradient_accumulation_steps']} x "
            f"world size {world_size} = {product}")
    if ds["train_micro_batch_size_per_gpu"] != micro or ds["gradient_accumulation_steps"] != accumulation:
        raise ConfigError(
            f"deepspeed config {cfg.deepspeed.config_file} sets micro batch "
            f"{ds['train_micro_batch_size_per_gpu']} / accumulation {ds['gradient_accumulation_steps']}, but "
            f"the data loader uses data.batch_size={micro} / optim.grad_accumulation={accumulation}: set those "
            "instead")
    return ds, differences


def _differences(ours: Dict[str, Any], theirs: Dict[str, Any], prefix: str = "") -> List[str]:
    out = []
    for key, value in theirs.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(ours.get(key), dict):
            out.extend(_differences(ours[key], value, dotted + "."))
        elif key not in ours:
            out.append(f"{dotted}: set to {value!r} by the file (not generated by compclip)")
        elif ours[key] != value:
            out.append(f"{dotted}: file {value!r} overrides generated {ours[key]!r}")
    return out




# --------------------------------------------------------------------------------------------------------------
# Optimizer, schedule, engine


def lr_lambda(cfg: TrainConfig, total_steps: int):
    warmup = max(cfg.optim.warmup_steps, 0)

    def factor(step: int) -> float:
        # open_clip's cosine_lr: linear warm-up to the peak, then half a cosine down to 0.
        if step < warmup:
            return (step + 1) / warmup
        if cfg.optim.schedule == "constant":
            return 1.0
        decay_steps = max(total_steps - warmup, 1)
        progress = min(step - warmup, decay_steps) / decay_steps
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def total_steps(cfg: TrainConfig, micro_per_epoch: int) -> int:
    """Optimizer steps of the run: epochs × micro-batches per epoch / accumulation, capped by optim.max_steps."""
    total = cfg.optim.epochs * max(micro_per_epoch // cfg.optim.grad_accumulation, 1)
    return min(total, cfg.optim.max_steps) if cfg.optim.max_steps else total


def build_engine(encoder: nn.Module, cfg: TrainConfig, ds_config: Dict[str, Any], total_steps: int):
    """(engine, optimizer, scheduler): torch AdamW over open_clip's parameter groups, the warm-up + cosine
    LambdaLR, both handed to deepspeed.initialize (the process group already exists)."""
    import deepspeed

    from compclip.models import parameter_groups

    optimizer = torch.optim.AdamW(parameter_groups(encoder, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=encoder, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=ds_config,
                                                           dist_init_required=False)
    return engine, optimizer, scheduler


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
    """The full fp32 value of a (possibly ZeRO-partitioned) parameter; a collective under ZeRO-3."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(param)
    if value is None:
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


def full_state_dict(clip: nn.Module) -> Dict[str, torch.Tensor]:
    """open_clip state dict with full fp32 parameters (gathered under ZeRO-3: call on every rank), 0-dim
    parameters back in their stock shape (compclip.models.promote_zero_dim_parameters)."""
    params = dict(clip.named_parameters())
    zero_dim = set(getattr(clip, "_compclip_zero_dim", ()))
    out = {}
    for key, value in clip.state_dict().items():
        out[key] = _full_fp32(params[key]).cpu().clone() if key in params else value.detach().cpu().clone()
        if key in zero_dim:
            out[key] = out[key].reshape(())
    return out


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
    optimizer = getattr(engine, "optimizer", None)
    stage0_masters = {}
    lp_groups, hp_groups = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if lp_groups is not None and hp_groups is not None and not hasattr(optimizer, "bit16_groups"):
        for lp_group, hp_group in zip(lp_groups, hp_groups):
            if isinstance(hp_group, (list, tuple)) and len(hp_group) == len(lp_group):
                stage0_masters.update({id(lp): hp for lp, hp in zip(lp_group, hp_group)})
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
