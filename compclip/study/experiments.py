"""The parts of a study (`--experiments`; `--full` runs them all, in this order):

- `lr`: every method at each learning rate of the profile on seed 0, scored on the **validation** sets; each
  method's best (by validation swap mean) is its learning rate (`lr/choice.json`) in `main` and in every part
  after it (`tuned`), except C2LIP's 2 x 2 on its own tower, which keeps the schedule's.
- `main`: every method x seed on the built-in world of each world seed, from one bag-of-words start per world;
  `results.{json,md,png}` (the first world seed), `world<seed>/results.*` (the others) and `worlds.md` (every
  world seed side by side).
- `dose`: the same world at each converse fraction of DOSES (converse phrasings as a dose), every method x seed;
  `dose/results.{json,md}` and `dose/dose.png` (relation swap and steps to 70 % against the dose).
- `mechanism`: in the world with the most converse phrasings, CLIP and the first hard-negative method of
  `--methods` in the registry's order (NegCLIP in `--full`; CE-CLIP with `--methods clip,ceclip`) from the plain
  bag-of-words start, from a start whose text tower first learned a supervised relation probe
  (compclip.study.mechanism), and the hard-negative method from a control start (the same text training without
  the probe); `mechanism/results.md`.
- `c2lip`: C2LIP as published (the SigLIP-style tower `compclip-tiny-sincos-bias`, learned logit bias, SigLIP
  as its contrastive term) in the 2 x 2 of NPC's labels {owner, same phrase} x {with, without the logit bias in
  NPC and XAC}, an NPC weight sweep, CLIP on the same tower, and the hard-negative methods trained without
  relation-swap negatives (leave one negative type out); `c2lip/results.md`.
- `retention`: a bag-of-words start on the union of the built-in world (A) and the default 2-3-object world (B,
  other scenes and both phrasings), every method fine-tuned on A, scored on B before and after (DeGLA's claim
  of keeping general ability); `retention/results.md`.

Every run is a child run, reused when finished with the same inputs, so each part can run in its own invocation.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from compclip.child_run import Benchmark
from compclip.runfolder import RunFolder
from compclip.study.protocol import DOSES, Profile
from compclip.study.report import analyse, markdown, plot, swap_subsets, text_only_markdown
from compclip.study.runs import finetune_config, pretrain, run_queue, scores_of, text_only_of
from compclip.study.world import VAL_PREFIX, builtin_benchmark

log = logging.getLogger("compclip.study")


@dataclass
class Study:
    """What every part shares: the profile, the command line's choices and where things go."""

    profile: Profile
    methods: List[str]
    seeds: int
    out: str
    jobs: int
    threads: int
    verbose: bool
    converse_fraction: float
    pretrained: str = ""
    doses: Tuple[float, ...] = DOSES

    def world(self, seed: int = 0, **changes) -> Dict[str, Any]:
        return {**self.profile.world, "seed": seed, "converse_fraction": self.converse_fraction, **changes}

    def benchmark(self, world: Dict[str, Any]) -> Benchmark:
        return builtin_benchmark(world, os.path.join(self.out, "world"))


@dataclass
class Spec:
    """One fine-tune: its run name, method and seed, and what it changes from the profile."""

    name: str
    method: str
    seed: int
    loss: Optional[Dict[str, Any]] = None
    finetune: Optional[Dict[str, Any]] = None
    arch: Optional[str] = None
    benchmark: Optional[Benchmark] = None
    num_negatives: Optional[int] = None


def start_of(study: Study, benchmark: Benchmark, runs: str, arch: Optional[str] = None,
             name: str = "pretrain") -> Tuple[str, Dict[str, float]]:
    """(checkpoint, its scores): the bag-of-words start on `benchmark` in `<runs>/<name>`, or `--pretrained`."""
    if study.pretrained:
        return study.pretrained, {}
    profile = replace(study.profile, arch=arch) if arch else study.profile
    stage1 = pretrain(benchmark, profile, runs, study.verbose, name)
    return str(RunFolder(Path(stage1)).latest_export()), scores_of(stage1, benchmark)


def fine_tune(study: Study, benchmark: Benchmark, runs: str, start: str, specs: Sequence[Spec]) -> Dict[str, str]:
    """Every spec from `start` (reused when finished); {name: run folder}."""
    configs = [finetune_config(spec.benchmark or benchmark, study.profile, spec.method, spec.seed, start,
                               study.threads, runs, spec.name, spec.loss, spec.finetune, spec.arch,
                               spec.num_negatives)
               for spec in specs]
    run_queue(configs, [spec.benchmark or benchmark for spec in specs], runs, study.jobs, study.verbose)
    return {spec.name: os.path.join(runs, spec.name) for spec in specs}


