"""The command line of the study (`python -m compclip.study`); see compclip.study for the protocol."""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from compclip.distributed import cpu_threads
from compclip.losses.modules import PUBLISHED_WEIGHTS
from compclip.plots import read_metrics
from compclip.runfolder import RunFolder
from compclip.study.protocol import METHODS, PROFILES
from compclip.study.report import aggregate, markdown, plot, text_only_markdown
from compclip.study.runs import finetune_config, per_method, pretrain, run_folder, run_queue, scores_of, text_only_of
from compclip.study.world import StudyError, builtin_benchmark, external_benchmark

log = logging.getLogger("compclip.study")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from compclip import study

    parser = argparse.ArgumentParser(prog="python -m compclip.study", description=study.__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See docs/study.md for the protocol and the relation experiments.")
    parser.add_argument("--train-manifest", help="manifest of the training world (JSONL, CSV or TSV rows of image, caption, "
                        "negatives, optional concepts; or WebDataset shards, e.g. train-{000..015}.tar); default: the "
                        "built-in synthetic world")
    parser.add_argument("--eval-sugarcrepe", help="folder of SugarCrepe-format <subset>.json evaluation files")
    parser.add_argument("--eval-image-root", help="folder the evaluation files' `filename`s are relative to")
    parser.add_argument("--retrieval", help="Karpathy-style retrieval JSON (image paths relative to its folder or "
                        "to --eval-image-root)")
    parser.add_argument("--retrieval-image-root", help="folder the retrieval file's image paths are relative to "
                        "(default: found next to the file or to --eval-image-root)")
    parser.add_argument("--seeds", type=int, help="fine-tuning seeds per method (default 3; 1 with --quick)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--out", default="study", help="output folder (default: ./study)")
    parser.add_argument("--quick", action="store_true", help="a tiny world and a few steps: tests the pipeline")
    parser.add_argument("--arch", help="open_clip architecture (default compclip-tiny-sincos)")
    parser.add_argument("--pretrained", default="", help="start every fine-tune from these weights (an open_clip "
                        "tag or a checkpoint file) instead of the bag-of-words pretraining stage")
    parser.add_argument("--jobs", type=int, default=0, help="runs in parallel (default: one per 1-thread CPU core, "
                        "at most 2)")
    parser.add_argument("--verbose", action="store_true", help="show each run's own log")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    if args.seeds is not None and args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | study | %(message)s", datefmt="%H:%M:%S")
    t0 = time.time()
    profile = PROFILES["quick" if args.quick else "default"]
    if args.arch:
        profile = replace(profile, arch=args.arch)
    seeds = args.seeds or profile.seeds
    methods = args.methods.split(",")
    out = os.path.abspath(args.out)
    runs = os.path.join(out, "runs")
    os.makedirs(runs, exist_ok=True)
    try:
        external = any((args.train_manifest, args.eval_sugarcrepe, args.eval_image_root, args.retrieval))
        world = external_benchmark(args) if external else builtin_benchmark(profile, os.path.join(out, "world"))
    except StudyError as error:
        raise SystemExit(f"python -m compclip.study: {error}")
    jobs = args.jobs or max(1, min(2, os.cpu_count() or 1))
    threads = cpu_threads(jobs)
    log.info("world %s; %d method(s) x %d seed(s), %d run(s) at a time", world.train_manifest, len(methods), seeds,
             jobs)

    start, start_scores = args.pretrained, None
    if not start:
        log.info("pretraining the bag-of-words CLIP (shuffled captions)")
        stage1 = pretrain(world, profile, runs, args.verbose)
        start, start_scores = str(RunFolder(Path(stage1)).latest_export()), scores_of(stage1, world)
        log.info("start %s: %s", start, json.dumps({k: round(v, 3) for k, v in start_scores.items()}))

    configs = [finetune_config(world, profile, m, s, start, threads, runs) for m in methods for s in range(seeds)]
    run_queue(configs, world, runs, jobs, args.verbose)
    steps = max(step for step, _ in read_metrics(run_folder(runs, methods[0], 0))["loss"])
    results = {
        "protocol": {"profile": "quick" if args.quick else "default", "arch": profile.arch,
                     "start": start_scores, "start_checkpoint": start,
                     "pretrain": None if args.pretrained else {**profile.pretrain, "method": "clip",
                                                                "caption_order": "shuffle"},
                     "finetune": profile.finetune, "finetune_steps": steps, "batch_size": profile.batch_size,
                     "num_negatives": profile.num_negatives, "seeds": seeds, "methods": methods,
                     "composite_terms": PUBLISHED_WEIGHTS["composite"] if "composite" in methods else None,
                     "world": world.describe(), "builtin_world": profile.world if not external else None,
                     "retrieval_r1": "mean of image→text and text→image R@1",
                     "seconds": round(time.time() - t0, 1)},
        "methods": aggregate(per_method(runs, methods, seeds, world)),
    }
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)
    text_only = aggregate(per_method(runs, methods, seeds, world, text_only_of))
    with open(os.path.join(out, "text_only.json"), "w", encoding="utf-8") as handle:
        json.dump(text_only, handle, indent=1)
    table = markdown(results) + "\n" + text_only_markdown(text_only, list(world.subsets))
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(table)
    plot(results, os.path.join(out, "results.png"))
    print(table)
    print(f"study: {len(configs)} fine-tune(s) in {time.time() - t0:.0f}s; {out}/results.json, results.md, "
          "results.png, text_only.json, runs/")
    return results
