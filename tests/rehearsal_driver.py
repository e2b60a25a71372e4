"""Run several trainings in one launched world: `deepspeed --num_gpus 2 tests/rehearsal_driver.py RUNS.json`, where
RUNS.json is a list of command lines for `compclip/train.py`. The process group is made once, here, so that each
`compclip.train.main` keeps it (a caller's group stays) and the ranks pay the start-up once (tests/test_rehearsal.py).
"""
import json
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, as compclip/train.py

from compclip.train import main  # noqa: E402
from compclip.trainer.engine import init_process_group  # noqa: E402

if __name__ == "__main__":
    runs = json.loads(open(sys.argv[-1], encoding="utf-8").read())
    init_process_group()
    for argv in runs:
        main(argv)