def grid(methods: Sequence[str], seeds: int, **fields) -> List[Spec]:
    return [Spec(f"{m}-seed{s}", m, s, **fields) for m in methods for s in range(seeds)]


def protocol(study: Study, benchmark: Benchmark, start: str, start_scores: Dict[str, float], folders, **extra):
    from compclip.plots import read_metrics

    first = next(iter(folders.values()))[0]
    return {"profile": _plain(study.profile), "arch": extra.pop("arch", study.profile.arch), "start": start_scores,
            "start_checkpoint": start, "finetune": study.profile.finetune,
            "finetune_steps": max(step for step, _ in read_metrics(first)["loss"]),
            "batch_size": study.profile.batch_size, "num_negatives": study.profile.num_negatives,
            "seeds": len(next(iter(folders.values()))), "methods": list(folders),
            "world": benchmark.describe(), **extra}


def write_results(folder: str, results: Dict[str, Any], benchmark: Benchmark, title: str = "",
                  text_only: Optional[Dict[str, Any]] = None) -> str:
    """results.json, results.md (with the text-only table when given, and text_only.json) and results.png in
    `folder` (write_part, then the plot); returns the markdown."""
    tables: List[str] = []

    def render(plain: Dict[str, Any]) -> str:
        tables.append(markdown(plain, title) + ("" if text_only is None else
                                                "\n" + text_only_markdown(text_only, list(benchmark.subsets))))
        return tables[0]

    results = write_part(folder, results, render)
    if text_only is not None:
        with open(os.path.join(folder, "text_only.json"), "w", encoding="utf-8") as handle:
            json.dump(text_only, handle, indent=1)
    plot(results, os.path.join(folder, "results.png"))
    return tables[0]


