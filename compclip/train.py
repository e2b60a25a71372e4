"""Fine-tune an open_clip model with CLIP, NegCLIP, CE-CLIP, DeGLA, C2LIP or any combination of their loss terms.

    deepspeed compclip/train.py [--config configs/<method>.yaml ...] [--section.field=value ...]
    python compclip/train.py ...            # one process, no launcher
    python compclip/train.py                # the embedded default: tiny model, synthetic world, a few minutes

The entry point and the loop. Configuration: compclip.config; model: compclip.models; objective and which
features to compute: compclip.methods; DeepSpeed (process group, config, engine, clamp, gathers):
compclip.engine; checkpoints, resume, RNG state, run folder: compclip.checkpoint; logs, metrics.jsonl, the summary
table: compclip.metrics; data: compclip.data; evaluation: compclip.evaluation. No loss math here, no feature list
and no branching on the method.
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
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

import torch  # noqa: E402

from compclip import engine as ds  # noqa: E402
from compclip.checkpoint import (Checkpointer, ResumePoint, epoch_batches, resolve_run_dir,  # noqa: E402
                                 seed_everything)
from compclip.config import ConfigError, TrainConfig, dump_yaml, load_config, resolve_data, to_dict  # noqa: E402
from compclip.metrics import (Metrics, Progress, evaluate_model, final_report, peak_memory_mb,  # noqa: E402
                              setup_logging)

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
        self.rank, self.world, self.device = ds.init_distributed(cfg)
        self.dtype = ds.COMPUTE_DTYPES[cfg.deepspeed.precision]
        self.run_dir = resolve_run_dir(cfg)
        self.checkpoints = Checkpointer(self.run_dir, self.rank, self.world)
        setup_logging(self.run_dir, self.rank)
        logger.info("run folder %s (%d rank%s, device %s, %d threads)", self.run_dir, self.world,
                    "s" * (self.world > 1), self.device, torch.get_num_threads())
        self.ds_config = ds.run_config(cfg, self.world)  # resolves global_batch_size into data.batch_size
        world_paths = resolve_data(cfg)  # data before model: a missing file or an empty manifest fails fast
        if self.rank == 0:
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
            (self.run_dir / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=1))
        self._build(world_paths)
        self.metrics = Metrics(self.run_dir, self.rank, cfg.log.tensorboard)
        self.global_step = self.epoch = self.micro_in_epoch = self.nonfinite = 0
        self.last_export: Optional[str] = None
        self.after: Optional[Dict[str, Dict[str, float]]] = None
        self.saved_at = self.exported_at = -1
        self.resume_point: Optional[ResumePoint] = None
        if cfg.resume:
            self.resume_point, extras = self.checkpoints.resume(self.engine, cfg.resume)
            self.method.load_state_dict(extras["method"])
            if self.teacher is not None:
                self.teacher.load_state_dict(extras["teacher"])
            point, self.nonfinite = self.resume_point, extras["nonfinite"]
            self.epoch, self.micro_in_epoch, self.global_step = point.epoch, point.micro_in_epoch, point.global_step

    def _build(self, world_paths: Optional[dict]) -> None:
        """Model, method, data, the `before` evaluation, the DeepSpeed engine and the EMA teacher."""
        from compclip.data import build_dataloader
        from compclip.methods import build_method
        from compclip.models import Encoder, build_from_config, visual_token_kind

        cfg = self.cfg
        seed_everything(cfg.seed)
        clip, preprocess_train, self.preprocess, self.tokenizer = build_from_config(cfg.model)
        self.method = build_method(cfg.loss, num_negatives=cfg.data.num_negatives,
                                   has_logit_bias=getattr(clip, "logit_bias", None) is not None)
        if self.method.needs_tokens:
            visual_token_kind(clip)  # unsupported towers fail here, not at step 1
        logger.info("method %s", self.method.describe())
        # Training images keep their geometry by default: the synthetic world's relations are spatial and a
        # random crop could cut an object out (use a YAML with a manifest to get open_clip's train transform).
        self.loader = build_dataloader(cfg.data, self.tokenizer, self.preprocess if world_paths else preprocess_train,
                                       rank=self.rank, world_size=self.world, seed=cfg.seed, epoch=0, train=True)
        init_teacher = self.checkpoints.init_from(clip, cfg.init_from) if cfg.init_from else None
        self.before = None
        if cfg.eval_before and cfg.eval.enabled() and not cfg.resume:
            self.before = self._evaluate_plain(clip, "before")
        self.micro_per_epoch = len(self.loader)
        total = cfg.optim.epochs * max(self.micro_per_epoch // cfg.optim.grad_accumulation, 1)
        self.total_steps = min(total, cfg.optim.max_steps) if cfg.optim.max_steps else total
        self.engine, self.optimizer, self.scheduler = ds.build_engine(Encoder(clip), cfg, self.ds_config,
                                                                      self.total_steps)
        self.clip = self.engine.module.clip
        self.teacher = None
        if self.method.needs_teacher:
            from compclip.ema import EMATeacher

            self.teacher = EMATeacher(self.engine, lambda: Encoder(build_from_config(cfg.model,
                                      load_weights=False)[0]), cfg.loss.ema_decay, zero3_config=self.ds_config)
            if init_teacher is not None:
                self.teacher.load_full(init_teacher)

    # ---- evaluation, export, checkpoints ------------------------------------------------------------------------
    def _evaluate_plain(self, clip, label: str) -> Optional[Dict[str, Dict[str, float]]]:
        return evaluate_model(clip, self.preprocess, self.tokenizer, self.cfg.eval, self.device,
                              self.run_dir / "eval" / label, label, self.rank)

    def _epoch_end(self, label: str, export_epoch: int, run_eval: bool) -> None:
        """Export `epoch_N.pt` (full fp32 weights, gathered under ZeRO-3) and evaluate it when due."""
        from compclip.models import build_from_config

        self.exported_at, cfg = self.global_step, self.cfg
        if not cfg.log.export and not run_eval:
            return
        state = ds.full_state_dict(self.clip)  # collective under ZeRO-3
        if cfg.log.export:
            path = self.checkpoints.export(state, export_epoch, cfg.model.arch, to_dict(cfg))
            self.last_export = path if self.rank == 0 else self.last_export
        if run_eval:
            model = build_from_config(cfg.model, load_weights=False, state=state)[0] if self.rank == 0 else None
            results = self._evaluate_plain(model, label)
            if results:
                self.metrics.write(self.global_step, {f"eval/{b}/{m}": v for b, r in results.items()
                                                      for m, v in r.items()})
                self.after = results

    def _save(self) -> None:
        if not self.cfg.log.save_deepspeed or self.saved_at == self.global_step:
            return
        self.saved_at = self.global_step
        counters = {"epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch, "global_step": self.global_step}
        extras = {"method": self.method.state_dict(), "nonfinite": self.nonfinite,
                  "teacher": self.teacher.state_dict() if self.teacher is not None else None,
                  "data": self.loader.state_dict()}  # this rank's position in the epoch (skip count, streams)
        self.checkpoints.save(self.engine, self.global_step, counters, to_dict(self.cfg), extras)

    # ---- the loop ---------------------------------------------------------------------------------------------
    def train_step(self, batch: Dict[str, Any]) -> Optional[StepOutput]:
        """One micro-batch: the method's features, global-batch loss, backward, DeepSpeed step and the method's
        hooks; at an accumulation boundary also the logit-scale clamp and the EMA teacher's update.

        Returns None when the loss is not finite: the step is skipped and logged, and `max_nonfinite` of them in a
        row stop the run. The loss is global, so every rank takes the same branch.
        """
        batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        features = self.method.features(self.engine, self.teacher, batch, self.dtype)
        loss, parts = self.method.loss(features)
        if not torch.isfinite(loss.detach()).item():
            self.nonfinite += 1
            logger.warning("non-finite loss %s at epoch %d micro-batch %d: step skipped (%s)", loss.item(),
                           self.epoch, self.micro_in_epoch - 1, {k: float(v.detach()) for k, v in parts.items()})
            self.metrics.write(self.global_step, {"nonfinite_loss": 1, "epoch": self.epoch})
            if self.nonfinite >= self.cfg.max_nonfinite:
                raise RuntimeError(
                    f"{self.nonfinite} non-finite losses in a row (max_nonfinite={self.cfg.max_nonfinite}); "
                    f"stopping at step {self.global_step}. Lower optim.lr, use bf16 instead of fp16, "
                    "or check the data.")
            return None
        self.nonfinite = 0
        self.engine.backward(loss * self.world)  # DeepSpeed averages over ranks; the loss is already global
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        self.method.after_step(features)
        if boundary:
            ds.clamp_logit_scale(self.clip, self.cfg.optim.logit_scale_max)
            if self.teacher is not None:
                self.teacher.update()
        return StepOutput(loss, parts, features, boundary, batch["images"].shape[0] * self.world)

    def _epoch_batches(self):
        point, self.resume_point = self.resume_point, None
        if point is None or self.micro_in_epoch == 0:
            self.loader.sampler.set_epoch(self.epoch)
            self.method.on_epoch_start(self.epoch)
            self.micro_in_epoch = 0
        return epoch_batches(self.loader, self.epoch, self.micro_in_epoch, point)

    def _log(self, step: StepOutput, samples: int, elapsed: float) -> None:
        features = step.features
        values = {"loss": float(step.loss.detach()), **{f"loss/{k}": float(v.detach()) for k, v in step.parts.items()},
                  "epoch": self.epoch, "lr": self.optimizer.param_groups[0]["lr"],
                  "logit_scale": float(features.logit_scale.detach()), "samples_per_s": samples / max(elapsed, 1e-9),
                  "peak_memory_mb": peak_memory_mb(self.device), "skipped_samples": getattr(self.loader, "skipped", 0),
                  **self.method.log_values()}
        if features.logit_bias is not None:
            values["logit_bias"] = float(features.logit_bias.detach())
        self.metrics.log_step(self.global_step, self.total_steps, self.epoch, values)

    def train(self) -> Dict[str, Any]:
        from compclip.kernels.dispatch import resolved_backends

        cfg, last = self.cfg, {}
        progress = Progress(self.rank == 0 and cfg.log.progress, self.total_steps, self.global_step)
        self.engine.train()
        samples, window_start, logged_backends = 0, time.time(), False
        while self.global_step < self.total_steps and self.epoch < cfg.optim.epochs:
            for index, batch in self._epoch_batches():
                self.micro_in_epoch = index + 1
                step = self.train_step(batch)
                if not logged_backends:
                    logger.info("kernel backends at step 0: %s", json.dumps(resolved_backends(), sort_keys=True))
                    logged_backends = True
                samples += step.samples if step is not None else 0
                if step is None or not step.boundary:
                    continue
                self.global_step += 1
                last = {"loss": float(step.loss.detach()), **{f"loss/{k}": float(v.detach())
                                                               for k, v in step.parts.items()}}
                progress.update(last["loss"], self.epoch)
                if self.global_step in (1, self.total_steps) or self.global_step % cfg.log.every_n_steps == 0:
                    self._log(step, samples, time.time() - window_start)
                    samples, window_start = 0, time.time()
                if cfg.log.save_every_n_steps and self.global_step % cfg.log.save_every_n_steps == 0:
                    self._save()
                if self.global_step >= self.total_steps:
                    break
            if self.micro_in_epoch >= self.micro_per_epoch:
                self.epoch, self.micro_in_epoch = self.epoch + 1, 0
                self._epoch_end(f"epoch_{self.epoch}", self.epoch, cfg.eval.due(self.epoch))
                self._save()
        progress.close()
        if self.exported_at != self.global_step:  # stopped mid-epoch (max_steps): what there is, as this epoch
            self._epoch_end(f"step_{self.global_step}", self.epoch + 1, cfg.eval.enabled())
        if self.saved_at != self.global_step:
            self._save()
        self.metrics.close()
        return {"before": self.before, "after": self.after, "export": self.last_export, "last": last,
                "steps": self.global_step}


def build_trainer(argv: List[str]) -> Trainer:
    """A Trainer from command-line arguments (over the embedded default), in a world of one without a launcher.

    Raises ConfigError for a bad configuration."""
    cfg = load_config(argv, base=EMBEDDED_DEFAULT)
    ds.single_process_environment()
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
    except ConfigError as exc:  # in the YAML / command line, or found once ranks and files are known
        print(f"compclip/train.py: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    result = trainer.train()
    if trainer.rank == 0:
        final_report(trainer.run_dir, f"{trainer.method.describe()} — {result['steps']} steps in "
                     f"{time.time() - t0:.0f}s ({trainer.world} rank{'s' * (trainer.world > 1)}, {trainer.device})",
                     trainer.cfg.model.arch, result)
    torch.distributed.barrier()
    if owns_process_group:
        torch.distributed.destroy_process_group()
    return result


def cli() -> None:
    """`compclip-train`: main() without its result as the exit status (a dict there would exit 1)."""
    main()


if __name__ == "__main__":
    main()
