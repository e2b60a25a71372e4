"""What a run writes about itself while it trains: the log (stdout + `<run>/out.log`), `metrics.jsonl` and
tensorboard (rank 0), the progress bar, and the record of a logged step.

`metrics.jsonl`: one JSON object per logged step, `{"step": N, key: value, ...}`, appended (a resumed run
continues the file). Tensorboard gets the finite numeric values under the same keys.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import sys
from pathlib import Path
from typing import Any, Dict

import torch

logger = logging.getLogger("compclip")

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

    def log_step(self, step: int, total: int, epoch: int, values: Dict[str, Any]) -> None:
        """A training step's record: metrics.jsonl / tensorboard and one log line."""
        self.write(step, values)
        logger.info("step %d/%d epoch %d %s", step, total, epoch,
                    " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A tqdm bar of optimizer steps on stderr (rank 0 with log.progress; otherwise nothing)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=sys.stderr)

    def update(self, loss: float, epoch: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def log_kernel_backends(when: str) -> bool:
    """Log which backend (triton | torch) every kernel op resolved to so far; True (for a logged-once flag)."""
    from compclip.kernels.dispatch import resolved_backends

    logger.info("kernel backends at %s: %s", when, json.dumps(resolved_backends(), sort_keys=True))
    return True
