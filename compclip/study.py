"""The methods compared under one protocol: `python -m compclip.study` (docs/study.md).

    python -m compclip.study                       # the built-in world, 6 methods x 3 seeds
    python -m compclip.study --quick               # the same pipeline in minutes: a test of it, not of the numbers
    python -m compclip.study --train-manifest FILE.jsonl --eval-sugarcrepe DIR --eval-image-root DIR \\
        [--retrieval FILE] [--seeds N] [--methods a,b,...] [--out DIR]

The protocol is the papers': a "pretrained" CLIP that has learned the bag-of-words shortcut, then every method
fine-tuned from it with the same data, budget and seeds.

1. **Pretraining** (once per study; reused when its inputs are unchanged): CLIP InfoNCE on the training captions
   with their words in a random order (`data.caption_order=shuffle`). Word order then carries no information, so the
   text tower becomes order-blind: it sees which objects, attributes and relation words a caption has, not who is
   where. That is the bag-of-words behaviour Yuksekgonul et al. (ICLR 2023) measured in web-trained CLIP, where the
   retrieval objective rarely needs order; here it is reached on purpose, in the world's own vocabulary.
2. **Fine-tuning**: each method x seed from that checkpoint with ordered captions, the manifest's hard negatives and
   the same schedule, through `compclip/train.py` (one process per run; `--jobs` in parallel on CPU cores).
3. **Evaluation**: every SugarCrepe-format `<subset>.json` of the evaluation folder (binary choice between the
   caption and its negative) and, with a retrieval file, image<->text R@1 (the mean of both directions).

Outputs in `--out`: `results.json` (`{"protocol": {...}, "methods": {name: {subset: {"mean", "std", "runs"}}}}`,
accuracies in [0, 1]), `results.md`, `results.png`, `text_only.json` (the same choices made without the image:
every caption scored against the evaluation set's mean image embedding; a subset far above chance there can be
solved from its captions alone), and `runs/<run>/` (each run's folder: config, log, curves,
evaluation). Finished runs are kept: a study started again continues where it stopped.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence

import yaml

from compclip.config import _merge
from compclip.evaluation.loading import latest_checkpoint
from compclip.plots import read_metrics

log = logging.getLogger("compclip.study")

METHODS = ("clip", "negclip", "ceclip", "degla", "c2lip", "composite")
COMPOSITE_TERMS = {"negclip": 1.0, "igc": 0.1, "tgc": 0.1, "distill": 0.005, "npc": 1.0, "xac": 0.01}
"""The composite: DeGLA's objective plus C2LIP's concept terms (NPC, XAC) at their published weights."""
LABELS = {"clip": "CLIP", "negclip": "NegCLIP", "ceclip": "CE-CLIP", "degla": "DeGLA", "c2lip": "C2LIP",
          "composite": "DeGLA+NPC/XAC", "pretrained": "pretrained (start)"}
RETRIEVAL_KEY = "retrieval_r1"
COST = {"composite": 2.5, "degla": 2.4, "negclip": 2.0, "ceclip": 1.8, "c2lip": 1.3, "clip": 1.0}
"""Seconds per fine-tune relative to CLIP's, measured in the default study on 2 CPU cores (docs/study/
second-machine: CLIP 79 s, composite 197 s). Only the queue's order: the longest runs go first."""


BUILTIN_WORLD: Dict[str, Any] = {"seed": 0, "image_size": 64, "max_objects": 2, "one_phrasing": True}
"""The built-in world's variant (compclip.data.synthetic): 2-object scenes, each layout in one phrasing ("left of",
"above"). With converse phrasings as well no method learns relations here (docs/study.md, third round)."""


@dataclass
class Profile:
    """Everything the protocol fixes besides the data: the world (built-in only), the model and both stages."""

    world: Dict[str, int]
    pretrain: Dict[str, Any]
    finetune: Dict[str, Any]
    seeds: int
    arch: str = "compclip-tiny-sincos"
    batch_size: int = 32
    num_negatives: int = 4


PROFILES: Dict[str, Profile] = {
    "default": Profile(
        world=dict(BUILTIN_WORLD, num_train=10000, num_val=300),
        pretrain={"epochs": 1, "lr": 1e-3, "warmup_steps": 50},
        finetune={"epochs": 2, "lr": 2e-3, "warmup_steps": 20, "max_steps": 400},
        seeds=3),
    "quick": Profile(
        world=dict(BUILTIN_WORLD, num_train=384, num_val=64),
        pretrain={"epochs": 1, "lr": 1e-3, "warmup_steps": 2},
        finetune={"epochs": 1, "lr": 5e-4, "warmup_steps": 2, "max_steps": 4},
        seeds=1, batch_size=16),
}


