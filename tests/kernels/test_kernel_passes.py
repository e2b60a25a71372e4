"""The pass counter (compclip.kernels.passes) against closed forms, on a tiny kernel written here, so that the
counts it reports for the real kernels can be trusted."""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from compclip.kernels.passes import count_dots


@triton.jit
def _tiled_matmul(x_ptr, y_ptr, out_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # out[pid*BM : (pid+1)*BM, :BN] = X[rows] @ Y, K in BK slices: K / BK tl.dots per program.
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    cols = tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :])
        y = tl.load(y_ptr + ks[:, None] * BN + cols[None, :])
        acc = tl.dot(x, y, acc, input_precision="ieee")
    tl.store(out_ptr + rows[:, None] * BN + cols[None, :], acc)


@pytest.mark.parametrize("programs,BM,BN,BK,K", [(1, 16, 16, 16, 16), (3, 32, 16, 16, 64), (2, 16, 32, 32, 96)])
def test_counter_matches_closed_form(programs, BM, BN, BK, K):
    x, y = torch.randn(programs * BM, K), torch.randn(K, BN)
    out = torch.empty(programs * BM, BN)
    with count_dots() as counter:
        _tiled_matmul[(programs,)](x, y, out, K, BM=BM, BN=BN, BK=BK)
    # one GEMM of [programs·BM, K] × [K, BN]: 2·M·N·K FLOPs in programs·K/BK dots
    assert counter.flops == 2 * programs * BM * BN * K
    assert counter.calls == programs * K // BK
    np.testing.assert_allclose(out.numpy(), (x @ y).numpy(), rtol=1e-4, atol=1e-4)


def test_counter_restores_the_interpreter():
    from triton.runtime.interpreter import InterpreterBuilder
    before = InterpreterBuilder.create_dot
    with count_dots():
        pass
    assert InterpreterBuilder.create_dot is before


def test_contrastive_and_xac_work_at_their_closed_forms_within_budget():
    """The executed dot FLOPs of the real kernels equal the closed forms their docstrings derive, and meet the
    budgets of docs/kernels.md: contrastive 5 passes per direction (deterministic), XAC ≤ 8; inputs without a
    gradient skip their kernels (issue 28)."""
    from compclip.kernels.passes import BUDGETS, XATTN_SHAPE, measure
    from compclip.kernels.xattn_pool import executed_passes
    xattn_shape = XATTN_SHAPE
    rows = {r["op"]: r for r in measure(["contrastive_row_loss", "contrastive_row_loss[columns frozen]",
                                         "contrastive_row_loss[anchors frozen]", "xac_loss_sum",
                                         "concept_attention_pool", "xac_loss_sum[pooled]",
                                         "xac_loss_sum[tokens frozen]", "xac_loss_sum[tokens, concepts frozen]",
                                         "grouped_contrast_row_loss", "grouped_contrast_row_loss[negatives frozen]"])}
    contrastive = rows["contrastive_row_loss"]
    assert (contrastive["forward"], contrastive["backward"]) == (1.0, 4.0)
    assert contrastive["total"] <= BUDGETS["contrastive_row_loss"]
    assert rows["contrastive_row_loss[columns frozen]"]["backward"] == 2.0           # no ∂C kernel
    assert rows["contrastive_row_loss[anchors frozen]"]["backward"] == 3.0           # dA kernel: recompute only
    shape = {k: xattn_shape[k] for k in ("P", "L", "D")}
    for op, route, need in (("xac_loss_sum", "gram", (True, True)), ("concept_attention_pool", "gram", (True, True)),
                            ("xac_loss_sum[pooled]", "pooled", (True, True)),
                            ("xac_loss_sum[tokens frozen]", "gram", (False, True)),
                            ("xac_loss_sum[tokens, concepts frozen]", "gram", (False, False))):
        expected = executed_passes(op, **shape, route=route, need_tokens=need[0], need_concepts=need[1])
        for key in ("forward", "backward"):
            assert rows[op][key] == pytest.approx(expected[key], rel=1e-12), (op, key)
    assert rows["xac_loss_sum"]["total"] <= BUDGETS["xac_loss_sum"]
    assert rows["xac_loss_sum[pooled]"]["total"] == pytest.approx(8.0)
    # memory-bound grouped loss: frozen negatives are not written (K·D of each row's 2·(K + 2)·D moves)
    saved = rows["grouped_contrast_row_loss"]["backward_reads"] - \
        rows["grouped_contrast_row_loss[negatives frozen]"]["backward_reads"]
    assert saved == pytest.approx(4 / 6, rel=1e-3)


@pytest.mark.parametrize("op, route", [("xac_loss_sum", "gram"), ("concept_attention_pool", "pooled")])
def test_executed_passes_count_the_padding(op, route):
    """At ragged extents (P, L, D not multiples of their tiles) the closed form with padding equals what the
    interpreter executes; the useful count is smaller."""
    import torch.nn.functional as F
    from compclip.kernels import concept_attention_pool, xac_loss_sum
    from compclip.kernels.passes import _fwd_bwd
    from compclip.kernels.xattn_pool import default_tiles, executed_passes
    P, L, D = 40, 50, 48
    tiles = default_tiles(P, L, D, block_p=32, block_l=32, block_d=32, block_do=32)
    tokens, concepts = F.normalize(torch.randn(1, L, D), dim=-1), F.normalize(torch.randn(P, D), dim=-1)
    blocks = dict(block_p=32, block_l=32, block_d=32, block_do=32, route=route)
    if op == "xac_loss_sum":
        def make():
            return xac_loss_sum(tokens.clone().requires_grad_(), concepts.clone().requires_grad_(),
                                torch.zeros(P, dtype=torch.long), 10.0, -1.0, **blocks)
    else:
        def make():
            return concept_attention_pool(tokens.clone().requires_grad_(), concepts.clone().requires_grad_(),
                                          **blocks)
    measured = _fwd_bwd(op, make, 2 * P * L * D)
    expected = executed_passes(op, P, L, D, route, tiles)
    assert (measured["forward"], measured["backward"]) == pytest.approx((expected["forward"],
                                                                          expected["backward"]), rel=1e-12)
    assert expected["useful_total"] < expected["total"]


@pytest.mark.parametrize("L", [50, 196, 197, 257, 577, 1024])
def test_xac_executed_passes_within_budget_at_real_lengths(L):
    """Issue 28: with BLOCK_L = 64 the padding took XAC to 8.13 executed passes at L = 577 (P = 2,304, D = 768);
    the chosen tile and route keep every listed L within 8, padding included."""
    from compclip.kernels.passes import BUDGETS
    from compclip.kernels.xattn_pool import choose_route, default_tiles, executed_passes
    P, D = 2304, 768
    tiles = default_tiles(P, L, D)
    assert executed_passes("xac_loss_sum", P, L, D, choose_route(P, L, D, tiles), tiles)["total"] <= \
        BUDGETS["xac_loss_sum"]
    before = dict(tiles, BLOCK_L=64)                                    # the old fixed token tile
    old_route = "gram" if 3 * L / D + 3 * L / P <= 4 else "pooled"
    if L == 577:
        assert executed_passes("xac_loss_sum", P, L, D, old_route, before)["total"] == pytest.approx(8.13, abs=0.01)
