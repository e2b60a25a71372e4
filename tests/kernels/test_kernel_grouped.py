"""grouped_scores / grouped_contrast_row_loss (Triton, interpreter on the CPU) against their references."""
import functools

import pytest
import torch

from compclip.kernels import grouped_contrast_row_loss, grouped_scores, reference
from kernel_parity import check_parity, unit

OPS = {
    "scores": (reference.grouped_scores, grouped_scores),
    "loss": (reference.grouped_contrast_row_loss, grouped_contrast_row_loss),
}


def _run(op, B, K, D, scale, dtype=torch.float32, non_contiguous=(), block_d=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = [unit(B, D, dtype=dtype, generator=g), unit(B, D, dtype=dtype, generator=g),
              unit(B, K, D, dtype=dtype, generator=g), torch.tensor(scale)]
    reference_fn, kernel_fn = OPS[op]
    check_parity(reference_fn, functools.partial(kernel_fn, block_d=block_d), inputs, dtype, non_contiguous)


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("B, K, D, scale, block_d", [
    (1, 1, 5, 1.0, None),          # one row, one negative
    (7, 3, 19, 100.0, 16),         # non powers of two, two D slices, the largest scale
    (5, 5, 33, 10.0, 16),          # three D slices
])
def test_fp32(op, B, K, D, scale, block_d):
    _run(op, B, K, D, scale, block_d=block_d)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", sorted(OPS))
def test_half_precision(op, dtype):
    _run(op, 6, 4, 19, 10.0, dtype=dtype, block_d=16)


@pytest.mark.parametrize("op", sorted(OPS))
def test_non_contiguous(op):
    _run(op, 4, 3, 19, 10.0, non_contiguous=(0, 2), block_d=16)


def test_one_output_used_and_float_scale():
    """Only the negative scores reach the loss (∂pos is None); a Python float scale gets no gradient."""
    anchors, positives, negatives = unit(4, 19), unit(4, 19), unit(4, 3, 19)
    leaves = [t.clone().requires_grad_() for t in (anchors, positives, negatives)]
    _, neg = grouped_scores(*leaves, 5.0, block_d=16)
    neg.sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (anchors, positives, negatives)]
    reference.grouped_scores(*ref_leaves, 5.0)[1].sum().backward()
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        expected = torch.zeros_like(leaf) if ref_leaf.grad is None else ref_leaf.grad   # positives: unreached
        torch.testing.assert_close(leaf.grad, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", sorted(OPS))
def test_wide_embedding_default_blocks(op):
    _run(op, 2, 2, 1030, 100.0)
