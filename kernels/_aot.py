"""Ahead-of-time compile check: every Triton kernel of circtune compiled for a fixed GPU target, without a GPU.

``python -m circtune.kernels._aot`` compiles each tile that the autotune offers, for ``sm_90`` (H100/H200) and
``sm_80`` (A100), in every operand dtype, and prints a table: kernels compiled, failures, registers, spills and the
largest shared memory per target and dtype. tests/test_aot_compile.py runs it in CI and asserts on the result.

How it drives the real code. Each check calls the project's own entry point, ``block_circulant_linear`` forward and
backward, on small CPU tensors, with the kernels' launch (``kernel[grid](...)``) replaced by a recorder: so the
arguments, strides, constexprs and launch options are exactly what a real call produces (``W0ᵀ`` as a strided view
for the input gradient, the token split and its atomics for the kernel gradient). Each recorded launch is then
compiled by Triton's own JIT path (``JITFunction.warmup``: the same argument binding and specialisation as a
launch) under a stand-in driver that reports the fixed target, all the way to a cubin by Triton's bundled
``ptxas``. Nothing runs. Shared memory comes from the compiled kernel's metadata; registers and spills from
``ptxas -v``'s log (Triton prints it with ``knobs.nvidia.dump_ptxas_log``; each worker compiles into a fresh cache
so that every kernel really goes through ptxas).

Sampling. The whole product (every tile × call site × 5 p × 2 token counts × split: ~2,700 kernels) takes about
half an hour on two cores; ``--full`` compiles it. The default sample (~150 kernels, ~100 s of CPU) compiles, per
target and dtype, every tile of the forward list once, rotating the call site (C3A forward with ``W0`` and bias,
C3A input gradient with ``W0ᵀ`` strided, CDVFT factor forward and input gradient without ``W0``: each at least
once), p (16, 24, 64, 96, 256: powers of two and not) and the token count (512 and 500: Triton specialises
integers on divisibility by 16); and every tile of the kernel gradient's list for a wide layer (``q_out`` >= 128:
full row tiles) plus every other tile of two narrow ones (``q_out`` = 3 and 32: row tiles clamped to 16 and 32),
alternating split = 1 (plain stores) and split = 4 (atomics).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace

import torch

from ._tuning import TileConfig

# name -> (compute capability, shared memory a block may use, in bytes: 227 KiB on Hopper, 163 KiB on the A100).
TARGETS: dict[str, tuple[tuple[int, int], int]] = {"sm_90": ((9, 0), 232448), "sm_80": ((8, 0), 166912)}
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                                  "fp64": torch.float64}
# Spills (bytes of spill stores per thread) allowed before a tile counts as spilling; 0 in practice today.
SPILL_BOUND = 64
_TOKENS = (512, 500)  # a multiple of 16 and not: Triton specialises integer arguments on divisibility by 16


@dataclass(frozen=True)
class Check:
    """One compile: a tile at one call site of ``block_circulant_linear``, for one target, dtype and shape."""

    target: str
    dtype: str  # "fp32" (TF32 off: ieee), "fp32-tf32" (TF32 on), "bf16", "fp16", "fp64"
    site: str  # "c3a forward", "c3a input gradient", "cdvft forward", "cdvft input gradient", "kernel gradient"
    p: int
    d_in: int
    d_out: int
    tokens: int
    forward: TileConfig | None = None  # the tile under test (forward and input gradient)
    kernel_grad: TileConfig | None = None  # the tile under test (kernel gradient), split set

    @property
    def tile(self) -> TileConfig:
        return self.forward or self.kernel_grad


@dataclass
class Result:
    check: Check
    ok: bool
    error: str = ""
    shared: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    seconds: float = 0.0
    launch: dict = field(default_factory=dict)  # what the launch specialised on: constexprs and options


def _torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name.split("-")[0]]


def _precision(name: str) -> str:
    return "tf32" if name == "fp32-tf32" else ("ieee" if name == "fp32" else "")


def offered(dtype: str, q_out: int | None = None) -> tuple[TileConfig, ...]:
    """The tiles the autotune offers for ``dtype``: the forward list, or the kernel gradient's for ``q_out`` block
    rows. (The lists do not depend on the GPU: each must fit both targets, which this check proves.)"""
    from .block_circulant_kernel_grad import cuda_configs as kernel_grad_configs
    from .block_circulant_matmul import cuda_configs as forward_configs

    tdtype, precision = _torch_dtype(dtype), _precision(dtype) or "ieee"
    if q_out is None:
        return forward_configs(tdtype, precision)
    return kernel_grad_configs(q_out, tdtype, precision)


FORWARD_SITES = ("c3a forward", "c3a input gradient", "cdvft forward", "cdvft input gradient")
VARIANTS = ("fp32", "fp32-tf32", "bf16", "fp16", "fp64")
# Kernel-gradient layers: (d_out, p values): a wide one (q_out = 192 and 128: the full row tiles) and narrow ones
# (q_out = 3: row tile 16; q_out = 32: row tile 32).
_WIDE = (3072, (16, 24))
_NARROW = ((768, (256,)), (3072, (96,)))


def checks(targets: Sequence[str] = tuple(TARGETS), full: bool = False) -> list[Check]:
    """The compile checks: sampled as the module docstring says, or the whole product with ``full``."""
    ps = (64, 24, 256, 96, 16)  # rotation: powers of two and not, alternately
    out: list[Check] = []
    for target in targets:
        for dtype in VARIANTS:
            tiles = offered(dtype)
            if full:
                out += [Check(target, dtype, site, p, 768, 1536, tokens, forward=tile)
                        for tile in tiles for site in FORWARD_SITES for p in ps for tokens in _TOKENS]
            else:
                # Every tile once, and every call site and several p at least once per list.
                n = max(len(tiles), len(FORWARD_SITES))
                out += [Check(target, dtype, FORWARD_SITES[i % 4], ps[i % len(ps)], *((768, 1536) if i % 2 else
                              (1536, 768)), _TOKENS[(i // 2) % 2], forward=tiles[i % len(tiles)]) for i in range(n)]
            # Kernel gradient: the wide layer's whole list, every other tile of each narrow list; the split
            # (1: plain stores, 4: atomics), p and the token count rotate over them.
            pairs = []
            for index, (d_out, layer_ps) in enumerate((_WIDE, *_NARROW)):
                tiles = offered(dtype, d_out // max(layer_ps))
                pairs += [(d_out, layer_ps, tile) for i, tile in enumerate(tiles)
                          if full or index == 0 or i % len(_NARROW) == index - 1]
            for k, (d_out, layer_ps, tile) in enumerate(pairs):
                if full:
                    out += [Check(target, dtype, "kernel gradient", p, 768, d_out, tokens,
                                  kernel_grad=replace(tile, split=split))
                            for split in (1, 4) for p in layer_ps for tokens in _TOKENS]
                else:
                    out.append(Check(target, dtype, "kernel gradient", layer_ps[(k // 2) % len(layer_ps)], 768, d_out,
                                     _TOKENS[(k // 4) % 2], kernel_grad=replace(tile, split=(1, 4)[k % 2])))
    return out


# ------------------------------------------------------------------------------------------------- compiling one


class _TargetDriver:
    """Stands in for Triton's CUDA driver: reports a fixed target. Each target gets its own device number, since
    the JIT caches its binder (and so the target) per device."""

    def __init__(self, capability: tuple[int, int]):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
        self.device = self.target.arch

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0


class _Recorder:
    """Takes the place of a ``@triton.jit`` kernel in its launcher's module: ``kernel[grid](*args, **kwargs)``
    records the launch instead of running it."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, grid, args, kwargs))


