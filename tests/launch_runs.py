"""Several training runs in one launched world: `deepspeed --num_gpus 2 tests/launch_runs.py RUNS.json` (or
`python tests/launch_runs.py RUNS.json`, a world of one), RUNS.json a list of `compclip/train.py` command lines.

Each run is `compclip.train.main(argv)`, the entry point's own path, resolve and errors included. The process
group is made once, here, so that every run keeps it (a caller's group stays) and the ranks pay the start-up of
Python, torch and DeepSpeed once instead of once per run (the launcher and rehearsal tests).
"""
import contextlib
import ctypes
import gc
import json
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, as compclip/train.py

from compclip.train import main  # noqa: E402
from compclip.trainer.engine import init_process_group, single_process_environment  # noqa: E402

if __name__ == "__main__":
    with open(sys.argv[-1], encoding="utf-8") as handle:
        runs = json.load(handle)
    single_process_environment()  # without the launcher: a world of one
    init_process_group()
    for argv in runs:
        main(argv)
        gc.collect()  # the finished run's engines are released (Trainer.close); give their memory back to the
        with contextlib.suppress(OSError, AttributeError):  # system before the next run (glibc keeps freed heap)
            ctypes.CDLL("libc.so.6").malloc_trim(0)
