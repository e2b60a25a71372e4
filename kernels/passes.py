"""Pass counter: the FLOPs of every ``tl.dot`` the kernels execute, counted under Triton's interpreter
(project issue #10, item 5).

``python -m compclip.kernels.passes [--json out.json]`` (re-executes itself with TRITON_INTERPRET=1).

How: ``InterpreterBuilder.create_dot`` (the interpreter's implementation of every tl.dot) is wrapped to add
2·M·N·K (times any batch dimensions) per call, for the operands it is actually given, so masked/padded tile
lanes count too: this is executed work, not useful work. Each public op runs forward, then backward, at a
moderate shape whose extents are multiples of the default blocks (so padding adds nothing) and the counts are
divided by the op's GEMM: contrastive 2·M·N·D per direction (one call of ``contrastive_row_loss`` is one
direction), XAC and pooling 2·B·P·L·D; grouped (no tl.dot: its scores are row dot products) by 2·B·(K+1)·D.
Budgets (docs/kernels.md): contrastive ≤ 5 per direction (forward + backward, deterministic), XAC ≤ 8.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from typing import Dict, Iterator, List, Optional

import numpy as np

BUDGETS = {"contrastive_row_loss": 5.0, "xac_loss_sum": 8.0, "xac_loss_sum[pooled]": 8.0}
CONTRASTIVE_SHAPE = dict(M=128, N=128, D=256)
XATTN_SHAPE = dict(B=2, P=256, L=64, D=256)


class DotCounter:
    flops: int = 0
    calls: int = 0


@contextlib.contextmanager
def count_dots() -> Iterator[DotCounter]:
    """Count the FLOPs of every interpreted tl.dot inside the block (needs TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpreterBuilder
    original = InterpreterBuilder.create_dot
    counter = DotCounter()

    def counted(self, a, b, d, *args, **kwargs):
        *batch, m, k = a.data.shape
        n = b.data.shape[-1]
        counter.flops += 2 * int(np.prod(batch, dtype=np.int64)) * m * n * k
        counter.calls += 1
        return original(self, a, b, d, *args, **kwargs)

    InterpreterBuilder.create_dot = counted
    try:
        yield counter
    finally:
        InterpreterBuilder.create_dot = original


def _fwd_bwd(op_name: str, make, gemm_flops: float) -> Dict[str, float]:
    import torch
    with count_dots() as fwd:
        out = make()
    weights = torch.randn(out.shape)
    with count_dots() as bwd:
        (out * weights).sum().backward()
    return dict(op=op_name, forward=fwd.flops / gemm_flops, backward=bwd.flops / gemm_flops,
                total=(fwd.flops + bwd.flops) / gemm_flops, forward_dots=fwd.calls, backward_dots=bwd.calls,
                gemm_flops=gemm_flops, budget=BUDGETS.get(op_name))


def xattn_closed_form(op: str, P: int, L: int, D: int, route: str = "gram") -> Dict[str, float]:
    """The passes xattn_pool's kernels do by construction (its module docstring). Route "gram": G = U Uᵀ, H = A G,
    M = Aᵀ diag(q) A and M U cost L/P, L/D, L/D and L/P of a pass; route "pooled": W = A U (forward and backward),
    h = W Uᵀ and (qA)ᵀ W, one pass each. Pooling adds its v̂ GEMM and dV Uᵀ, (A/n)ᵀ dV."""
    op = op.split("[")[0]
    if route == "gram":
        extra_fwd, extra_bwd = L / D + L / P, 2 * L / D + 2 * L / P
    else:
        extra_fwd, extra_bwd = 1.0, 3.0
    if op == "xac_loss_sum":
        forward, backward = 1 + extra_fwd, 3 + extra_bwd
    elif op == "concept_attention_pool":
        forward, backward = 2 + extra_fwd, 5 + extra_bwd
    else:
        raise ValueError(op)
    return dict(forward=forward, backward=backward, total=forward + backward)


def measure(ops: Optional[List[str]] = None) -> List[Dict[str, float]]:
    """Passes per op at moderate, block-aligned shapes (float32 inputs, as the interpreter multiplies); ``ops``
    restricts the run to those ops."""
    import torch
    import torch.nn.functional as F
    from . import (concept_attention_pool, contrastive_row_loss, grouped_contrast_row_loss, grouped_scores,
                   xac_loss_sum)
    torch.manual_seed(0)

    def unit(*shape):
        return F.normalize(torch.randn(*shape), dim=-1).requires_grad_()

    scale = torch.tensor(10.0, requires_grad=True)
    M, N, D = CONTRASTIVE_SHAPE["M"], CONTRASTIVE_SHAPE["N"], CONTRASTIVE_SHAPE["D"]
    rows: List[Dict[str, float]] = []

    def add(name, make, flops):
        if ops is None or name in ops:
            rows.append(_fwd_bwd(name, make, flops))

    add("contrastive_row_loss",
        lambda: contrastive_row_loss(unit(M, D), unit(N, D), scale, torch.arange(M)), 2 * M * N * D)
    B, K = 64, 4
    add("grouped_scores", lambda: torch.cat(
        [t.reshape(B, -1) for t in grouped_scores(unit(B, D), unit(B, D), unit(B, K, D), scale)], 1),
        2 * B * (K + 1) * D)
    add("grouped_contrast_row_loss",
        lambda: grouped_contrast_row_loss(unit(B, D), unit(B, D), unit(B, K, D), scale), 2 * B * (K + 1) * D)
    # XAC / pooling: the Gram parts cost L/D and L/P of a pass (module docstring of xattn_pool), so the shape keeps
    # P > L as in training (the C2LIP target has P = 2304, L = 196): 4 + 3·64/256 + 3·64/256 = 5.5 for XAC.
    Bi, P, L, D = XATTN_SHAPE["B"], XATTN_SHAPE["P"], XATTN_SHAPE["L"], XATTN_SHAPE["D"]
    owner = torch.arange(P) % Bi
    add("xac_loss_sum", lambda: xac_loss_sum(unit(Bi, L, D), unit(P, D), owner, scale, torch.tensor(-1.0)),
        2 * Bi * P * L * D)
    add("concept_attention_pool", lambda: concept_attention_pool(unit(Bi, L, D), unit(P, D)), 2 * Bi * P * L * D)
    # the other route, forced (the default picks the cheaper one: "gram" here, "pooled" for long L)
    add("xac_loss_sum[pooled]", lambda: xac_loss_sum(unit(Bi, L, D), unit(P, D), owner, scale, torch.tensor(-1.0),
                                                     route="pooled"), 2 * Bi * P * L * D)
    return rows


def markdown(rows) -> str:
    out = "| op | forward | backward | total | budget | tl.dot calls (fwd/bwd) |\n|---|---|---|---|---|---|\n"
    for r in rows:
        budget = "-" if r["budget"] is None else f"≤ {r['budget']:g}"
        out += (f"| {r['op']} | {r['forward']:.2f} | {r['backward']:.2f} | {r['total']:.2f} | {budget} | "
                f"{r['forward_dots']}/{r['backward_dots']} |\n")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compclip.kernels.passes", description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows as JSON")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        # The kernels are decorated when compclip.kernels is imported: the interpreter must be on before that.
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "compclip.kernels.passes", *(argv or sys.argv[1:])], env=env)
    rows = measure()
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
