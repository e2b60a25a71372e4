"""The study's protocol: which methods, with which labels, on which world, with which schedule and seeds.

Everything a study fixes besides the data lives in a `Profile`: the built-in world's variant and size, the model,
stage 1 (the bag-of-words pretraining, compclip.bow) and stage 2 (every method's fine-tune from it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from compclip.bow import STAGE1
from compclip.methods import REGISTRY

METHODS = tuple(REGISTRY)
"""The methods the study fine-tunes: every registered one, in the registry's order (compclip.methods); `composite`
is DeGLA + C2LIP's concept terms, at the weights of the one published table (compclip.losses.modules)."""
LABELS = {**{name: method.label for name, method in REGISTRY.items()}, "pretrained": "pretrained (start)"}
COST = {"composite": 2.5, "degla": 2.4, "negclip": 2.0, "ceclip": 1.8, "c2lip": 1.3, "clip": 1.0}
"""Seconds per fine-tune relative to CLIP's, measured in the default study on 2 CPU cores (docs/study/
second-machine: CLIP 79 s, composite 197 s). The queue's order (the longest runs go first) and its ETA (the cost
left at the rate of the finished runs: compclip.study.runs.run_queue)."""

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
        pretrain=dict(STAGE1),
        finetune={"epochs": 2, "lr": 2e-3, "warmup_steps": 20, "max_steps": 400},
        seeds=3),
    "quick": Profile(
        world=dict(BUILTIN_WORLD, num_train=384, num_val=64),
        pretrain={"epochs": 1, "lr": 1e-3, "warmup_steps": 2},
        finetune={"epochs": 1, "lr": 5e-4, "warmup_steps": 2, "max_steps": 4},
        seeds=1, batch_size=16),
}
