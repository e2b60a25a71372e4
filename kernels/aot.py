"""Ahead-of-time resource gate for every Triton launch the public ops make (project issue #10, item 1).

``python -m compclip.kernels.aot [--full] [--arch 80|90] [--json out.json] [--md out.md]``
``python -m compclip.kernels.aot --waves [--md out.md]``  (grids only: CTAs per launch against the SM count)

How: each public op (``contrastive_row_loss``, ``grouped_scores``, ``grouped_contrast_row_loss``,
``concept_attention_pool``, ``xac_loss_sum``) runs forward and backward on **meta-device** tensors of the real
shapes, with ``launch`` (``_common.launch``, as bound in every kernel module) replaced by a recorder: nothing is
allocated or run, but every (kernel, grid, args, meta) the host launchers would issue is captured. Each distinct
launch is then specialised exactly as Triton's own launcher would (its binder and ``_pack_args``: pointer dtypes,
i32/i64 scalars, constexprs, ``tt.divisibility`` = 16 for pointers and ints that are multiples of 16) for a
``GPUTarget("cuda", cc, 32)`` and compiled with ``triton.compile``; results are cached on disk (``$COMPCLIP_AOT_CACHE`` or
<triton cache dir>/compclip-aot, keyed by kernel source hash + signature + options + arch) so a rerun is fast. The
bundled ``ptxas -v`` then reports registers and spills; shared memory is the larger of Triton's dynamic
allocation (``metadata.shared``) and ptxas' static figure, against the per-block opt-in limit (sm_90 232,448 B,
sm_80 166,912 B). TTGIR tells whether each 16-bit ``tt.dot`` got a tensor-core layout (``warp_group_dot`` =
wgmma on sm_90, ``nvidia_mma`` = mma.sync).

Fails (exit 1) on: a compile error, shared memory over the limit, spill bytes in a bf16/fp16 row, a 16-bit dot
without tensor cores. The meta tensors have data_ptr 0, i.e. aligned, like fresh CUDA allocations; the full
matrix adds views one element into their storage (pointers not 16-byte aligned, as a slice of a larger tensor
gives), sizes that are not multiples of 16 (Triton specialises integers divisible by 16), the ``deterministic=False``
atomic path, the local batch of an 8-GPU run (M = B/8: the split kernels and their combines) and inputs that need
no gradient (the kernels' HAS_* variants). Each architecture records its own launches: the launchers read
``_common.device_arch`` and ``_common.sm_count``, which the gate sets to the target (sm_80: an A100's 108 SMs,
sm_90: an H100's 132), so a tile or split that depends on the GPU is compiled as that GPU would pick it.

Waves: ``--waves`` records the launches of every op at the target shapes of docs/kernels.md, at the global batch
and at an 8-GPU rank's local batch (M = B/8; for XAC B/8 local images against all 2,304 concepts), for sm_80 and
sm_90, and reports CTAs per launch against the SM count. ``WAVES_FLOOR`` = 2 is asserted by
tests/kernels/test_kernel_waves.py.

Must run with TRITON_INTERPRET unset/0 (under the interpreter the kernels are not JIT functions and
``dot_config`` would choose float32 dots); the test runs it as a subprocess.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, asdict
from typing import Callable, Dict, List, Optional, Tuple

import torch

SMEM_LIMIT = {90: 232_448, 80: 166_912}
ARCHS = (90, 80)


# --------------------------------------------------------------------------------------------------------------
# Recording launches
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Launch:
    kernel: object
    grid: Tuple[int, ...]
    args: tuple
    meta: dict


def _kernel_modules():
    """Every compclip.kernels module that binds ``launch`` from ``_common`` (data-driven: new modules count)."""
    import importlib
    import pkgutil
    from . import _common
    pkg = sys.modules[__package__]
    mods = [_common]
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in ("aot", "passes"):
            continue
        mod = importlib.import_module(f"{__package__}.{info.name}")
        if getattr(mod, "launch", None) is _common.launch and mod is not _common:
            mods.append(mod)
    return mods


def record(fn: Callable[[], None]) -> List[Launch]:
    """Run ``fn`` with every kernel module's ``launch`` replaced by a recorder; returns the launches."""
    from . import _common
    original = _common.launch
    recorded: List[Launch] = []

    def recorder(kernel, grid, *args, **meta):
        if all(g > 0 for g in grid):
            recorded.append(Launch(kernel, tuple(grid), args, meta))

    mods = _kernel_modules()
    try:
        for m in mods:
            m.launch = recorder
        fn()
    finally:
        for m in mods:
            m.launch = original
    return recorded


