"""The run's evaluations and its final report: the `before` evaluation of the initial model, each due evaluation of
an epoch's full weights (rank 0 evaluates, the others wait; a SIGTERM stops it between two batches:
compclip.trainer.preemption.SaveSchedule.on_rank0), and the before -> after table with the export and how to load
it, printed at the end.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

logger = logging.getLogger("compclip")

# The rows of the summary table: binding accuracy and retrieval R@1. A benchmark reporting none of them (SugarCrepe,
# VALSE, zero-shot, ARO order) shows all its metrics. Per-group keys (`group/accuracy`) are never rows.
SUMMARY_METRICS = ("accuracy", "macro_accuracy", "micro_accuracy", "image_to_text_R@1", "text_to_image_R@1")


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


OnRank0 = Callable[[Callable[[Callable[[], bool]], Any]], Any]
"""Runs `work(should_stop)` on rank 0 while the other ranks wait; rank 0's result (SaveSchedule.on_rank0)."""


def at_barrier(rank: int) -> OnRank0:
    """The plain `OnRank0`: rank 0 works, the others wait at a barrier, and nothing stops the work."""
    def run(work):
        result = work(lambda: False) if rank == 0 else None
        torch.distributed.barrier()
        return result
    return run


def evaluate_model(clip, preprocess, tokenizer, eval_cfg, device: torch.device, out_dir: Path, label: str,
                   rank: int, on_rank0: Optional[OnRank0] = None, arch: Optional[str] = None,
                   pretrained: Optional[str] = None) -> Optional[Dict[str, Dict[str, float]]]:
    """Evaluate an unwrapped open_clip model on rank 0 while the others wait (`on_rank0`, default `at_barrier`)
    and log its headline numbers. None on the other ranks, and when `should_stop` stopped it (nothing written).
    `arch` and `pretrained` name the model in the clip_benchmark JSONs (clip_benchmark's `--model` /
    `--pretrained`)."""
    from compclip.evaluation import EvaluationStopped, evaluate

    def work(should_stop):
        t0 = time.time()
        try:
            results = evaluate(clip.to(device), preprocess, tokenizer, eval_cfg, device, out_dir=str(out_dir),
                               label=label, arch=arch, pretrained=pretrained, should_stop=should_stop)
        except EvaluationStopped as stopped:
            logger.warning("evaluation %s: SIGTERM, %s (%.1fs); it runs again on --resume", label, stopped,
                           time.time() - t0)
            return None
        logger.info("evaluation %s (%.1fs): %s", label, time.time() - t0, json.dumps(headline(results)))
        return results

    return (on_rank0 or at_barrier(rank))(work)


class Evaluator:
    """The run's evaluations: `before` on the initial model, and each due one on the full weights of an epoch.
    Each writes `eval/<label>/` (the benchmarks' JSON, results.md, results.csv) and goes to the metrics' writers
    (`metrics.jsonl` at its step, tensorboard, the W&B table and artifact). `model_cfg` names the model in the
    clip_benchmark JSONs: its architecture, and as `pretrained` the weights (the start, or the export).
    `on_rank0`: how rank 0 evaluates while the others wait (the run's SaveSchedule.on_rank0)."""

    def __init__(self, preprocess, tokenizer, eval_cfg, device: torch.device, run_dir: Path, rank: int, metrics,
                 model_cfg=None, on_rank0: Optional[OnRank0] = None):
        self.preprocess, self.tokenizer, self.cfg, self.device = preprocess, tokenizer, eval_cfg, device
        self.run_dir, self.rank, self.metrics, self.model_cfg = run_dir, rank, metrics, model_cfg
        self.on_rank0 = on_rank0

    def model(self, clip, label: str, step: int = 0,
              pretrained: Optional[str] = None) -> Optional[Dict[str, Dict[str, float]]]:
        """Evaluate `clip` (the `before` evaluation: at step 0, of the starting weights); None when a SIGTERM
        stopped it."""
        arch = self.model_cfg.arch if self.model_cfg is not None else None
        if pretrained is None and self.model_cfg is not None:
            pretrained = self.model_cfg.pretrained or "random init"
        folder = self.run_dir / "eval" / label
        results = evaluate_model(clip, self.preprocess, self.tokenizer, self.cfg, self.device, folder, label,
                                 self.rank, self.on_rank0, arch=arch, pretrained=pretrained)
        if results:
            from compclip.evaluation.report import write_tables

            write_tables({label: results}, str(folder), title=f"{self.run_dir.name}: evaluation {label}")
            self.metrics.write(step, {f"eval/{b}/{m}": v for b, r in results.items() for m, v in r.items()})
            self.metrics.evaluation(label, step, results, folder)
        return results

    def state(self, state: Dict[str, torch.Tensor], model_cfg, label: str, step: int,
              pretrained: Optional[str] = None) -> Optional[Dict[str, Dict[str, float]]]:
        """Evaluate weights `state` in a fresh model (rank 0) and write `eval/<benchmark>/<metric>` at `step`;
        `pretrained`: where the weights were exported (the label when they were not)."""
        from compclip.models import build_from_config

        model = build_from_config(model_cfg, load_weights=False, state=state)[0] if self.rank == 0 else None
        return self.model(model, label, step, pretrained=pretrained or label)

    def curve(self, state: Callable[[], Dict[str, torch.Tensor]], model_cfg, step: int, total_steps: int) -> None:
        """A point of the learning curves every `eval.every_n_steps` steps (`eval/curve/step_N`, the last step has
        its whole evaluation) of the weights `state()` returns (on every rank; rank 0 evaluates): its metrics go to
        `metrics.jsonl` at `step`, not to the run's tables. The generators are restored after it (building the model
        to score draws its initialisation), so a run with curves trains exactly as the same run without them."""
        from compclip.models import build_from_config
        from compclip.rng import rng_state, set_rng_state

        every = self.cfg.every_n_steps
        if not every or step % every or step >= total_steps:
            return
        generators = rng_state()
        weights = state()
        model = build_from_config(model_cfg, load_weights=False, state=weights)[0] if self.rank == 0 else None
        label = f"curve step {step}"
        results = evaluate_model(model, self.preprocess, self.tokenizer, curve_config(self.cfg), self.device,
                                 self.run_dir / "eval" / "curve" / f"step_{step}", label, self.rank, self.on_rank0,
                                 arch=model_cfg.arch, pretrained=label)
        if results:
            self.metrics.write(step, {f"eval/{b}/{m}": v for b, r in results.items() for m, v in r.items()})
        set_rng_state(generators)