def write_part(folder: str, results: Dict[str, Any], table: Callable[[Dict[str, Any]], str]) -> Dict[str, Any]:
    """A part's results.json and results.md (`table` writes the markdown) in `folder`; returns `results`."""
    os.makedirs(folder, exist_ok=True)
    results = json.loads(json.dumps(results, default=_plain))
    with open(os.path.join(folder, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)
    with open(os.path.join(folder, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(table(results))
    return results


def _plain(value):
    if hasattr(value, "__dataclass_fields__"):
        return {key: getattr(value, key) for key in value.__dataclass_fields__}
    raise TypeError(f"{type(value).__name__} is not JSON")


def _by_method(folders: Dict[str, str], specs: Sequence[Spec], key: Callable[[Spec], str] = lambda s: s.method):
    out: Dict[str, List[str]] = {}
    for spec in specs:
        out.setdefault(key(spec), []).append(folders[spec.name])
    return out


# ------------------------------------------------------------------------------------------------------- parts


def run_lr(study: Study) -> Dict[str, Any]:
    """Each method at each lr of the profile, seed 0, on the first world; the best by validation swap mean."""
    if not study.profile.lrs:
        raise ValueError("the lr part needs a grid of learning rates: this study's profile has none (Profile.lrs)")
    benchmark = study.benchmark(study.world(study.profile.world_seeds[0]))
    runs = os.path.join(study.out, "runs")
    start, _ = start_of(study, benchmark, runs)
    specs = [Spec(f"{m}-lr{lr:g}-seed0", m, 0, finetune=dict(study.profile.finetune, lr=lr))
             for m in study.methods for lr in study.profile.lrs]
    folders = fine_tune(study, benchmark, os.path.join(study.out, "lr", "runs"), start, specs)
    val_swaps = [VAL_PREFIX + s for s in swap_subsets(benchmark.subsets)]
    table: Dict[str, Dict[str, float]] = {}
    for spec in specs:
        scores = scores_of(folders[spec.name], benchmark)
        table.setdefault(spec.method, {})[f"{spec.finetune['lr']:g}"] = statistics.fmean(scores[s] for s in val_swaps)
    choice = {m: float(max(values, key=values.get)) for m, values in table.items()}
    os.makedirs(os.path.join(study.out, "lr"), exist_ok=True)
    with open(os.path.join(study.out, "lr", "choice.json"), "w", encoding="utf-8") as handle:
        json.dump({"validation_swap_mean": table, "choice": choice}, handle, indent=1)
    return choice


def chosen_lrs(study: Study) -> Dict[str, float]:
    path = os.path.join(study.out, "lr", "choice.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)["choice"]


def tuned(study: Study, methods: Sequence[str]) -> List[Spec]:
    """`methods` x seeds, each method at the lr chosen for it on validation (`lr`, `lr/choice.json`; its runs are
    named so) or, without a choice, at the schedule's. `main`, `dose`, `mechanism`, leave-one-out and `retention`
    fine-tune through this, so that they train each method alike (and the dose of `--converse-fraction` is
    `main`'s runs); only C2LIP's 2 x 2 on its own tower keeps the schedule's lr."""
    lrs, specs = chosen_lrs(study), []
    for method in methods:
        lr = lrs.get(method)
        if lr is None or lr == study.profile.finetune["lr"]:
            specs += grid([method], study.seeds)
        else:
            specs += [Spec(f"{method}-lr{lr:g}-seed{s}", method, s, finetune=dict(study.profile.finetune, lr=lr))
                      for s in range(study.seeds)]
    return specs


def main_specs(study: Study) -> List[Spec]:
    """Every method of the study x seeds, each at its lr (`tuned`)."""
    return tuned(study, study.methods)


def run_main(study: Study, benchmark: Optional[Benchmark] = None, world_seed: int = 0,
             folder: Optional[str] = None) -> Dict[str, Any]:
    """Every method x seed on one world (the built-in one of `world_seed`, or `benchmark`)."""
    builtin = benchmark is None
    benchmark = benchmark or study.benchmark(study.world(world_seed))
    folder = folder or study.out
    runs = os.path.join(folder, "runs")
    start, start_scores = start_of(study, benchmark, runs)
    log.info("start %s: %s", start, json.dumps({k: round(v, 3) for k, v in start_scores.items()}))
    specs = main_specs(study)
    folders = _by_method(fine_tune(study, benchmark, runs, start, specs), specs)
    results = {"protocol": protocol(study, benchmark, start, start_scores, folders,
                                    builtin_world=study.world(world_seed) if builtin else None,
                                    learning_rates={s.method: (s.finetune or study.profile.finetune)["lr"]
                                                    for s in specs}),
               "methods": analyse(folders, benchmark)}
    results = json.loads(json.dumps(results, default=_plain))  # what results.json holds: lists, string keys
    text_only = _aggregate_text_only(folders, benchmark)
    print(write_results(folder, results, benchmark, text_only=text_only))
    return results


def _aggregate_text_only(folders: Dict[str, List[str]], benchmark: Benchmark) -> Dict[str, Any]:
    from compclip.study.report import aggregate

    return aggregate({m: [text_only_of(f, benchmark) for f in runs] for m, runs in folders.items()})


def run_worlds(study: Study) -> Dict[str, Any]:
    """`main` on every world seed of the profile (the first in `--out` itself)."""
    results = {}
    for index, seed in enumerate(study.profile.world_seeds):
        folder = study.out if index == 0 else os.path.join(study.out, f"world{seed}")
        results[seed] = run_main(study, world_seed=seed, folder=folder)
    if len(results) > 1:  # the world seeds side by side
        from compclip.study.report import worlds_markdown

        with open(os.path.join(study.out, "worlds.md"), "w", encoding="utf-8") as handle:
            handle.write(worlds_markdown(results))
    return results


def run_dose(study: Study) -> Dict[str, Any]:
    """Every method x seed at each converse fraction (the fraction of `--converse-fraction` is `main`'s runs)."""
    from compclip.study.report import dose_markdown, dose_plot

    by_dose = {}
    for dose in study.doses:
        benchmark = study.benchmark(study.world(converse_fraction=dose))
        folder = study.out if dose == study.converse_fraction else os.path.join(study.out, "dose", f"conv{dose:g}")
        runs = os.path.join(folder, "runs")
        start, start_scores = start_of(study, benchmark, runs)
        specs = main_specs(study)
        folders = _by_method(fine_tune(study, benchmark, runs, start, specs), specs)
        by_dose[f"{dose:g}"] = {"start": start_scores, "methods": analyse(folders, benchmark)}
    write_part(os.path.join(study.out, "dose"), by_dose, dose_markdown)
    dose_plot(by_dose, os.path.join(study.out, "dose", "dose.png"))
    return by_dose


BASELINE = "clip"


def hard_negative_methods(methods: Sequence[str]) -> List[str]:
    """The methods of `methods` whose published terms read the hard negatives (the registry decides, not a list
    of names), in the order given; the composite aside (DeGLA's terms and C2LIP's)."""
    from compclip.losses.modules import PUBLISHED_WEIGHTS
    from compclip.losses.terms import required_features

    return [m for m in methods if m != "composite" and m in PUBLISHED_WEIGHTS
            and any("negatives" in required_features(term) for term in PUBLISHED_WEIGHTS[m])]


def run_mechanism(study: Study) -> Dict[str, Any]:
    """In the world of the largest dose: CLIP and the first hard-negative method from the bag-of-words start; both
    from the same start with its text tower first trained on the supervised relation probe; and that method from
    the control start, whose text tower had the same training without the probe (compclip.study.mechanism)."""
    from compclip.study.mechanism import CONTROL, probe_start

    dose = max(DOSES)  # the world as drawn: about half of its relations converse
    benchmark = study.benchmark(study.world(converse_fraction=dose))
    runs = os.path.join(study.out, "dose", f"conv{dose:g}", "runs")
    start, start_scores = start_of(study, benchmark, runs)
    learner = hard_negative_methods(study.methods)[:1]
    specs = tuned(study, [m for m in study.methods if m == BASELINE] + learner)
    plain = _by_method(fine_tune(study, benchmark, runs, start, specs), specs)
    folder = os.path.join(study.out, "mechanism")
    probe = probe_start(start, benchmark, os.path.join(folder, "probe"), study.profile.arch)
    probe_specs = tuned(study, learner + [m for m in study.methods if m == BASELINE])
    probed = _by_method(fine_tune(study, benchmark, os.path.join(folder, "runs"), probe["checkpoint"],
                                  probe_specs), probe_specs, key=lambda s: f"{s.method}+probe")
    control = probe_start(start, benchmark, os.path.join(folder, "probe"), study.profile.arch, CONTROL)
    control_specs = tuned(study, learner)
    controlled = _by_method(fine_tune(study, benchmark, os.path.join(folder, "control-runs"),
                                      control["checkpoint"], control_specs), control_specs,
                            key=lambda s: f"{s.method}+control")
    results = {"protocol": {"world": benchmark.describe(), "dose": dose, "start": start_scores, "probe": probe,
                            "control": control},
               "methods": analyse({**plain, **probed, **controlled}, benchmark)}
    from compclip.study.report import mechanism_markdown

    return write_part(folder, results, mechanism_markdown)


SIGLIP_ARCH = "compclip-tiny-sincos-bias"
"""compclip-tiny-sincos with SigLIP's logit scale (10) and a learned logit bias (-10) at the start. Its name avoids
"siglip": open_clip picks a Hugging Face tokenizer (a download) for architecture names that contain it."""
C2LIP_TERMS = {"siglip": 1.0, "npc": 1.0, "xac": 0.01}


def c2lip_specs(seeds: int, ablations: bool = True) -> List[Spec]:
    """The 2 x 2 of NPC labels x logit bias in NPC/XAC, CLIP (SigLIP) on the tower and, with `ablations`, the bias
    in one of the two terms only (owner labels) and the NPC weight sweep."""
    def cell(name: str, loss: Dict[str, Any]) -> List[Spec]:
        return grid([name], seeds, loss=loss, arch=SIGLIP_ARCH)

    def biased(labels: str, npc: bool, xac: bool) -> Dict[str, Any]:
        return {"method": "c2lip", "terms": dict(C2LIP_TERMS),
                "options": {"npc": {"labels": labels, "use_bias": npc}, "xac": {"use_bias": xac}}}

    specs = []
    for labels in ("owner", "phrase"):
        for use_bias in (True, False):
            specs += cell(f"c2lip-{labels}-{'bias' if use_bias else 'nobias'}", biased(labels, use_bias, use_bias))
    if ablations:
        specs += cell("c2lip-owner-npcbias", biased("owner", True, False))  # which term's bias it is
        specs += cell("c2lip-owner-xacbias", biased("owner", False, True))
        for weight in (0.1, 0.3):
            specs += cell(f"c2lip-npc{weight:g}", {"method": "c2lip", "terms": dict(C2LIP_TERMS, npc=weight)})
    specs += cell("siglip", {"method": "clip"})
    return specs


def run_c2lip(study: Study) -> Dict[str, Any]:
    """C2LIP on the SigLIP tower (its 2 x 2, NPC sweep and baseline) and leave-one-negative-type-out."""
    from compclip.study.report import c2lip_markdown

    benchmark = study.benchmark(study.world())
    folder = os.path.join(study.out, "c2lip")
    runs = os.path.join(folder, "runs")
    start, start_scores = start_of(study, benchmark, runs, arch=SIGLIP_ARCH, name="pretrain-siglip")
    specs = c2lip_specs(study.seeds, study.profile.ablations)
    folders = _by_method(fine_tune(study, benchmark, runs, start, specs), specs)
    results = {"siglip": {"start": start_scores, "methods": analyse(folders, benchmark, baseline="siglip")},
               "leave_one_out": None}
    if not study.profile.ablations:
        return write_part(folder, results, c2lip_markdown)
    without = without_relation_swap(benchmark)
    main_start, _ = start_of(study, benchmark, os.path.join(study.out, "runs"))
    learners = hard_negative_methods(study.methods)
    with_all = tuned(study, [m for m in study.methods if m == BASELINE] + learners)
    loo = [replace(spec, name=spec.name + "-norel", benchmark=without,
                   num_negatives=study.profile.num_negatives - 1) for spec in tuned(study, learners)]
    loo_folders = _by_method(fine_tune(study, benchmark, runs, main_start, loo), loo,
                             key=lambda s: f"{s.method}-norel")
    main_runs = _by_method(fine_tune(study, benchmark, os.path.join(study.out, "runs"), main_start, with_all),
                           with_all)  # main's runs (reused), run here when this part goes first
    results["leave_one_out"] = {"methods": analyse({**main_runs, **loo_folders}, benchmark)}
    return write_part(folder, results, c2lip_markdown)


def without_relation_swap(benchmark: Benchmark) -> Benchmark:
    """The benchmark with a training manifest whose relation-swap negatives are removed (with their types and
    validity): the methods train on the other three types, with K one smaller. Removed, not marked invalid: the
    validity mask only gates CE-CLIP's rank term, and an invalid negative stays in the NegCLIP softmax (as
    released), so marking them would leave NegCLIP's and DeGLA's training unchanged."""
    source = benchmark.train_manifest
    target = source.replace(".jsonl", "-without-relation_swap-v2.jsonl")
    if not os.path.exists(target) or os.path.getmtime(target) < os.path.getmtime(source):
        with open(source, encoding="utf-8") as handle, open(target + ".tmp", "w", encoding="utf-8") as out:
            for line in handle:
                row = json.loads(line)
                keep = [k for k, kind in enumerate(row["negative_types"]) if kind != "relation_swap"]
                for field in ("negatives", "negative_types", "valid"):
                    row[field] = [row[field][k] for k in keep]
                out.write(json.dumps(row, sort_keys=True) + "\n")
        os.replace(target + ".tmp", target)
    return replace(benchmark, train_manifest=target)


def union_manifest(sources: Sequence[str], target: str) -> str:
    """One JSONL manifest of every row of `sources` (JSONL manifests), image paths made absolute; rewritten only
    when a source is newer."""
    if os.path.exists(target) and all(os.path.getmtime(target) >= os.path.getmtime(s) for s in sources):
        return target
    with open(target + ".tmp", "w", encoding="utf-8") as out:
        for source in sources:
            root = os.path.dirname(os.path.abspath(source))
            with open(source, encoding="utf-8") as handle:
                for line in handle:
                    row = json.loads(line)
                    row["image"] = os.path.join(root, row["image"])
                    out.write(json.dumps(row, sort_keys=True) + "\n")
    os.replace(target + ".tmp", target)
    return target


def run_retention(study: Study) -> Dict[str, Any]:
    """Start on A ∪ B, fine-tune on A, score on B (its own evaluation sets and retrieval) before and after."""
    from compclip.data.synthetic import generate_world
    from compclip.study.report import retention_markdown

    a = study.benchmark(study.world())
    size = study.profile.world
    b_paths = generate_world(os.path.join(study.out, "world", f"retention-b-{size['num_train']}"),
                             size["num_train"], size.get("num_test", size["num_val"]), seed=1,
                             image_size=size["image_size"])
    b = Benchmark.synthetic(b_paths)
    union = replace(b, train_manifest=union_manifest([a.train_manifest, b.train_manifest],
                                                     os.path.join(study.out, "world", "retention-union.jsonl")))
    folder = os.path.join(study.out, "retention")
    runs = os.path.join(folder, "runs")
    start, start_scores = start_of(study, union, runs)
    specs = [replace(spec, benchmark=replace(b, train_manifest=a.train_manifest))
             for spec in main_specs(study)]
    folders = _by_method(fine_tune(study, b, runs, start, specs), specs)
    results = {"protocol": {"a": a.describe(), "b": b.describe(), "start": start_scores},
               "methods": analyse(folders, b)}
    return write_part(folder, results, retention_markdown)


PARTS: Dict[str, Callable[[Study], Any]] = {"lr": run_lr, "main": run_worlds, "dose": run_dose,
                                            "mechanism": run_mechanism, "c2lip": run_c2lip,
                                            "retention": run_retention}
