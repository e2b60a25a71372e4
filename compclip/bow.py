"""`model.pretrained: synthetic-bow[:EPOCHS]`: start from the synthetic world's bag-of-words CLIP.

The papers fine-tune a web-pretrained CLIP that has learned the bag-of-words shortcut. On the synthetic world that
start is made on purpose (docs/study.md): plain CLIP InfoNCE on the training captions with their words in a random
order (`data.caption_order: shuffle`), so that word order carries no information. It is the study's stage 1
(compclip.study), and the embedded default's start.

`resolve()` turns the tag into a `BowStart`: the run folder and checkpoint path the stage will have, known before
anything runs. `ensure(start)` trains it once, as a child run (compclip.child_run) under a file lock, so that
concurrent runs and the ranks of one run wait for one training and then reuse it.
"""
from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

from compclip.child_run import Benchmark, run_child, stage_config

log = logging.getLogger("compclip")

TAG = "synthetic-bow"
STAGE1: Dict[str, Any] = {"epochs": 1, "lr": 1e-3, "warmup_steps": 50}
"""The stage-1 schedule (the study's default profile; `synthetic-bow:EPOCHS` overrides the epochs)."""


def parse_tag(pretrained: str) -> Optional[int]:
    """None when `pretrained` is not the bag-of-words tag; else its epoch count (0 = STAGE1's). ValueError on a bad
    count."""
    tag, colon, epochs = pretrained.partition(":")
    if tag != TAG:
        return None
    if not colon:
        return 0
    if not epochs.isdigit() or int(epochs) < 1:
        raise ValueError(f"model.pretrained={pretrained!r}: write {TAG} or {TAG}:EPOCHS with EPOCHS >= 1")
    return int(epochs)


def pretrain_config(benchmark: Benchmark, arch: str, batch_size: int, num_negatives: int, stage: Dict[str, Any],
                    threads: int, runs: str, name: str = "pretrain") -> Dict[str, Any]:
    """Stage 1 on `benchmark`: CLIP on shuffled captions, seed 0, no `before` evaluation, in `<runs>/<name>`."""
    cfg = stage_config(benchmark, arch, batch_size, num_negatives, stage, threads)
    cfg["loss"] = {"method": "clip"}
    cfg["data"]["caption_order"] = "shuffle"
    cfg.update(seed=0, eval_before=False)
    cfg["log"].update(logs=runs, name=name)
    return cfg


@dataclass(frozen=True)
class BowStart:
    """The bag-of-words start of one run: the stage-1 run on the world at `world` (its WorldPaths) for this
    architecture, micro-batch and K."""

    world: Any
    arch: str
    batch_size: int
    num_negatives: int
    epochs: int

    @property
    def runs(self) -> str:
        return os.path.join(self.world.root, "pretrained")

    @property
    def name(self) -> str:
        return f"bow-{self.arch}-b{self.batch_size}-e{self.epochs}".replace("/", "_")

    @property
    def checkpoint(self) -> str:
        """The export the stage-1 run leaves (its last epoch's `epoch_N.pt`)."""
        return os.path.join(self.runs, self.name, "checkpoints", f"epoch_{self.epochs}.pt")

    def config(self) -> Dict[str, Any]:
        stage = dict(STAGE1, epochs=self.epochs)
        return pretrain_config(Benchmark.synthetic(self.world), self.arch, self.batch_size, self.num_negatives,
                               stage, max(1, os.cpu_count() or 1), self.runs, self.name)


def start_for(world, arch: str, batch_size: int, num_negatives: int, epochs: int) -> BowStart:
    """The BowStart of `synthetic-bow:EPOCHS` (0: STAGE1's epochs)."""
    return BowStart(world, arch, batch_size, num_negatives, epochs or STAGE1["epochs"])


def ensure(start: BowStart) -> str:
    """Train the start if it is not there yet (once, under a file lock); returns its checkpoint."""
    os.makedirs(start.runs, exist_ok=True)
    with open(os.path.join(start.runs, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run_child(start.config(), Benchmark.synthetic(start.world), start.runs, verbose=True)
    if not os.path.isfile(start.checkpoint):
        raise RuntimeError(f"the bag-of-words start finished without {start.checkpoint}")
    return start.checkpoint
