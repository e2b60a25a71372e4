"""Parity harness for the Triton kernels: reference vs kernel, outputs and every input gradient.

Inputs are built from float32 values and then cast to the dtype under test; the reference runs on the float32
upcast of the very same (rounded) values, so the only differences left are the kernel's own arithmetic and the
rounding of its gradients to the input dtype.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

# (rtol, atol relative to the largest magnitude of the expected tensor)
TOLERANCES: Dict[torch.dtype, tuple] = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 2e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def unit(*shape: int, dtype=torch.float32, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """L2-normalised random rows (the embeddings the losses see), cast to ``dtype`` after normalising."""
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1).to(dtype)


def strided(tensor: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (last two dims stored transposed)."""
    return tensor.transpose(-1, -2).contiguous().transpose(-1, -2)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


def check_parity(
    reference_fn: Callable,
    kernel_fn: Callable,
    inputs: Sequence,
    dtype: torch.dtype,
    non_contiguous: Sequence[int] = (),
    seed: int = 0,
) -> None:
    """Run both functions on leaf copies of ``inputs``, weight the outputs randomly, backpropagate and compare.

    ``inputs``: tensors (floating ones get gradients), Python numbers and None, in call order. Floating tensors
    are passed to the kernel as they are (its dtype) and to the reference as their float32 upcast; indices in
    ``non_contiguous`` reach the kernel as non-contiguous views.
    """
    ref_args, ker_args, pairs = [], [], []
    for index, value in enumerate(inputs):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            ref_leaf = value.detach().float().clone().requires_grad_()
            ker_value = value.detach().clone()
            if index in non_contiguous:
                ker_value = strided(ker_value)
                assert not ker_value.is_contiguous()
            ker_leaf = ker_value.requires_grad_()
            ref_args.append(ref_leaf)
            ker_args.append(ker_leaf)
            pairs.append((index, ref_leaf, ker_leaf))
        else:
            ref_args.append(value)
            ker_args.append(value)
    expected = reference_fn(*ref_args)
    actual = kernel_fn(*ker_args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    actual = actual if isinstance(actual, tuple) else (actual,)
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(out.shape, generator=generator) for out in expected]
    for k, (exp, act) in enumerate(zip(expected, actual)):
        assert act.dtype == torch.float32, f"output {k} is {act.dtype}, expected float32"
        assert_close_scaled(act, exp, dtype, f"output {k}")
    sum((out * w).sum() for out, w in zip(expected, weights)).backward()
    sum((out * w).sum() for out, w in zip(actual, weights)).backward()
    for index, ref_leaf, ker_leaf in pairs:
        assert ker_leaf.grad is not None, f"input {index} got no gradient from the kernel"
        assert ker_leaf.grad.dtype == ker_leaf.dtype, f"input {index}: gradient dtype {ker_leaf.grad.dtype}"
        # The reference gradient, rounded like the kernel's to the input dtype, is the fair comparison.
        # Tolerance of the dtype under test, also for float32 leaves (logit_scale) computed from its values.
        assert_close_scaled(ker_leaf.grad, ref_leaf.grad.to(ker_leaf.dtype), dtype, f"grad of input {index}")
