"""Python's cyclic garbage collector in compclip's processes.

A process that has imported torch, DeepSpeed and open_clip holds about 600,000 long-lived objects (modules,
functions, classes). CPython's collector walks all of them at every full collection, and a run's allocations
trigger full collections again and again: measured on the tiny CE-CLIP run (6 steps, one CPU thread), 1.6 s of
its 10 s went there. `freeze_startup_objects` moves what is alive once the imports are done into the collector's
permanent generation (`gc.freeze`), which collections skip; the run's own objects (model, engine, batches) are
made afterwards and are collected as usual. The same call before `os.fork` keeps the children from touching, and
so copying, the parent's pages.
"""
from __future__ import annotations

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
