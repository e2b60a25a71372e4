"""Backend resolution of the kernel ops on a CPU."""
import pytest
import torch

import compclip.kernels as kernels
from compclip.kernels import dispatch

OPS = ["contrastive_row_loss", "grouped_scores", "grouped_contrast_row_loss", "concept_attention_pool",
       "xac_loss_sum"]


@pytest.mark.parametrize("op", OPS)
def test_every_op_is_exported_with_the_reference_signature(op):
    import inspect
    kernel_params = inspect.signature(getattr(kernels, op)).parameters
    reference_params = inspect.signature(getattr(kernels.reference, op)).parameters
    positional = [name for name, p in kernel_params.items() if p.kind != inspect.Parameter.KEYWORD_ONLY]
    assert positional == list(reference_params)
    # keyword-only extras are tuning knobs only: tile sizes, the contrastive splits, XAC's image chunk and route
    assert all(name.startswith("block_") or name in ("chunk", "route", "splits") for name, p in kernel_params.items()
               if p.kind == inspect.Parameter.KEYWORD_ONLY)


def test_triton_on_cpu_without_interpreter_raises_with_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.resolve("contrastive_row_loss", "triton", [torch.zeros(2, 3)])
    assert dispatch.resolve("contrastive_row_loss", "auto", [torch.zeros(2, 3)]) == "torch"


def test_triton_on_cpu_with_interpreter_resolves(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.resolve("xac_loss_sum", "triton", [torch.zeros(2, 3)]) == "triton"
    with pytest.raises(RuntimeError, match="float64"):
        dispatch.resolve("xac_loss_sum", "triton", [torch.zeros(2, 3, dtype=torch.float64)])
