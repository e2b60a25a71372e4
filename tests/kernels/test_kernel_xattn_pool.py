"""concept_attention_pool / xac_loss_sum (Triton, interpreter on the CPU) against their references."""
import functools

import pytest
import torch

from compclip.kernels import concept_attention_pool, reference, xac_loss_sum, xattn_pool
from kernel_parity import check_parity, unit

SMALL = dict(block_p=16, block_l=16, block_d=16, block_do=16, chunk=2)   # several concept blocks, token tiles,
#                                                                        D slices and image chunks at test sizes


def _inputs(B, L, P, D, dtype, offset=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens, concepts = unit(B, L, D, dtype=dtype, generator=g), unit(P, D, dtype=dtype, generator=g)
    owner = offset + torch.randint(0, B, (P,), generator=g)
    return tokens, concepts, owner


def _run_xac(B, L, P, D, scale, bias, temperature=1.0, dtype=torch.float32, offset=0, non_contiguous=(),
             **blocks):
    tokens, concepts, owner = _inputs(B, L, P, D, dtype, offset)
    bias = None if bias is None else torch.tensor(bias)
    check_parity(reference.xac_loss_sum, functools.partial(xac_loss_sum, **blocks),
                 [tokens, concepts, owner, torch.tensor(scale), bias, temperature, offset], dtype, non_contiguous)


def _run_pool(B, L, P, D, temperature=1.0, dtype=torch.float32, non_contiguous=(), **blocks):
    tokens, concepts, _ = _inputs(B, L, P, D, dtype)
    check_parity(reference.concept_attention_pool, functools.partial(concept_attention_pool, **blocks),
                 [tokens, concepts, temperature], dtype, non_contiguous)


@pytest.mark.parametrize("B, L, P, D, scale, bias, temperature, offset, blocks", [
    (1, 7, 1, 5, 10.0, -2.0, 1.0, 0, {}),                 # one image, one concept
    (2, 7, 5, 19, 1.0, None, 1.0, 0, {}),                 # no bias, default blocks
    (3, 7, 37, 33, 100.0, -10.0, 0.5, 0, SMALL),          # three concept blocks, three D slices, T ≠ 1
    (3, 20, 19, 17, 10.0, 1.0, 1.0, 6, SMALL),            # data parallel: owners are global indices
])
def test_xac_fp32(B, L, P, D, scale, bias, temperature, offset, blocks):
    _run_xac(B, L, P, D, scale, bias, temperature, offset=offset, **blocks)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_xac_half_precision(dtype):
    _run_xac(2, 7, 19, 19, 10.0, -1.0, dtype=dtype, **SMALL)


def test_xac_non_contiguous_and_unnormalised():
    _run_xac(2, 7, 5, 19, 10.0, -1.0, non_contiguous=(0, 1), **SMALL)
    tokens, concepts, owner = _inputs(2, 7, 5, 19, torch.float32)      # the kernel must not assume unit rows
    check_parity(reference.xac_loss_sum, functools.partial(xac_loss_sum, **SMALL),
                 [3.0 * tokens, 0.5 * concepts, owner, torch.tensor(4.0), None, 2.0, 0], torch.float32)


@pytest.mark.parametrize("B, L, P, D, temperature, blocks", [
    (1, 7, 1, 5, 1.0, {}),
    (3, 7, 19, 33, 0.5, SMALL),
])
def test_pool_fp32(B, L, P, D, temperature, blocks):
    _run_pool(B, L, P, D, temperature, **blocks)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pool_half_precision(dtype):
    _run_pool(2, 7, 5, 19, dtype=dtype, **SMALL)


def test_pool_non_contiguous():
    _run_pool(2, 7, 5, 19, non_contiguous=(0,), **SMALL)


def test_float_scale_and_bias_get_no_gradient():
    tokens, concepts, owner = _inputs(2, 7, 5, 19, torch.float32)
    leaf = tokens.clone().requires_grad_()
    loss = xac_loss_sum(leaf, concepts, owner, 10.0, -1.0)
    torch.testing.assert_close(loss.detach(), reference.xac_loss_sum(tokens, concepts, owner, 10.0, -1.0),
                               rtol=1e-4, atol=1e-5)
    loss.backward()
    assert leaf.grad is not None


def test_wide_embedding_default_blocks():
    _run_xac(2, 3, 3, 1030, 100.0, -10.0)
    _run_pool(1, 3, 2, 1030)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_long_token_axis(dtype):
    # L = 300 in five 64-token tiles (default blocks; the last one ragged) in every L loop, Gram tiles included;
    # D = 21 (not a multiple of 8).
    _run_xac(2, 300, 3, 21, 10.0, -1.0, 0.5, dtype=dtype)
    if dtype == torch.float32:
        # five 32-token tiles (the last ragged: 150 = 4·32 + 22), two 16-wide D slices, several concept blocks and
        # image chunks
        small = dict(SMALL, block_l=32)
        _run_xac(3, 150, 19, 21, 10.0, -1.0, 0.5, **small)
        _run_pool(2, 150, 2, 21, 0.5, **small)


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_image_chunks(chunk):
    # 5 images in chunks of 1, 3 (balanced to 3 + 2: a ragged last chunk) and 5: ∂C is accumulated chunk after
    # chunk.
    _run_xac(5, 20, 19, 17, 10.0, -1.0, block_p=16, block_l=16, chunk=chunk)
    _run_pool(5, 20, 7, 17, chunk=chunk, block_l=16)


def test_one_concept_and_ragged_owners():
    # One concept (a 16-row block with 15 masked rows), owners outside this rank's images (all negatives).
    _run_xac(3, 5, 1, 9, 10.0, -2.0, offset=4, **SMALL)
    tokens, concepts, _ = _inputs(4, 9, 23, 17, torch.float32)
    owner = torch.tensor([0] * 11 + [3] * 9 + [2] * 3)             # image 1 owns nothing
    check_parity(reference.xac_loss_sum, functools.partial(xac_loss_sum, **SMALL),
                 [tokens, concepts, owner, torch.tensor(10.0), torch.tensor(-1.0), 1.0, 0], torch.float32)


@pytest.mark.parametrize("name", ["block_p", "block_l", "block_d", "block_do"])
def test_blocks_below_sixteen_are_rejected(name):
    tokens, concepts, owner = _inputs(1, 3, 2, 8, torch.float32)
    with pytest.raises(ValueError, match=name):
        xac_loss_sum(tokens, concepts, owner, 10.0, **{name: 8})
    with pytest.raises(ValueError, match=name):
        concept_attention_pool(tokens, concepts, **{name: 8})


def test_chunk_must_be_positive():
    tokens, concepts, owner = _inputs(2, 3, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="chunk"):
        xac_loss_sum(tokens, concepts, owner, 10.0, chunk=0)


@pytest.mark.parametrize("route", ["gram", "pooled"])
def test_both_routes_to_the_pair_statistics(route):
    # The Gram route (h = aG) and the pooled-vector route (W = AU per chunk, h = W Uᵀ), each forced, over several
    # token tiles (3), D slices (2), concept blocks (3) and chunks (2), for XAC and pooling, with and without a bias.
    blocks = dict(SMALL, route=route)
    _run_xac(3, 40, 37, 21, 100.0, -10.0, 0.5, **blocks)
    _run_xac(2, 7, 5, 19, 1.0, None, **blocks)
    _run_pool(3, 40, 19, 21, 0.5, **blocks)


def test_route_choice_follows_the_pass_count():
    from compclip.kernels.xattn_pool import choose_route
    assert choose_route(2304, 196, 768) == "gram"       # 3·196/768 + 3·196/2304 = 1.02 extra passes < 4
    assert choose_route(2304, 1024, 768) == "pooled"    # 5.33 > 4
    assert choose_route(2304, 768, 768) == "gram"       # exactly 4: either; the Gram route keeps less memory
    with pytest.raises(ValueError, match="route"):
        tokens, concepts, owner = _inputs(2, 3, 2, 8, torch.float32)
        xac_loss_sum(tokens, concepts, owner, 10.0, route="direct")


# ---- issue 28: token tiles, the ∂C split, inputs without gradients, empty batches --------------------------------
@pytest.mark.parametrize("L, block", [(50, 64), (196, 32), (197, 32), (257, 32), (577, 32), (1024, 64), (7, 16),
                                      (20, 32), (300, 64)])
def test_token_tile_pads_least(L, block):
    from compclip.kernels.xattn_pool import choose_block_l
    assert choose_block_l(L) == block
    assert choose_block_l(L, 16) == 16


def test_concept_gradient_split_over_images(monkeypatch):
    """With few SMs the ∂C kernel splits a chunk's images over several programs per output tile (2 + 2 + 1 of a
    5-image chunk here) and sums the float32 partials in order; the interpreter's default of 132 SMs gives one
    image per split at the other tests' sizes."""
    from compclip.kernels import _common
    monkeypatch.setattr(xattn_pool, "sm_count", lambda tensor: 4)
    splits, per_split = _common.split_axis(2 * 2, 5, 1, 4)        # 2 concept blocks × 2 D slices of 16
    assert (splits, per_split) == (3, 2)
    _run_xac(5, 7, 19, 17, 10.0, -1.0, block_p=16, block_l=16, block_d=16, block_do=16, chunk=5)


@pytest.mark.parametrize("frozen", [("tokens",), ("concepts",), ("tokens", "concepts")])
@pytest.mark.parametrize("route", ["gram", "pooled"])
def test_inputs_without_gradient(frozen, route):
    """Frozen tokens skip M and ∂U, frozen concepts ∂C, both frozen X as well (only ∂s and ∂b): the other
    gradients still equal the reference's."""
    tokens, concepts, owner = _inputs(2, 20, 19, 17, torch.float32)
    grads = {}
    for name, fn in (("reference", reference.xac_loss_sum), ("kernel", functools.partial(xac_loss_sum, **SMALL,
                                                                                           route=route))):
        leaves = dict(tokens=tokens.clone().requires_grad_("tokens" not in frozen),
                      concepts=concepts.clone().requires_grad_("concepts" not in frozen),
                      scale=torch.tensor(10.0, requires_grad=True), bias=torch.tensor(-1.0, requires_grad=True))
        fn(leaves["tokens"], leaves["concepts"], owner, leaves["scale"], leaves["bias"]).backward()
        grads[name] = {k: v.grad for k, v in leaves.items()}
    for key, expected in grads["reference"].items():
        if key in frozen:
            assert grads["kernel"][key] is None
        else:
            torch.testing.assert_close(grads["kernel"][key], expected, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{key}: {m}")


def test_empty_batches():
    """No images (a rank without local images) and no concepts: zero losses, zero gradients of the right shape."""
    tokens, concepts, owner = _inputs(2, 7, 5, 19, torch.float32)
    for u, c, o in ((tokens[:0], concepts, owner), (tokens, concepts[:0], owner[:0])):
        leaves = [u.clone().requires_grad_(), c.clone().requires_grad_()]
        scale = torch.tensor(10.0, requires_grad=True)
        loss = xac_loss_sum(*leaves, o, scale, torch.tensor(-1.0))
        assert loss.item() == 0.0
        loss.backward()
        assert all(torch.equal(leaf.grad, torch.zeros_like(leaf)) for leaf in leaves) and scale.grad.item() == 0.0
        pooled = concept_attention_pool(u, c)
        assert pooled.shape == (u.shape[0], c.shape[0], 19)
