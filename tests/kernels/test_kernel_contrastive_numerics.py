"""The kernel's 16-bit casting sequence at real magnitudes, emulated in PyTorch on the CPU.

NegCLIP at B = 32,768 images, K = 4 (163,840 columns), D = 512, logit scale 100, random unit vectors, loss = the
mean over 2B rows (g = 1/2B per row). The emulation follows the kernel exactly: operands rounded to fp16,
products exact and accumulated in float32; G = g·(p − 1[n = t]) scaled by σ = ``grad_scale_of(g)`` and rounded
to fp16 before the gradient GEMMs; float32 accumulator unscaled by s/σ. Each row's loss and ∂a depend only on
that row and all columns, and the rows' ∂C contributions are Gᵀ A over those rows, so a few sampled anchor rows
are checked exactly, against float64 on the same fp16-rounded inputs.

Tolerance: relative error norm ≤ 2^-11 ≈ 4.9e-4 (fp16's unit roundoff) for ∂a and ∂C: after scaling, every
entry of σG that matters is a normal fp16 number, so its rounding error is at most 2^-11 relative, and the
float32 accumulation adds ~1e-6; the bound is the worst case of the one rounding left (measured: 9.4e-5). The
old sequence (G rounded to fp16 unscaled: g·p ≤ 1e-5, median 7e-15, all in fp16's subnormal range below 6.1e-5,
or flushed to 0) measures 2.7e-2 (∂a) and 1.3e-2 (∂C), and must fail the same bound. Loss: float32 accumulation
of exact fp16 products, |error| ≤ 1e-4 (measured 2.4e-6).
"""
import torch
import torch.nn.functional as F

from compclip.kernels.contrastive import grad_scale_of

B, K, D, SCALE, ROWS = 32768, 4, 512, 100.0, 4


def _problem():
    g = torch.Generator().manual_seed(0)
    columns = torch.empty(B * (1 + K), D, dtype=torch.float16)
    for start in range(0, columns.shape[0], 32768):          # normalise in chunks: bounded float32 memory
        columns[start:start + 32768] = F.normalize(torch.randn(32768, D, generator=g), dim=-1).half()
    rows = torch.tensor([0, 123, 20000, B - 1])
    anchors = F.normalize(torch.randn(ROWS, D, generator=g), dim=-1).half()
    return anchors, columns, rows


def _exact(anchors, columns, rows, grad):
    a, c = anchors.double(), columns.double()
    logits = SCALE * a @ c.t()
    loss = torch.logsumexp(logits, 1) - logits[torch.arange(ROWS), rows]
    coef = grad.double()[:, None] * (torch.softmax(logits, 1) - F.one_hot(rows, c.shape[0]).double())
    return loss, SCALE * coef @ c, SCALE * coef.t() @ a


def _emulated(anchors, columns, rows, grad, scaled: bool):
    a, c = anchors.float(), columns.float()                   # fp16 values; fp32 matmul = exact products, fp32 sums
    logits = SCALE * a @ c.t()
    lse = torch.logsumexp(logits, 1)
    loss = lse - logits[torch.arange(ROWS), rows]
    sigma = grad_scale_of(grad) if scaled else torch.ones(1)
    prob = torch.exp(logits - lse[:, None])
    coef = (sigma * grad[:, None]) * (prob - F.one_hot(rows, c.shape[0]).float())
    coef = coef.half().float()                                # the kernel's cast before the gradient GEMMs
    return loss, (SCALE / sigma) * (coef @ c), (SCALE / sigma) * (coef.t() @ a)


def _rel(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


def test_scaled_gradient_cast_matches_float64_at_real_sizes():
    anchors, columns, rows = _problem()
    grad = torch.full((ROWS,), 1.0 / (2 * B))
    loss, d_a, d_c = _exact(anchors, columns, rows, grad)
    new = _emulated(anchors, columns, rows, grad, scaled=True)
    old = _emulated(anchors, columns, rows, grad, scaled=False)
    torch.testing.assert_close(new[0].double(), loss, rtol=1e-5, atol=1e-4)
    errors = {"new dA": _rel(new[1], d_a), "new dC": _rel(new[2], d_c),
              "old dA": _rel(old[1], d_a), "old dC": _rel(old[2], d_c)}
    bound = 2.0 ** -11
    assert errors["new dA"] < bound and errors["new dC"] < bound, errors
    assert errors["old dA"] > bound and errors["old dC"] > bound, errors    # the unscaled cast fails the same bar
