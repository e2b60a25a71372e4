"""Python's cyclic garbage collector in compclip's processes.

A process that has imported torch, DeepSpeed and open_clip holds about 600,000 long-lived objects (modules,
functions, classes). CPython's collector walks all of them at every full collection, and a run's allocations
trigger full collections again and again. On the tiny CE-CLIP run (6 steps, one CPU thread) the two calls below
took the whole process from 10.0-10.7 s to 8.1-8.2 s. `freeze_startup_objects` moves what is alive once the
imports are done into the collector's permanent generation (`gc.freeze`), which collections skip; the run's own
objects (model, engine, batches) are made afterwards and are collected as usual. Called before `os.fork`, it also
keeps the children from touching, and so copying, the parent's pages. `startup()` pauses the collector while the
imports run (they make no garbage cycles worth a collection, but trigger hundreds of collections over a growing
heap), then freezes.
"""
from __future__ import annotations

import contextlib
import gc

_frozen = False


def freeze_startup_objects() -> None:
    """Collect once, then freeze every object alive now; once per process (a second run in the same process, a
    notebook or a sweep driver, leaves the first freeze as it is, so nothing of an earlier run is frozen)."""
    global _frozen
    if _frozen:
        return
    gc.collect()
    gc.freeze()
    _frozen = True


@contextlib.contextmanager
def startup():
    """Around a process's imports and set-up: the collector paused, then, unless the block raised (a configuration
    error: the process is about to exit, or a caller goes on), what was made frozen. The collector's own switch is
    restored either way."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
    freeze_startup_objects()
