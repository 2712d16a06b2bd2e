"""Compile the triton backend's kernels ahead of the timed stages of gpu_check, in parallel, into Triton's disk cache.

Every Triton kernel variant (block size p, dtype, call site, and which integer arguments are divisible by 16) is
compiled once per tile on its first call, one after another inside one process: ~100 compiles for the benchmark's
grid and as many again for the searches. gpu_check starts one of these per (method, d, p) in the background while
its first two stages run (the 16 CPU cores compile in parallel) and waits for them before the benchmark, so the
timed stages find the compiled kernels in the cache that all processes share. A step of a real layer (forward and
backward, autotuning every tile) is what makes the launchers' arguments exactly what the stages will pass.

    python benchmarks/gpu_warm_triton.py --method c3a --dim 1024 --block-size 64
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from circtune.adapters import C3ALinear, CDVFTLinear

# (method, d, p): C3A at the benchmark's widths, CDVFT (no fused base: other variants) at roberta-large's.
TASKS = [("c3a", d, p) for d in (1024, 4096) for p in (32, 64, 128, 256)] + [("cdvft", 1024, p)
                                                                              for p in (32, 64, 128, 256)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("c3a", "cdvft"), required=True)
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--block-size", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_warm_triton: no CUDA device; nothing to compile", file=sys.stderr)
        return 2
    started = time.perf_counter()
    base = nn.Linear(args.dim, args.dim, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    if args.method == "c3a":
        layer = C3ALinear(base, args.block_size, backend="triton", init="gaussian")
    else:
        layer = CDVFTLinear(base, args.block_size, 2, backend="triton")
    x = torch.randn(args.tokens, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).backward(torch.randn_like(x))
    torch.cuda.synchronize()
    print(f"{args.method} d={args.dim} p={args.block_size}: compiled in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
