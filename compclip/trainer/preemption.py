"""When a training run saves and when it stops early: every `log.save_every_n_steps` optimizer steps, every
`log.save_every_n_minutes` of wall clock, and on SIGTERM (the notice SLURM and Kubernetes send before they kill).

On SIGTERM the run finishes the optimizer step it is in, saves a DeepSpeed checkpoint, and every process exits
with status `PREEMPTED` (143 = 128 + SIGTERM, what a process killed by SIGTERM reports to a shell). All ranks
must stop at the same step (a save is collective), but a signal may reach only some of them, or reach them in
different steps: at each optimizer step boundary the ranks all-reduce their local flags (signal seen, minutes
elapsed), so they save and stop at the same step. `--resume latest` continues the run.

An evaluation runs on rank 0 while the other ranks wait (`on_rank0`). They do not wait in a barrier, which would
hear nothing: before each batch rank 0 meets them in one all-reduce of (signal seen, finished, failed), and they
loop on that all-reduce until rank 0 says it has finished. A SIGTERM that reaches any subset of ranks thus stops
the evaluation before its next batch; the run then saves (the step is complete) and every rank exits 143, within
one evaluation batch and one save of the signal. The tag records the evaluation as pending, and `--resume` runs it
again (compclip.trainer.train).
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Callable, Optional, TypeVar

from compclip.trainer import faults
from compclip.distributed import any_across_ranks

Result = TypeVar("Result")

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
        self.meetings = 0  # of `on_rank0`'s all-reduces, over the process (the fault hook counts them)

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

    def on_rank0(self, work: Callable[[Callable[[], bool]], Result]) -> Optional[Result]:
        """`work(should_stop)` on rank 0 while the other ranks wait for it (an evaluation): rank 0's result, None
        on the others. Every call of `should_stop` meets the waiting ranks in one all-reduce, so a SIGTERM seen by
        any rank makes it true (module docstring); afterwards `stop` is set on every rank alike. An exception of
        `work` is raised on rank 0 and reported as a RuntimeError on the others (they would wait forever)."""
        result, failed = None, True
        if self.rank == 0:
            try:
                result = work(lambda: self._meet(finished=False, failed=False)[0])
                failed = False
            finally:
                stop, _, _ = self._meet(finished=True, failed=failed)
        else:
            stop, finished, failed = self._meet(finished=False, failed=False)
            while not finished:
                stop, finished, failed = self._meet(finished=False, failed=False)
            if failed:
                raise RuntimeError("rank 0 failed while the other ranks waited for it (its log has the error)")
        if stop and not self.stop:
            logger.warning("SIGTERM: saving, then exiting with status %d (resume with --resume latest)", PREEMPTED)
        self.stop = self.stop or stop
        return result

    def _meet(self, finished: bool, failed: bool):
        """(some rank got SIGTERM, rank 0 has finished, rank 0 failed): one all-reduce with every rank."""
        self.meetings += 1
        faults.evaluation_meeting(self.meetings, self.rank)
        return any_across_ranks([self.signalled, finished, failed])
