"""Fine-tune an open_clip model with CLIP, NegCLIP, CE-CLIP, DeGLA, C2LIP or any combination of their loss terms.

    deepspeed compclip/train.py [--config configs/<method>.yaml ...] [--section.field=value ...]
    python compclip/train.py ...            # one process, no launcher
    python compclip/train.py                # the embedded default: CE-CLIP from a bag-of-words tiny CLIP, ~4 min

The entry point and the loop. Every other concern lives in its own component (the table in docs/architecture.md):
no loss math here, no feature list, no branch on the method.
"""
from __future__ import annotations

import os
import sys

# Run as a script, sys.path[0] is compclip/ and its modules (config, models, ...) would shadow or be shadowed by
# top-level packages; the repository root goes there instead, so a fresh clone works even before installing.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.getcwd()) == _HERE:
    sys.path[0] = os.path.dirname(_HERE)

import logging  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

import torch  # noqa: E402

from compclip import engine as ds  # noqa: E402
from compclip.checkpoint import (Checkpointer, ResumePoint, epoch_batches, resolve_run_dir,  # noqa: E402
                                 seed_everything)
from compclip.config import (ConfigError, TrainConfig, dump_yaml, help_text, load_config,  # noqa: E402
                             resolve_data, to_dict)
from compclip.data import build_dataloader, to_device  # noqa: E402
from compclip.data.synthetic import FOLDER  # noqa: E402
from compclip.gradcache import CachedStep, finish_step, step_data  # noqa: E402
from compclip.metrics import (Evaluator, Metrics, NonFiniteGuard, Progress, StepOutput,  # noqa: E402
                              final_report, log_kernel_backends, setup_logging, step_values)
from compclip.preemption import PREEMPTED, SaveSchedule  # noqa: E402

logger = logging.getLogger("compclip")

