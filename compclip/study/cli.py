"""The command line of the study (`python -m compclip.study`); see compclip.study for the protocol."""
from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import replace
from typing import Any, Dict, Optional, Sequence

from compclip.distributed import cpu_threads
from compclip.study.experiments import PARTS, Study, run_main
from compclip.study.protocol import DEFAULT_METHODS, DOSES, EXPERIMENTS, METHODS, PROFILES
from compclip.study.world import StudyError, external_benchmark

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
    parser.add_argument("--seeds", type=int, help="fine-tuning seeds per method (default 3; 5 with --full; 1 with "
                        "--quick)")
    parser.add_argument("--methods", help=f"comma-separated, from {', '.join(METHODS)} (default: all; on the "
                        "built-in world all but composite, unless --full)")
    parser.add_argument("--out", default="study", help="output folder (default: ./study)")
    parser.add_argument("--quick", action="store_true", help="a tiny world and a few steps: tests the pipeline")
    parser.add_argument("--full", action="store_true", help="the whole study: 5 seeds, 2 world seeds, the lr sweep "
                        "on validation, the converse dose-response, the mechanism, C2LIP as published, retention "
                        "(hours; run it by --experiments and --methods, finished runs are reused)")
    parser.add_argument("--experiments", help=f"parts of a built-in-world study, from {', '.join(EXPERIMENTS)} "
                        "(default: main; all with --full); see compclip.study.experiments")
    parser.add_argument("--converse-fraction", type=float, default=None,
                        help="the built-in world's share of converse phrasings, in [0, 1] (default 0)")
    parser.add_argument("--doses", help="the converse fractions of the dose part, comma-separated (default "
                        f"{','.join(f'{d:g}' for d in DOSES)})")
    parser.add_argument("--world-seed", type=int, help="draw the built-in world from this seed (default 0; --full: "
                        "0 and 1)")
    parser.add_argument("--arch", help="open_clip architecture (default compclip-tiny-sincos)")
    parser.add_argument("--pretrained", default="", help="start every fine-tune from these weights (an open_clip "
                        "tag or a checkpoint file) instead of the bag-of-words pretraining stage")
    parser.add_argument("--jobs", type=int, default=0, help="runs in parallel (default: one per 1-thread CPU core, "
                        "at most 2)")
    parser.add_argument("--verbose", action="store_true", help="show each run's own log")
    args = parser.parse_args(argv)
    external = any((args.train_manifest, args.eval_sugarcrepe, args.eval_image_root, args.retrieval))
    if args.methods is None:
        args.methods = ",".join(METHODS if args.full or external else DEFAULT_METHODS)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    if args.seeds is not None and args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.quick and args.full:
        parser.error("--quick and --full exclude each other")
    wrong = [e for e in (args.experiments or "").split(",") if e and e not in EXPERIMENTS]
    if wrong:
        parser.error(f"--experiments: unknown {', '.join(wrong)} (choose from {', '.join(EXPERIMENTS)})")
    if args.converse_fraction is not None and not 0.0 <= args.converse_fraction <= 1.0:
        parser.error(f"--converse-fraction must be in [0, 1], not {args.converse_fraction}")
    built_in_only = {"--experiments": args.experiments, "--converse-fraction": args.converse_fraction,
                     "--world-seed": args.world_seed, "--doses": args.doses}
    try:
        args.doses = tuple(float(d) for d in args.doses.split(",")) if args.doses else None
    except ValueError:
        parser.error(f"--doses: expected numbers, got {args.doses!r}")
    if args.doses and not all(0.0 <= d <= 1.0 for d in args.doses):
        parser.error("--doses must be in [0, 1]")
    given = [flag for flag, value in built_in_only.items() if value is not None]
    if external and given:
        parser.error(f"{', '.join(given)}: only for the built-in world (an external world brings its own splits)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | study | %(message)s", datefmt="%H:%M:%S")
    t0 = time.time()
    profile = PROFILES["quick" if args.quick else "full" if args.full else "default"]
    if args.arch:
        profile = replace(profile, arch=args.arch)
    if args.world_seed is not None:
        profile = replace(profile, world_seeds=(args.world_seed,))
    out = os.path.abspath(args.out)
    jobs = args.jobs or max(1, min(2, os.cpu_count() or 1))
    converse = profile.world["converse_fraction"] if args.converse_fraction is None else args.converse_fraction
    study = Study(profile, args.methods.split(","), args.seeds or profile.seeds, out, jobs, cpu_threads(jobs),
                  args.verbose, converse, args.pretrained, args.doses or DOSES)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    try:
        external = any((args.train_manifest, args.eval_sugarcrepe, args.eval_image_root, args.retrieval))
        if external:
            benchmark = external_benchmark(args)
            log.info("world %s; %d method(s) x %d seed(s), %d run(s) at a time", benchmark.train_manifest,
                     len(study.methods), study.seeds, jobs)
            results = run_main(study, benchmark)
        else:
            parts = args.experiments.split(",") if args.experiments else list(profile.experiments)
            results = {}
            for part in [name for name in EXPERIMENTS if name in parts]:
                log.info("part %s: %d method(s) x %d seed(s), %d run(s) at a time", part, len(study.methods),
                         study.seeds, jobs)
                results[part] = PARTS[part](study)
            if parts == ["main"]:
                results = results["main"][profile.world_seeds[0]]
    except StudyError as error:
        raise SystemExit(f"python -m compclip.study: {error}")
    print(f"study: {time.time() - t0:.0f}s; results in {out} (results.md, and each part's folder)")
    return results
