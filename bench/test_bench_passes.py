"""GEMM-equivalent passes of every op, forward and backward, counted from the interpreter's tl.dot FLOPs
(compclip.kernels.passes), beside the budgets of docs/kernels.md (contrastive ≤ 5 per direction, XAC ≤ 8). The counts go into
extra_info; the timing is that of the counting run itself (interpreter, not a speed figure). Runs in a
subprocess because the counter needs TRITON_INTERPRET=1 before compclip.kernels is imported."""
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.benchmark(group="GEMM passes (interpreter)")
def test_gemm_passes(benchmark, tmp_path):
    out = tmp_path / "passes.json"
    env = dict(os.environ, TRITON_INTERPRET="1")

    def count():
        subprocess.run([sys.executable, "-m", "compclip.kernels.passes", "--json", str(out)], env=env, check=True,
                       capture_output=True)

    benchmark.pedantic(count, rounds=1, iterations=1)
    rows = json.loads(out.read_text())["measured"]
    for row in rows:
        for key in ("forward", "backward", "total", "budget"):
            benchmark.extra_info[f"{row['op']}.{key}"] = row[key]
    assert {r["op"] for r in rows} >= {"contrastive_row_loss", "xac_loss_sum", "grouped_contrast_row_loss"}
