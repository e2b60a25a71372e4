"""The study's runs: stage 1 once, then every method x seed fine-tuned from its export, each a child run
(compclip.child_run: reused when finished with the same inputs), two at a time on the CPU's cores; and what each
finished run scored.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from compclip.bow import pretrain_config
from compclip.child_run import Benchmark, final_eval, finished, run_child, stage_config
from compclip.losses.modules import PUBLISHED_WEIGHTS
from compclip.progress import Progress
from compclip.study.protocol import COST, Profile

log = logging.getLogger("compclip.study")

RETRIEVAL_KEY = "retrieval_r1"
CURVE_SUBSETS = ("relation_swap", "val_relation_swap")
"""What the learning curves follow (the periodic evaluation of `eval.every_n_steps`)."""


def pretrain(benchmark: Benchmark, profile: Profile, runs: str, verbose: bool, name: str = "pretrain") -> str:
    """Stage 1 (compclip.bow.pretrain_config) in `<runs>/<name>`, on every core; returns its run folder."""
    cfg = pretrain_config(benchmark, profile.arch, profile.batch_size, profile.num_negatives, profile.pretrain,
                          max(1, os.cpu_count() or 1), runs, name)
    return run_child(cfg, benchmark, runs, verbose)


def finetune_config(benchmark: Benchmark, profile: Profile, method: str, seed: int, start: str, threads: int,
                    runs: str, name: Optional[str] = None, loss: Optional[Dict[str, Any]] = None,
                    finetune: Optional[Dict[str, Any]] = None, arch: Optional[str] = None,
                    num_negatives: Optional[int] = None) -> Dict[str, Any]:
    """Stage 2 of one method and seed, from the checkpoint `start`, in `<runs>/<name>` (default
    `<method>-seed<seed>`). `loss` replaces the method's loss section (an ablation's terms and options),
    `finetune` the profile's schedule (a learning-rate sweep), `arch` its architecture, `num_negatives` its K (a
    manifest with a negative type left out). With the profile's `curve_every`, the relation swap is scored every
    that many steps (learning curves)."""
    cfg = stage_config(benchmark, arch or profile.arch, profile.batch_size, num_negatives or profile.num_negatives,
                       finetune or profile.finetune, threads)
    if loss is None:
        loss = {"method": method}
        if method == "composite":  # written out, so the run's config.yaml names its terms
            loss["terms"] = dict(PUBLISHED_WEIGHTS["composite"])
    cfg["model"]["pretrained"] = start
    cfg.update(loss=loss, seed=seed, eval_before=False)
    curve = [subset for subset in CURVE_SUBSETS if subset in benchmark.subsets]
    if profile.curve_every and curve:
        cfg["eval"].update(every_n_steps=profile.curve_every, curve_subsets=curve)
    cfg["log"].update(logs=runs, name=name or run_name(method, seed))
    return cfg


def run_queue(configs: List[Dict[str, Any]], benchmark, runs: str, jobs: int, verbose: bool) -> None:
    """Every config as a child run, `jobs` at a time, the costliest methods first (so that the last runs of the
    queue are short and no core idles at the end), with the queue's progress and ETA (`QueueProgress`). A failed
    run or an interrupt (Ctrl-C) stops the queue: the runs not yet started never start, the finished ones are
    reused when the study is run again. `benchmark`: one Benchmark for all, or one per config (what its reuse key
    reads the training manifest from)."""
    benchmarks = benchmark if isinstance(benchmark, list) else [benchmark] * len(configs)
    order = sorted(range(len(configs)), key=lambda i: cost_of(configs[i]), reverse=True)
    configs, benchmarks = [configs[i] for i in order], [benchmarks[i] for i in order]
    reused = [finished(cfg, bench, runs) for cfg, bench in zip(configs, benchmarks)]
    with QueueProgress(configs, reused) as progress, ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(run_child, cfg, bench, runs, verbose): cfg
                   for cfg, bench, old in zip(configs, benchmarks, reused) if not old}
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


def run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def run_folder(runs: str, method: str, seed: int) -> str:
    return os.path.join(runs, run_name(method, seed))


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


def outcomes_of(run_dir: str, subsets: Sequence[str]) -> Dict[str, Tuple[List[str], np.ndarray]]:
    """{subset: (item ids, 0/1 outcome per item)} of a finished run's last evaluation (for paired statistics)."""
    with open(os.path.join(final_eval(run_dir), "sugarcrepe.details.json"), encoding="utf-8") as handle:
        items = json.load(handle)["details"]["items"]
    return {subset: (items[subset]["ids"], np.frombuffer(items[subset]["correct"].encode(), dtype=np.uint8) - 48)
            for subset in subsets}


RETRIEVAL_DIRECTIONS = ("image_to_text", "text_to_image")


def retrieval_hits_of(run_dir: str) -> Optional[Dict[str, np.ndarray]]:
    """{direction: 0/1 R@1 hit per query} of a finished run's last evaluation (images for image→text, captions for
    text→image, in file order), or None when that evaluation kept no per-query ranks (runs evaluated before it did,
    or without a retrieval file)."""
    path = os.path.join(final_eval(run_dir), "retrieval.details.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        ranks = json.load(handle)["details"].get("ranks")
    if ranks is None:
        return None
    return {direction: (np.asarray(ranks[direction]) < 1).astype(np.uint8) for direction in RETRIEVAL_DIRECTIONS}


def curve_of(run_dir: str, subset: str) -> List[Tuple[int, float]]:
    """[(step, accuracy)] of `subset` over a finished run: the periodic evaluations and the final one."""
    from compclip.plots import read_metrics

    return sorted(read_metrics(run_dir).get(f"eval/sugarcrepe/{subset}", []))