def curve_config(eval_cfg):
    """The periodic evaluation's config: with `curve_subsets`, only those SugarCrepe subsets; else the whole one."""
    import dataclasses

    if not eval_cfg.curve_subsets:
        return eval_cfg
    keep = ("sugarcrepe", "sugarcrepe_image_root", "batch_size", "num_workers", "precision", "max_items")
    return dataclasses.replace(type(eval_cfg)(), sugarcrepe_subsets=list(eval_cfg.curve_subsets), progress=False,
                               **{key: getattr(eval_cfg, key) for key in keep})


def load_hint(export: str, arch: str, quick_gelu: bool) -> str:
    """How stock open_clip loads an export: its local folder when there is one (the activation is in its config),
    else the `.pt` with the architecture (and QuickGELU when the run trained with it)."""
    from compclip.models import MODEL_CONFIG_DIR, local_dir_of

    folder = local_dir_of(export)
    if Path(folder, "open_clip_config.json").is_file():
        return f"open_clip.create_model_and_transforms('local-dir:{folder}')"
    load = f"open_clip.create_model_and_transforms({arch!r}, pretrained={export!r}" + (
        ", force_quick_gelu=True)" if quick_gelu else ")")
    if (MODEL_CONFIG_DIR / f"{arch}.json").exists():
        load = f"open_clip.add_model_config({str(MODEL_CONFIG_DIR)!r}); " + load
    return load


def final_report(run, title: str, result: Dict[str, Any]) -> str:
    """The end-of-run text (rank 0): the before -> after table, the export and how to load it, the curves;
    printed and appended to `out.log`. `run`: the ResolvedRun."""
    run_dir, model = run.run.root, run.config.model
    lines = [f"\ncompclip: {title}"]
    table = summary_table(result["before"], result["after"])
    if table:
        lines += ["binding accuracy and retrieval R@1 (%), before -> after:", table]
    if result["export"]:
        lines.append(f"exported checkpoint: {result['export']}")
        lines.append(f"  load it: {load_hint(result['export'], model.arch, model.force_quick_gelu)}")
    curves = draw_curves(run_dir)
    if curves:
        lines.append(f"curves: {curves}")
    lines.append(f"run folder: {run_dir}")
    text = "\n".join(lines)
    print(text, flush=True)
    with open(run_dir / "out.log", "a", encoding="utf-8") as fh:
        fh.write(text + "\n")
    return text


def draw_curves(run_dir: Path) -> Optional[str]:
    """`<run>/curves.png` from metrics.jsonl (rank 0; at the end of a run, and of a preempted one); its path, or
    None when it could not be drawn (logged: the run itself is done and saved, so a plot must not turn it red)."""
    try:
        from compclip.plots import plot_runs

        return plot_runs([str(run_dir)], str(run_dir / "curves.png"))
    except Exception as exc:
        logger.warning("could not plot %s/metrics.jsonl: %s", run_dir, exc)
        return None