class StudyError(ValueError):
    """Bad input to the study (the message names the flag or file)."""


# ----------------------------------------------------------------------------------------------------- the world


@dataclass
class World:
    train_manifest: str
    sugarcrepe: str
    image_root: str
    subsets: List[str]
    retrieval: Optional[str] = None
    retrieval_image_root: Optional[str] = None
    builtin: bool = False

    def describe(self) -> Dict[str, Any]:
        return {"train_manifest": self.train_manifest, "eval_sugarcrepe": self.sugarcrepe,
                "eval_image_root": self.image_root, "subsets": self.subsets, "retrieval": self.retrieval,
                "builtin": self.builtin}


def builtin_world(profile: Profile, cache: str) -> World:
    from compclip.data.synthetic import FOLDER, generate_world, variant_name

    w = profile.world
    root = os.path.join(cache, FOLDER.format(**w, variant=variant_name(w["max_objects"], w["one_phrasing"])))
    return synthetic_world(generate_world(root, **w))


def synthetic_world(paths: Dict[str, Any]) -> World:
    """The World of a generated synthetic world (compclip.data.synthetic.generate_world's paths)."""
    sugarcrepe = os.path.dirname(next(iter(paths["eval"].values())))
    return World(paths["train"], sugarcrepe, paths["eval_image_root"], sorted(paths["eval"]), paths["retrieval"],
                 paths["root"], builtin=True)


def _manifest_files(path: str) -> List[str]:
    """The files behind --train-manifest: the file itself, or a WebDataset shard pattern's shards
    (`train-{000..011}.tar`, `a.tar::b.tar`), each of which must exist."""
    from compclip.data.manifest import detect_format
    from compclip.data.shards import expand_urls

    try:
        files = expand_urls(path) if detect_format(path) == "wds" else [path]
    except ValueError as error:
        raise StudyError(f"--train-manifest: {error}") from None
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise StudyError(f"--train-manifest: no such file {missing[0]}"
                         + (f" (and {len(missing) - 1} more of the pattern's {len(files)})" if len(missing) > 1 else ""))
    return files


def _manifest_records(path: str, limit: int):
    """(where, has negatives) for the first `limit` samples of a manifest or shard pattern, through the data
    layer's own parsing (errors name file:line or shard:sample and the field)."""
    from compclip.data.manifest import _string_list, detect_format, iter_rows, make_record
    from compclip.data.shards import decode_fields, expand_urls, iter_tar_samples

    seen = 0
    if detect_format(path) == "wds":
        for url in expand_urls(path):
            for sample in iter_tar_samples(url):
                where = f"{url}:{sample['__key__']}"
                image, caption, fields = decode_fields(sample)
                if image is None or not caption:
                    raise ValueError(f"{where}: a sample needs an image member and a caption (json 'caption' "
                                     "or a .txt member)")
                try:  # the JSONL rows' own check (make_record)
                    negatives = _string_list(fields.get("negatives"), "negatives")
                except ValueError as error:
                    raise ValueError(f"{where}: {error}") from None
                yield where, bool(negatives)
                seen += 1
                if seen >= limit:
                    return
        return
    for number, row in iter_rows(path, detect_format(path)):
        record = make_record(row, f"{path}:{number}", os.path.dirname(os.path.abspath(path)))
        yield f"{path}:{number}", bool(record.negatives)
        seen += 1
        if seen >= limit:
            return


def _check_manifest(path: str) -> None:
    """The manifest (a JSONL/CSV/TSV file or a WebDataset shard pattern) exists, parses (the data layer's own
    checks, which name file:line and field), and has hard negatives: the methods that use them would otherwise
    silently train as CLIP. Reads the first 1000 samples."""
    from compclip.data.manifest import ManifestError

    _manifest_files(path)
    with_negatives = rows = 0
    try:
        for _, has_negatives in _manifest_records(path, 1000):
            rows += 1
            with_negatives += has_negatives
    except (ManifestError, ValueError, OSError) as error:
        raise StudyError(f"--train-manifest: {error}") from None
    if not rows:
        raise StudyError(f"--train-manifest {path}: no sample")
    if not with_negatives:
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