@contextlib.contextmanager
def _recording() -> Iterator[list]:
    from . import block_circulant_kernel_grad as kgrad
    from . import block_circulant_matmul as matmul

    launches: list = []
    patches = [(matmul, "_block_circulant_matmul_kernel"), (kgrad, "_block_circulant_kernel_grad_kernel")]
    saved = [(module, name, getattr(module, name)) for module, name in patches]
    saved += [(module, "check_device", module.check_device) for module in (matmul, kgrad)]
    try:
        for module, name in patches:
            setattr(module, name, _Recorder(getattr(module, name), launches))
        for module in (matmul, kgrad):
            # The tensors are on the CPU; the launchers accept them (the launch itself is recorded, never run).
            module.check_device = lambda op, *tensors: next(t for t in tensors if t is not None).device
        yield launches
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _record(check: Check) -> list:
    """The launches of ``block_circulant_linear`` forward and backward for ``check``, labelled by call site."""
    from .block_circulant_linear import block_circulant_linear

    dtype = _torch_dtype(check.dtype)
    p, q_in, q_out = check.p, check.d_in // check.p, check.d_out // check.p
    c3a = check.site.startswith("c3a") or check.site == "kernel gradient"
    x = torch.randn(check.tokens, check.d_in, dtype=dtype, requires_grad=True)
    w = torch.randn(q_out, q_in, p, requires_grad=True)
    weight = torch.randn(check.d_out, check.d_in, dtype=dtype) if c3a else None
    bias = torch.randn(check.d_out, dtype=dtype) if c3a else None
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = check.dtype == "fp32-tf32"
    try:
        with _recording() as launches:
            # The GEMM kernel-gradient route, always: the spectral routes are torch ops with no kernel to compile.
            y = block_circulant_linear(x, w, scale=0.5, weight=weight, bias=bias, forward_config=check.forward,
                                       input_grad_config=check.forward, kernel_grad_config=check.kernel_grad,
                                       kernel_grad_route="gemm")
            y.backward(torch.ones_like(y))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    labelled = []
    matmuls = 0
    for launch in launches:
        name = getattr(launch[0], "fn", launch[0]).__name__
        if name == "_block_circulant_matmul_kernel":
            site = ("forward", "input gradient")[min(matmuls, 1)]
            matmuls += 1
            labelled.append((("c3a " if c3a else "cdvft ") + site, launch))
        else:
            labelled.append(("kernel gradient", launch))
    if matmuls != 2 or len(labelled) != 3:
        # The launchers changed: this check would no longer see what a real call compiles.
        raise RuntimeError(f"expected a forward, an input-gradient and a kernel-gradient launch, recorded "
                           f"{[site for site, _ in labelled]}")
    return labelled


