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
    budgets of docs/kernels.md: contrastive 5 passes per direction (deterministic), XAC ≤ 8."""
    from compclip.kernels.passes import BUDGETS, XATTN_SHAPE, measure, xattn_closed_form
    rows = {r["op"]: r for r in measure(["contrastive_row_loss", "xac_loss_sum", "concept_attention_pool",
                                         "xac_loss_sum[pooled]"])}
    contrastive = rows["contrastive_row_loss"]
    assert (contrastive["forward"], contrastive["backward"]) == (1.0, 4.0)
    assert contrastive["total"] <= BUDGETS["contrastive_row_loss"]
    shape = {k: XATTN_SHAPE[k] for k in ("P", "L", "D")}
    for op, route in (("xac_loss_sum", "gram"), ("concept_attention_pool", "gram"), ("xac_loss_sum[pooled]", "pooled")):
        expected = xattn_closed_form(op, **shape, route=route)
        for key in ("forward", "backward"):
            assert rows[op][key] == pytest.approx(expected[key], rel=1e-12), (op, key)
    assert rows["xac_loss_sum"]["total"] <= BUDGETS["xac_loss_sum"]
    assert rows["xac_loss_sum[pooled]"]["total"] == pytest.approx(8.0)