def external_world(args) -> World:
    given = {"--train-manifest": args.train_manifest, "--eval-sugarcrepe": args.eval_sugarcrepe,
             "--eval-image-root": args.eval_image_root}
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise StudyError(f"an external world needs {', '.join(given)} together; missing {', '.join(missing)}")
    _check_manifest(args.train_manifest)
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
    return World("::".join(os.path.abspath(part) for part in args.train_manifest.split("::")),
                 os.path.abspath(args.eval_sugarcrepe),
                 os.path.abspath(args.eval_image_root), subsets,
                 os.path.abspath(args.retrieval) if args.retrieval else None, retrieval_root)


# ------------------------------------------------------------------------------------------------------ the runs


def _common(world: World, profile: Profile, stage: Dict[str, Any], threads: int) -> Dict[str, Any]:
    optim = {"lr": stage["lr"], "weight_decay": 0.1, "warmup_steps": stage["warmup_steps"],
             "epochs": stage["epochs"], "max_steps": stage.get("max_steps", 0), "grad_clip": 1.0}
    evaluation = {"sugarcrepe": world.sugarcrepe, "sugarcrepe_image_root": world.image_root,
                  "sugarcrepe_subsets": list(world.subsets), "precision": "fp32", "progress": False}
    if world.retrieval:
        evaluation.update(retrieval=world.retrieval, retrieval_image_root=world.retrieval_image_root)
    return {"model": {"arch": profile.arch, "pretrained": ""},
            "data": {"train_manifest": world.train_manifest, "batch_size": profile.batch_size,
                     "num_negatives": profile.num_negatives},
            "optim": optim, "eval": evaluation, "eval_synthetic": False, "threads": threads,
            "log": {"progress": False, "save_deepspeed": False, "keep_exports": 1, "every_n_steps": 10}}


def pretrain_config(world: World, profile: Profile, threads: int, runs: str) -> Dict[str, Any]:
    cfg = _common(world, profile, profile.pretrain, threads)
    return _merge(cfg, {"loss": {"method": "clip"}, "data": {"caption_order": "shuffle"}, "seed": 0,
                        "eval_before": False, "log": {"logs": runs, "name": "pretrain"}})


def finetune_config(world: World, profile: Profile, method: str, seed: int, start: str, threads: int,
                    runs: str) -> Dict[str, Any]:
    cfg = _common(world, profile, profile.finetune, threads)
    loss: Dict[str, Any] = {"method": method}
    if method == "composite":
        loss["terms"] = dict(COMPOSITE_TERMS)
    return _merge(cfg, {"model": {"pretrained": start}, "loss": loss, "seed": seed, "eval_before": False,
                        "log": {"logs": runs, "name": f"{method}-seed{seed}"}})


BOW_TAG = "synthetic-bow"
"""`model.pretrained: synthetic-bow[:EPOCHS]`: start from the bag-of-words CLIP of the synthetic world the run trains
on (stage 1 of the study, `bow_pretrained`; EPOCHS overrides its length). The embedded default is such a
fine-tune."""


def parse_bow_tag(pretrained: str) -> Optional[int]:
    """None when `pretrained` is not the bag-of-words tag; else its epoch count (0 = the study's). ValueError on
    a bad count."""
    tag, colon, epochs = pretrained.partition(":")
    if tag != BOW_TAG:
        return None
    if not colon:
        return 0
    if not epochs.isdigit() or int(epochs) < 1:
        raise ValueError(f"model.pretrained={pretrained!r}: write {BOW_TAG} or {BOW_TAG}:EPOCHS with EPOCHS >= 1")
    return int(epochs)


