"""Kernel-backed losses vs their PyTorch references and peers: op × provider × mode × size.

Groups are ``<op> <size>``, so pytest-benchmark's table lists the providers of one op and size together.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import compclip.losses as losses
from harness import CUDA, SIZES, Case, require_cuda, run_case
from providers import contrastive_providers

MODES = ("forward", "backward", "full")
DTYPE = torch.bfloat16 if CUDA else torch.float32

CONTRASTIVE_SIZES = {  # (B, K, D); K = 0 is plain CLIP
    "tiny": [(64, 0, 32), (64, 4, 32)],
    "cpu": [(256, 0, 512), (256, 4, 512), (1024, 4, 512)],
    "gpu": [(4096, 0, 512), (32768, 0, 512), (4096, 4, 512), (16384, 4, 512), (32768, 4, 512)],
}[SIZES]
GROUPED_SIZES = {"tiny": [(64, 4, 32)], "cpu": [(4096, 4, 512)], "gpu": [(32768, 4, 512), (262144, 4, 512)]}[SIZES]
XAC_SIZES = {  # (B images, P concepts, L tokens, D)
    "tiny": [(4, 12, 9, 32)],
    "cpu": [(16, 48, 50, 128)],
    "gpu": [(128, 384, 196, 768), (768, 2304, 196, 768)],
}[SIZES]
POOL_SIZES = {"tiny": [(4, 12, 9, 32)], "cpu": [(16, 64, 50, 256)], "gpu": [(128, 2048, 50, 768)]}[SIZES]


def _unit(*shape, device):
    return F.normalize(torch.randn(*shape, device=device, dtype=torch.float32), dim=-1).to(DTYPE)


def _case(loss_fn, make_leaves, mode: str, **costs) -> Case:
    """Forward = the loss (graph built, as in training); backward = loss.backward() alone; full = both."""

    def fresh():
        return tuple(t.requires_grad_(True) for t in make_leaves())

    if mode == "forward":
        return Case(setup=fresh, run=loss_fn, **costs)
    if mode == "backward":
        return Case(setup=lambda: (loss_fn(*fresh()),), run=lambda loss: loss.backward(), **costs)
    return Case(setup=fresh, run=lambda *leaves: loss_fn(*leaves).backward(), **costs)


def _gemm_equivalents(mode: str) -> int:
    # forward: the logits once; backward: recompute + d(rows) + d(columns)
    return {"forward": 1, "backward": 3, "full": 4}[mode]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["torch", "linear_ce", "infcl", "triton"])
@pytest.mark.parametrize("size", CONTRASTIVE_SIZES, ids=lambda s: "B{}-K{}-D{}".format(*s))
def test_contrastive(benchmark, device, rounds, size, provider, mode):
    batch, num_negatives, dim = size
    loss = contrastive_providers()[provider]
    if provider in ("triton", "infcl"):
        require_cuda(provider)
    if loss is None:
        pytest.skip(f"{provider} is not installed (pip install inf-cl)")
    if provider == "infcl" and num_negatives:
        pytest.skip("Inf-CL computes plain CLIP only")
    benchmark.group = f"contrastive B={batch} K={num_negatives} D={dim}"
    scale = torch.tensor(100.0, device=device)

    def leaves():
        negatives = _unit(batch, num_negatives, dim, device=device) if num_negatives else None
        return tuple(t for t in (_unit(batch, dim, device=device), _unit(batch, dim, device=device), negatives)
                     if t is not None)

    def call(image, text, *rest):
        return loss(image, text, rest[0] if rest else None, scale)

    gemm = 2.0 * batch * batch * (1 + num_negatives) * dim
    n = _gemm_equivalents(mode)
    run_case(benchmark, _case(call, leaves, mode, flops=n * gemm, floor_flops=n * gemm), rounds)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["torch", "triton"])
@pytest.mark.parametrize("size", GROUPED_SIZES, ids=lambda s: "B{}-K{}-D{}".format(*s))
def test_grouped_igc(benchmark, device, rounds, size, provider, mode):
    batch, num_negatives, dim = size
    if provider == "triton":
        require_cuda(provider)
    benchmark.group = f"grouped IGC B={batch} K={num_negatives} D={dim}"
    scale = torch.tensor(100.0, device=device)

    def leaves():
        return (_unit(batch, dim, device=device), _unit(batch, dim, device=device),
                _unit(batch, num_negatives, dim, device=device))

    def call(image, text, negatives):
        return losses.degla_igc_loss(image, text, negatives, scale, backend=provider)

    inputs = batch * (2 + num_negatives) * dim * DTYPE.itemsize
    # forward reads the inputs once; backward reads them again and writes their gradients
    traffic = {"forward": inputs, "backward": 2 * inputs, "full": 3 * inputs}[mode]
    run_case(benchmark, _case(call, leaves, mode, bytes_moved=traffic), rounds)


@pytest.mark.parametrize("size", GROUPED_SIZES, ids=lambda s: "B{}-K{}-D{}".format(*s))
def test_grouped_read_floor(benchmark, device, rounds, size):
    """A pure read of the grouped-contrast inputs: the bandwidth yardstick the kernel is compared with."""
    batch, num_negatives, dim = size
    benchmark.group = f"grouped IGC B={batch} K={num_negatives} D={dim}"
    benchmark.name = "read-inputs"
    inputs = batch * (2 + num_negatives) * dim * DTYPE.itemsize
    case = Case(
        setup=lambda: (_unit(batch, dim, device=device), _unit(batch, dim, device=device),
                       _unit(batch, num_negatives, dim, device=device)),
        run=lambda *tensors: [t.sum(dtype=torch.float32) for t in tensors],
        bytes_moved=inputs,
    )
    run_case(benchmark, case, rounds)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["torch", "triton"])
@pytest.mark.parametrize("size", XAC_SIZES, ids=lambda s: "B{}-P{}-L{}-D{}".format(*s))
def test_xac(benchmark, device, rounds, size, provider, mode):
    images, concepts, tokens, dim = size
    if provider == "triton":
        require_cuda(provider)
    benchmark.group = f"XAC B={images} P={concepts} L={tokens} D={dim}"
    scale, bias = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    owner = torch.arange(concepts, device=device) % images

    def leaves():
        return _unit(images, tokens, dim, device=device), _unit(concepts, dim, device=device)

    def call(token_embeddings, concept_embeddings):
        return losses.c2lip_xac_loss(token_embeddings, concept_embeddings, owner, scale, bias, backend=provider)

    # scores and weighted sum: 2 GEMM-like products of B·P·L·D each
    flops = 4.0 * images * concepts * tokens * dim * {"forward": 1, "backward": 2, "full": 3}[mode]
    run_case(benchmark, _case(call, leaves, mode, flops=flops), rounds)


@pytest.mark.parametrize("provider", ["torch", "triton"])
@pytest.mark.parametrize("size", POOL_SIZES, ids=lambda s: "B{}-P{}-L{}-D{}".format(*s))
def test_attention_pool_inference(benchmark, device, rounds, size, provider):
    images, concepts, tokens, dim = size
    if provider == "triton":
        require_cuda(provider)
    benchmark.group = f"attention pool (inference) B={images} P={concepts} L={tokens} D={dim}"
    written = images * concepts * dim * DTYPE.itemsize
    read = (images * tokens + concepts) * dim * DTYPE.itemsize
    case = Case(
        setup=lambda: (_unit(images, tokens, dim, device=device), _unit(concepts, dim, device=device)),
        run=lambda token_embeddings, concept_embeddings: losses.concept_attention_pool(
            token_embeddings, concept_embeddings, backend=provider),
        bytes_moved=written + read,
    )
    with torch.no_grad():
        run_case(benchmark, case, rounds)
