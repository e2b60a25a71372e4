"""The files a resolved run needs before its model is built, written once: the synthetic world it trains on and
the bag-of-words start it begins from (compclip.resolve names both; nothing is written there).

Global rank 0 writes the world (or finds it complete) before the other ranks look: on a shared folder they reuse
its copy; where the folder is node-local, the first rank of each other node to take the world's file lock writes
that node's copy and the rest of the node reuse it. No decision rests on the local rank. The bag-of-words start is
trained by one child run under a file lock (compclip.bow.ensure) while every other rank waits for it.
"""
from __future__ import annotations

import logging
import time

from compclip import bow
from compclip.data.synthetic import generate
from compclip.distributed import barrier, get_rank

logger = logging.getLogger("compclip")


def prepare_inputs(run) -> None:
    """Write `run.synthetic` (a collective: every rank calls it) and train `run.start` if they are missing."""
    if run.synthetic is not None:
        first = get_rank() == 0
        if not first:
            barrier()  # rank 0 is done with the world
        generate(run.config.data.synthetic)
        if first:
            barrier()
    if run.start is not None:
        logger.info("model.pretrained=%s: the bag-of-words CLIP of %s (trained once by a child run, then reused)",
                    run.requested.model.pretrained, run.synthetic.root)
        t0 = time.time()
        bow.ensure(run.start)
        logger.info("start: %s (%.0fs)", run.start.checkpoint, time.time() - t0)
