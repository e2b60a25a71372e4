"""Shared machinery for `pytest bench --benchmark-only`.

Every benchmark runs one op for one provider in one mode (forward / backward / full) at one size, inside a
pytest-benchmark group named after op and size so the table compares providers side by side. Peak memory,
throughput and the ratio to the arithmetic or bandwidth floor go into ``extra_info``.

Sizes: ``COMPCLIP_BENCH_SIZES`` = ``tiny`` (a smoke run, used by the test suite), ``cpu`` (default without CUDA)
or ``gpu`` (default with CUDA: the target sizes of docs/kernels.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import pytest
import torch

CUDA = torch.cuda.is_available()
SIZES = os.environ.get("COMPCLIP_BENCH_SIZES", "gpu" if CUDA else "cpu")
if SIZES not in ("tiny", "cpu", "gpu"):
    raise ValueError(f"COMPCLIP_BENCH_SIZES={SIZES!r}: expected tiny, cpu or gpu")

# Dense bf16 tensor-core peak and HBM bandwidth of the devices the benchmarks report against.
DEVICE_PEAKS = {
    "H100": {"flops": 989e12, "bandwidth": 3.35e12},
    "H200": {"flops": 989e12, "bandwidth": 4.8e12},
    "A100": {"flops": 312e12, "bandwidth": 2.0e12},
}


def device_name() -> str:
    return torch.cuda.get_device_name() if CUDA else "cpu"


def device_peaks() -> Optional[Dict[str, float]]:
    name = device_name()
    for key, peaks in DEVICE_PEAKS.items():
        if key in name:
            return peaks
    return None


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _release_free_heap() -> None:
    """Hand the allocator's free pages back to the OS (glibc ``malloc_trim``), so that memory the next call reuses
    has to be faulted in again and shows in the resident peak. No-op where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(fn: Callable[[], object]) -> int:
    """Bytes allocated at the peak of one call of ``fn`` beyond what was allocated before it.

    CUDA: ``max_memory_allocated`` after a reset. CPU: the rise of the process's peak resident set (VmHWM, reset
    through /proc/self/clear_refs) after the allocator's free pages went back to the OS (see above).
    """
    if CUDA:
        synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        synchronize()
        return torch.cuda.max_memory_allocated() - before
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return -1
    before = _rss_bytes("VmRSS")
    fn()
    return max(0, _rss_bytes("VmHWM") - before)


@dataclass
class Case:
    """One benchmark: ``setup()`` builds fresh inputs (untimed), ``run(inputs)`` is timed."""

    setup: Callable[[], tuple]
    run: Callable[..., object]
    flops: float = 0.0  # useful arithmetic of the timed call
    bytes_moved: float = 0.0  # the least HBM traffic the timed call needs
    floor_flops: float = 0.0  # arithmetic floor (4 GEMM-equivalents for fwd+bwd, docs/kernels.md)


def run_case(benchmark, case: Case, rounds: int) -> None:
    def timed(*inputs):
        out = case.run(*inputs)
        synchronize()
        return out

    def setup():
        inputs = case.setup()
        synchronize()
        return inputs, {}

    try:
        benchmark.pedantic(timed, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)
        inputs = case.setup()
        benchmark.extra_info["peak_memory_mb"] = float(f"{peak_memory(lambda: case.run(*inputs)) / 2**20:.4g}")
    except torch.cuda.OutOfMemoryError as exc:
        # A materialising provider that does not fit is a result too: reported as a skip with its size.
        torch.cuda.empty_cache()
        pytest.skip(f"out of GPU memory at this size ({str(exc).splitlines()[0]})")
    benchmark.extra_info["device"] = device_name()
    if benchmark.stats is None:  # --benchmark-disable: the call ran once, untimed
        return
    mean = benchmark.stats.stats.mean
    if case.flops:
        benchmark.extra_info["tflops"] = float(f"{case.flops / mean / 1e12:.3g}")
    if case.bytes_moved:
        benchmark.extra_info["gb_per_s"] = float(f"{case.bytes_moved / mean / 1e9:.3g}")
    peaks = device_peaks()
    if peaks:
        floor = max(case.floor_flops / peaks["flops"], case.bytes_moved / peaks["bandwidth"])
        if floor > 0:
            benchmark.extra_info["floor_ms"] = round(floor * 1e3, 3)
            benchmark.extra_info["x_floor"] = round(mean / floor, 2)


def require_cuda(provider: str) -> None:
    if not CUDA:
        pytest.skip(f"{provider}: needs CUDA (Triton kernels only run interpreted on a CPU, which says nothing "
                    "about speed)")
