"""The study's protocol: which methods, with which labels, on which world, with which schedule and seeds.

Everything a study fixes besides the data lives in a `Profile`: the built-in world's variant and size, the model,
stage 1 (the bag-of-words pretraining, compclip.bow) and stage 2 (every method's fine-tune from it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

from compclip.bow import STAGE1
from compclip.methods import REGISTRY

METHODS = tuple(REGISTRY)
"""The methods the study fine-tunes: every registered one, in the registry's order (compclip.methods); `composite`
is DeGLA + C2LIP's concept terms, at the weights of the one published table (compclip.losses.modules)."""
DEFAULT_METHODS = tuple(m for m in METHODS if m != "composite")
"""What a study without --methods fine-tunes (the composite, DeGLA + C2LIP's concept terms, with --full)."""
LABELS = {**{name: method.label for name, method in REGISTRY.items()}, "pretrained": "pretrained (start)"}
COST = {"composite": 2.45, "degla": 1.84, "negclip": 1.53, "ceclip": 1.52, "c2lip": 1.3, "clip": 1.0}
"""Seconds per fine-tune relative to CLIP's, measured in the default study on 2 CPU cores (two runs at a time, one
thread each: CLIP 100 s, NegCLIP 153 s, CE-CLIP 152 s, DeGLA 184 s, C2LIP 130 s; the composite 240-256 s in
`--full`'s lr part). The queue's order (the longest runs go first) and its ETA (the cost left at the rate of the
finished runs: compclip.study.runs.run_queue)."""

BUILTIN_WORLD: Dict[str, Any] = {"seed": 0, "image_size": 64, "max_objects": 2, "converse_fraction": 0.0}
"""The built-in world's variant (compclip.data.synthetic): 2-object scenes, each layout in one phrasing ("left of",
"above"; converse_fraction 0). `--converse-fraction` gives the same world with that share of converse phrasings
("B right of A"); at 0.5, the share of the world as drawn, no method takes off in the budget (docs/study.md)."""

LRS = (5e-4, 1e-3, 2e-3, 4e-3)
"""The `lr` part's grid: the schedule's 2e-3 with one rate above and two below (every published method chose 1e-3,
docs/study.md)."""


@dataclass
class Profile:
    """Everything the protocol fixes besides the data: the world (built-in only), the model and both stages."""

    world: Dict[str, Any]
    pretrain: Dict[str, Any]
    finetune: Dict[str, Any]
    seeds: int
    arch: str = "compclip-tiny-sincos"
    batch_size: int = 32
    num_negatives: int = 4
    curve_every: int = 0
    """Relation and attribute swap scored every this many fine-tune steps (learning curves); 0 = at the end only."""
    world_seeds: Tuple[int, ...] = (0,)
    """The built-in world is drawn from each of these seeds (its scenes, test split and held-out pairs)."""
    lrs: Tuple[float, ...] = LRS
    """The learning rates of the `lr` part's per-method sweep on validation (each profile's schedule lr inside)."""
    experiments: Tuple[str, ...] = ("main",)
    ablations: bool = False
    """The c2lip part's NPC weight sweep and leave-one-negative-type-out runs (`--full`); without, its 2 x 2 and
    baseline only."""


SPLIT = {"num_train": 10000, "num_val": 500, "num_test": 1100}
"""The built-in world's splits: 1,100 test scenes (and 1,100 of the held-out pairs), so that every evaluation set
keeps more than 1,000 items (a relation-free binding item is dropped when its swap names the same two objects:
about 5 %), and 500 validation scenes on which schedules and learning rates are chosen."""
FINETUNE = {"epochs": 2, "lr": 2e-3, "warmup_steps": 20, "max_steps": 500}
"""The fine-tune schedule of every method (and of the embedded default), chosen on validation (docs/study.md)."""
DEMO_METHOD = "degla"
"""The method of the embedded default (`configs/default.yaml`: the study's fine-tune of this method, seed 0). Chosen
on the validation split of the default study: DeGLA's validation relation swap passed 67 % by step 300 on each of
its 3 seeds (89–90 % at step 400), so its take-off falls well inside the 500 steps; CE-CLIP's seed 0 was still at
63 % at step 500 (docs/study.md, "The embedded default")."""

PROFILES: Dict[str, Profile] = {
    "default": Profile(world=dict(BUILTIN_WORLD, **SPLIT), pretrain=dict(STAGE1), finetune=dict(FINETUNE), seeds=3,
                       curve_every=100),
    "full": Profile(world=dict(BUILTIN_WORLD, **SPLIT), pretrain=dict(STAGE1), finetune=dict(FINETUNE), seeds=5,
                    curve_every=50, world_seeds=(0, 1), ablations=True,
                    experiments=("lr", "main", "dose", "mechanism", "c2lip", "retention")),
    "quick": Profile(
        world=dict(BUILTIN_WORLD, num_train=384, num_val=64, num_test=64),
        pretrain={"epochs": 1, "lr": 1e-3, "warmup_steps": 2},
        finetune={"epochs": 1, "lr": 5e-4, "warmup_steps": 2, "max_steps": 4},
        seeds=1, batch_size=16, curve_every=2, lrs=(2.5e-4, 5e-4, 1e-3)),
}
EXPERIMENTS = ("lr", "main", "dose", "mechanism", "c2lip", "retention")
"""The parts of a study on the built-in world (compclip.study.experiments); `--experiments` picks some."""
DOSES = (0.0, 0.1, 0.25, 0.5)
"""The converse fractions of the dose-response."""
