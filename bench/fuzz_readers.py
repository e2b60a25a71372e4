"""The fuzz suite of the input readers, run long: `python bench/fuzz_readers.py --cases 2000 [--seed S]`.

CI runs every reader's fuzz test with `tests/fuzz_support.CI_CASES` cases and a fixed seed; this runs the same
tests with `--cases` cases per reader (COMPCLIP_FUZZ_CASES) and writes what was tried to
`bench/results/fuzz-readers-<date>.json`: per reader the cases, their outcomes (accepted / skipped / error), the
mutation kinds drawn and the seconds taken, plus the seed, the commit and the machine. A failing case stops its
reader's test with Hypothesis' minimal example and `@reproduce_failure` blob; the record then lists the failures.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ_TESTS = ["tests/data/test_fuzz_manifest.py", "tests/data/test_fuzz_importers.py",
              "tests/data/test_fuzz_prepare.py", "tests/data/test_fuzz_shards.py", "tests/data/test_fuzz_images.py",
              "tests/evaluation/test_fuzz_benchmark_files.py", "tests/test_config_fuzz.py",
              "tests/trainer/test_checkpoint_fuzz.py"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000, help="cases per reader")
    parser.add_argument("--seed", type=int, default=0, help="varies every reader's fixed seed (0: CI's seeds)")
    parser.add_argument("--out", default="", help="record file (default bench/results/fuzz-readers-<date>.json)")
    parser.add_argument("tests", nargs="*", default=FUZZ_TESTS, help="the fuzz test files to run (default: all)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(ROOT, "bench", "results", f"fuzz-readers-{datetime.date.today()}.json")
    record = tempfile.mktemp(suffix=".json")
    env = dict(os.environ, COMPCLIP_FUZZ_CASES=str(args.cases), COMPCLIP_FUZZ_RECORD=record,
               COMPCLIP_FUZZ_SEED=str(args.seed), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-q", "-p", "no:cacheprovider",
                           *args.tests], cwd=ROOT, env=env, capture_output=True, text=True)
    with open(record, encoding="utf-8") as handle:
        readers = json.load(handle)["readers"]
    os.remove(record)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    failures = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    result = {"cases_per_reader": args.cases, "seed": args.seed, "commit": commit,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"Python {platform.python_version()}",
              "seconds": round(time.time() - started, 1), "pytest_exit_status": done.returncode,
              "failures": failures, "readers": readers,
              "total_cases": sum(reader["cases"] for reader in readers.values())}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1, sort_keys=True)
        handle.write("\n")
    print(done.stdout[-3000:])
    print(f"{result['total_cases']} cases over {len(readers)} readers in {result['seconds']} s -> {out}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
