"""What a run writes about itself while it trains: the log (stdout + `<run>/out.log`), `metrics.jsonl`,
tensorboard and Weights & Biases (rank 0), the progress display, and the record of a logged step.

`metrics.jsonl`: one JSON object per logged step, `{"step": N, key: value, ...}`, appended (a resumed run
continues the file). Tensorboard and W&B get the finite numeric values under the same keys at the same step.

W&B (`log.wandb`, imported only then): rank 0 starts one W&B run with the resolved configuration, its files in
`<run>/wandb/`. Each evaluation becomes a table (`eval_table`: evaluation, step, benchmark, metric, value) and an
artifact of type `evaluation` holding its folder `eval/<label>/` (the benchmarks' JSON, results.md, results.csv).
The W&B run id is kept in `<run>/wandb/compclip_run_id`, so `--resume` continues the same W&B run; W&B drops the
steps a resumed run logs again (those after its checkpoint), as it keeps each run's steps increasing.
"""
from __future__ import annotations

import json
import logging
import math
import re
import resource
import secrets
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from compclip.progress import Progress, ProgressStats, format_duration

logger = logging.getLogger("compclip")

WANDB_ID_FILE = "compclip_run_id"


def setup_logging(run_dir: Path, rank: int) -> None:
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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def step_values(step, epoch: int, lr: float, samples_per_s: float, device: torch.device,
                skipped: int, method_values: Dict[str, float]) -> Dict[str, Any]:
    """The record of a logged training step: losses, schedule, temperature (and bias), speed, memory, data."""
    features = step.features
    values = {**step.scalars(), "epoch": epoch, "lr": lr, "logit_scale": float(features.logit_scale.detach()),
              "samples_per_s": samples_per_s, "peak_memory_mb": peak_memory_mb(device), "skipped_samples": skipped,
              **method_values}
    if features.logit_bias is not None:
        values["logit_bias"] = float(features.logit_bias.detach())
    return values


def scalars(values: Mapping[str, Any]) -> Dict[str, float]:
    """The finite numbers of a record (what tensorboard and W&B get)."""
    return {key: value for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def step_line(step: int, total: int, epoch: int, values: Mapping[str, Any], timing: Optional[ProgressStats]) -> str:
    """The log line of a training step: where it is (elapsed, ETA, samples/s), then every value."""
    head = [f"step {step}/{total} epoch {epoch}"]
    if timing is not None:
        head.append(f"elapsed {format_duration(timing.elapsed)}")
        head.append(f"ETA {format_duration(timing.eta)}" if timing.eta is not None else "ETA -")
    if "samples_per_s" in values:
        head.append(f"{values['samples_per_s']:.1f} samples/s")
    tail = " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in values.items() if k != "samples_per_s")
    return " | ".join(head + [tail])


def train_progress(enabled: bool, total: int, initial: int) -> Progress:
    """Optimizer steps on rank 0 (`enabled`): a tqdm bar in a terminal, a line in the log every
    COMPCLIP_PROGRESS_INTERVAL seconds elsewhere. Disabled, it still counts, for the step lines' ETA."""
    return Progress(total, "train", unit="steps", initial=initial, enabled=enabled, logger=logger)


class Metrics:
    """metrics.jsonl, tensorboard and W&B, rank 0 only. `log`: the run's LogConfig; `config`: the resolved
    configuration as a mapping (W&B's run config); `resumed`: continue the W&B run of the folder."""

    def __init__(self, run_dir: Path, rank: int, log, config: Optional[Dict[str, Any]] = None,
                 resumed: bool = False):
        self.rank = rank
        self.path = run_dir / "metrics.jsonl"
        self.writer = self.wandb = None
        if rank != 0:
            return
        if log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception as exc:  # tensorboard missing: the jsonl still has everything
                logger.warning("tensorboard disabled: %s", exc)
        if log.wandb:
            self.wandb = WandbRun(run_dir, log, config or {}, resumed)

    def write(self, step: int, values: Dict[str, Any]) -> None:
        if self.rank != 0:
            return
        record = {"step": step, **values}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=False) + "\n")
        numbers = scalars(values)
        if self.writer is not None:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step)

    def log_step(self, step: int, total: int, epoch: int, values: Dict[str, Any],
                 timing: Optional[ProgressStats] = None) -> None:
        """A training step's record: metrics.jsonl / tensorboard / W&B and one log line."""
        self.write(step, values)
        logger.info("%s", step_line(step, total, epoch, values, timing))

    def evaluation(self, label: str, step: int, results: Dict[str, Dict[str, float]], folder: Path) -> None:
        """An evaluation's table and folder (W&B; the numbers themselves go through `write`)."""
        if self.wandb is not None:
            self.wandb.evaluation(label, step, results, folder)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


class WandbRun:
    """One W&B run (rank 0), continued across resumes of the run folder."""

    def __init__(self, run_dir: Path, log, config: Dict[str, Any], resumed: bool):
        import wandb  # only here: a run without log.wandb never imports it (compclip.config.check_installed)

        self.wandb = wandb
        folder = run_dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(6)  # W&B ids: letters, digits, dashes, underscores; unique in a project
            id_file.write_text(run_id)
        options = dict(project=log.wandb_project, entity=log.wandb_entity or None,
                       name=log.wandb_name or run_dir.name, tags=list(log.wandb_tags) or None, config=config,
                       dir=str(run_dir), id=run_id, resume="allow")
        if log.wandb_mode:
            options["mode"] = log.wandb_mode
        try:
            self.run = wandb.init(**options)
        except Exception as error:  # no API key, no network: say which keys decide it
            raise RuntimeError(f"log.wandb: wandb.init failed ({type(error).__name__}: {error}); log in with `wandb "
                               "login`, or set log.wandb_mode=offline to log without a network (upload later with "
                               f"`wandb sync {folder}/offline-run-*`)") from error
        logger.info("W&B run %s (%s, project %s, mode %s) in %s", self.run.name, run_id, log.wandb_project,
                    log.wandb_mode or "W&B's default", folder)

    def log(self, values: Dict[str, float], step: int) -> None:
        if values:
            self.run.log(values, step=step)

    def evaluation(self, label: str, step: int, results: Dict[str, Dict[str, float]], folder: Path) -> None:
        rows = [[label, step, benchmark, metric, value] for benchmark, metrics in results.items()
                for metric, value in metrics.items()]
        table = self.wandb.Table(columns=["evaluation", "step", "benchmark", "metric", "value"], data=rows)
        self.run.log({"eval_table": table}, step=step)
        name = re.sub(r"[^A-Za-z0-9._-]", "-", f"eval-{label}-{self.run.id}")
        artifact = self.wandb.Artifact(name, type="evaluation", metadata={"label": label, "step": step})
        artifact.add_dir(str(folder))
        self.run.log_artifact(artifact)

    def finish(self) -> None:
        self.run.finish()


def log_kernel_backends(when: str) -> bool:
    """Log which backend (triton | torch) every kernel op resolved to so far; True (for a logged-once flag)."""
    from compclip.kernels.dispatch import resolved_backends

    logger.info("kernel backends at %s: %s", when, json.dumps(resolved_backends(), sort_keys=True))
    return True
