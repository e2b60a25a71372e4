"""Several training runs in one launched world: `deepspeed --num_gpus 2 tests/launch_runs.py RUNS.json` (or
`python tests/launch_runs.py RUNS.json`, a world of one), RUNS.json a list of `compclip/train.py` command lines.

Each run is `compclip.train.main(argv)`, the entry point's own path, resolve and errors included. The process
group is made once, here, so that every run keeps it (a caller's group stays) and the ranks pay the start-up of
Python, torch and DeepSpeed once instead of once per run (the launcher and rehearsal tests).

An entry may instead be `{"evaluate": [compclip-eval arguments], "remove": [paths]}`: rank 0 runs compclip-eval's
entry point on the runs so far, then deletes the listed files (the exports it read), while the other ranks wait.
The rehearsal evaluates each real-shape export as soon as it is written and drops it, so that its disk peak is one
run's export (about 1.2 GB at ViT-B) instead of all five.
"""
import contextlib
import ctypes
import gc
import json
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, as compclip/train.py

import torch  # noqa: E402

from compclip.train import main  # noqa: E402
from compclip.trainer.engine import init_process_group, single_process_environment  # noqa: E402


def evaluate(argv: list, remove: list) -> None:
    """compclip-eval on rank 0, then the listed files deleted; every rank leaves together."""
    if torch.distributed.get_rank() == 0:
        from compclip.evaluation.__main__ import main as compclip_eval

        if compclip_eval(argv) != 0:
            raise SystemExit(f"compclip-eval {' '.join(argv)} failed")
        for path in remove:
            os.remove(path)
    torch.distributed.barrier()


if __name__ == "__main__":
    with open(sys.argv[-1], encoding="utf-8") as handle:
        runs = json.load(handle)
    single_process_environment()  # without the launcher: a world of one
    init_process_group()
    for entry in runs:
        if isinstance(entry, dict):
            evaluate(entry["evaluate"], entry.get("remove", []))
        else:
            main(entry)
        gc.collect()  # the finished run's engines are released (Trainer.close); give their memory back to the
        with contextlib.suppress(OSError, AttributeError):  # system before the next run (glibc keeps freed heap)
            ctypes.CDLL("libc.so.6").malloc_trim(0)