# --------------------------------------------------------------------------------------------------------------
# Case matrix (real shapes, meta device)
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    op: str
    dtype: torch.dtype
    shape: str
    run: Callable[[], None]


def _t(*shape, dtype, grad=True, unaligned=False):
    """A meta tensor (no storage); ``unaligned``: a view one element into a larger one, so its data pointer is
    not a multiple of 16 bytes (what Triton's launcher would see for a slice)."""
    if unaligned:
        numel = 1
        for extent in shape:
            numel *= extent
        base = torch.empty(numel + 1, dtype=dtype, device="meta", requires_grad=grad)
        return base[1:].view(*shape)
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


def _contrastive(M, N, D, dtype, extra=False, deterministic=True, frozen=(), unaligned=False):
    """``frozen``: inputs without a gradient ("anchors", "columns")."""
    def run():
        from . import contrastive_row_loss
        a = _t(M, D, dtype=dtype, grad="anchors" not in frozen, unaligned=unaligned)
        c = _t(N, D, dtype=dtype, grad="columns" not in frozen, unaligned=unaligned)
        targets = torch.empty(M, dtype=torch.long, device="meta")
        e = _t(M, dtype=torch.float32) if extra else None
        scale = _t((), dtype=torch.float32)
        contrastive_row_loss(a, c, scale, targets, e, deterministic=deterministic).sum().backward()
    return run


def _grouped(B, K, D, dtype, loss, frozen=(), unaligned=False):
    def run():
        from . import grouped_contrast_row_loss, grouped_scores
        a = _t(B, D, dtype=dtype, unaligned=unaligned)
        p = _t(B, D, dtype=dtype, unaligned=unaligned)
        n = _t(B, K, D, dtype=dtype, grad="negatives" not in frozen, unaligned=unaligned)
        scale = _t((), dtype=torch.float32)
        if loss:
            grouped_contrast_row_loss(a, p, n, scale).sum().backward()
        else:
            pos, neg = grouped_scores(a, p, n, scale)
            (pos.sum() + neg.sum()).backward()
    return run


def _xattn(B, P, L, D, dtype, xac, frozen=(), unaligned=False):
    """``frozen``: "tokens", "concepts" (both: only the scalars' gradients)."""
    def run():
        from . import concept_attention_pool, xac_loss_sum
        u = _t(B, L, D, dtype=dtype, grad="tokens" not in frozen, unaligned=unaligned)
        c = _t(P, D, dtype=dtype, grad="concepts" not in frozen, unaligned=unaligned)
        if xac:
            owner = torch.empty(P, dtype=torch.long, device="meta")
            xac_loss_sum(u, c, owner, _t((), dtype=torch.float32), _t((), dtype=torch.float32)).backward()
        else:
            concept_attention_pool(u, c).sum().backward()
    return run


B_TARGET, K_TARGET = 32768, 4                 # contrastive / grouped target batch (docs/kernels.md)
XAC_TARGET = dict(B=768, P=2304, L=196, D=768)
RANKS = 8                                     # the local batch of an 8-GPU data-parallel run: B / 8 rows