_SEEN: dict[str, tuple[int, int, int]] = {}  # kernel hash -> ptxas figures, for kernels this process compiled


def _ptxas_figures(log: str) -> tuple[int, int, int] | None:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spills:
        return None
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def _worker_setup() -> None:
    """Once per process: a fresh Triton cache (so ptxas runs and logs), the ptxas log on, no CUDA driver needed."""
    import triton

    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        raise RuntimeError("the AOT check compiles kernels: run it without TRITON_INTERPRET=1")
    cache = tempfile.mkdtemp(prefix="circtune-aot-")
    import atexit

    atexit.register(shutil.rmtree, cache, True)
    triton.knobs.cache.dir = cache
    triton.knobs.nvidia.dump_ptxas_log = True
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


_READY = False


def run_check(check: Check) -> Result:
    """Compile the launch of ``check`` for its target (nothing runs); never raises for a compile error.

    Meant for a process of its own (``run``'s workers, or this module's command line): it points the process's
    Triton at a stand-in driver and a temporary cache."""
    global _READY
    if not _READY:
        _worker_setup()
        _READY = True
    from triton.runtime.driver import driver

    try:
        launches = [launch for site, launch in _record(check) if site == check.site]
        if len(launches) != 1:
            raise RuntimeError(f"expected one launch at {check.site}, recorded {len(launches)}")
    except Exception as e:  # noqa: BLE001 - the table reports it
        return Result(check, False, f"recording failed: {type(e).__name__}: {str(e).strip()[:300]}")
    kernel, grid, args, kwargs = launches[0]
    launch = {k: (str(v) if not isinstance(v, (int, float, bool, str)) else v) for k, v in kwargs.items()}
    driver.set_active(_TargetDriver(TARGETS[check.target][0]))
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = kernel.warmup(*args, grid=grid, **kwargs)
    except Exception as e:  # noqa: BLE001 - a compile error is a result
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        return Result(check, False, f"{type(e).__name__}: {lines[0] if lines else ''}"[:300],
                      seconds=time.perf_counter() - start, launch=launch)
    seconds = time.perf_counter() - start
    key = compiled.metadata.hash
    figures = _ptxas_figures(log.getvalue()) or _SEEN.get(key)
    if figures is None:
        return Result(check, False, "compiled, but ptxas -v printed no register or spill figures",
                      shared=compiled.metadata.shared, seconds=seconds, launch=launch)
    _SEEN[key] = figures
    return Result(check, True, shared=compiled.metadata.shared, registers=figures[0], spill_stores=figures[1],
                  spill_loads=figures[2], seconds=seconds, launch=launch)


# ------------------------------------------------------------------------------------------------------ all of them


