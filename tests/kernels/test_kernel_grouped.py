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


@pytest.mark.parametrize("frozen", [("negatives",), ("anchors", "positives"), ("anchors", "positives", "negatives")])
def test_inputs_without_gradient(frozen):
    """Gradients an input does not need are not written (HAS_D*); the others equal the reference's."""
    g = torch.Generator().manual_seed(3)
    values = dict(anchors=unit(5, 19, generator=g), positives=unit(5, 19, generator=g),
                  negatives=unit(5, 3, 19, generator=g))
    grads = {}
    for name, fn in (("reference", reference.grouped_contrast_row_loss),
                     ("kernel", functools.partial(grouped_contrast_row_loss, block_d=16))):
        leaves = {k: v.clone().requires_grad_(k not in frozen) for k, v in values.items()}
        scale = torch.tensor(10.0, requires_grad=True)
        (fn(leaves["anchors"], leaves["positives"], leaves["negatives"], scale) * torch.arange(1.0, 6.0)).sum() \
            .backward()
        grads[name] = dict({k: leaf.grad for k, leaf in leaves.items()}, scale=scale.grad)
    for key, expected in grads["reference"].items():
        if key in frozen:
            assert grads["kernel"][key] is None
        else:
            torch.testing.assert_close(grads["kernel"][key], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", sorted(OPS))
def test_empty_batch(op):
    leaves = [torch.zeros(0, 19, requires_grad=True), torch.zeros(0, 19, requires_grad=True),
              torch.zeros(0, 3, 19, requires_grad=True)]
    scale = torch.tensor(10.0, requires_grad=True)
    out = OPS[op][1](*leaves, scale)
    sum(t.sum() for t in (out if isinstance(out, tuple) else (out,))).backward()
    assert [leaf.grad.shape for leaf in leaves] == [leaf.shape for leaf in leaves] and scale.grad.item() == 0.0
