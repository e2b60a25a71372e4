"""The pooling / XAC backward's 16-bit casts at the gradient magnitudes of the real size (issue 28).

A mean-reduced loss on the pooled output of the C2LIP target, [B, P, D] = [768, 2304, 768], sends every element of
∂v̂ about 1/(B·P·D) ≈ 7e-10: below fp16's smallest subnormal (6e-8). The kernels' fp16 path rounds ∂v̂ (in E = dV Uᵀ
and (A/n)ᵀ dV) and X, M, q·A to fp16 as they enter a dot; without a power-of-two scale they all flush to 0.

Emulation: the real kernels run in the interpreter with their fp16 path switched on (``dot_config`` returns fp16,
as it does on a GPU for fp16 inputs: fp16 dot operands and fp16 workspaces for G, M, W and X; products exact,
float32 accumulation, which is how the interpreter multiplies fp16). The inputs are float32 tensors holding
fp16-representable values, so the gradients come back in float32 and only the kernels' internal casts are under
test (an fp16 input's own .grad would flush values below 2⁻²⁴ whatever the kernel does, as in PyTorch). Token and
concept counts are the real L = 196 and a P, D that only set how many terms are summed; ∂v̂ has the real-size
magnitude. Against float64 on the same values.

Bound: 2e-3 relative error norm, four fp16 roundings (2⁻¹¹ each) along a gradient's path (measured: 3.5e-4).
The old kernels, without σ, return all-zero ∂tokens and ∂concepts (relative error 1.0) here; XAC, which forms its
coefficients for ∂L = 1, passes with a loss-mean ∂L of 1/(B·P) before and after.
"""
import pytest
import torch
import torch.nn.functional as F
import triton.language as tl

from compclip.kernels import concept_attention_pool, reference, xac_loss_sum, xattn_pool

REAL_B, REAL_P, REAL_D, L = 768, 2304, 768, 196
BOUND = 2e-3


def _inputs(P, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = F.normalize(torch.randn(1, L, D, generator=g), dim=-1).half().float()
    concepts = F.normalize(torch.randn(P, D, generator=g), dim=-1).half().float()
    return tokens, concepts, g


def _relative_errors(run_kernel, run_reference, tensors):
    ref = [t.double().requires_grad_() for t in tensors]
    run_reference(*ref)
    ker = [t.clone().requires_grad_() for t in tensors]
    run_kernel(*ker)
    return [((k.grad.double() - r.grad).norm() / r.grad.norm()).item() for k, r in zip(ker, ref)]


@pytest.fixture
def fp16_dots(monkeypatch):
    """The kernels' GPU path for fp16 inputs: fp16 dot operands and workspaces (the interpreter can multiply
    fp16, unlike bf16)."""
    monkeypatch.setattr(xattn_pool, "dot_config", lambda *tensors, follow_tf32=False: (tl.float16, "ieee"))


def test_pooling_backward_keeps_real_size_gradients_in_fp16(fp16_dots):
    tokens, concepts, g = _inputs(P=128, D=64)
    grad = torch.randn(1, 128, 64, generator=g, dtype=torch.float64) / (REAL_B * REAL_P * REAL_D)
    errors = _relative_errors(lambda u, c: concept_attention_pool(u, c).backward(grad.float()),
                              lambda u, c: reference.concept_attention_pool(u, c).backward(grad), [tokens, concepts])
    assert max(errors) < BOUND, errors


def test_xac_backward_at_a_loss_mean_in_fp16(fp16_dots):
    tokens, concepts, g = _inputs(P=128, D=64, seed=1)
    owner = torch.randint(0, 4, (128,), generator=g)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    grad = torch.tensor(1.0 / (REAL_B * REAL_P), dtype=torch.float64)            # mean over all pairs
    errors = _relative_errors(lambda u, c: xac_loss_sum(u, c, owner, scale, bias).backward(grad.float()),
                              lambda u, c: reference.xac_loss_sum(u, c, owner, scale, bias).backward(grad),
                              [tokens, concepts])
    assert max(errors) < BOUND, errors
