"""The random generators a run draws from, seeded, saved and restored in one place.

A checkpoint stores every generator (python, numpy, torch, and each CUDA device's) so that a resumed run draws what
the straight run would have drawn. The gradient-caching step (compclip.trainer.gradcache) saves the torch
generators before a chunk's forward and restores them for its re-forward, so that dropout draws the same masks.
"""
from __future__ import annotations

import random
from typing import Any, Dict, Optional

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state(device: Optional[torch.device] = None, *, host: bool = True) -> Dict[str, Any]:
    """The generators' state: python and numpy (`host=True`), torch's CPU generator, and CUDA's: every device's
    when `device` is None, else that device's only (a CUDA device; a CPU device adds nothing)."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if host:
        state.update(python=random.getstate(), numpy=np.random.get_state())
    if device is not None:
        if device.type == "cuda":
            state["cuda_device"] = torch.cuda.get_rng_state(device)
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any], device: Optional[torch.device] = None) -> None:
    """Restore what `rng_state` returned (the keys it holds)."""
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"], device)