def run(selected: Sequence[Check], workers: int = 2, progress: bool = False) -> list[Result]:
    """Compile every check, in ``workers`` processes (each with its own fresh Triton cache)."""
    import multiprocessing

    # Slowest first (fp32 and the kernel gradient compile longest), so that the pool ends together.
    order = sorted(range(len(selected)), key=lambda i: (selected[i].site != "kernel gradient",
                                                         not selected[i].dtype.startswith("fp32")))
    results: list[Result | None] = [None] * len(selected)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(selected), desc="compiling", unit="kernel", file=sys.stderr)
    if workers <= 1:
        for i in order:
            results[i] = run_check(selected[i])
            if bar:
                bar.update()
    else:
        # spawn: a fresh interpreter per worker, so no interpreter-mode kernels or CUDA state come along.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(run_check, selected[i]): i for i in order}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if bar:
                    bar.update()
    if bar:
        bar.close()
    return [r for r in results if r is not None]


def problems(results: Sequence[Result], spill_bound: int = SPILL_BOUND) -> list[str]:
    """What the AOT check rejects: a failed compile, a tile over its target's shared memory, spills over the bound."""
    out = []
    for r in results:
        c = r.check
        where = f"{c.target} {c.dtype} {c.site} p={c.p} tokens={c.tokens} tile {_tile_text(c.tile)}"
        if not r.ok:
            out.append(f"{where}: does not compile: {r.error}")
            continue
        limit = TARGETS[c.target][1]
        if r.shared > limit:
            out.append(f"{where}: needs {r.shared} B of shared memory, {c.target} has {limit} B")
        if r.spill_stores > spill_bound:
            out.append(f"{where}: spills {r.spill_stores} B per thread (bound {spill_bound} B)")
    return out


def _tile_text(t: TileConfig) -> str:
    split = "" if t.split is None else f" split={t.split}"
    return f"{t.block_m}x{t.block_n}x{t.block_k} w{t.num_warps} s{t.num_stages}{split}"


def table(results: Sequence[Result]) -> str:
    """Per target and dtype: kernels compiled, failures, registers, spills, largest shared memory (and its tile)."""
    rows = [("target", "dtype", "compiled", "failed", "max regs", "max spill B", "spilling", "max shared B",
             "limit B", "largest tile", "compile s")]
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.check.target, r.check.dtype), []).append(r)
    for (target, dtype), rs in sorted(groups.items(), key=lambda kv: (list(TARGETS).index(kv[0][0]),
                                                                      VARIANTS.index(kv[0][1]))):
        ok = [r for r in rs if r.ok]
        big = max(ok, key=lambda r: r.shared, default=None)
        rows.append((target, dtype, str(len(ok)), str(len(rs) - len(ok)),
                     str(max((r.registers for r in ok), default=0)),
                     str(max((r.spill_stores for r in ok), default=0)),
                     str(sum(r.spill_stores > 0 for r in ok)),
                     str(big.shared if big else 0), str(TARGETS[target][1]),
                     f"{big.check.site}: {_tile_text(big.check.tile)}" if big else "-",
                     f"{sum(r.seconds for r in rs):.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m circtune.kernels._aot",
        description="Compile every Triton kernel of circtune for sm_90 and sm_80 without a GPU and print "
                    "registers, spills and shared memory per target and dtype (exit status 1 on a problem).")
    parser.add_argument("--target", action="append", choices=tuple(TARGETS),
                        help="a target to compile for (repeatable; default: all)")
    parser.add_argument("--full", action="store_true",
                        help="every tile x site x p x token count instead of the sample (~30 min on 2 cores)")
    parser.add_argument("--workers", type=int, default=2, help="compiler processes (default 2)")
    parser.add_argument("--json", metavar="PATH", help="also write every result to PATH as JSON")
    parser.add_argument("--verbose", action="store_true", help="print one line per compiled kernel")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError as e:
        print(f"the AOT check needs Triton with its NVIDIA backend: {e}", file=sys.stderr)
        return 2
    selected = checks(tuple(args.target or TARGETS), full=args.full)
    start = time.perf_counter()
    results = run(selected, workers=args.workers, progress=True)
    elapsed = time.perf_counter() - start
    if args.verbose:
        for r in results:
            c = r.check
            print(f"{c.target} {c.dtype:9} {c.site:20} p={c.p:<3} T={c.tokens:<3} {_tile_text(c.tile):24} "
                  + (f"shared={r.shared} regs={r.registers} spill={r.spill_stores}/{r.spill_loads} "
                     f"{r.seconds:.1f}s" if r.ok else r.error))
    print(table(results))
    found = problems(results)
    for line in found:
        print("PROBLEM:", line)
    print(f"{len(results)} kernels, {len(found)} problems, {elapsed:.0f} s with {args.workers} workers")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(r), "check": {**asdict(r.check)}} for r in results], f, indent=1)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
