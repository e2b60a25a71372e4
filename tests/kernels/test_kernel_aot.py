"""The AOT resource gate (compclip.kernels.aot) on the reduced CI set, both archs, run as a subprocess because the
gate needs compiled (not interpreted) kernels while tests/conftest.py sets TRITON_INTERPRET=1.

The assertion is the gate's own verdict: it passes only when every recorded launch compiles for sm_80 and sm_90
within the shared-memory limit, without spills in 16-bit rows, and with every 16-bit tl.dot on tensor cores. The
reduced set has the global batch and an 8-GPU rank's local batch (the split kernels and their combines); the full
matrix (``--full``, run by hand: bench/results/aot-full-*.md) adds the atomic path, ragged sizes, unaligned views
and frozen inputs.
"""
import json
import os
import subprocess
import sys

import pytest

from compclip.kernels import aot


def test_dot_report_reads_tensor_core_layouts():
    # Independent of the kernels: a hand-written TTGIR fragment with one mma dot, one blocked 16-bit dot and
    # one wgmma; the parser must count 3 sixteen-bit dots, 2 on tensor cores.
    ttgir = (
        "#blocked = #ttg.blocked<{sizePerThread = [1, 1]}>\n"
        "#mma = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0}>\n"
        "%1 = tt.dot %a, %b, %c : tensor<64x32xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma}>> * "
        "tensor<32x64xbf16, #x> -> tensor<64x64xf32, #mma>\n"
        "%2 = tt.dot %a, %b, %c : tensor<64x32xf16, #blocked> * tensor<32x64xf16, #blocked> "
        "-> tensor<64x64xf32, #blocked>\n"
        "%3 = ttng.warp_group_dot %a, %b, %c : !ttg.memdesc<64x32xbf16> * !ttg.memdesc<32x64xbf16> "
        "-> tensor<64x64xf32, #mma1>\n"
        "%4 = tt.dot %a, %b, %c : tensor<64x32xf32, #blocked> * tensor<32x64xf32, #blocked> "
        "-> tensor<64x64xf32, #blocked>\n"
    )
    assert aot.dot_report(ttgir)[:2] == (3, 2)


@pytest.mark.cost(32)  # 64 compilations with Triton's cache empty, as on a fresh CI machine (4 s from a warm cache)
def test_reduced_gate_passes(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "compclip.kernels.aot", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    ops = {r["op"].split("+")[0] for r in rows}
    kernels = {r["kernel"] for r in rows}
    assert {"_contrastive_fwd_combine_kernel", "_sum_splits_kernel"} <= kernels     # the local batch's splits
    # every public op contributed launches, for both archs
    assert ops == {"contrastive_row_loss", "grouped_scores", "grouped_contrast_row_loss",
                   "concept_attention_pool", "xac_loss_sum"}
    assert {r["arch"] for r in rows} == {80, 90}
    failing = [f"sm_{r['arch']} {r['op']} {r['shape']} {r['kernel']}: {'; '.join(r['failures'])}"
               for r in rows if r["failures"]]
    assert not failing, "AOT gate failures:\n" + "\n".join(failing)
    assert proc.returncode == 0, proc.stdout[-3000:]
