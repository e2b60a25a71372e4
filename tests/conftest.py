"""Test-wide setup. Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on
before any kernel module is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
