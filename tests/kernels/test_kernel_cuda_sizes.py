"""The kernels at the sizes they are built for, on a GPU (skipped without CUDA; the interpreter cannot reach
these sizes). bf16 inputs against the float32 reference on the same rounded values: outputs and every gradient,
compared by relative error norm, since at these sizes a max-abs tolerance would only measure the rounding of
the largest of millions of entries."""
import inspect

import pytest
import torch
import torch.nn.functional as F

import compclip.kernels as kernels
from compclip.kernels import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: sizes far beyond the interpreter")


def _unit(*shape):
    return F.normalize(torch.randn(*shape, device="cuda"), dim=-1).to(torch.bfloat16)


def _relative_error(actual, expected):
    actual, expected = actual.detach().float(), expected.detach().float()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def _parity(reference_fn, kernel_fn, inputs, output_tol=2e-3, grad_tol=2e-2):
    ref_leaves = [t.detach().float().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor)
                  else t for t in inputs]
    ker_leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor)
                  else t for t in inputs]
    expected, actual = reference_fn(*ref_leaves), kernel_fn(*ker_leaves)
    assert _relative_error(actual, expected) < output_tol
    weights = torch.randn(expected.shape, device="cuda")
    (expected * weights).sum().backward()
    (actual * weights).sum().backward()
    del expected, actual
    for index, (ref, ker) in enumerate(zip(ref_leaves, ker_leaves)):
        if isinstance(ref, torch.Tensor) and ref.requires_grad:
            assert ker.grad is not None, f"input {index}: no gradient"
            error = _relative_error(ker.grad, ref.grad)
            assert error < grad_tol, f"input {index}: relative gradient error {error:.2e}"


@pytest.mark.parametrize("batch,num_negatives", [(32768, 0), (8192, 4), (12345, 3)])
def test_contrastive_at_scale(batch, num_negatives):
    dim = 512
    image, text = _unit(batch, dim), _unit(batch, dim)
    columns = torch.cat([text, _unit(batch * num_negatives, dim)]) if num_negatives else text
    scale = torch.tensor(100.0, device="cuda")
    targets = torch.arange(batch, device="cuda")
    _parity(reference.contrastive_row_loss, kernels.contrastive_row_loss, [image, columns, scale, targets])


def test_imc_paper_rows_at_scale():
    batch, num_negatives, dim = 8192, 4, 512
    text, negatives = _unit(batch, dim), _unit(batch * num_negatives, dim)
    extra = torch.randn(batch, device="cuda") * 30
    targets = torch.full((batch,), -1, device="cuda", dtype=torch.long)
    scale = torch.tensor(100.0, device="cuda")
    _parity(reference.contrastive_row_loss, kernels.contrastive_row_loss, [text, negatives, scale, targets, extra])


def test_grouped_at_scale():
    batch, num_negatives, dim = 262144, 4, 512
    scale = torch.tensor(100.0, device="cuda")
    _parity(reference.grouped_contrast_row_loss, kernels.grouped_contrast_row_loss,
            [_unit(batch, dim), _unit(batch, dim), _unit(batch, num_negatives, dim), scale])


@pytest.mark.parametrize("images,tokens,chunk", [(768, 196, None), (768, 577, None), (256, 1024, None),
                                                 (300, 196, 128)])
def test_xac_at_c2lip_scale(images, tokens, chunk):
    # ViT-B/16 (196 tokens), ViT-L/14-336 (577), 1024 tokens; the last row forces three workspace chunks.
    concepts, dim = 2304, 768
    owner = torch.randint(0, images, (concepts,), device="cuda")
    scale, bias = torch.tensor(10.0, device="cuda"), torch.tensor(-10.0, device="cuda")

    def kernel_fn(*args):
        return kernels.xac_loss_sum(*args, chunk=chunk)

    _parity(reference.xac_loss_sum, kernel_fn, [_unit(images, tokens, dim), _unit(concepts, dim), owner, scale, bias])


def test_attention_pool_at_scale():
    images, concepts, tokens, dim = 128, 2048, 50, 768
    _parity(reference.concept_attention_pool, kernels.concept_attention_pool,
            [_unit(images, tokens, dim), _unit(concepts, dim)])


# A contrastive kernel that takes the negatives as a second column source (``extra_columns``) is tested at scale
# against the reference on the concatenated columns; older kernels without that keyword skip this one test.
HAS_EXTRA_COLUMNS = "extra_columns" in inspect.signature(kernels.contrastive_row_loss).parameters


@pytest.mark.skipif(not HAS_EXTRA_COLUMNS, reason="contrastive_row_loss has no extra_columns keyword")
def test_contrastive_separate_negative_source_at_scale():
    batch, num_negatives, dim = 32768, 4, 768
    image, text, negatives = _unit(batch, dim), _unit(batch, dim), _unit(batch * num_negatives, dim)
    scale = torch.tensor(100.0, device="cuda")
    targets = torch.arange(batch, device="cuda")

    def reference_fn(image, text, negatives, scale, targets):
        return reference.contrastive_row_loss(image, torch.cat([text, negatives]), scale, targets)

    def kernel_fn(image, text, negatives, scale, targets):
        return kernels.contrastive_row_loss(image, text, scale, targets, extra_columns=negatives)

    _parity(reference_fn, kernel_fn, [image, text, negatives, scale, targets])