def bow_pretrained(paths: Dict[str, Any], arch: str, batch_size: int, num_negatives: int, epochs: int = 0) -> str:
    """The checkpoint behind `model.pretrained: synthetic-bow[:EPOCHS]` for the synthetic world at `paths`.

    It is the study's stage 1 (`pretrain_config` with the default profile's schedule, `epochs` long if given) for
    this architecture and batch size. It is trained once, by a child `compclip.train` run in
    `<world>/pretrained/`, and reused after that on the study's rule (same config, same manifest). A file lock
    makes one process train it while the others (the other ranks, a concurrent run) wait and then reuse it."""
    import fcntl

    world = synthetic_world(paths)
    stage = dict(PROFILES["default"].pretrain, **({"epochs": epochs} if epochs else {}))
    profile = replace(PROFILES["default"], arch=arch, batch_size=batch_size, num_negatives=num_negatives,
                      pretrain=stage)
    runs = os.path.join(paths["root"], "pretrained")
    os.makedirs(runs, exist_ok=True)
    cfg = pretrain_config(world, profile, max(1, os.cpu_count() or 1), runs)
    cfg["log"]["name"] = f"bow-{arch}-b{batch_size}-e{stage['epochs']}".replace("/", "_")
    with open(os.path.join(runs, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return latest_checkpoint(run_one(cfg, world, runs, verbose=True))


def _fingerprint(cfg: Dict[str, Any], world: World) -> str:
    """What a finished run depends on: its config (less the thread count, which changes the speed, not the run)
    and the training manifest's (or its shards') size and modification time."""
    stats = [os.stat(f) for f in _manifest_files(world.train_manifest)]
    cfg = {key: value for key, value in cfg.items() if key != "threads"}
    manifest = [[stat.st_size, int(stat.st_mtime)] for stat in stats]
    # one file keeps the key it had before shard patterns were accepted, so finished runs stay reusable
    blob = json.dumps({"cfg": cfg, "manifest": manifest[0] if len(manifest) == 1 else manifest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _final_eval(run_dir: str) -> str:
    """The evaluation folder of a finished run's last evaluation (recorded in its study_done.json)."""
    with open(os.path.join(run_dir, "study_done.json"), encoding="utf-8") as handle:
        return json.load(handle)["eval"]


def run_one(cfg: Dict[str, Any], world: World, runs: str, verbose: bool) -> str:
    """Run compclip/train.py on `cfg` in a child process (reused when finished with the same inputs); returns
    the run folder."""
    name = cfg["log"]["name"]
    run_dir = os.path.join(runs, name)
    key = _fingerprint(cfg, world)
    done = os.path.join(run_dir, "study_done.json")
    if os.path.exists(done):
        with open(done, encoding="utf-8") as handle:
            if json.load(handle).get("key") == key:
                log.info("%s: finished before, reused", name)
                return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)  # a changed or interrupted run starts over (runs are minutes long)
    os.makedirs(runs, exist_ok=True)
    config_file = os.path.join(runs, f"{name}.yaml")
    with open(config_file, "w", encoding="utf-8") as handle:
        yaml.safe_dump(cfg, handle, sort_keys=False)
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), PYTHONUNBUFFERED="1")
    for variable in ("RANK", "MASTER_PORT"):  # without RANK the child sets itself up as a world of one, and
        env.pop(variable, None)  # without MASTER_PORT on a free port of its own (engine.single_process_environment)
    command = [sys.executable, "-m", "compclip.train", "--config", config_file]
    t0 = time.time()
    result = subprocess.run(command, env=env, stdout=None if verbose else subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        tail = (result.stdout or "")[-3000:]
        raise RuntimeError(f"run {name} failed (exit {result.returncode}); config {config_file}, log "
                           f"{os.path.join(run_dir, 'out.log')}\n{tail}")
    evals = [os.path.join(run_dir, "eval", f) for f in os.listdir(os.path.join(run_dir, "eval")) if f != "before"]
    if not evals:
        raise RuntimeError(f"run {name} finished without a final evaluation ({run_dir}/eval)")
    with open(done, "w", encoding="utf-8") as handle:  # the last evaluation: epoch_N, or step_N with max_steps
        json.dump({"key": key, "eval": max(evals, key=os.path.getmtime),
                   "seconds": round(time.time() - t0, 1)}, handle)
    log.info("%s: %.0fs", name, time.time() - t0)
    return run_dir


def scores_of(run_dir: str, world: World) -> Dict[str, float]:
    """{subset: accuracy, retrieval_r1: mean of both directions' R@1} of a finished run, in [0, 1]."""
    folder = _final_eval(run_dir)
    with open(os.path.join(folder, "sugarcrepe.json"), encoding="utf-8") as handle:
        sugarcrepe = json.load(handle)
    scores = {subset: float(sugarcrepe[subset]) for subset in world.subsets}
    if world.retrieval:
        with open(os.path.join(folder, "retrieval.json"), encoding="utf-8") as handle:
            retrieval = json.load(handle)
        scores[RETRIEVAL_KEY] = 0.5 * (retrieval["image_to_text_R@1"] + retrieval["text_to_image_R@1"])
    return scores


def text_only_of(run_dir: str, world: World) -> Dict[str, float]:
    """{subset: accuracy without the image} of a finished run: each item's captions scored against the mean image
    embedding of its subset (compclip.evaluation.compositional.score_items). Far above chance means the subset can
    be solved from the captions alone."""
    with open(os.path.join(_final_eval(run_dir), "sugarcrepe.details.json"), encoding="utf-8") as handle:
        text_only = json.load(handle)["details"]["text_only"]
    return {subset: float(text_only[subset]) for subset in world.subsets}


# ------------------------------------------------------------------------------------------------------ results


def aggregate(runs: Dict[str, List[Dict[str, float]]]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """{method: {subset: {mean, std (sample, ddof=1; 0 for one run), runs}}}."""
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for method, per_seed in runs.items():
        out[method] = {}
        for subset in per_seed[0]:
            values = [run[subset] for run in per_seed]
            mean, std = _mean_std(values)
            out[method][subset] = {"mean": mean, "std": std, "runs": values}
    return out


def _mean_std(values: Sequence[float]) -> tuple:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def swap_subsets(subsets: Sequence[str]) -> List[str]:
    """The subsets whose negatives exchange two parts of the caption (SugarCrepe's swap_*, the world's *_swap)."""
    return [s for s in subsets if "swap" in s]


def markdown(results: Dict[str, Any]) -> str:
    methods, protocol = results["methods"], results["protocol"]
    subsets = protocol["world"]["subsets"]
    swaps = swap_subsets(subsets)
    columns = list(subsets) + (["swap mean"] if swaps else []) + ([RETRIEVAL_KEY] if protocol["world"]["retrieval"]
                                                                   else [])
    header = "| method | " + " | ".join(c.replace("_", " ") for c in columns) + " |"
    lines = [f"Accuracy (%) on each evaluation set and retrieval R@1 (%, mean of image→text and text→image), "
             f"mean ± std over {protocol['seeds']} seed(s); every method fine-tuned from the same bag-of-words "
             f"pretrained CLIP ({protocol['finetune_steps']} steps, batch {protocol['batch_size']}, "
             f"K = {protocol['num_negatives']}).", "", header, "|" + "---|" * (len(columns) + 1)]
    start = protocol.get("start") or {}
    if start:
        cells = [f"{100 * start[c]:.1f}" if c in start else "" for c in columns if c != "swap mean"]
        if swaps:
            cells.insert(len(subsets), f"{100 * sum(start[s] for s in swaps) / len(swaps):.1f}")
        lines.append(f"| {LABELS['pretrained']} | " + " | ".join(cells) + " |")
    for method, scores in methods.items():
        cells = [f"{100 * scores[s]['mean']:.1f} ± {100 * scores[s]['std']:.1f}" for s in subsets]
        if swaps:
            mean, std = swap_mean(scores, swaps)
            cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}")
        if RETRIEVAL_KEY in scores:
            cells.append(f"{100 * scores[RETRIEVAL_KEY]['mean']:.1f} ± {100 * scores[RETRIEVAL_KEY]['std']:.1f}")
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def text_only_markdown(text_only: Dict[str, Dict[str, Dict[str, Any]]], subsets: Sequence[str]) -> str:
    """The text-only table: the same choices made against the mean image embedding instead of the item's image."""
    lines = ["Text-only accuracy (%): each model's choice between caption and negative scored against the mean "
             "image embedding of the evaluation set instead of the item's own image. Near 50 % is what a subset "
             "should give; far above, its negatives can be told from the captions alone.", "",
             "| method | " + " | ".join(s.replace("_", " ") for s in subsets) + " |", "|" + "---|" * (len(subsets) + 1)]
    for method, scores in text_only.items():
        cells = [f"{100 * scores[s]['mean']:.1f} ± {100 * scores[s]['std']:.1f}" for s in subsets]
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def swap_mean(scores: Dict[str, Dict[str, Any]], swaps: Sequence[str]) -> tuple:
    """Mean over the swap subsets per seed, then mean and std over seeds."""
    per_seed = [statistics.fmean(values) for values in zip(*(scores[s]["runs"] for s in swaps))]
    return _mean_std(per_seed)


def plot(results: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    keys = list(results["protocol"]["world"]["subsets"]) + ([RETRIEVAL_KEY] if results["protocol"]["world"]
                                                            ["retrieval"] else [])
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(7, 1.4 * len(keys) + 2), 4.2))
    for i, (method, scores) in enumerate(methods.items()):
        xs = [k + (i - (len(methods) - 1) / 2) * width for k in range(len(keys))]
        ax.bar(xs, [100 * scores[k]["mean"] for k in keys], width, yerr=[100 * scores[k]["std"] for k in keys],
               label=LABELS.get(method, method), capsize=2)
    start = results["protocol"].get("start") or {}
    for k, key in enumerate(keys):
        if key in start:
            ax.hlines(100 * start[key], k - 0.42, k + 0.42, colors="black", linestyles="dashed", linewidth=1)
    ax.axhline(50, color="grey", linewidth=0.6)
    ax.set_xticks(range(len(keys)), [k.replace("_", "\n") for k in keys])
    ax.set_ylabel("accuracy / R@1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title("methods fine-tuned from one bag-of-words CLIP (dashed: the start)")
    ax.legend(fontsize=8, ncol=3, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m compclip.study", description=__doc__.split("\n\n")[0],
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
        world = external_world(args) if external else builtin_world(profile, os.path.join(out, "world"))
    except StudyError as error:
        raise SystemExit(f"python -m compclip.study: {error}")
    jobs = args.jobs or max(1, min(2, os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    log.info("world %s; %d method(s) x %d seed(s), %d run(s) at a time", world.train_manifest, len(methods), seeds,
             jobs)

    start, start_scores = args.pretrained, None
    if not start:
        log.info("pretraining the bag-of-words CLIP (shuffled captions)")
        pretrain = run_one(pretrain_config(world, profile, max(1, os.cpu_count() or 1), runs), world, runs,
                           args.verbose)
        start, start_scores = latest_checkpoint(pretrain), scores_of(pretrain, world)
        log.info("start %s: %s", start, json.dumps({k: round(v, 3) for k, v in start_scores.items()}))

    # the costliest methods first, so that the last runs of the queue are short and no core idles at the end
    order = sorted(methods, key=lambda m: -COST.get(m, 1.0))
    configs = [finetune_config(world, profile, m, s, start, threads, runs) for m in order for s in range(seeds)]
    from tqdm import tqdm

    bar = tqdm(total=len(configs), desc="study runs", unit="run", disable=not sys.stderr.isatty())
    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(run_one, cfg, world, runs, args.verbose) for cfg in configs]
        for future in futures:
            future.result()
            bar.update()
    bar.close()
    per_method = {m: [scores_of(os.path.join(runs, f"{m}-seed{s}"), world) for s in range(seeds)] for m in methods}
    steps = max(step for step, _ in read_metrics(os.path.join(runs, f"{methods[0]}-seed0"))["loss"])
    results = {
        "protocol": {"profile": "quick" if args.quick else "default", "arch": profile.arch,
                     "start": start_scores, "start_checkpoint": start,
                     "pretrain": None if args.pretrained else {**profile.pretrain, "method": "clip",
                                                                "caption_order": "shuffle"},
                     "finetune": profile.finetune, "finetune_steps": steps, "batch_size": profile.batch_size,
                     "num_negatives": profile.num_negatives, "seeds": seeds, "methods": methods,
                     "composite_terms": COMPOSITE_TERMS if "composite" in methods else None,
                     "world": world.describe(), "builtin_world": profile.world if not external else None,
                     "retrieval_r1": "mean of image→text and text→image R@1",
                     "seconds": round(time.time() - t0, 1)},
        "methods": aggregate(per_method),
    }
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)
    text_only = aggregate({m: [text_only_of(os.path.join(runs, f"{m}-seed{s}"), world) for s in range(seeds)]
                           for m in methods})
    with open(os.path.join(out, "text_only.json"), "w", encoding="utf-8") as handle:
        json.dump(text_only, handle, indent=1)
    table = markdown(results) + "\n" + text_only_markdown(text_only, world.subsets)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(table)
    plot(results, os.path.join(out, "results.png"))
    print(table)
    print(f"study: {len(configs)} fine-tune(s) in {time.time() - t0:.0f}s; {out}/results.json, results.md, "
          "results.png, text_only.json, runs/")
    return results


if __name__ == "__main__":
    main()