def cases(full: bool) -> List[Case]:
    """Reduced (CI): bf16, the target rows of docs/kernels.md (contrastive/grouped D=512 at the global batch and
    an 8-GPU rank's local batch, XAC/pooling L=196 D=768; a rank's 96 images compile the same kernels). Full: D ∈ {512, 768, 1024} (contrastive/grouped),
    D ∈ {512, 768} × L ∈ {50, 196, 257, 577, 1024} (XAC/pooling), bf16 + fp16 + fp32, and per dtype the atomic
    path, ragged sizes, unaligned views and frozen inputs."""
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if full else (torch.bfloat16,)
    dims = (512, 768, 1024) if full else (512,)
    x_dims = (512, 768) if full else (768,)
    lengths = (50, 196, 257, 577, 1024) if full else (196,)
    N, local = B_TARGET * (1 + K_TARGET), B_TARGET // RANKS
    xb, xp = XAC_TARGET["B"], XAC_TARGET["P"]
    out: List[Case] = []
    for dt in dtypes:
        for D in dims:
            for extra in (False, True):
                out.append(Case("contrastive_row_loss" + ("+extra" if extra else ""), dt,
                                f"M={B_TARGET} N={N} D={D}", _contrastive(B_TARGET, N, D, dt, extra)))
            out.append(Case("contrastive_row_loss", dt, f"M={local} N={N} D={D}", _contrastive(local, N, D, dt)))
            out.append(Case("grouped_scores", dt, f"B={B_TARGET} K={K_TARGET} D={D}",
                            _grouped(B_TARGET, K_TARGET, D, dt, False)))
            out.append(Case("grouped_contrast_row_loss", dt, f"B={B_TARGET} K={K_TARGET} D={D}",
                            _grouped(B_TARGET, K_TARGET, D, dt, True)))
            if full:
                # one rank of 32 (a combine of two rows per CTA), and the atomic path at both batches
                out.append(Case("contrastive_row_loss", dt, f"M=1024 N={N} D={D}", _contrastive(1024, N, D, dt)))
                for M in (B_TARGET, local):
                    out.append(Case("contrastive_row_loss[atomic]", dt, f"M={M} N={N} D={D}",
                                    _contrastive(M, N, D, dt, deterministic=False)))
        for D in x_dims:
            for L in lengths:
                for op, xac in (("concept_attention_pool", False), ("xac_loss_sum", True)):
                    out.append(Case(op, dt, f"B={xb} P={xp} L={L} D={D}", _xattn(xb, xp, L, D, dt, xac)))
                    if full:   # a rank's 96 images: the same kernels as 768 at the target (tests/…/waves)
                        out.append(Case(op, dt, f"B={xb // RANKS} P={xp} L={L} D={D}",
                                        _xattn(xb // RANKS, xp, L, D, dt, xac)))
        if full:
            out.extend(_edge_cases(dt))
    return out


def _edge_cases(dt) -> List[Case]:
    """Ragged sizes (no extent a multiple of 16), unaligned views and frozen inputs, for one dtype."""
    M, D = 12345, 500
    return [
        Case("contrastive_row_loss", dt, f"M={M} N={5 * M} D={D} ragged", _contrastive(M, 5 * M, D, dt, True)),
        Case("contrastive_row_loss[atomic]", dt, f"M={M} N={5 * M} D={D} ragged",
             _contrastive(M, 5 * M, D, dt, deterministic=False)),
        Case("contrastive_row_loss", dt, f"M=4096 N=163840 D=512 unaligned",
             _contrastive(4096, 163840, 512, dt, unaligned=True)),
        Case("contrastive_row_loss", dt, "M=4096 N=163840 D=512 anchors frozen",
             _contrastive(4096, 163840, 512, dt, frozen=("anchors",))),
        Case("contrastive_row_loss", dt, "M=4096 N=163840 D=512 columns frozen",
             _contrastive(4096, 163840, 512, dt, frozen=("columns",))),
        Case("grouped_contrast_row_loss", dt, f"B={M} K=3 D={D} ragged unaligned",
             _grouped(M, 3, D, dt, True, unaligned=True)),
        Case("grouped_contrast_row_loss", dt, "B=32768 K=4 D=512 negatives frozen",
             _grouped(32768, 4, 512, dt, True, frozen=("negatives",))),
        Case("xac_loss_sum", dt, f"B=77 P=2303 L=197 D={D} ragged unaligned",
             _xattn(77, 2303, 197, D, dt, True, unaligned=True)),
        Case("concept_attention_pool", dt, f"B=77 P=2303 L=197 D={D} ragged unaligned",
             _xattn(77, 2303, 197, D, dt, False, unaligned=True)),
        Case("xac_loss_sum", dt, "B=96 P=2304 L=196 D=768 tokens frozen",
             _xattn(96, 2304, 196, 768, dt, True, frozen=("tokens",))),
        Case("xac_loss_sum", dt, "B=96 P=2304 L=196 D=768 both frozen",
             _xattn(96, 2304, 196, 768, dt, True, frozen=("tokens", "concepts"))),
    ]


# --------------------------------------------------------------------------------------------------------------
# Specialise and compile
# --------------------------------------------------------------------------------------------------------------
def _jit_fn(kernel):
    from triton.runtime.jit import JITFunction
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(f"{kernel!r} is not a JITFunction (is TRITON_INTERPRET=1 set? the gate needs it unset)")
    return kernel


def specialise(launch: Launch, cc: int):
    """(fn, signature, constexprs, attrs, options) exactly as Triton's launcher builds them for this target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = _jit_fn(launch.kernel)
    backend = make_backend(GPUTarget("cuda", cc, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.meta)
    kwargs.setdefault("debug", False)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return fn, signature, constexprs, attrs, options


def _ptxas() -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "static_smem": re.compile(r"(\d+) bytes smem"),
}


def ptxas_info(ptx: str, cc: int) -> Dict[str, int]:
    arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([_ptxas(), "-v", "--gpu-name", arch, src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    if res.returncode:
        raise RuntimeError(f"ptxas failed: {text[-2000:]}")
    info = {}
    for key, rx in _PTXAS_RE.items():
        vals = [int(v) for v in rx.findall(text)]
        info[key] = max(vals) if vals else 0
    return info


def dot_report(ttgir: str) -> Tuple[int, int, str]:
    """(16-bit dots, of which on tensor cores, instruction kind) from TTGIR."""
    mma_aliases = {m.group(1) for m in re.finditer(r"^(#\w+) = #ttg\.nvidia_mma<", ttgir, re.M)}
    n16 = tc = 0
    kinds = set()
    for line in ttgir.splitlines():
        if "tt.dot " not in line and "warp_group_dot " not in line:
            continue
        operands = line.split(":", 1)[-1].split("->")[0]
        if "xbf16" not in operands and "xf16" not in operands:
            continue
        n16 += 1
        if "warp_group_dot" in line:
            tc += 1
            kinds.add("wgmma")
        elif any(a + ">" in line.split("->")[-1] or a + "," in line.split("->")[-1] for a in mma_aliases):
            tc += 1
            kinds.add("mma")
    return n16, tc, "+".join(sorted(kinds)) or "-"


@dataclass
class Row:
    op: str
    dtype: str
    shape: str
    kernel: str
    arch: int
    ctas: int = 0
    waves: float = 0.0
    num_warps: int = 0
    constexprs: str = ""
    shared: int = 0
    smem_limit: int = 0
    registers: int = 0
    spill: int = 0
    dots16: int = 0
    dots_tc: int = 0
    dot_kind: str = "-"
    error: str = ""
    failures: List[str] = field(default_factory=list)


_compiled: Dict[str, dict] = {}


def compile_launch(launch: Launch, cc: int) -> dict:
    import triton
    from triton.compiler import ASTSource
    fn, signature, constexprs, attrs, options = specialise(launch, cc)
    src = ASTSource(fn, signature, constexprs, attrs)
    key = hashlib.sha256(f"{cc}-{src.hash()}-{sorted(options.__dict__.items())}".encode()).hexdigest()
    if key in _compiled:
        return _compiled[key]
    # Disk cache keyed by the kernel's source hash (fn.cache_key, which covers the jit functions it calls), the
    # signature, constexprs, attrs, options and arch: a rerun skips both triton.compile and ptxas.
    cache_file = os.path.join(_cache_dir(), key + ".json")
    if os.path.exists(cache_file):
        with open(cache_file) as f:
            _compiled[key] = json.load(f)
        return _compiled[key]
    from triton.backends.compiler import GPUTarget
    shown = {fn.arg_names[k[0]]: v for k, v in constexprs.items()
             if fn.arg_names[k[0]].isupper() and not str(fn.arg_names[k[0]]).startswith("DOT")}
    try:
        ck = _compile_to_ptx(src, cc, options)
        info = ptxas_info(ck.asm["ptx"], cc)
        n16, tc, kind = dot_report(ck.asm["ttgir"])
        out = dict(num_warps=options.num_warps, shared=max(int(ck.metadata.shared), info["static_smem"]),
                   registers=info["registers"], spill=info["spill_stores"] + info["spill_loads"],
                   dots16=n16, dots_tc=tc, dot_kind=kind, error="")
    except Exception as exc:  # a compile error is a gate failure, reported in the row
        out = dict(num_warps=options.num_warps, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                   if str(exc) else type(exc).__name__)
    out["constexprs"] = " ".join(f"{k}={getattr(v, 'value', v)}" for k, v in shown.items())
    _compiled[key] = out
    if not out.get("error"):  # errors are recomputed (they may come from the environment)
        tmp = cache_file + f".{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.replace(tmp, cache_file)
    return out


def _ptx_only(*args):
    """Triton's ``add_stages_inspection_hook``: the gate assembles the PTX itself (``ptxas -v``, for registers and
    spills), so Triton's own ptxas run, whose cubin nobody loads, is skipped. Called without arguments it returns
    the (key, hash) that keeps these artefacts apart in Triton's cache; with (backend, stages, options, language,
    capability) it edits the stages."""
    if not args:
        return "compclip-aot-ptx-only", "compclip-aot-ptx-only"
    stages = args[1]
    stages["cubin"] = lambda src, metadata: b""


def _compile_to_ptx(src, cc: int, options):
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    previous, knobs.runtime.add_stages_inspection_hook = knobs.runtime.add_stages_inspection_hook, _ptx_only
    try:
        return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options.__dict__)
    finally:
        knobs.runtime.add_stages_inspection_hook = previous


def _cache_dir() -> str:
    from triton import knobs
    root = os.environ.get("COMPCLIP_AOT_CACHE") or os.path.join(knobs.cache.dir, "compclip-aot")
    os.makedirs(root, exist_ok=True)
    return root


def evaluate(row: Row) -> Row:
    if row.error:
        row.failures.append("compile error")
        return row
    if row.shared > row.smem_limit:
        row.failures.append(f"smem {row.shared} > {row.smem_limit}")
    if row.spill and row.dtype in ("bfloat16", "float16"):
        row.failures.append(f"spills {row.spill} B")
    if row.dots_tc < row.dots16:
        row.failures.append(f"{row.dots16 - row.dots_tc} 16-bit dot(s) without tensor cores")
    return row


def record_for(case_run: Callable[[], None], cc: int) -> List[Launch]:
    """The launches ``case_run`` makes on a GPU of compute capability ``cc`` (×10): the launchers pick tiles and
    splits from ``_common.device_arch`` / ``sm_count``, which read this target off the GPU."""
    from . import _common
    previous, _common._TARGET_ARCH["cc"] = _common._TARGET_ARCH["cc"], cc
    # The host code must decide as on a GPU (16-bit dot dtypes, and the workspace chunks they size) even in a
    # process that runs the kernels in the interpreter (the tests): nothing is executed here.
    interpret = os.environ.pop("TRITON_INTERPRET", None)
    try:
        return record(case_run)
    finally:
        _common._TARGET_ARCH["cc"] = previous
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret


def _ctas(grid) -> int:
    ctas = 1
    for extent in grid:
        ctas *= extent
    return ctas


def _kernel_name(kernel) -> str:
    return kernel.__name__ if hasattr(kernel, "__name__") else str(kernel)


def run_gate(full: bool = False, archs=ARCHS, log=print) -> List[Row]:
    rows: List[Row] = []
    from ._common import TARGET_SMS
    for case in cases(full):
        seen = set()
        for cc in archs:
            for ln in record_for(case.run, cc):
                name = _kernel_name(ln.kernel)
                res = compile_launch(ln, cc)
                ctas = _ctas(ln.grid)
                row = Row(case.op, str(case.dtype).replace("torch.", ""), case.shape, name, cc, ctas=ctas,
                          waves=round(ctas / TARGET_SMS[cc], 2), smem_limit=SMEM_LIMIT[cc], **res)
                k = (name, cc, row.constexprs, row.num_warps)
                if k in seen:
                    continue
                seen.add(k)
                rows.append(evaluate(row))
                if log:
                    log(format_row(rows[-1]))
    return rows


COLUMNS = ("op", "dtype", "shape", "kernel", "arch", "ctas", "waves", "num_warps", "shared", "smem_limit",
           "registers", "spill", "dots16", "dots_tc", "dot_kind", "constexprs", "failures")


def format_row(r: Row) -> str:
    status = "FAIL " + "; ".join(r.failures) if r.failures else "ok"
    return (f"sm_{r.arch} {r.op:26s} {r.dtype:8s} {r.shape:28s} {r.kernel:34s} w={r.num_warps} "
            f"smem={r.shared:>7d}/{r.smem_limit} regs={r.registers:>3d} spill={r.spill:>5d} "
            f"dots16={r.dots_tc}/{r.dots16} {r.dot_kind:5s} {status}" + (f" [{r.error}]" if r.error else ""))


def markdown(rows: List[Row]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    body = ""
    for r in rows:
        d = asdict(r)
        d["failures"] = "; ".join(r.failures) or "ok"
        d["arch"] = f"sm_{r.arch}"
        body += "| " + " | ".join(str(d[c]) for c in COLUMNS) + " |\n"
    return head + body


def summary(rows: List[Row]) -> str:
    bad = [r for r in rows if r.failures]
    return f"{len(rows)} rows, {len(bad)} failing"


# --------------------------------------------------------------------------------------------------------------
# Waves: CTAs per launch against the SM count, at the target shapes
# --------------------------------------------------------------------------------------------------------------
WAVES_FLOOR = 2.0


def wave_cases() -> List[Case]:
    """The target shapes of docs/kernels.md (bf16) at the global batch and at the local batch of one of RANKS
    ranks: contrastive image→[texts; negatives] (N = 5B) and text→image (N = B) rows at B = 32,768 and 8,192
    (local M from 1,024 to 32,768), both backward paths; grouped; XAC and pooling at B = 768 images (local 96)
    against all 2,304 concepts."""
    out: List[Case] = []
    bf16 = torch.bfloat16
    for B in (B_TARGET, 8192):
        for ranks in (1, RANKS):
            M = B // ranks
            for N, direction in ((B * (1 + K_TARGET), "i2t"), (B, "t2i")):
                out.append(Case(f"contrastive_row_loss {direction}", bf16, f"M={M} N={N} D=512",
                                _contrastive(M, N, 512, bf16)))
            out.append(Case("contrastive_row_loss[atomic] i2t", bf16, f"M={M} N={B * (1 + K_TARGET)} D=512",
                            _contrastive(M, B * (1 + K_TARGET), 512, bf16, deterministic=False)))
    out.append(Case("contrastive_row_loss i2t", bf16, f"M=1024 N={B_TARGET * (1 + K_TARGET)} D=512",
                    _contrastive(1024, B_TARGET * (1 + K_TARGET), 512, bf16)))
    for ranks in (1, RANKS):
        B = B_TARGET // ranks
        out.append(Case("grouped_contrast_row_loss", bf16, f"B={B} K={K_TARGET} D=512",
                        _grouped(B, K_TARGET, 512, bf16, True)))
        images, x = XAC_TARGET["B"] // ranks, XAC_TARGET
        for op, xac in (("xac_loss_sum", True), ("concept_attention_pool", False)):
            out.append(Case(op, bf16, f"B={images} P={x['P']} L={x['L']} D={x['D']}",
                            _xattn(images, x["P"], x["L"], x["D"], bf16, xac)))
    return out


@dataclass
class WaveRow:
    op: str
    shape: str
    kernel: str
    arch: int
    grid: str
    ctas: int
    sms: int
    waves: float


def waves(archs=ARCHS, wave_cases_=None) -> List[WaveRow]:
    """Every launch (no deduplication) of ``wave_cases()`` per architecture, with its CTAs and waves."""
    from ._common import TARGET_SMS
    rows = []
    for case in (wave_cases_ or wave_cases()):
        for cc in archs:
            for ln in record_for(case.run, cc):
                ctas = _ctas(ln.grid)
                rows.append(WaveRow(case.op, case.shape, _kernel_name(ln.kernel), cc, "×".join(map(str, ln.grid)),
                                    ctas, TARGET_SMS[cc], round(ctas / TARGET_SMS[cc], 2)))
    return rows


def waves_markdown(rows: List[WaveRow]) -> str:
    """One line per (op, shape, kernel), with the CTAs and waves of sm_90 (H100, 132 SMs) and sm_80 (A100, 108):
    of its smallest launch, where a kernel is launched more than once (per chunk of images)."""
    table: Dict[tuple, Dict[int, WaveRow]] = {}
    for r in rows:
        by_arch = table.setdefault((r.op, r.shape, r.kernel), {})
        if r.arch not in by_arch or r.ctas < by_arch[r.arch].ctas:
            by_arch[r.arch] = r
    out = ("| op | shape | kernel | grid (sm_90) | CTAs (sm_90) | waves H100 | grid (sm_80) | CTAs (sm_80) | "
           "waves A100 |\n|---|---|---|---|---|---|---|---|---|\n")
    for (op, shape, kernel), by_arch in table.items():
        cells = []
        for cc in (90, 80):
            r = by_arch.get(cc)
            cells += [r.grid, str(r.ctas), f"{r.waves:.2f}"] if r else ["-", "-", "-"]
        out += f"| {op} | {shape} | {kernel} | " + " | ".join(cells) + " |\n"
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compclip.kernels.aot", description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="every D, L and dtype (default: reduced CI set)")
    ap.add_argument("--arch", type=int, action="append", choices=ARCHS, help="compute capability (repeatable)")
    ap.add_argument("--json", help="write the rows as JSON")
    ap.add_argument("--md", help="write the rows as a Markdown table")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--waves", action="store_true", help="only the waves table (records grids, compiles nothing)")
    args = ap.parse_args(argv)
    if args.waves:
        rows = waves(tuple(args.arch or ARCHS))
        text = waves_markdown(rows)
        if args.md:
            with open(args.md, "w") as f:
                f.write(text)
        low = [r for r in rows if r.waves < WAVES_FLOOR]
        print(text if not args.quiet else "", end="")
        print(f"waves: {len(rows)} launches, {len(low)} below {WAVES_FLOOR:g} waves")
        return 1 if low else 0
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot: TRITON_INTERPRET=1 is set; the gate needs compiled (not interpreted) kernels", file=sys.stderr)
        return 2
    t0 = time.time()
    rows = run_gate(args.full, tuple(args.arch or ARCHS), log=None if args.quiet else print)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(rows))
    bad = [r for r in rows if r.failures]
    for r in bad:
        print("FAILED:", format_row(r))
    print(f"aot gate: {summary(rows)} ({time.time() - t0:.1f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
