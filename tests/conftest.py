"""Test-wide setup. Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on
before any kernel module is imported.

Under xdist (`-n N`) the cores are divided among the N workers: OMP_NUM_THREADS, read by torch in each worker, by
every child process a test starts, and by the trainer's `threads: 0` (compclip.distributed.cpu_threads). With
torch's default of a thread per core in every worker, the workers' OpenMP threads would spin on each other's
cores."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _WORKERS > 1:
    from compclip.distributed import cpu_threads

    os.environ["OMP_NUM_THREADS"] = str(cpu_threads(_WORKERS))  # a valid value of the caller's wins
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


import pytest  # noqa: E402


@pytest.fixture
def one_process(monkeypatch):
    """A world of one for in-process DeepSpeed runs, created once per test process and kept: DeepSpeed caches
    groups derived from the default group, so it must outlive every engine built on it."""
    from compclip.distributed import free_port
    from compclip.trainer.engine import init_process_group

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)  # DeepSpeed reads them at every initialize
    if not torch.distributed.is_initialized():
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        init_process_group()
    yield


def pytest_report_header(config):
    """The free disk where the tests write: the real-shape rehearsal holds about 4 GB at once (a ViT-B/32 DeepSpeed
    tag and an export), the rest of the suite under 1.5 GB per test, each deleted when its test passes
    (pytest.ini). A full disk shows up as errors of unrelated tests; this line tells it at a glance."""
    import shutil
    import tempfile

    folder = tempfile.gettempdir()
    return f"disk: {shutil.disk_usage(folder).free / 2**30:.1f} GiB free in {folder} (the suite needs about 6)"


def pytest_configure(config):
    """Under xdist (`-n 2`), tests are handed out one at a time as workers free up (`--maxschedchunk 1`) instead
    of in chunks of a quarter of the suite, so that the order below decides who runs what."""
    if getattr(config.option, "maxschedchunk", "absent") is None:
        config.option.maxschedchunk = 1


def pytest_collection_modifyitems(config, items):
    """Scheduling only. Tests marked `cost(seconds)` run first, the longest first (the rest keep their order): a
    4-minute test started near the end would run alone while the other worker idles. Tests marked `one_worker` (the
    rehearsal's two real-shape tests, each a 2-rank ViT-sized world) come first of all: under `-n 2` each worker
    starts with two consecutive tests, so one worker runs them one after the other and the two worlds never hold
    memory at the same time."""
    def key(item):
        marker = item.get_closest_marker("cost")
        return (item.get_closest_marker("one_worker") is None, -(marker.args[0] if marker else 0.0))

    items.sort(key=key)  # stable: every other test keeps its place


def pytest_collection_finish(session):
    """What collection imported (torch, DeepSpeed, open_clip, every test module) out of the garbage collector's
    full walks for the rest of the session, as the trainer does for its run (compclip.heap)."""
    from compclip.heap import freeze_startup_objects

    freeze_startup_objects()
