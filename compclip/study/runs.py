"""The study's runs: stage 1 once, then every method x seed fine-tuned from its export, each a child run
(compclip.child_run: reused when finished with the same inputs), two at a time on the CPU's cores; and what each
finished run scored.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Dict, List, Sequence

from compclip.bow import pretrain_config
from compclip.child_run import Benchmark, final_eval, finished, run_child, stage_config
from compclip.losses.modules import PUBLISHED_WEIGHTS
from compclip.progress import Progress
from compclip.study.protocol import COST, Profile

log = logging.getLogger("compclip.study")

RETRIEVAL_KEY = "retrieval_r1"


def pretrain(benchmark: Benchmark, profile: Profile, runs: str, verbose: bool) -> str:
    """Stage 1 (compclip.bow.pretrain_config) in `<runs>/pretrain`, on every core; returns its run folder."""
    cfg = pretrain_config(benchmark, profile.arch, profile.batch_size, profile.num_negatives, profile.pretrain,
                          max(1, os.cpu_count() or 1), runs)
    return run_child(cfg, benchmark, runs, verbose)


def finetune_config(benchmark: Benchmark, profile: Profile, method: str, seed: int, start: str, threads: int,
                    runs: str) -> Dict[str, Any]:
    """Stage 2 of one method and seed, from the checkpoint `start`, in `<runs>/<method>-seed<seed>`."""
    cfg = stage_config(benchmark, profile.arch, profile.batch_size, profile.num_negatives, profile.finetune, threads)
    loss: Dict[str, Any] = {"method": method}
    if method == "composite":  # written out, so the run's config.yaml names its terms
        loss["terms"] = dict(PUBLISHED_WEIGHTS["composite"])
    cfg["model"]["pretrained"] = start
    cfg.update(loss=loss, seed=seed, eval_before=False)
    cfg["log"].update(logs=runs, name=f"{method}-seed{seed}")
    return cfg


def run_queue(configs: List[Dict[str, Any]], benchmark: Benchmark, runs: str, jobs: int, verbose: bool) -> None:
    """Every config as a child run, `jobs` at a time, the costliest methods first (so that the last runs of the
    queue are short and no core idles at the end), with the queue's progress and ETA (`QueueProgress`). A failed
    run or an interrupt (Ctrl-C) stops the queue: the runs not yet started never start, the finished ones are
    reused when the study is run again."""
    configs = sorted(configs, key=cost_of, reverse=True)
    reused = [finished(cfg, benchmark, runs) for cfg in configs]
    with QueueProgress(configs, reused) as progress, ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(run_child, cfg, benchmark, runs, verbose): cfg
                   for cfg, old in zip(configs, reused) if not old}
        try:
            for future in as_completed(futures):
                future.result()
                progress.finished(futures[future])
        except BaseException:
            for future in futures:
                future.cancel()  # a queued run; a running one ends on its own (Ctrl-C reaches its process too)
            raise


def cost_of(cfg: Dict[str, Any]) -> float:
    """A fine-tune's cost in CLIP fine-tunes (COST; 1 for a method it does not list)."""
    return COST.get(cfg["loss"]["method"], 1.0)


class QueueProgress:
    """The queue's progress in cost units (compclip.study.protocol.COST: one unit is a CLIP fine-tune), so that its
    ETA is the cost left at the rate of the finished runs, whatever the mix of methods: a bar in a terminal, a line
    every COMPCLIP_PROGRESS_INTERVAL seconds in a log (compclip.progress; `options`: Progress's). Runs `reused`
    (finished before) count as done from the start and not in the rate."""

    def __init__(self, configs: List[Dict[str, Any]], reused: Sequence[bool], **options: Any):
        self.runs, self.done = len(configs), sum(reused)
        initial = sum(cost_of(cfg) for cfg, old in zip(configs, reused) if old)
        options = {"unit": "CLIP-runs", "logger": log, **options}
        self.bar = Progress(sum(cost_of(cfg) for cfg in configs), "study", initial=initial, **options)
        self.bar.set_postfix(runs=f"{self.done}/{self.runs}")

    def finished(self, cfg: Dict[str, Any]) -> None:
        self.done += 1
        self.bar.update(cost_of(cfg), runs=f"{self.done}/{self.runs}")

    def __enter__(self) -> "QueueProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def run_folder(runs: str, method: str, seed: int) -> str:
    return os.path.join(runs, f"{method}-seed{seed}")


def scores_of(run_dir: str, benchmark: Benchmark) -> Dict[str, float]:
    """{subset: accuracy, retrieval_r1: mean of both directions' R@1} of a finished run, in [0, 1]."""
    folder = final_eval(run_dir)
    with open(os.path.join(folder, "sugarcrepe.json"), encoding="utf-8") as handle:
        sugarcrepe = json.load(handle)
    scores = {subset: float(sugarcrepe[subset]) for subset in benchmark.subsets}
    if benchmark.retrieval:
        with open(os.path.join(folder, "retrieval.json"), encoding="utf-8") as handle:
            retrieval = json.load(handle)
        scores[RETRIEVAL_KEY] = 0.5 * (retrieval["image_to_text_R@1"] + retrieval["text_to_image_R@1"])
    return scores


def text_only_of(run_dir: str, benchmark: Benchmark) -> Dict[str, float]:
    """{subset: accuracy without the image} of a finished run: each item's captions scored against the mean image
    embedding of its subset (compclip.evaluation.compositional.score_items). Far above chance means the subset can
    be solved from the captions alone."""
    with open(os.path.join(final_eval(run_dir), "sugarcrepe.details.json"), encoding="utf-8") as handle:
        text_only = json.load(handle)["details"]["text_only"]
    return {subset: float(text_only[subset]) for subset in benchmark.subsets}


def per_method(runs: str, methods: Sequence[str], seeds: int, benchmark: Benchmark,
               score=scores_of) -> Dict[str, List[Dict[str, float]]]:
    """{method: [scores of seed 0, 1, ...]} of finished runs."""
    return {m: [score(run_folder(runs, m, s), benchmark) for s in range(seeds)] for m in methods}


