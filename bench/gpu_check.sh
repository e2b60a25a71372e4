#!/usr/bin/env bash
# One prepared check for a lent H100/H200 (at most 7.5 minutes: the step timeouts add up to 450 s).
#
#   bash bench/gpu_check.sh            # run everything
#   bash bench/gpu_check.sh --dry-run  # print every command, run nothing
#
# Steps: (1) the kernels at their target sizes vs the float32 reference, computed in chunks that fit an 80 GB card
# (tests/kernels/test_kernel_cuda_sizes.py: contrastive at B = 32,768 and at an 8-GPU rank's local batch, both
# backward paths, XAC at L = 196, 577 and 1024 and in several workspace chunks, the separate negative source, M = 0);
# (2) the benchmark matrix at GPU sizes: compclip's kernels vs the PyTorch reference, F.linear_cross_entropy and
# Inf-CL (bench/providers.py; Inf-CL rows appear only when inf_cl imports); (3) the AOT resource gate for this
# GPU's own arch. Writes bench/results/<gpu>-<date>.json (pytest-benchmark), <gpu>-<date>-aot.json and
# <gpu>-<date>.md (benchmark table + AOT table + test summary); copies them to $OUT when that is set.
# A failing step is recorded and the next step still runs; the exit status is that of the first failure.
set -u
cd "$(dirname "$0")/.."

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} TRITON_INTERPRET=0 COMPCLIP_BENCH_SIZES=gpu

if [ $DRY = 1 ]; then
  GPU=gpu-name; CC=90
else
  GPU=$($PY -c "import torch; print(torch.cuda.get_device_name(0).lower().replace('nvidia ','').replace(' ','-'))")
  CC=$($PY -c "import torch; a,b=torch.cuda.get_device_capability(0); print(90 if a*10+b>=90 else 80)")
fi
STAMP=bench/results/${GPU}-$(date -u +%Y-%m-%d)
STATUS=0

step() {  # step <timeout seconds> <command...>
  local limit=$1; shift
  echo "+ timeout $limit $*"
  [ $DRY = 1 ] && return 0
  timeout "$limit" "$@"
  local rc=$?
  echo "  -> exit $rc"
  [ $rc -ne 0 ] && [ $STATUS -eq 0 ] && STATUS=$rc
  return 0
}

step 170 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_kernel_cuda_sizes.py \
  --junitxml="$STAMP-sizes.xml"
step 170 $PY -m pytest -q -p no:cacheprovider bench/test_bench_losses.py --benchmark-only \
  --benchmark-json="$STAMP.json"
step 20 $PY bench/render.py "$STAMP.json" --md "$STAMP.md"
step 90 $PY -m compclip.kernels.aot --arch "$CC" --json "$STAMP-aot.json" --md "$STAMP-aot.md" --quiet

echo "+ assemble $STAMP.md (benchmark table, AOT table, size-test summary) and copy to \$OUT"
if [ $DRY = 0 ]; then
  {
    echo; echo "## AOT resource gate (sm_$CC)"; echo
    [ -f "$STAMP-aot.md" ] && cat "$STAMP-aot.md"
    echo; echo "## Kernels at target sizes (tests/kernels/test_kernel_cuda_sizes.py)"; echo
    [ -f "$STAMP-sizes.xml" ] && $PY - "$STAMP-sizes.xml" <<'PYEOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
for case in root.iter("testcase"):
    verdict = "failed" if case.find("failure") is not None or case.find("error") is not None else \
        "skipped" if case.find("skipped") is not None else "passed"
    print(f"- {case.get('name')}: {verdict} ({float(case.get('time', 0)):.1f} s)")
PYEOF
  } >> "$STAMP.md"
  if [ -n "${OUT:-}" ]; then cp "$STAMP".json "$STAMP".md "$STAMP"-aot.json "$OUT"/ 2>/dev/null; fi
fi
exit $STATUS
