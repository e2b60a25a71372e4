"""The per-process resources: CPU threads (compclip.distributed.cpu_threads) and the frozen imports
(compclip.heap)."""
import os
import subprocess
import sys

import pytest

from compclip.distributed import cpu_threads


@pytest.mark.parametrize("value, processes, expected", [
    ("3", 1, 3), ("3", 8, 3),  # the environment's choice wins, whatever the process count
    (None, 1, os.cpu_count() or 1), (None, 10_000, 1),  # else the cores divided, at least one
    ("0", 1, os.cpu_count() or 1), ("many", 2, max(1, (os.cpu_count() or 1) // 2)), ("", 1, os.cpu_count() or 1),
])
def test_cpu_threads(monkeypatch, value, processes, expected):
    if value is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert cpu_threads(processes) == expected


def test_the_trainer_takes_its_threads_from_the_environment(one_process, monkeypatch):
    import torch

    from compclip.config import load_config
    from compclip.trainer.engine import init_distributed

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        init_distributed(load_config(["--config", "tiny", "--device=cpu"]))
        assert torch.get_num_threads() == 1
        init_distributed(load_config(["--config", "tiny", "--device=cpu", "--threads=2"]))  # the key wins
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


FREEZE = """
import gc, weakref
from compclip.heap import freeze_startup_objects

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)

first = cycle()  # garbage before the first call: collected, not frozen
freeze_startup_objects()
assert first() is None and gc.get_freeze_count() > 0
frozen = gc.get_freeze_count()
second = cycle()  # garbage of a first run, when a second run starts in the same process
freeze_startup_objects()
assert gc.get_freeze_count() == frozen  # once per process
gc.collect()
assert second() is None  # the first run's garbage was not frozen: it is collected
print("ok")
"""


def test_the_startup_freeze_happens_once_and_freezes_no_garbage():
    out = subprocess.run([sys.executable, "-c", FREEZE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


STARTUP = """
import gc
from compclip.heap import startup

try:
    with startup():
        assert not gc.isenabled()
        raise ValueError("a configuration error")
except ValueError:
    pass
assert gc.isenabled() and gc.get_freeze_count() == 0  # restored, nothing frozen
gc.disable()
with startup():
    pass
assert not gc.isenabled() and gc.get_freeze_count() > 0  # a caller's switch stays as it was; frozen
print("ok")
"""


def test_startup_pauses_the_collector_and_freezes_only_when_the_block_succeeds():
    out = subprocess.run([sys.executable, "-c", STARTUP], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
