"""What a run writes about itself: the log (stdout + `<run>/out.log`), `metrics.jsonl` and tensorboard (rank 0),
and the before -> after summary table of the final evaluation.

`metrics.jsonl`: one JSON object per logged step, `{"step": N, key: value, ...}`, appended (a resumed run
continues the file). Tensorboard gets the finite numeric values under the same keys.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

logger = logging.getLogger("compclip")

# The rows of the summary table: binding accuracy and retrieval R@1. A benchmark reporting none of them (SugarCrepe,
# VALSE, zero-shot, ARO order) shows all its metrics. Per-group keys (`group/accuracy`) are never rows.
SUMMARY_METRICS = ("accuracy", "macro_accuracy", "micro_accuracy", "image_to_text_R@1", "text_to_image_R@1")


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


@dataclass
class StepOutput:
    """What one micro-batch (or one cached contrastive step) of training produced."""

    loss: torch.Tensor  # the weighted global loss (detach before keeping it)
    parts: Dict[str, torch.Tensor]  # unweighted value of every term
    features: Any  # compclip.losses.terms.Features of this micro-batch
    boundary: bool  # an optimizer step happened
    samples: int  # images in the global micro-batch

    def scalars(self) -> Dict[str, float]:
        return {"loss": float(self.loss.detach()), **{f"loss/{k}": float(v.detach()) for k, v in self.parts.items()}}


class NonFiniteGuard:
    """Counts non-finite losses in a row: `ok(...)` is False for one (the step is then skipped and logged); the
    `limit`-th in a row stops the run. The loss is global, so every rank takes the same branch."""

    def __init__(self, limit: int, metrics: "Metrics", count: int = 0):
        self.limit, self.metrics, self.count = limit, metrics, count

    def ok(self, loss: torch.Tensor, parts: Dict[str, torch.Tensor], epoch: int, micro: int, step: int) -> bool:
        if torch.isfinite(loss.detach()).item():
            self.count = 0
            return True
        self.count += 1
        logger.warning("non-finite loss %s at epoch %d micro-batch %d: step skipped (%s)", loss.item(), epoch,
                       micro, {k: float(v.detach()) for k, v in parts.items()})
        self.metrics.write(step, {"nonfinite_loss": 1, "epoch": epoch})
        if self.count >= self.limit:
            raise RuntimeError(f"{self.count} non-finite losses in a row (max_nonfinite={self.limit}); stopping at "
                               f"step {step}. Lower optim.lr, use bf16 instead of fp16, or check the data.")
        return False


def step_values(step: StepOutput, epoch: int, lr: float, samples_per_s: float, device: torch.device,
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


def headline(results: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Per benchmark, its SUMMARY_METRICS (all its metrics when it reports none of them)."""
    out = {}
    for benchmark, metrics in results.items():
        keep = {k: v for k, v in metrics.items() if k in SUMMARY_METRICS}
        out[benchmark] = keep or dict(metrics)
    return out


def summary_table(before: Optional[Dict], after: Optional[Dict]) -> str:
    from compclip.evaluation.report import format_table

    runs = {}
    if before:
        runs["before"] = headline(before)
    if after:
        runs["after"] = headline(after)
    return format_table(runs) if runs else ""


def evaluate_model(clip, preprocess, tokenizer, eval_cfg, device: torch.device, out_dir: Path, label: str,
                   rank: int) -> Optional[Dict[str, Dict[str, float]]]:
    """Evaluate an unwrapped open_clip model on rank 0 (the others wait) and log its headline numbers."""
    results = None
    if rank == 0:
        from compclip.evaluation import evaluate

        t0 = time.time()
        results = evaluate(clip.to(device), preprocess, tokenizer, eval_cfg, device, out_dir=str(out_dir),
                           label=label)
        logger.info("evaluation %s (%.1fs): %s", label, time.time() - t0, json.dumps(headline(results)))
    torch.distributed.barrier()
    return results


def log_kernel_backends(when: str) -> bool:
    """Log which backend (triton | torch) every kernel op resolved to so far; True (for a logged-once flag)."""
    from compclip.kernels.dispatch import resolved_backends

    logger.info("kernel backends at %s: %s", when, json.dumps(resolved_backends(), sort_keys=True))
    return True


class Evaluator:
    """The run's evaluations: `before` on the initial model, and each due one on the full weights of an epoch."""

    def __init__(self, preprocess, tokenizer, eval_cfg, device: torch.device, run_dir: Path, rank: int,
                 metrics: Metrics):
        self.preprocess, self.tokenizer, self.cfg, self.device = preprocess, tokenizer, eval_cfg, device
        self.run_dir, self.rank, self.metrics = run_dir, rank, metrics

    def model(self, clip, label: str) -> Optional[Dict[str, Dict[str, float]]]:
        return evaluate_model(clip, self.preprocess, self.tokenizer, self.cfg, self.device,
                              self.run_dir / "eval" / label, label, self.rank)

    def state(self, state: Dict[str, torch.Tensor], model_cfg, label: str,
              step: int) -> Optional[Dict[str, Dict[str, float]]]:
        """Evaluate weights `state` in a fresh model (rank 0) and write `eval/<benchmark>/<metric>` at `step`."""
        from compclip.models import build_from_config

        model = build_from_config(model_cfg, load_weights=False, state=state)[0] if self.rank == 0 else None
        results = self.model(model, label)
        if results:
            self.metrics.write(step, {f"eval/{b}/{m}": v for b, r in results.items() for m, v in r.items()})
        return results


def final_report(run_dir: Path, title: str, arch: str, result: Dict[str, Any]) -> str:
    """The end-of-run text (rank 0): the before -> after table, the export and how to load it, the curves;
    printed and appended to `out.log`."""
    from compclip.models import MODEL_CONFIG_DIR

    lines = [f"\ncompclip: {title}"]
    table = summary_table(result["before"], result["after"])
    if table:
        lines += ["binding accuracy and retrieval R@1 (%), before -> after:", table]
    if result["export"]:
        lines.append(f"exported checkpoint: {result['export']}")
        load = f"open_clip.create_model_and_transforms({arch!r}, pretrained={result['export']!r})"
        if (MODEL_CONFIG_DIR / f"{arch}.json").exists():
            load = f"open_clip.add_model_config({str(MODEL_CONFIG_DIR)!r}); " + load
        lines.append(f"  load it: {load}")
    try:
        from compclip.plots import plot_runs

        lines.append(f"curves: {plot_runs([str(run_dir)], str(run_dir / 'curves.png'))}")
    except Exception as exc:  # the run itself is done and saved: a plotting failure must not turn it red
        logger.warning("could not plot %s/metrics.jsonl: %s", run_dir, exc)
    lines.append(f"run folder: {run_dir}")
    text = "\n".join(lines)
    print(text, flush=True)
    with open(run_dir / "out.log", "a", encoding="utf-8") as fh:
        fh.write(text + "\n")
    return text
