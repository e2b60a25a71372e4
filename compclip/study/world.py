"""What a study trains and evaluates on (a `compclip.child_run.Benchmark`): the built-in synthetic world of its
profile, or an external one given by the flags `--train-manifest --eval-sugarcrepe --eval-image-root
[--retrieval]`, checked before anything runs (errors name the flag and the file, line and field).
"""
from __future__ import annotations

import os
from typing import Optional

from compclip.child_run import Benchmark
from compclip.study.protocol import Profile

NEGATIVE_CHECK_SAMPLES = 1000


class StudyError(ValueError):
    """Bad input to the study (the message names the flag or file)."""


def builtin_benchmark(profile: Profile, cache: str) -> Benchmark:
    """The profile's synthetic world, written (or reused) in a folder of `cache` named after its parameters."""
    from compclip.data.synthetic import FOLDER, generate_world, world_folder

    w = profile.world
    root = os.path.join(cache, world_folder(FOLDER, w["seed"], w["num_train"], w["num_val"], w["image_size"],
                                            w["max_objects"], w["one_phrasing"]))
    return Benchmark.synthetic(generate_world(root, **w))


def check_manifest(path: str) -> None:
    """The manifest (a JSONL/CSV/TSV file or a WebDataset shard pattern) exists, parses (the data layer's own
    checks, which name file:line and field), and has hard negatives: the methods that use them would otherwise
    silently train as CLIP. Reads the first NEGATIVE_CHECK_SAMPLES samples."""
    from compclip.data.survey import peek, source_files

    try:
        source_files(path)
        samples = list(peek(path, NEGATIVE_CHECK_SAMPLES))
    except (OSError, ValueError) as error:  # ManifestError is a ValueError
        raise StudyError(f"--train-manifest: {error}") from None
    if not samples:
        raise StudyError(f"--train-manifest {path}: no sample")
    if not any(sample.has_negatives for sample in samples):
        raise StudyError(f"--train-manifest {path}: no sample has a 'negatives' field, so NegCLIP, CE-CLIP and "
                         "DeGLA would train as CLIP; add rule-based hard negatives first: python -m "
                         f"compclip.data.prepare --input {path} --output <prepared>.jsonl")


def _retrieval_root(path: str, image_root: str, given: Optional[str] = None) -> str:
    """The folder the retrieval file's image paths resolve against: --retrieval-image-root when given, else the
    first of the file's folder, its parent, --eval-image-root and its parent that holds the first image."""
    from compclip.evaluation.retrieval import load_karpathy

    try:
        entries = load_karpathy(path)
    except Exception as error:  # noqa: BLE001 - the evaluation's own error names the file and entry
        raise StudyError(f"--retrieval {path}: {error}") from None
    here = os.path.dirname(os.path.abspath(path))
    candidates = [given] if given else [here, os.path.dirname(here), os.path.abspath(image_root),
                                        os.path.dirname(os.path.abspath(image_root))]
    for root in candidates:
        if os.path.exists(os.path.join(root, entries[0].path)):
            return root
    raise StudyError(f"--retrieval {path}: image {entries[0].path!r} (entry {entries[0].id}) is under none of "
                     f"{', '.join(candidates)}; pass the folder its paths are relative to as --retrieval-image-root")


def external_benchmark(args) -> Benchmark:
    """The Benchmark of the external-world flags (each checked)."""
    given = {"--train-manifest": args.train_manifest, "--eval-sugarcrepe": args.eval_sugarcrepe,
             "--eval-image-root": args.eval_image_root}
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise StudyError(f"an external world needs {', '.join(given)} together; missing {', '.join(missing)}")
    check_manifest(args.train_manifest)
    if not os.path.isdir(args.eval_sugarcrepe):
        raise StudyError(f"--eval-sugarcrepe: no such folder {args.eval_sugarcrepe}")
    retrieval_file = os.path.abspath(args.retrieval) if args.retrieval else None
    subsets = sorted(name[:-5] for name in os.listdir(args.eval_sugarcrepe) if name.endswith(".json")
                     and os.path.abspath(os.path.join(args.eval_sugarcrepe, name)) != retrieval_file)
    if not subsets:
        raise StudyError(f"--eval-sugarcrepe {args.eval_sugarcrepe}: no <subset>.json file")
    if not os.path.isdir(args.eval_image_root):
        raise StudyError(f"--eval-image-root: no such folder {args.eval_image_root}")
    retrieval_root = None
    if args.retrieval:
        if not os.path.isfile(args.retrieval):
            raise StudyError(f"--retrieval: no such file {args.retrieval}")
        retrieval_root = _retrieval_root(args.retrieval, args.eval_image_root, args.retrieval_image_root)
    return Benchmark("::".join(os.path.abspath(part) for part in args.train_manifest.split("::")),
                     os.path.abspath(args.eval_sugarcrepe), os.path.abspath(args.eval_image_root), tuple(subsets),
                     retrieval_file, retrieval_root)
