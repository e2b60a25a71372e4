"""Pass counter: the FLOPs of every ``tl.dot`` (and the bytes of every load and store) the kernels execute,
counted under Triton's interpreter (project issue #10, item 5; issue #28).

``python -m compclip.kernels.passes [--json out.json] [--md out.md]`` (re-executes itself with TRITON_INTERPRET=1).

How: ``InterpreterBuilder.create_dot`` (the interpreter's implementation of every tl.dot) is wrapped to add
2·M·N·K (times any batch dimensions) per call, for the operands it is actually given, so masked/padded tile
lanes count too: this is executed work, not useful work. ``create_masked_load`` / ``create_masked_store`` are
wrapped to add the bytes of their unmasked lanes. Each public op runs forward, then backward, at a moderate shape
whose extents are multiples of the default blocks (so padding adds nothing) and the counts are divided by the
op's GEMM: contrastive 2·M·N·D per direction (one call of ``contrastive_row_loss`` is one direction), XAC and
pooling 2·B·P·L·D; grouped (no tl.dot: its scores are row dot products) by the bytes of one read of its inputs,
(K + 2)·B·D elements. Rows with a suffix in brackets run with inputs that need no gradient, to show what the
kernels skip.

At the real XAC sizes (P = 2,304, D = 768 and 512, L from 50 to 1,024) the interpreter would take minutes, so the
executed and useful passes there come from ``xattn_pool.executed_passes``, the closed form of the kernels' loops
with the padding of P, L and D to their tiles; tests/kernels/test_kernel_passes.py checks that closed form
against this counter at ragged shapes. Budgets (docs/kernels.md): contrastive ≤ 5 per direction (forward +
backward, deterministic), XAC ≤ 8 executed passes.
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
# Small, multiples of the default tiles (no padding): the counts per GEMM do not depend on the size beyond that
# (XAC: on L/D and L/P, 1/4 each as in the C2LIP target's order of magnitude, P > L).
CONTRASTIVE_SHAPE = dict(M=64, N=64, D=64, B=16)          # B: the grouped rows
XATTN_SHAPE = dict(B=1, P=128, L=32, D=128)
# The lengths of issue 28 (ViT-B/32, B/16, L/14 at 224 and 336 px, long sequences) and the C2LIP target (196).
REAL_LENGTHS = (50, 196, 197, 257, 577, 1024)
REAL_P = 2304


class DotCounter:
    flops: int = 0
    calls: int = 0
    bytes: int = 0


@contextlib.contextmanager
def count_dots() -> Iterator[DotCounter]:
    """Count the FLOPs of every interpreted tl.dot, and the bytes every load and store moves, inside the block
    (needs TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpreterBuilder
    original = (InterpreterBuilder.create_dot, InterpreterBuilder.create_masked_load,
                InterpreterBuilder.create_masked_store)
    counter = DotCounter()

    def counted(self, a, b, d, *args, **kwargs):
        *batch, m, k = a.data.shape
        n = b.data.shape[-1]
        counter.flops += 2 * int(np.prod(batch, dtype=np.int64)) * m * n * k
        counter.calls += 1
        return original[0](self, a, b, d, *args, **kwargs)

    def moved(ptrs, mask) -> int:
        return int(np.count_nonzero(mask.data)) * (ptrs.get_element_ty().primitive_bitwidth // 8)

    def load(self, ptrs, mask, *args, **kwargs):
        counter.bytes += moved(ptrs, mask)
        return original[1](self, ptrs, mask, *args, **kwargs)

    def store(self, ptrs, value, mask, *args, **kwargs):
        counter.bytes += moved(ptrs, mask)
        return original[2](self, ptrs, value, mask, *args, **kwargs)

    InterpreterBuilder.create_dot, InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = \
        counted, load, store
    try:
        yield counter
    finally:
        (InterpreterBuilder.create_dot, InterpreterBuilder.create_masked_load,
         InterpreterBuilder.create_masked_store) = original


def _fwd_bwd(op_name: str, make, gemm_flops: float, read_bytes: Optional[float] = None) -> Dict[str, float]:
    import torch
    with count_dots() as fwd:
        out = make()
    weights = torch.randn(out.shape)
    with count_dots() as bwd:
        (out * weights).sum().backward()
    row = dict(op=op_name, forward=fwd.flops / gemm_flops, backward=bwd.flops / gemm_flops,
               total=(fwd.flops + bwd.flops) / gemm_flops, forward_dots=fwd.calls, backward_dots=bwd.calls,
               gemm_flops=gemm_flops, budget=BUDGETS.get(op_name))
    if read_bytes:
        row.update(forward_reads=fwd.bytes / read_bytes, backward_reads=bwd.bytes / read_bytes)
    return row


def measure(ops: Optional[List[str]] = None, contrastive_shape: Optional[dict] = None,
            xattn_shape: Optional[dict] = None) -> List[Dict[str, float]]:
    """Passes per op at moderate, block-aligned shapes (float32 inputs, as the interpreter multiplies); ``ops``
    restricts the run to those ops; the shapes default to CONTRASTIVE_SHAPE and XATTN_SHAPE (any shape whose
    extents are multiples of the default tiles counts the same for contrastive, and the same L/D and L/P for
    XAC)."""
    import torch
    import torch.nn.functional as F
    from . import (concept_attention_pool, contrastive_row_loss, grouped_contrast_row_loss, grouped_scores,
                   xac_loss_sum)
    torch.manual_seed(0)

    def unit(*shape, grad=True):
        return F.normalize(torch.randn(*shape), dim=-1).requires_grad_(grad)

    scale = torch.tensor(10.0, requires_grad=True)
    contrastive_shape, xattn_shape = contrastive_shape or CONTRASTIVE_SHAPE, xattn_shape or XATTN_SHAPE
    M, N, D = contrastive_shape["M"], contrastive_shape["N"], contrastive_shape["D"]
    rows: List[Dict[str, float]] = []

    def add(name, make, flops, read_bytes=None):
        if ops is None or name in ops:
            rows.append(_fwd_bwd(name, make, flops, read_bytes))

    add("contrastive_row_loss",
        lambda: contrastive_row_loss(unit(M, D), unit(N, D), scale, torch.arange(M)), 2 * M * N * D)
    add("contrastive_row_loss[columns frozen]",
        lambda: contrastive_row_loss(unit(M, D), unit(N, D, grad=False), scale, torch.arange(M)), 2 * M * N * D)
    add("contrastive_row_loss[anchors frozen]",
        lambda: contrastive_row_loss(unit(M, D, grad=False), unit(N, D), scale, torch.arange(M)), 2 * M * N * D)
    B, K = contrastive_shape.get("B", 64), 4             # grouped rows (anchors of their own)
    grouped_bytes = 4 * B * (K + 2) * D                  # one read of its float32 inputs
    add("grouped_scores", lambda: torch.cat(
        [t.reshape(B, -1) for t in grouped_scores(unit(B, D), unit(B, D), unit(B, K, D), scale)], 1),
        2 * B * (K + 1) * D, grouped_bytes)
    add("grouped_contrast_row_loss",
        lambda: grouped_contrast_row_loss(unit(B, D), unit(B, D), unit(B, K, D), scale), 2 * B * (K + 1) * D,
        grouped_bytes)
    add("grouped_contrast_row_loss[negatives frozen]",
        lambda: grouped_contrast_row_loss(unit(B, D), unit(B, D), unit(B, K, D, grad=False), scale),
        2 * B * (K + 1) * D, grouped_bytes)
    # XAC / pooling: the Gram parts cost L/D and L/P of a pass (module docstring of xattn_pool), so the shape keeps
    # P > L as in training (the C2LIP target has P = 2304, L = 196): 4 + 3·32/128 + 3·32/128 = 5.5 for XAC.
    Bi, P, L, D = xattn_shape["B"], xattn_shape["P"], xattn_shape["L"], xattn_shape["D"]
    owner = torch.arange(P) % Bi
    bias = torch.tensor(-1.0)
    add("xac_loss_sum", lambda: xac_loss_sum(unit(Bi, L, D), unit(P, D), owner, scale, bias), 2 * Bi * P * L * D)
    add("concept_attention_pool", lambda: concept_attention_pool(unit(Bi, L, D), unit(P, D)), 2 * Bi * P * L * D)
    # the other route, forced (the default picks the cheaper one: "gram" here, "pooled" for long L)
    add("xac_loss_sum[pooled]", lambda: xac_loss_sum(unit(Bi, L, D), unit(P, D), owner, scale, bias,
                                                     route="pooled"), 2 * Bi * P * L * D)
    add("xac_loss_sum[tokens frozen]",
        lambda: xac_loss_sum(unit(Bi, L, D, grad=False), unit(P, D), owner, scale, bias), 2 * Bi * P * L * D)
    add("xac_loss_sum[tokens, concepts frozen]",
        lambda: xac_loss_sum(unit(Bi, L, D, grad=False), unit(P, D, grad=False), owner, scale, bias),
        2 * Bi * P * L * D)
    return rows


def real_lengths(P: int = REAL_P, dims=(768, 512), lengths=REAL_LENGTHS) -> List[Dict[str, float]]:
    """XAC and pooling at the real P, D and L of issue 28, default tiles and route: executed (padding included)
    and useful passes from the closed form ``xattn_pool.executed_passes``."""
    from .xattn_pool import choose_route, default_tiles, executed_passes
    rows = []
    for D in dims:
        for L in lengths:
            tiles = default_tiles(P, L, D)
            route = choose_route(P, L, D, tiles)
            for op in ("xac_loss_sum", "concept_attention_pool"):
                count = executed_passes(op, P, L, D, route, tiles)
                rows.append(dict(op=op, P=P, L=L, D=D, route=route, BLOCK_L=tiles["BLOCK_L"],
                                 executed=count["total"], useful=count["useful_total"],
                                 budget=BUDGETS.get(op)))
    return rows


def _table(header, cells) -> str:
    return ("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n" +
            "".join("| " + " | ".join(row) + " |\n" for row in cells))


def _budget(row) -> str:
    return "-" if row["budget"] is None else f"≤ {row['budget']:g}"


def markdown(rows) -> str:
    return _table(("op", "forward", "backward", "total", "budget", "tl.dot calls (fwd/bwd)",
                   "bytes moved fwd/bwd (reads of the inputs)"),
                  ([r["op"], f"{r['forward']:.2f}", f"{r['backward']:.2f}", f"{r['total']:.2f}", _budget(r),
                    f"{r['forward_dots']}/{r['backward_dots']}",
                    f"{r['forward_reads']:.2f} / {r['backward_reads']:.2f}" if "forward_reads" in r else "-"]
                   for r in rows))


def real_markdown(rows) -> str:
    return _table(("op", "P", "L", "D", "route", "BLOCK_L", "executed passes", "useful passes", "budget"),
                  ([r["op"], str(r["P"]), str(r["L"]), str(r["D"]), r["route"], str(r["BLOCK_L"]),
                    f"{r['executed']:.2f}", f"{r['useful']:.2f}", _budget(r)] for r in rows))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compclip.kernels.passes", description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows as JSON")
    ap.add_argument("--md", help="write both tables as Markdown")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        # The kernels are decorated when compclip.kernels is imported: the interpreter must be on before that.
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "compclip.kernels.passes", *(argv or sys.argv[1:])], env=env)
    rows, real = measure(), real_lengths()
    text = (markdown(rows) + "\nXAC and pooling at real sizes (closed form of the kernels' loops, padding "
            "included):\n\n" + real_markdown(real))
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(measured=rows, real_lengths=real), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
