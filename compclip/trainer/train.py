"""The training loop: `Trainer(run).train()` for a `ResolvedRun` (compclip.resolve), top to bottom.

Every other concern lives in its own component (docs/architecture.md): the DeepSpeed engine (`engine`), checkpoints
(`checkpoint`), when to save and stop (`preemption`), the optimizer and schedule (`optim`), a contrastive batch over
chunks (`gradcache`), the EMA teacher (`ema`), a step's bookkeeping (`step`), evaluations and the final report
(`evaluator`), logs and metrics (`metrics`), the files a run needs first (`inputs`). No loss math here, no feature
list, no branch on the method, and nothing writes into the run's configuration (it is sealed).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional

import torch

from compclip.config import to_dict
from compclip.data import build_dataloader, to_device
from compclip.resolve import ResolvedRun
from compclip.rng import rng_state, seed_everything
from compclip.trainer import engine, optim
from compclip.trainer.checkpoint import Checkpointer, ResumePoint, epoch_batches
from compclip.trainer.evaluator import Evaluator, draw_curves
from compclip.trainer.gradcache import CachedStep
from compclip.trainer.inputs import prepare_inputs
from compclip.trainer.metrics import Metrics, log_kernel_backends, setup_logging, step_values, train_progress
from compclip.trainer.preemption import SaveSchedule
from compclip.trainer.step import NonFiniteGuard, StepOutput, finish_step
from compclip.trainer.validate import Validator

logger = logging.getLogger("compclip")


class Trainer:
    def __init__(self, run: ResolvedRun):
        self.run, self.cfg = run, run.config
        self.rank, world_size, self.device = engine.init_distributed(self.cfg)
        if world_size != run.world_size:
            raise RuntimeError(f"the run was resolved for {run.world_size} ranks but the process group has "
                               f"{world_size}")
        self.world_size = world_size
        self.dtype = engine.COMPUTE_DTYPES[self.cfg.deepspeed.precision]
        log = self.cfg.log
        self.checkpoints = Checkpointer(run.run, self.rank, world_size, log.keep_checkpoints, log.keep_exports,
                                        log.keep_abandoned)
        setup_logging(run.run.root, self.rank)
        logger.info("run folder %s (%d rank%s, device %s, %d threads); configuration: %s", run.run.root, world_size,
                    "s" * (world_size > 1), self.device, torch.get_num_threads(), " < ".join(run.layers))
        for line in run.deepspeed_overrides:
            logger.warning("deepspeed config: %s", line)
        # every rank checks a share of the checkpoint's files, and all take the same (first intact) tag
        self.resume_from = self.checkpoints.verified((run.resume, *run.resume_fallbacks)) if run.resume else None
        self.init_from = self.checkpoints.verified((run.init_from,), "init_from") if run.init_from else None
        logger.info("%s", engine.configure_tf32(self.cfg.model.tf32, self.device))
        prepare_inputs(run)  # the synthetic world and the bag-of-words start, before the model
        self.checkpoints.write_run_files(run)
        self.metrics = Metrics(run.run.root, self.rank, self.cfg.log, to_dict(self.cfg),
                               resumed=run.resume is not None)
        self.schedule = SaveSchedule(log.save_every_n_steps, log.save_every_n_minutes, self.rank)
        self._build()
        self.guard = NonFiniteGuard(self.cfg.max_nonfinite, self.metrics)
        self.global_step = self.epoch = self.micro_in_epoch = 0
        self.last_export, self.after = None, None
        self.exported_at = -1
        self.resume_point: Optional[ResumePoint] = None
        self.pending: Optional[Dict[str, Any]] = None  # an evaluation a SIGTERM stopped: {"label", "epoch"}
        if self.resume_from is not None:
            point, extras = self.checkpoints.restore_training(self.engine, self.resume_from, self._stateful())
            self.resume_point, self.guard.count = point, extras["nonfinite"]
            self.pending = extras.get("pending_evaluation")
            self.epoch, self.micro_in_epoch, self.global_step = point.epoch, point.micro_in_epoch, point.global_step
        if log.save_deepspeed:
            self.checkpoints.begin_line(self.resume_from)  # after the load: nothing is abandoned for a failed one

    def _build(self) -> None:
        """Model, method, data, the `before` evaluation, the DeepSpeed engine and the EMA teacher."""
        from compclip.methods import build_method
        from compclip.models import Encoder, build_from_config, visual_token_kind
        from compclip.trainer.ema import build_teacher

        cfg, run = self.cfg, self.run
        seed_everything(cfg.seed)
        clip, preprocess_train, preprocess, self.tokenizer = build_from_config(cfg.model)
        self.evaluator = Evaluator(preprocess, self.tokenizer, cfg.eval, self.device, run.run.root, self.rank,
                                   self.metrics, cfg.model, self.schedule.on_rank0)
        self.method = build_method(cfg.loss, num_negatives=cfg.data.num_negatives,
                                   has_logit_bias=getattr(clip, "logit_bias", None) is not None)
        if self.method.needs_tokens:
            visual_token_kind(clip)  # unsupported towers fail here, not at step 1
        logger.info("method %s", self.method.describe())
        # Images keep their geometry on the synthetic world (its relations are spatial); a manifest gets crops. With a
        # contrastive batch a loader batch is the rank's share of a whole step (data.batch_size stays the chunk).
        loader_data = self._data_config(run.loader_batch)
        self.loader = build_dataloader(loader_data, self.tokenizer, preprocess if run.synthetic else preprocess_train,
                                       rank=self.rank, world_size=self.world_size, seed=cfg.seed, epoch=0, train=True)
        init_teacher = self.checkpoints.init_from(clip, self.init_from) if self.init_from else None
        due = cfg.eval_before and cfg.eval.enabled() and run.resume is None
        self.before = self.evaluator.model(clip, "before") if due else None
        self.micro_per_epoch = len(self.loader)
        self.total_steps = optim.total_steps(cfg.optim, self.micro_per_epoch)
        encoder = Encoder(clip)
        optimizer, scheduler = optim.build(encoder, cfg.optim, self.total_steps)
        self.engine, self.optimizer, self.scheduler = engine.build_engine(encoder, optimizer, scheduler, run.deepspeed)
        self.clip = self.engine.module.clip
        untrained = lambda: Encoder(build_from_config(cfg.model, load_weights=False, initialize=False)[0])  # noqa: E731
        self.teacher = (build_teacher(self.engine, untrained, cfg.loss.ema_decay, run.deepspeed, init_teacher)
                        if self.method.needs_teacher else None)
        self.cached = CachedStep.build(cfg, self.engine, self.method, self.teacher, self.device, self.world_size)
        val = build_dataloader(cfg.data, self.tokenizer, preprocess, rank=self.rank, world_size=self.world_size,
                               seed=cfg.seed, train=False) if cfg.data.val_manifest else None
        self.validator = (Validator(val, self.method, self.engine, self.teacher, self.device, self.dtype, self.metrics)
                          if val is not None else None)
        from open_clip import get_model_preprocess_cfg

        self.preprocess_cfg = get_model_preprocess_cfg(clip)

    def _data_config(self, batch_size: int):
        import dataclasses

        data = self.cfg.data
        return data if batch_size == data.batch_size else dataclasses.replace(data, batch_size=batch_size)

    # ---- export, evaluation, checkpoints ------------------------------------------------------------------------
    def _epoch_end(self, label: str, export_epoch: int, run_eval: bool) -> None:
        """Validate (data.val_manifest), export `epoch_N.pt` (full fp32 weights, gathered under ZeRO-3) and evaluate
        it when due. A SIGTERM during the evaluation stops it; it is then pending: the save records it with the
        generators as they were before it, and `--resume` runs it again from there (`_pending_evaluation`)."""
        self.exported_at, cfg = self.global_step, self.cfg
        if self.validator is not None:
            self.validator.run(self.global_step)
        if not cfg.log.export and not run_eval:
            return
        state, path = engine.full_state_dict(self.clip, self.engine), None  # collective under ZeRO-3
        if cfg.log.export:
            path = self.checkpoints.export(state, export_epoch, cfg.model.arch, to_dict(cfg),
                                           quick_gelu=cfg.model.force_quick_gelu,
                                           preprocess_cfg=self.preprocess_cfg, tokenizer=self.tokenizer)
            self.last_export = path if self.rank == 0 else self.last_export
        if run_eval:
            generators, stopped_before = rng_state(), self.schedule.stop
            self.after = self.evaluator.state(state, cfg.model, label, self.global_step, path) or self.after
            if self.schedule.stop and not stopped_before:  # all ranks agree (SaveSchedule.on_rank0)
                self.pending = {"label": label, "epoch": export_epoch, "rng": generators}

    def _pending_evaluation(self) -> None:
        """A resumed run whose save interrupted an evaluation runs it first, from the generators' state before it."""
        pending, self.pending = self.pending, None
        if pending is not None:
            self.resume_point.restore_rng()
            self._epoch_end(pending["label"], pending["epoch"], self.cfg.eval.enabled())

    def _stateful(self) -> Dict[str, Any]:
        return {"method": self.method, "teacher": self.teacher}

    def _save(self) -> None:
        if not self.cfg.log.save_deepspeed or self.checkpoints.saved_step == self.global_step:
            return
        counters = {"epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch, "global_step": self.global_step}
        pending = {k: v for k, v in self.pending.items() if k != "rng"} if self.pending else None
        # data: this rank's position in the epoch (skip count, streams), restored at its epoch (epoch_batches)
        self.checkpoints.save_training(self.engine, counters, self.run, self._stateful(),
                                       {"data": self.loader.state_dict(), "nonfinite": self.guard.count,
                                        "pending_evaluation": pending}, rng=(self.pending or {}).get("rng"))

    # ---- the loop ---------------------------------------------------------------------------------------------
    def train_step(self, batch: Dict[str, Any]) -> Optional[StepOutput]:
        """One micro-batch: the method's features, global-batch loss, backward, DeepSpeed step and the method's
        hooks; at an accumulation boundary also the logit-scale clamp and the EMA teacher's update.
        With `optim.contrastive_batch`, the whole optimizer step over chunks (compclip.trainer.gradcache). Returns
        None when the loss is not finite: the step is skipped and logged (`NonFiniteGuard`)."""
        if self.cached is not None:
            return self.cached.step(batch, self.guard, (self.epoch, self.micro_in_epoch - 1, self.global_step))
        batch = to_device(batch, self.device)
        features = self.method.features(self.engine, self.teacher, batch, self.dtype)
        loss, parts = self.method.loss(features)
        if not self.guard.ok(loss, parts, self.epoch, self.micro_in_epoch - 1, self.global_step):
            return None
        self.engine.backward(loss * self.world_size)  # DeepSpeed averages over ranks; the loss is already global
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        finish_step(self.engine, self.method, self.teacher, features, boundary, self.cfg.optim.logit_scale_max)
        return StepOutput(loss, parts, features, boundary, batch["images"].shape[0] * self.world_size)

    def _epoch_batches(self):
        point, self.resume_point = self.resume_point, None
        if point is None or self.micro_in_epoch == 0:
            self.loader.sampler.set_epoch(self.epoch)
            self.method.on_epoch_start(self.epoch)
            self.micro_in_epoch = 0
        return epoch_batches(self.loader, self.epoch, self.micro_in_epoch, point)

    def _log(self, step: StepOutput, samples: int, elapsed: float, timing) -> None:
        values = step_values(step, self.epoch, self.optimizer.param_groups[0]["lr"], samples / max(elapsed, 1e-9),
                             self.device, getattr(self.loader, "skipped", 0), self.method.log_values())
        self.metrics.log_step(self.global_step, self.total_steps, self.epoch, values, timing)

    def train(self) -> Dict[str, Any]:
        cfg, last, schedule = self.cfg, {}, self.schedule.start()
        progress = train_progress(self.rank == 0 and cfg.log.progress, self.total_steps, self.global_step)
        self._pending_evaluation()
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
                progress.update(1, loss=last["loss"], epoch=self.epoch)
                if self.global_step in (1, self.total_steps) or self.global_step % cfg.log.every_n_steps == 0:
                    self._log(step, samples, time.time() - window_start, progress.stats())
                    samples, window_start = 0, time.time()
                if schedule.due(self.global_step):  # every n steps / minutes, or SIGTERM; all ranks agree
                    self._save()
                self.evaluator.curve(lambda: engine.full_state_dict(self.clip), cfg.model, self.global_step,
                                     self.total_steps)
                if self.global_step >= self.total_steps or schedule.stop:
                    break
            if self.micro_in_epoch >= self.micro_per_epoch and not schedule.stop:
                self.epoch, self.micro_in_epoch = self.epoch + 1, 0
                self._epoch_end(f"epoch_{self.epoch}", self.epoch, cfg.eval.due(self.epoch))
                self._save()
        progress.close()
        if self.exported_at != self.global_step and not schedule.stop:  # mid-epoch (max_steps): as this epoch
            self._epoch_end(f"step_{self.global_step}", self.epoch + 1, cfg.eval.enabled())
        self._save()  # unless this step is saved already
        schedule.close()
        if schedule.stop and self.rank == 0:  # preempted: no final report, but the curves so far
            draw_curves(self.run.run.root)
        self.metrics.close()
        return {"before": self.before, "after": self.after, "export": self.last_export, "last": last,
                "steps": self.global_step, "preempted": schedule.stop}

    def close(self) -> None:
        """Release the DeepSpeed engines (student, and a ZeRO-3 teacher's): their ZeRO optimizers keep gradient
        hooks on the parameters, through autograd's C++ side, that hold the engine, its optimizer states and
        buffers alive after the Trainer is gone. A process that trains again (several runs in one launched world,
        a notebook) otherwise keeps every earlier run's memory."""
        teacher_engine = getattr(self.teacher, "engine", None)
        for held in (self.engine, teacher_engine):
            if held is not None:
                held.destroy()
