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
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace

from ._aot_compile import DTYPES as DTYPES  # not used here: kept importable from this module, beside TARGETS
from ._aot_compile import TARGETS, Check, Result, _torch_dtype, run_check
from ._tuning import TileConfig

# Spills (bytes of spill stores per thread) allowed before a tile counts as spilling; 0 in practice today.
SPILL_BOUND = 64
_TOKENS = (512, 500)  # a multiple of 16 and not: Triton specialises integer arguments on divisibility by 16


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
