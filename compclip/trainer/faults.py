"""Fault injection for tests: the environment variable `COMPCLIP_FAULT` makes a training process die or be
signalled at a chosen instant, as a cluster would do it.

* `save:<stage>:<step>`: SIGKILL this process at `<stage>` of the save of tag `step<step>`. Stages, in the order
  of a save (`compclip.trainer.checkpoint.Checkpointer.save`): `before_states` (nothing of the tag written yet),
  `after_states` (DeepSpeed's model and optimizer states written), `after_extras` (this rank's
  `compclip_rank<r>.pt` written), `after_marker` (rank 0: the completion marker written), `after_pointer`
  (rank 0: the `latest` pointers written). Every rank that reaches the stage dies there; a rank that waits for a
  dead one in a collective is ended by the launcher (or the test's process supervisor).
* `sigterm:<step>[:<rank>]`: send SIGTERM to this process (rank `<rank>` only, default every rank) while it
  computes optimizer step `<step>` (>= 2: the signal is raised at the end of step `<step> - 1`), as a
  scheduler's preemption notice does.
* `sigterm_eval:<n>[:<rank>]`: send SIGTERM to this process (rank `<rank>` only, default every rank) at the
  `<n>`-th meeting of an evaluation's ranks (`compclip.trainer.preemption.SaveSchedule.on_rank0`: rank 0 meets
  the waiting ranks before each batch, so all ranks count alike): in the middle of an evaluation.

Without the variable every hook is a no-op (one dictionary look-up).
"""
from __future__ import annotations

import os
import signal
import sys
from typing import List, Optional

ENV = "COMPCLIP_FAULT"
SAVE_STAGES = ("before_states", "after_states", "after_extras", "after_marker", "after_pointer")


def _spec() -> Optional[List[str]]:
    value = os.environ.get(ENV, "")
    if not value:
        return None
    parts = value.split(":")
    kind = parts[0]
    ok = (kind == "save" and len(parts) == 3 and parts[1] in SAVE_STAGES and parts[2].isdigit()) or (
        kind in ("sigterm", "sigterm_eval") and len(parts) in (2, 3) and all(p.isdigit() for p in parts[1:]))
    if not ok:
        raise ValueError(f"{ENV}={value!r}: expected save:<stage>:<step> with a stage in {', '.join(SAVE_STAGES)}, "
                         "sigterm:<step>[:<rank>] or sigterm_eval:<n>[:<rank>]")
    return parts


def save_stage(stage: str, step: int) -> None:
    """The test hook at `stage` of the save of step `step`: SIGKILL when `COMPCLIP_FAULT` names it."""
    spec = _spec()
    if spec and spec[0] == "save" and spec[1] == stage and int(spec[2]) == step:
        sys.stdout.flush(), sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def step_finished(step: int, rank: int) -> None:
    """The test hook after optimizer step `step`: SIGTERM when `COMPCLIP_FAULT` asks for one during `step + 1`."""
    _sigterm("sigterm", step + 1, rank)


def evaluation_meeting(count: int, rank: int) -> None:
    """The test hook at the `count`-th meeting of an evaluation's ranks: SIGTERM when `COMPCLIP_FAULT` names it."""
    _sigterm("sigterm_eval", count, rank)


def _sigterm(kind: str, at: int, rank: int) -> None:
    spec = _spec()
    if spec and spec[0] == kind and int(spec[1]) == at and (len(spec) == 2 or int(spec[2]) == rank):
        os.kill(os.getpid(), signal.SIGTERM)
