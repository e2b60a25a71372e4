"""The kernels at the sizes they are built for, on a GPU (skipped without CUDA; the interpreter cannot reach
these sizes). bf16 inputs against the float32 reference on the same rounded values: outputs and every gradient,
compared by relative error norm, since at these sizes a max-abs tolerance would only measure the rounding of
the largest of millions of entries.

The reference runs in chunks (of rows, or of images) whose float32 intermediates stay within a few GB: whole, the
contrastive reference at M = 32,768 against 163,840 columns would hold 4–5 [M, N] float32 tensors of 21.5 GB at
its backward's peak, more than an 80 GB card has. Each chunk's graph is built, backpropagated with its slice of
the output weights and freed; the gradients accumulate in the float32 leaves."""
import inspect

import pytest
import torch
import torch.nn.functional as F

import compclip.kernels as kernels
from compclip.kernels import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: sizes far beyond the interpreter")

CHUNK_ELEMENTS = 1 << 29         # float32 elements of a reference chunk's widest intermediate (2 GiB)


def _unit(*shape):
    return F.normalize(torch.randn(*shape, device="cuda"), dim=-1).to(torch.bfloat16)


def _relative_error(actual, expected):
    actual, expected = actual.detach().float(), expected.detach().float()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def _parity(reference_pieces, kernel_fn, inputs, output_tol=2e-3, grad_tol=2e-2):
    """``reference_pieces(*leaves)`` yields (piece of the reference output, index): ``index`` a slice of the output's
    first axis, or None where the output is a sum and the piece one of its terms."""
    ref_leaves = [t.detach().float().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor)
                  else t for t in inputs]
    ker_leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor)
                  else t for t in inputs]
    actual = kernel_fn(*ker_leaves)
    weights = torch.randn(actual.shape, device="cuda")
    expected = torch.zeros(actual.shape, device="cuda")
    for piece, index in reference_pieces(*ref_leaves):
        if index is None:
            expected += piece.detach()
            (piece * weights).sum().backward()
        else:
            expected[index] = piece.detach()
            (piece * weights[index]).sum().backward()
        del piece
    assert _relative_error(actual, expected) < output_tol
    (actual * weights).sum().backward()
    del actual, expected
    for index, (ref, ker) in enumerate(zip(ref_leaves, ker_leaves)):
        if isinstance(ref, torch.Tensor) and ref.requires_grad:
            assert ker.grad is not None, f"input {index}: no gradient"
            error = _relative_error(ker.grad, ref.grad)
            assert error < grad_tol, f"input {index}: relative gradient error {error:.2e}"


def whole(fn):
    """Reference pieces of an op small enough to run in one piece."""
    return lambda *args: iter([(fn(*args), slice(None))])


def _row_chunks(fn, rows: int, width: int, sliced):
    """Reference pieces of a row-wise op: ``fn`` on chunks of rows whose [rows, width] intermediates stay within
    CHUNK_ELEMENTS; ``sliced``: the argument positions that have one entry per row (None arguments pass)."""
    step = max(1, CHUNK_ELEMENTS // max(width, 1))

    def pieces(*args):
        for start in range(0, rows, step):
            index = slice(start, min(start + step, rows))
            chunk = [a[index] if i in sliced and a is not None else a for i, a in enumerate(args)]
            yield fn(*chunk), index
    return pieces


def _image_chunks(fn, images: int, per_image: int, summed: bool, **keywords):
    """Reference pieces of an op over images (tokens first); XAC's sum gets ``image_offset`` = the chunk's first."""
    step = max(1, CHUNK_ELEMENTS // max(per_image, 1))

    def pieces(tokens, *rest):
        for start in range(0, images, step):
            index = slice(start, min(start + step, images))
            extra = dict(keywords, image_offset=start) if summed else keywords
            yield fn(tokens[index], *rest, **extra), None if summed else index
    return pieces


@pytest.mark.parametrize("batch,num_negatives", [(32768, 0), (8192, 4), (12345, 3)])
def test_contrastive_at_scale(batch, num_negatives):
    dim = 512
    image, text = _unit(batch, dim), _unit(batch, dim)
    columns = torch.cat([text, _unit(batch * num_negatives, dim)]) if num_negatives else text
    scale = torch.tensor(100.0, device="cuda")
    targets = torch.arange(batch, device="cuda")
    _parity(_row_chunks(reference.contrastive_row_loss, batch, columns.shape[0], {0, 3}),
            kernels.contrastive_row_loss, [image, columns, scale, targets])


@pytest.mark.parametrize("deterministic", [True, False])
def test_contrastive_local_batch_of_eight_ranks(deterministic):
    """One rank of 8 at B = 32,768 (M = 4,096 rows against 163,840 columns): the split forward and ∂A kernels."""
    rows, columns_count, dim = 4096, 163840, 512
    anchors, columns = _unit(rows, dim), _unit(columns_count, dim)
    scale = torch.tensor(100.0, device="cuda")
    targets = 4096 * 3 + torch.arange(rows, device="cuda")                 # rank 3's rows of the global batch

    def kernel_fn(*args):
        return kernels.contrastive_row_loss(*args, deterministic=deterministic)
    _parity(_row_chunks(reference.contrastive_row_loss, rows, columns_count, {0, 3}), kernel_fn,
            [anchors, columns, scale, targets])


def test_imc_paper_rows_at_scale():
    batch, num_negatives, dim = 8192, 4, 512
    text, negatives = _unit(batch, dim), _unit(batch * num_negatives, dim)
    extra = torch.randn(batch, device="cuda") * 30
    targets = torch.full((batch,), -1, device="cuda", dtype=torch.long)
    scale = torch.tensor(100.0, device="cuda")
    _parity(_row_chunks(reference.contrastive_row_loss, batch, negatives.shape[0], {0, 3, 4}),
            kernels.contrastive_row_loss, [text, negatives, scale, targets, extra])


def test_grouped_at_scale():
    batch, num_negatives, dim = 262144, 4, 512
    scale = torch.tensor(100.0, device="cuda")
    _parity(_row_chunks(reference.grouped_contrast_row_loss, batch, num_negatives * dim, {0, 1, 2}),
            kernels.grouped_contrast_row_loss,
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

    _parity(_image_chunks(reference.xac_loss_sum, images, concepts * max(tokens, dim), True),
            kernel_fn, [_unit(images, tokens, dim), _unit(concepts, dim), owner, scale, bias])


def test_attention_pool_at_scale():
    images, concepts, tokens, dim = 128, 2048, 50, 768
    _parity(_image_chunks(reference.concept_attention_pool, images, concepts * dim, False),
            kernels.concept_attention_pool, [_unit(images, tokens, dim), _unit(concepts, dim)])


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

    _parity(_row_chunks(reference_fn, batch, batch * (1 + num_negatives), {0, 4}), kernel_fn,
            [image, text, negatives, scale, targets])


def test_empty_local_batch_on_gpu():
    """M = 0 rows on a rank: an empty loss, zero column and scale gradients, no launch with an empty grid."""
    columns = _unit(1000, 512).requires_grad_()
    scale = torch.tensor(100.0, device="cuda", requires_grad=True)
    anchors = torch.zeros(0, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    loss = kernels.contrastive_row_loss(anchors, columns, scale, torch.zeros(0, dtype=torch.long, device="cuda"))
    loss.sum().backward()
    assert loss.shape == (0,) and torch.count_nonzero(columns.grad) == 0 and scale.grad.item() == 0.0
