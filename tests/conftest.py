"""Test-wide setup. Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on
before any kernel module is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
