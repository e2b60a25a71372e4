"""pytest fixtures for the benchmarks; the machinery lives in harness.py."""
import pytest
import torch

from harness import CUDA, SIZES


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if CUDA else "cpu")


@pytest.fixture
def rounds() -> int:
    return {"tiny": 1, "cpu": 3, "gpu": 10}[SIZES]


