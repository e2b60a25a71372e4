"""When a training run saves and when it stops early: every `log.save_every_n_steps` optimizer steps, every
`log.save_every_n_minutes` of wall clock, and on SIGTERM (the notice SLURM and Kubernetes send before they kill).

On SIGTERM the run finishes the optimizer step it is in, saves a DeepSpeed checkpoint, and every process exits
with status `PREEMPTED` (143 = 128 + SIGTERM, what a process killed by SIGTERM reports to a shell). All ranks
must stop at the same step (a save is collective), but a signal may reach only some of them, or reach them in
different steps: at each optimizer step boundary the ranks all-reduce their local flags (signal seen, minutes
elapsed), so they save and stop at the same step. `--resume latest` continues the run.
"""
from __future__ import annotations

import logging
import signal
import threading
import time

from compclip.trainer import faults
from compclip.distributed import any_across_ranks

logger = logging.getLogger("compclip")

PREEMPTED = 143  # exit status of a run stopped by SIGTERM after its checkpoint: 128 + signal.SIGTERM


class SaveSchedule:
    """Per optimizer step, whether to save and whether to stop, agreed by all ranks. Catches SIGTERM from
    `start()` until `close()` (main thread only: elsewhere the signal keeps its default action)."""

    def __init__(self, every_n_steps: int, every_n_minutes: float, rank: int):
        self.every_n_steps, self.every_s, self.rank = every_n_steps, every_n_minutes * 60.0, rank
        self.signalled = self.stop = False
        self.clock = time.monotonic()
        self._previous = None

    def start(self) -> "SaveSchedule":
        self.clock = time.monotonic()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        else:
            logger.warning("training outside the main thread: SIGTERM is not caught (no save on preemption)")
        return self

    def _on_sigterm(self, signum, frame) -> None:
        self.signalled = True  # only a flag: the loop acts on it at the next optimizer step boundary

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def due(self, step: int) -> bool:
        """After optimizer step `step`: save now? Sets `stop` when some rank got SIGTERM. A collective."""
        minutes = self.every_s > 0 and time.monotonic() - self.clock >= self.every_s
        stop, minutes = any_across_ranks([self.signalled, minutes])
        faults.step_finished(step, self.rank)
        if minutes:
            self.clock = time.monotonic()
        if stop and not self.stop:
            logger.warning("SIGTERM: saving after optimizer step %d, then exiting with status %d (resume with "
                           "--resume latest)", step, PREEMPTED)
        self.stop = self.stop or stop
        return self.stop or minutes or bool(self.every_n_steps and step % self.every_n_steps == 0)