# The embedded default run (`python compclip/train.py` with no arguments) and the base of every run (a YAML or the
# command line overrides it). It is the study's CE-CLIP fine-tune, seed 0 (docs/study.md; tests/test_study.py checks
# that they agree): the 2-object, one-phrasing synthetic world, the world's bag-of-words CLIP as the start (the
# study's stage 1, trained once, then reused), a tiny ViT with a fixed 2-D sin-cos position embedding, 400 steps at
# lr 2e-3. About 3 minutes on 2 CPU cores the first time (1 of them the bag-of-words pretraining), 2 after that.
EMBEDDED_DEFAULT: Dict[str, Any] = {
    "model": {"arch": "compclip-tiny-sincos", "pretrained": "synthetic-bow:1"},
    "data": {"batch_size": 32, "num_negatives": 4,
             "synthetic": {"num_train": 10000, "num_val": 300, "seed": 0, "image_size": 64, "max_objects": 2,
                           "one_phrasing": True,
                           "root": os.path.join(".cache", "compclip", FOLDER)}},
    "loss": {"method": "ceclip"},
    "optim": {"lr": 2e-3, "weight_decay": 0.1, "warmup_steps": 20, "epochs": 2, "max_steps": 400, "grad_clip": 1.0},
    "eval": {"progress": False, "precision": "fp32"},
}


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world, self.device = ds.init_distributed(cfg)
        self.dtype = ds.COMPUTE_DTYPES[cfg.deepspeed.precision]
        self.run_dir = resolve_run_dir(cfg)
        self.checkpoints = Checkpointer(self.run_dir, self.rank, self.world, cfg.log.keep_checkpoints,
                                        cfg.log.keep_exports)
        setup_logging(self.run_dir, self.rank)
        logger.info("run folder %s (%d rank%s, device %s, %d threads)", self.run_dir, self.world,
                    "s" * (self.world > 1), self.device, torch.get_num_threads())
        self.ds_config = ds.run_config(cfg, self.world)  # resolves global_batch_size into data.batch_size
        world_paths = resolve_data(cfg)  # data before model: a missing file or an empty manifest fails fast
        self._resolve_start(world_paths)
        self.checkpoints.write_run_files(dump_yaml(cfg), self.ds_config)
        self.metrics = Metrics(self.run_dir, self.rank, cfg.log.tensorboard)
        self._build(world_paths)
        self.guard = NonFiniteGuard(cfg.max_nonfinite, self.metrics)
        self.schedule = SaveSchedule(cfg.log.save_every_n_steps, cfg.log.save_every_n_minutes, self.rank)
        self.global_step = self.epoch = self.micro_in_epoch = 0
        self.last_export, self.after = None, None
        self.exported_at = -1
        self.resume_point: Optional[ResumePoint] = None
        if cfg.resume:
            point, extras = self.checkpoints.restore_training(self.engine, cfg.resume, self._stateful())
            self.resume_point, self.guard.count = point, extras["nonfinite"]
            self.epoch, self.micro_in_epoch, self.global_step = point.epoch, point.micro_in_epoch, point.global_step

    def _resolve_start(self, world_paths: Optional[dict]) -> None:
        """`model.pretrained: synthetic-bow[:EPOCHS]` becomes the path of the synthetic world's bag-of-words CLIP
        (trained once by a child run, then reused: compclip.study.bow_pretrained); the run's config records the
        path."""
        from compclip.study import bow_pretrained, parse_bow_tag

        cfg = self.cfg
        try:
            epochs = parse_bow_tag(cfg.model.pretrained)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if epochs is None:
            return
        if world_paths is None:
            raise ConfigError(f"model.pretrained={cfg.model.pretrained} is the synthetic world's bag-of-words start; "
                              "with data.train_manifest set, give model.pretrained an open_clip tag or a checkpoint")
        logger.info("model.pretrained=%s: the bag-of-words CLIP of %s (trained once by a child run, then reused)",
                    cfg.model.pretrained, world_paths["root"])
        t0 = time.time()
        cfg.model.pretrained = bow_pretrained(world_paths, cfg.model.arch, cfg.data.batch_size,
                                              cfg.data.num_negatives, epochs)
        logger.info("start: %s (%.0fs)", cfg.model.pretrained, time.time() - t0)

    def _build(self, world_paths: Optional[dict]) -> None:
        """Model, method, data, the `before` evaluation, the DeepSpeed engine and the EMA teacher."""
        from compclip.ema import build_teacher
        from compclip.methods import build_method
        from compclip.models import Encoder, build_from_config, visual_token_kind

        cfg = self.cfg
        seed_everything(cfg.seed)
        clip, preprocess_train, preprocess, tokenizer = build_from_config(cfg.model)
        self.evaluator = Evaluator(preprocess, tokenizer, cfg.eval, self.device, self.run_dir, self.rank, self.metrics)
        self.method = build_method(cfg.loss, num_negatives=cfg.data.num_negatives,
                                   has_logit_bias=getattr(clip, "logit_bias", None) is not None)
        if self.method.needs_tokens:
            visual_token_kind(clip)  # unsupported towers fail here, not at step 1
        logger.info("method %s", self.method.describe())
        # Images keep their geometry by default (the synthetic world's relations are spatial; a manifest gets crops).
        self.loader = build_dataloader(step_data(cfg, self.world), tokenizer,  # with contrastive_batch: a step's share
                                       preprocess if world_paths else preprocess_train, rank=self.rank,
                                       world_size=self.world, seed=cfg.seed, epoch=0, train=True)
        init_teacher = self.checkpoints.init_from(clip, cfg.init_from) if cfg.init_from else None
        due = cfg.eval_before and cfg.eval.enabled() and not cfg.resume
        self.before = self.evaluator.model(clip, "before") if due else None
        self.micro_per_epoch = len(self.loader)
        self.total_steps = ds.total_steps(cfg, self.micro_per_epoch)
        self.engine, self.optimizer, self.scheduler = ds.build_engine(Encoder(clip), cfg, self.ds_config,
                                                                      self.total_steps)
        self.clip = self.engine.module.clip
        untrained = lambda: Encoder(build_from_config(cfg.model, load_weights=False)[0])  # noqa: E731
        self.teacher = (build_teacher(self.engine, untrained, cfg.loss.ema_decay, self.ds_config, init_teacher)
                        if self.method.needs_teacher else None)
        self.cached = CachedStep.build(cfg, self.engine, self.method, self.teacher, self.device, self.world)

    # ---- export, evaluation, checkpoints ------------------------------------------------------------------------
    def _epoch_end(self, label: str, export_epoch: int, run_eval: bool) -> None:
        """Export `epoch_N.pt` (full fp32 weights, gathered under ZeRO-3) and evaluate it when due."""
        self.exported_at, cfg = self.global_step, self.cfg
        if not cfg.log.export and not run_eval:
            return
        state = ds.full_state_dict(self.clip)  # collective under ZeRO-3
        if cfg.log.export:
            path = self.checkpoints.export(state, export_epoch, cfg.model.arch, to_dict(cfg))
            self.last_export = path if self.rank == 0 else self.last_export
        if run_eval:
            self.after = self.evaluator.state(state, cfg.model, label, self.global_step) or self.after

    def _stateful(self) -> Dict[str, Any]:
        return {"method": self.method, "teacher": self.teacher}

    def _save(self) -> None:
        if not self.cfg.log.save_deepspeed or self.checkpoints.saved_step == self.global_step:
            return
        counters = {"epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch, "global_step": self.global_step}
        # data: this rank's position in the epoch (skip count, streams), restored at its epoch (epoch_batches)
        self.checkpoints.save_training(self.engine, counters, to_dict(self.cfg), self._stateful(),
                                       {"data": self.loader.state_dict(), "nonfinite": self.guard.count})

    # ---- the loop ---------------------------------------------------------------------------------------------
    def train_step(self, batch: Dict[str, Any]) -> Optional[StepOutput]:
        """One micro-batch: the method's features, global-batch loss, backward, DeepSpeed step and the method's
        hooks; at an accumulation boundary also the logit-scale clamp and the EMA teacher's update.
        With `optim.contrastive_batch`, the whole optimizer step over chunks (compclip.gradcache). Returns None when
        the loss is not finite: the step is skipped and logged (`NonFiniteGuard`)."""
        if self.cached is not None:
            return self.cached.step(batch, self.guard, (self.epoch, self.micro_in_epoch - 1, self.global_step))
        batch = to_device(batch, self.device)
        features = self.method.features(self.engine, self.teacher, batch, self.dtype)
        loss, parts = self.method.loss(features)
        if not self.guard.ok(loss, parts, self.epoch, self.micro_in_epoch - 1, self.global_step):
            return None
        self.engine.backward(loss * self.world)  # DeepSpeed averages over ranks; the loss is already global
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        finish_step(self.engine, self.method, self.teacher, features, boundary, self.cfg.optim.logit_scale_max)
        return StepOutput(loss, parts, features, boundary, batch["images"].shape[0] * self.world)

    def _epoch_batches(self):
        point, self.resume_point = self.resume_point, None
        if point is None or self.micro_in_epoch == 0:
            self.loader.sampler.set_epoch(self.epoch)
            self.method.on_epoch_start(self.epoch)
            self.micro_in_epoch = 0
        return epoch_batches(self.loader, self.epoch, self.micro_in_epoch, point)

    def _log(self, step: StepOutput, samples: int, elapsed: float) -> None:
        values = step_values(step, self.epoch, self.optimizer.param_groups[0]["lr"], samples / max(elapsed, 1e-9),
                             self.device, getattr(self.loader, "skipped", 0), self.method.log_values())
        self.metrics.log_step(self.global_step, self.total_steps, self.epoch, values)

    def train(self) -> Dict[str, Any]:
        cfg, last, schedule = self.cfg, {}, self.schedule.start()
        progress = Progress(self.rank == 0 and cfg.log.progress, self.total_steps, self.global_step)
        self.engine.train()
        samples, window_start, logged_backends = 0, time.time(), False
        while self.global_step < self.total_steps and self.epoch < cfg.optim.epochs and not schedule.stop:
            for index, batch in self._epoch_batches():
                self.micro_in_epoch = index + 1
                step = self.train_step(batch)
                logged_backends = logged_backends or log_kernel_backends("step 0")
                samples += step.samples if step is not None else 0
                if step is None or not step.boundary:
                    continue
                self.global_step += 1
                last = step.scalars()
                progress.update(last["loss"], self.epoch)
                if self.global_step in (1, self.total_steps) or self.global_step % cfg.log.every_n_steps == 0:
                    self._log(step, samples, time.time() - window_start)
                    samples, window_start = 0, time.time()
                if schedule.due(self.global_step):  # every n steps / minutes, or SIGTERM; all ranks agree
                    self._save()
                if self.global_step >= self.total_steps or schedule.stop:
                    break
            if self.micro_in_epoch >= self.micro_per_epoch and not schedule.stop:
                self.epoch, self.micro_in_epoch = self.epoch + 1, 0
                self._epoch_end(f"epoch_{self.epoch}", self.epoch, cfg.eval.due(self.epoch))
                self._save()
        progress.close(), schedule.close()
        if self.exported_at != self.global_step and not schedule.stop:  # mid-epoch (max_steps): as this epoch
            self._epoch_end(f"step_{self.global_step}", self.epoch + 1, cfg.eval.enabled())
        self._save()  # unless this step is saved already
        self.metrics.close()
        return {"before": self.before, "after": self.after, "export": self.last_export, "last": last,
                "steps": self.global_step, "preempted": schedule.stop}


def build_trainer(argv: List[str]) -> Trainer:
    """A Trainer from command-line arguments (over the embedded default), in a world of one without a launcher.

    Raises ConfigError for a bad configuration."""
    cfg = load_config(argv, base=EMBEDDED_DEFAULT)
    ds.single_process_environment()
    return Trainer(cfg)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        raise SystemExit(print(__doc__.strip() + "\n\n" + help_text(load_config([], base=EMBEDDED_DEFAULT))))
    t0 = time.time()
    # A caller's process group (a test, a notebook) stays: DeepSpeed caches groups derived from it.
    owns_process_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        trainer = build_trainer(argv)
    except ConfigError as exc:  # in the YAML / command line, or found once ranks and files are known
        print(f"compclip/train.py: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    result = trainer.train()
    if trainer.rank == 0 and not result["preempted"]:
        final_report(trainer.run_dir, f"{trainer.method.describe()} — {result['steps']} steps in "
                     f"{time.time() - t0:.0f}s ({trainer.world} rank{'s' * (trainer.world > 1)}, {trainer.device})",
                     trainer.cfg.model.arch, result)
    torch.distributed.barrier()
    if owns_process_group:
        torch.distributed.destroy_process_group()
    if result["preempted"]:  # SIGTERM: checkpoint saved, `--resume latest` continues
        raise SystemExit(PREEMPTED)
    return result


def cli() -> None:
    """`compclip-train`: main() without its result as the exit status (a dict there would exit 1)."""
    main()


if __name__ == "__main__":
    main()
