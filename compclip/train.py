"""Fine-tune an open_clip model with CLIP, NegCLIP, CE-CLIP, DeGLA, C2LIP or any combination of their loss terms.

    deepspeed compclip/train.py [--config configs/<method>.yaml ...] [--section.field=value ...]
    python compclip/train.py ...            # one process, no launcher
    python compclip/train.py                # the embedded default: tiny model, synthetic world, a few minutes

Thin glue: configuration (compclip.config), model (compclip.models), objective (compclip.methods), data
(compclip.data), evaluation (compclip.evaluation). No loss math here and no branching on the method.
"""
from __future__ import annotations

import os
import sys

# Run as a script, sys.path[0] is compclip/ and its modules (config, models, ...) would shadow or be shadowed by
# top-level packages; the repository root goes there instead, so a fresh clone works even before installing.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.getcwd()) == _HERE:
    sys.path[0] = os.path.dirname(_HERE)

import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from compclip.config import (ConfigError, TrainConfig, apply_global_batch, deepspeed_config,  # noqa: E402
                             default_run_name, dump_yaml, load_config, to_dict)

logger = logging.getLogger("compclip")

# The embedded default run (`python compclip/train.py` with no arguments) and the base of every run: values a
# YAML or the command line overrides. Chosen so the default finishes in a few minutes on 2 CPU cores and
# visibly improves attribute/relation binding on the synthetic world.
EMBEDDED_DEFAULT: Dict[str, Any] = {
    "model": {"arch": "compclip-tiny", "pretrained": ""},
    "data": {"batch_size": 32, "num_negatives": 4,
             "synthetic": {"num_train": 2000, "num_val": 200, "seed": 0, "image_size": 64,
                           "root": ".cache/compclip/synthetic-{seed}-{num_train}-{num_val}-{image_size}"}},
    "loss": {"method": "negclip"},
    "optim": {"lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 20, "epochs": 3, "grad_clip": 1.0},
    "eval": {"progress": False, "precision": "fp32"},
}

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------------------------
# Process setup


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_process_environment() -> None:
    """`python compclip/train.py` without a launcher is a world of one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


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


def _init_distributed(cfg: TrainConfig):
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
    return rank, world, device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _broadcast_object(value, src: int = 0):
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=src)
    return holder[0]


def _setup_logging(run_dir: Path, rank: int) -> None:
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter(f"%(asctime)s | rank {rank} | %(levelname)s | %(message)s", "%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    stream.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.addHandler(stream)
    if rank == 0:
        handler = logging.FileHandler(run_dir / "out.log")
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    # Other packages' loggers (data, evaluation, kernels) into the same places.
    for name in ("compclip.data", "compclip.evaluation", "compclip.kernels"):
        other = logging.getLogger(name)
        other.handlers = list(logger.handlers)
        other.setLevel(logging.INFO)
        other.propagate = False


# --------------------------------------------------------------------------------------------------------------
# Pieces


def _resolve_paths(cfg: TrainConfig) -> Optional[dict]:
    """Format the synthetic world's folder; generate it (locked, so every rank may call); return its paths."""
    world = cfg.data.synthetic
    if "{" in world.root:
        world.root = world.root.format(seed=world.seed, num_train=world.num_train, num_val=world.num_val,
                                       image_size=world.image_size)
    if cfg.data.train_manifest:
        if not os.path.exists(cfg.data.train_manifest.split("::")[0]) and "{" not in cfg.data.train_manifest:
            raise FileNotFoundError(f"data.train_manifest: no such file {cfg.data.train_manifest}")
        return None
    from compclip.data.synthetic import generate_world

    return generate_world(world.root, world.num_train, world.num_val, world.seed, world.image_size)


def _configure_eval(cfg: TrainConfig, world_paths: Optional[dict]) -> None:
    if cfg.eval.enabled() or not cfg.eval_synthetic or world_paths is None:
        return
    cfg.eval.sugarcrepe = os.path.dirname(next(iter(world_paths["eval"].values())))
    cfg.eval.sugarcrepe_subsets = list(world_paths["eval"])
    cfg.eval.sugarcrepe_image_root = world_paths["eval_image_root"]
    cfg.eval.retrieval = world_paths["retrieval"]
    cfg.eval.retrieval_image_root = world_paths["root"]


def _lr_lambda(cfg: TrainConfig, total_steps: int):
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


def _to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Metrics:
    """metrics.jsonl + tensorboard, rank 0 only."""

    def __init__(self, run_dir: Path, rank: int, tensorboard: bool):
        self.rank = rank
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if rank == 0 and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception as exc:  # tensorboard missing: the jsonl still has everything
                logger.warning("tensorboard disabled: %s", exc)

    def write(self, step: int, values: Dict[str, Any]) -> None:
        if self.rank != 0:
            return
        record = {"step": step, **values}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=False) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _headline(results: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Binding accuracy per set and retrieval R@1: the rows of the final table."""
    out = {}
    for benchmark, metrics in results.items():
        keep = {k: v for k, v in metrics.items()
                if ("acc" in k.lower() and "/" not in k) or k.lower().replace("@", "").endswith(("r1", "r1_mean"))}
        out[benchmark] = keep or dict(metrics)
    return out


# --------------------------------------------------------------------------------------------------------------
# The trainer


@dataclass
class StepOutput:
    """What one micro-batch of training produced."""

    loss: torch.Tensor  # the weighted global loss (detach before keeping it)
    parts: Dict[str, torch.Tensor]  # unweighted value of every term
    features: Any  # compclip.losses.terms.Features of this micro-batch
    boundary: bool  # an optimizer step happened
    samples: int  # images in the global micro-batch


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world, self.device = _init_distributed(cfg)
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                                     self.world)))
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.dtype = COMPUTE_DTYPES[cfg.deepspeed.precision]

        # Run folder (named by rank 0 so every rank agrees).
        if cfg.resume and cfg.resume != "latest" and not cfg.log.name:
            # <logs>/<name>/checkpoints/deepspeed[/<tag>]: continue in the same run folder
            parts = Path(cfg.resume).resolve().parts
            if "checkpoints" not in parts:
                raise ConfigError(f"resume={cfg.resume}: not inside a run folder; give log.name")
            index = len(parts) - 1 - parts[::-1].index("checkpoints")
            cfg.log.name, cfg.log.logs = parts[index - 1], str(Path(*parts[:index - 1]))
        if cfg.resume == "latest" and not cfg.log.name:
            raise ConfigError("resume=latest needs log.name (the run folder to continue)")
        cfg.log.name = _broadcast_object(cfg.log.name or default_run_name(cfg))
        self.run_dir = Path(cfg.log.logs) / cfg.log.name
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.ds_dir = self.ckpt_dir / "deepspeed"
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        _setup_logging(self.run_dir, self.rank)
        logger.info("run folder %s (%d rank%s, device %s, %d threads)", self.run_dir, self.world,
                    "s" * (self.world > 1), self.device, torch.get_num_threads())

        apply_global_batch(cfg, self.world)
        self.ds_config, differences = deepspeed_config(cfg, self.world)
        for line in differences:
            logger.warning("deepspeed config: %s", line)

        # Data before model: a missing file or an empty manifest fails fast.
        world_paths = _resolve_paths(cfg)
        _configure_eval(cfg, world_paths)
        if self.rank == 0:
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
            (self.run_dir / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=1))

        from compclip.data import build_dataloader
        from compclip.methods import build_method
        from compclip.models import Encoder, build_model, visual_token_kind

        _seed_everything(cfg.seed)
        clip, preprocess_train, preprocess_val, tokenizer = build_model(
            cfg.model.arch, cfg.model.pretrained, cfg.model.force_quick_gelu)
        if cfg.model.grad_checkpointing:
            clip.set_grad_checkpointing(True)
        self.tokenizer, self.preprocess = tokenizer, preprocess_val
        self.method = build_method(cfg.loss, num_negatives=cfg.data.num_negatives,
                                   has_logit_bias=getattr(clip, "logit_bias", None) is not None)
        if self.method.needs_tokens:
            visual_token_kind(clip)  # unsupported towers fail here, not at step 1
        logger.info("method %s", self.method.describe())
        # Training images keep their geometry by default: the synthetic world's relations are spatial and a
        # random crop could cut an object out (use a YAML with a manifest to get open_clip's train transform).
        self.loader = build_dataloader(cfg.data, tokenizer, preprocess_val if world_paths else preprocess_train,
                                       rank=self.rank, world_size=self.world, seed=cfg.seed, epoch=0, train=True)

        if cfg.init_from:
            self._init_from(clip, cfg.init_from)

        self.before: Optional[Dict[str, Dict[str, float]]] = None
        if cfg.eval_before and cfg.eval.enabled() and not cfg.resume:
            self.before = self._evaluate_plain(clip, "before")

        self.micro_per_epoch = len(self.loader)
        self.steps_per_epoch = max(self.micro_per_epoch // cfg.optim.grad_accumulation, 1)
        total = cfg.optim.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.optim.max_steps) if cfg.optim.max_steps else total

        import deepspeed

        from compclip.models import parameter_groups

        encoder = Encoder(clip)
        optimizer = torch.optim.AdamW(parameter_groups(encoder, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                      betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, self.total_steps))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=encoder, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        self.clip = self.engine.module.clip

        self.teacher = None
        if self.method.needs_teacher:
            from compclip.ema import EMATeacher

            def build_teacher():
                # The architecture only, but with the student's activation: `pretrained` decides QuickGELU.
                return Encoder(build_model(cfg.model.arch, cfg.model.pretrained, cfg.model.force_quick_gelu,
                                           load_weights=False)[0])
            self.teacher = EMATeacher(self.engine.module, build_teacher, cfg.loss.ema_decay,
                                      zero3_config=self.ds_config)
            if getattr(self, "_init_teacher", None) is not None:
                self.teacher.load_full(self._init_teacher)

        self.metrics = Metrics(self.run_dir, self.rank, cfg.log.tensorboard)
        self.global_step = 0
        self.epoch = 0
        self.micro_in_epoch = 0
        self.nonfinite = 0
        self.last_export: Optional[str] = None
        self._resume_rng: Optional[Dict[str, Any]] = None
        self._resume_data: Optional[Dict[str, Any]] = None
        self.after: Optional[Dict[str, Dict[str, float]]] = None
        self.saved_at = self.exported_at = -1
        if cfg.resume:
            self._resume(cfg.resume)

    # ---- evaluation and export ----------------------------------------------------------------------------------
    def _evaluate_plain(self, clip, label: str) -> Optional[Dict[str, Dict[str, float]]]:
        """Evaluate an unwrapped open_clip model on rank 0 (others wait)."""
        results = None
        if self.rank == 0:
            from compclip.evaluation import evaluate

            clip = clip.to(self.device)
            t0 = time.time()
            results = evaluate(clip, self.preprocess, self.tokenizer, self.cfg.eval, self.device,
                               out_dir=str(self.run_dir / "eval" / label), label=label)
            logger.info("evaluation %s (%.1fs): %s", label, time.time() - t0, json.dumps(_headline(results)))
        torch.distributed.barrier()
        return results

    def _full_state(self) -> Dict[str, torch.Tensor]:
        from compclip.models import full_state_dict

        return full_state_dict(self.clip)  # collective under ZeRO-3

    def _epoch_end(self, label: str, export_epoch: int, run_eval: bool) -> None:
        """Export `epoch_N.pt` (full fp32 weights, gathered under ZeRO-3) and evaluate it when due."""
        from compclip.models import build_model, export_checkpoint

        self.exported_at = self.global_step
        if not self.cfg.log.export and not run_eval:
            return
        state = self._full_state()
        if self.rank == 0 and self.cfg.log.export:
            path = str(self.ckpt_dir / f"epoch_{export_epoch}.pt")
            export_checkpoint(state, path, export_epoch, self.cfg.model.arch, to_dict(self.cfg))
            self.last_export = path
            logger.info("exported open_clip checkpoint %s", path)
        if run_eval:
            model = None
            if self.rank == 0:
                model = build_model(self.cfg.model.arch, self.cfg.model.pretrained, self.cfg.model.force_quick_gelu,
                                    load_weights=False)[0]  # QuickGELU as in training
                model.load_state_dict(state)
            results = self._evaluate_plain(model, label)
            if results:
                self.metrics.write(self.global_step, {f"eval/{b}/{m}": v for b, r in results.items()
                                                      for m, v in r.items()})
                self.after = results

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def _save(self) -> None:
        if not self.cfg.log.save_deepspeed or self.saved_at == self.global_step:
            return
        self.saved_at = self.global_step
        tag = f"step{self.global_step}"
        client = {"compclip": {"epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch,
                               "global_step": self.global_step, "world_size": self.world,
                               "config": to_dict(self.cfg)}}
        self.engine.save_checkpoint(str(self.ds_dir), tag=tag, client_state=client)
        extras = {"rng": _rng_state(), "method": self.method.state_dict(), "nonfinite": self.nonfinite,
                  "teacher": self.teacher.state_dict() if self.teacher is not None else None,
                  "epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch, "global_step": self.global_step,
                  "data": self.loader.state_dict()}  # this rank's position in the epoch (skip count, streams)
        torch.save(extras, self.ds_dir / tag / f"compclip_rank{self.rank}.pt")
        torch.distributed.barrier()
        logger.info("saved DeepSpeed checkpoint %s", self.ds_dir / tag)

    def _checkpoint_path(self, spec: str) -> tuple:
        if spec == "latest":
            root = self.ds_dir
            latest = root / "latest"
            if not latest.exists():
                raise FileNotFoundError(f"resume=latest: no checkpoint in {root}")
            return root, latest.read_text().strip()
        path = Path(spec)
        if (path / "latest").exists():
            return path, (path / "latest").read_text().strip()
        if (path.parent / "latest").exists() or path.is_dir():
            return path.parent, path.name
        raise FileNotFoundError(f"resume: {spec} is not a DeepSpeed checkpoint folder or tag")

    def _resume(self, spec: str) -> None:
        root, tag = self._checkpoint_path(spec)
        extras_path = root / tag / f"compclip_rank{self.rank}.pt"
        if not extras_path.exists():
            raise FileNotFoundError(f"resume: {extras_path} missing (written by a different number of ranks? "
                                    "use init_from)")
        _, client = self.engine.load_checkpoint(str(root), tag=tag)
        state = client["compclip"]
        if state["world_size"] != self.world:
            raise ConfigError(f"resume: checkpoint has {state['world_size']} ranks, this run {self.world}; "
                              "use init_from to continue on a different number of ranks")
        extras = torch.load(extras_path, map_location="cpu", weights_only=False)
        self.method.load_state_dict(extras["method"])
        if self.teacher is not None:
            self.teacher.load_state_dict(extras["teacher"])
        self.nonfinite = extras["nonfinite"]
        self.epoch, self.micro_in_epoch, self.global_step = (
            state["epoch"], state["micro_in_epoch"], state["global_step"])
        self._resume_rng = extras["rng"]
        self._resume_data = extras.get("data")
        logger.info("resumed from %s at epoch %d, micro-batch %d, step %d", root / tag, self.epoch,
                    self.micro_in_epoch, self.global_step)

    def _init_from(self, clip, spec: str) -> None:
        """Weights of a DeepSpeed checkpoint written by any number of ranks (consolidated fp32)."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from compclip.ema import consolidate_shards

        root, tag = self._checkpoint_path(spec)
        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        shapes = {k: v.shape for k, v in clip.state_dict().items()}
        clip_state = {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")}
        # 0-dim parameters were trained as [1] (compclip.models.promote_zero_dim_parameters)
        clip_state = {k: v.reshape(shapes[k]) if k in shapes and v.numel() == shapes[k].numel() else v
                      for k, v in clip_state.items()}
        missing, unexpected = clip.load_state_dict(clip_state, strict=False)
        if [m for m in missing if m in dict(clip.named_parameters())] or unexpected:
            raise ValueError(f"init_from {spec}: missing {missing}, unexpected {unexpected}")
        files = sorted((root / tag).glob("compclip_rank*.pt"), key=lambda p: int(p.stem[len("compclip_rank"):]))
        teacher_states = [torch.load(f, map_location="cpu", weights_only=False)["teacher"] for f in files]
        self._init_teacher = None
        if teacher_states and teacher_states[0] is not None:
            self._init_teacher = consolidate_shards(teacher_states)
        logger.info("initialised weights from %s (consolidated fp32%s); optimizer, schedule and data order "
                    "start fresh", root / tag, " + EMA teacher" if self._init_teacher is not None else "")

    # ---- the loop ---------------------------------------------------------------------------------------------
    def _features(self, batch):
        from compclip.losses.terms import Features

        method = self.method
        out = self.engine(batch["images"].to(self.dtype), batch["text"],
                          batch["negatives"] if method.needs_negatives else None,
                          batch["concepts"] if method.needs_concepts else None,
                          method.needs_tokens)
        features = Features(image=out.image, text=out.text, logit_scale=out.logit_scale,
                            logit_bias=out.logit_bias, negatives=out.negatives,
                            valid=batch["valid"] if method.needs_negatives else None,
                            tokens=out.tokens, concepts=out.concepts,
                            owner=batch["owner"] if method.needs_concepts else None)
        if self.teacher is not None:
            teacher_out = self.teacher(batch["images"], batch["text"], batch["negatives"], None, False)  # fp32
            features.teacher_image = teacher_out.image.to(out.image.dtype)
            features.teacher_text = teacher_out.text.to(out.text.dtype)
            features.teacher_negatives = teacher_out.negatives.to(out.negatives.dtype)
        return features

    def train_step(self, batch: Dict[str, Any]) -> Optional["StepOutput"]:
        """One micro-batch: encode, global-batch loss, backward, DeepSpeed step and the method's hooks; at an
        accumulation boundary also the logit-scale clamp and the EMA teacher's update.

        Returns None when the loss is not finite: the step is skipped and logged, and `max_nonfinite` of them in a
        row stop the run. The loss is global, so every rank takes the same branch.
        """
        from compclip.models import clamp_logit_scale

        batch = _to_device(batch, self.device)
        features = self._features(batch)
        loss, parts = self.method.loss(features)
        if not torch.isfinite(loss.detach()).item():
            self.nonfinite += 1
            logger.warning("non-finite loss %s at epoch %d micro-batch %d: step skipped (%s)",
                           loss.item(), self.epoch, self.micro_in_epoch - 1,
                           {k: float(v.detach()) for k, v in parts.items()})
            self.metrics.write(self.global_step, {"nonfinite_loss": 1, "epoch": self.epoch})
            if self.nonfinite >= self.cfg.max_nonfinite:
                raise RuntimeError(
                    f"{self.nonfinite} non-finite losses in a row (max_nonfinite={self.cfg.max_nonfinite}); "
                    f"stopping at step {self.global_step}. Lower optim.lr, use bf16 instead of fp16, "
                    "or check the data.")
            return None
        self.nonfinite = 0
        # The terms return the global loss with exact global gradients w.r.t. the local features; DeepSpeed
        # averages gradients over ranks, so scale by the world size to get the sum back.
        self.engine.backward(loss * self.world)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        self.method.after_step(features)
        if boundary:
            clamp_logit_scale(self.clip, self.cfg.optim.logit_scale_max)
            if self.teacher is not None:
                self.teacher.update()
        return StepOutput(loss, parts, features, boundary, batch["images"].shape[0] * self.world)

    def train(self) -> Dict[str, Any]:
        from compclip.kernels.dispatch import resolved_backends

        cfg = self.cfg
        progress = None
        if self.rank == 0 and cfg.log.progress:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.global_step, desc="train", dynamic_ncols=True,
                            file=sys.stderr)
        self.engine.train()
        window_samples, window_start = 0, time.time()
        logged_backends = False
        finished = self.global_step >= self.total_steps
        start_epoch = self.epoch
        last: Dict[str, float] = {}
        while not finished and self.epoch < cfg.optim.epochs:
            resuming_mid_epoch = self.epoch == start_epoch and self.micro_in_epoch > 0
            if not resuming_mid_epoch:
                self.loader.sampler.set_epoch(self.epoch)
                self.method.on_epoch_start(self.epoch)
                self.micro_in_epoch = 0
            else:
                # The loader starts at the first batch not yet trained on: the batches before it are neither
                # loaded nor decoded, the rest come in the straight run's order with its negative draws, and
                # the count of skipped samples continues from the checkpoint.
                position = {"epoch": self.epoch, "batch": self.micro_in_epoch}
                data = self._resume_data
                if data is not None and int(data.get("epoch", -1)) == self.epoch \
                        and int(data.get("batch", -1)) == self.micro_in_epoch:
                    position = data
                else:
                    logger.warning("checkpoint without this rank's data position: the count of skipped samples "
                                   "restarts at 0 for the rest of epoch %d", self.epoch)
                self.loader.load_state_dict(position)
            self._resume_data = None
            skip = self.micro_in_epoch
            if skip == 0 and self._resume_rng is not None:
                # Saved at an epoch end: the straight run drew nothing since, not even the loader's seed.
                _set_rng_state(self._resume_rng)
                self._resume_rng = None
            batches = iter(self.loader)  # draws the DataLoader's base seed, as at the straight run's epoch start
            if self._resume_rng is not None:
                # Saved after the last finished step, i.e. after this batch's predecessors were loaded: restored
                # before it is loaded, so an augmentation drawing from the global generator (no workers) draws
                # as in the straight run.
                _set_rng_state(self._resume_rng)
                self._resume_rng = None
            for index, batch in enumerate(batches, start=skip):
                self.micro_in_epoch = index + 1
                step = self.train_step(batch)
                if not logged_backends:
                    logger.info("kernel backends at step 0: %s", json.dumps(resolved_backends(), sort_keys=True))
                    logged_backends = True
                if step is None:
                    continue
                loss, parts, features = step.loss, step.parts, step.features
                window_samples += step.samples
                if not step.boundary:
                    continue
                self.global_step += 1
                last = {"loss": float(loss.detach()),
                        **{f"loss/{k}": float(v.detach()) for k, v in parts.items()}}
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{last['loss']:.4f}", epoch=self.epoch)
                if self.global_step == 1 or self.global_step % cfg.log.every_n_steps == 0 \
                        or self.global_step == self.total_steps:
                    elapsed = max(time.time() - window_start, 1e-9)
                    values = dict(last)
                    values.update({
                        "epoch": self.epoch,
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "logit_scale": float(features.logit_scale.detach()),
                        "samples_per_s": window_samples / elapsed,
                        "peak_memory_mb": _peak_memory_mb(self.device),
                        "skipped_samples": getattr(self.loader, "skipped", 0),
                        **self.method.log_values(),
                    })
                    if features.logit_bias is not None:
                        values["logit_bias"] = float(features.logit_bias.detach())
                    self.metrics.write(self.global_step, values)
                    logger.info("step %d/%d epoch %d %s", self.global_step, self.total_steps, self.epoch,
                                " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in values.items()))
                    window_samples, window_start = 0, time.time()
                if cfg.log.save_every_n_steps and self.global_step % cfg.log.save_every_n_steps == 0:
                    self._save()
                if self.global_step >= self.total_steps:
                    finished = True
                    break
            if self.micro_in_epoch >= self.micro_per_epoch:
                self.epoch += 1
                self.micro_in_epoch = 0
                self._epoch_end(f"epoch_{self.epoch}", self.epoch, cfg.eval.due(self.epoch))
                self._save()
        if progress is not None:
            progress.close()
        if self.exported_at != self.global_step:
            # Stopped mid-epoch (max_steps): export and evaluate what there is, as the epoch in progress.
            self._epoch_end(f"step_{self.global_step}", self.epoch + 1, cfg.eval.enabled())
        if self.saved_at != self.global_step:
            self._save()
        self.metrics.close()
        return {"before": self.before, "after": self.after, "export": self.last_export,
                "last": last, "steps": self.global_step}


def summary_table(before: Optional[Dict], after: Optional[Dict]) -> str:
    from compclip.evaluation.report import format_table

    runs = {}
    if before:
        runs["before"] = _headline(before)
    if after:
        runs["after"] = _headline(after)
    return format_table(runs) if runs else ""


def build_trainer(argv: List[str]) -> Trainer:
    """A Trainer from command-line arguments (over the embedded default), in a world of one without a launcher.

    Raises ConfigError for a bad configuration."""
    cfg = load_config(argv, base=EMBEDDED_DEFAULT)
    _single_process_environment()
    return Trainer(cfg)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        from compclip.config import help_text

        print(__doc__.strip() + "\n\n" + help_text(load_config([], base=EMBEDDED_DEFAULT)))
        raise SystemExit(0)
    t0 = time.time()
    # A caller that set up the process group (a test, a notebook) keeps it: DeepSpeed caches groups derived from
    # it, so tearing it down would break the caller's next run.
    owns_process_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        trainer = build_trainer(argv)
        cfg = trainer.cfg
    except ConfigError as exc:  # in the YAML / command line, or found once ranks and files are known
        print(f"compclip/train.py: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    result = trainer.train()
    if trainer.rank == 0:
        table = summary_table(result["before"], result["after"])
        lines = [f"\ncompclip: {trainer.method.describe()} — {result['steps']} steps in {time.time() - t0:.0f}s "
                 f"({trainer.world} rank{'s' * (trainer.world > 1)}, {trainer.device})"]
        if table:
            lines += ["binding accuracy and retrieval R@1 (%), before -> after:", table]
        if result["export"]:
            lines.append(f"exported checkpoint: {result['export']}")
            from compclip.models import MODEL_CONFIG_DIR

            if (MODEL_CONFIG_DIR / f"{cfg.model.arch}.json").exists():
                lines.append(f"  load it: open_clip.add_model_config({str(MODEL_CONFIG_DIR)!r}); "
                             f"open_clip.create_model_and_transforms({cfg.model.arch!r}, "
                             f"pretrained={result['export']!r})")
            else:
                lines.append(f"  load it: open_clip.create_model_and_transforms({cfg.model.arch!r}, "
                             f"pretrained={result['export']!r})")
        try:
            from compclip.plots import plot_runs

            lines.append(f"curves: {plot_runs([str(trainer.run_dir)], str(trainer.run_dir / 'curves.png'))}")
        except Exception as exc:  # the run itself is done and saved: a plotting failure must not turn it red
            logger.warning("could not plot %s/metrics.jsonl: %s", trainer.run_dir, exc)
        lines.append(f"run folder: {trainer.run_dir}")
        text = "\n".join(lines)
        print(text, flush=True)
        with open(trainer.run_dir / "out.log", "a", encoding="utf-8") as fh:
            fh.write(text + "\n")
    torch.distributed.barrier()
    if owns_process_group:
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
