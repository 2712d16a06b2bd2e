"""Predicted H200 times of every cell of bench_gpu_kernels.py, written down before any GPU run.

``python benchmarks/bench_gpu_kernels_predict.py`` rewrites ``bench_gpu_kernels_predictions.csv`` (committed; the
benchmark prints measured / predicted beside each cell). The model is the arithmetic of the kernels' docstrings
(kernels/triton_backend.py, block_circulant_matmul.py, block_circulant_kernel_grad.py), one line per kernel a
path launches:

* a kernel takes ``max(FLOPs / rate, bytes / bandwidth, 3 µs)``; rates: bf16 tensor-core GEMMs 0.75 x 790 TFLOP/s
  (the 8192³ product measured on an H200 of this workplace; the layers' GEMMs are smaller), complex64 batched GEMMs
  on the CUDA cores 50 TFLOP/s, memory 0.8 x 4.3 TB/s (the measured device copy; elementwise kernels reach less);
* a phase (forward, backward) takes at least 6 µs of host time per eager op it dispatches: small layers are
  launch-bound, and CUDA events then measure the host;
* the AdamW update of the adapter parameters: 50 µs of host time (the foreach kernels are tiny);
* bytes per kernel, with N = T·d activations (bf16, 2 bytes) and S the complex64 spectrum of T·q·F values
  (F = p/2 + 1 for rfft, p for fft): torch route forward = cast 6N, transform 4N + S, mixing (frequency-batched GEMM
  with two contiguous copies, 6S; or for q² <= 16 a loop of q broadcast products, 3S each), inverse S + 4N (fft:
  3S + 4N), cast 6N, add 6N (dft: the transforms and the mixing as bf16 GEMMs at 0.3 x 790 TFLOP/s, 2·T·d·(p+2)
  and 4·T·d·q FLOPs, each reading and writing 2N, no casts or copies); backward = the same on g for the input
  gradient plus a transform of x and the correlation over tokens for the kernel gradient, and the accumulation of
  x.grad (6N). Dense: ΔW built in
  about 32 d² bytes and folded into the base GEMM; backward adds ``gᵀx`` (one GEMM) and the diagonal sums. Triton
  (the docstrings' prediction): forward and input gradient cost the base GEMMs plus 1 µs of tile generation each;
  the kernel gradient one GEMM, inflated by 16/q when q = d/p < 16 (the row tile's padding). PEFT's C3A: float32
  full-spectrum FFTs and einsum copies (about 114N bytes forward, 174N backward, see ``peft``). LoRA: float32
  factors, i.e. casts of x and of the output (34N bytes forward, 42N backward).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

GEMM = 0.75 * 790e12
CGEMM = 50e12
DFT_GEMM = 0.3 * 790e12  # batched bf16 GEMMs with a short inner dimension (p or q): far from the peak
BW = 0.8 * 4.3e12
MIN_KERNEL_S = 3e-6
HOST_OP_S = 6e-6
ADAMW_S = 50e-6
OUT = Path(__file__).resolve().parent / "bench_gpu_kernels_predictions.csv"


def k(flops: float = 0.0, rate: float = GEMM, nbytes: float = 0.0) -> float:
    """One kernel's time in seconds."""
    return max(flops / rate if flops else 0.0, nbytes / BW, MIN_KERNEL_S)


def gemm(m: int, kk: int, n: int) -> float:
    return k(2 * m * kk * n, GEMM, 2 * (m * kk + kk * n + m * n))


def phase(kernels: list[float], ops: int) -> float:
    return max(sum(kernels), ops * HOST_OP_S)


def _mix(t: int, q: int, f: int, s: float) -> tuple[list[float], int]:
    if q * q <= 16:
        return [k(nbytes=3 * s)] * q, 2 * q
    return [k(nbytes=2 * s), k(8 * t * q * q * f, CGEMM, 2 * s), k(nbytes=2 * s)], 5


def torch_route(t: int, d: int, p: int, transform: str) -> tuple[float, float]:
    n, q = t * d, d // p
    f = p // 2 + 1 if transform == "rfft" else p
    s = 8.0 * t * q * f
    inverse = k(nbytes=s + 4 * n) if transform == "rfft" else k(nbytes=3 * s + 4 * n)
    mix, mix_ops = _mix(t, q, f, s)
    fwd = [gemm(t, d, d), k(nbytes=6 * n), k(nbytes=4 * n + s), *[MIN_KERNEL_S] * 3, *mix, inverse,
           k(nbytes=6 * n), k(nbytes=6 * n)]
    corr = [k(nbytes=3 * s)] * q if q * q <= 16 else [k(nbytes=2 * s), k(nbytes=2 * s), k(8 * t * q * q * f, CGEMM,
                                                                                         2 * s)]
    bwd = [gemm(t, d, d), k(nbytes=6 * n), k(nbytes=4 * n + s), *[MIN_KERNEL_S] * 2, *mix, inverse, k(nbytes=6 * n),
           k(nbytes=6 * n), k(nbytes=4 * n + s), *corr, MIN_KERNEL_S, k(nbytes=6 * n)]
    return phase(fwd, 9 + mix_ops), phase(bwd, 14 + mix_ops + len(corr))


def dft(t: int, d: int, p: int) -> tuple[float, float]:
    """The dft route (circtune/adapters/_dft.py): transforms and mixing as bf16 GEMMs, no permute copies."""
    n, q = t * d, d // p
    transform = 2 * t * d * (p + 2)  # [2F, p] against [p, T·q]
    mix = 4 * t * d * q  # 4 real products per frequency of [T, q] x [q, q]
    fwd = [gemm(t, d, d), k(transform, DFT_GEMM, 4 * n), *[MIN_KERNEL_S] * 2, k(mix, DFT_GEMM, 4 * n),
           k(transform, DFT_GEMM, 4 * n), k(nbytes=6 * n)]
    bwd = [gemm(t, d, d), k(transform, DFT_GEMM, 4 * n), k(mix, DFT_GEMM, 4 * n), k(transform, DFT_GEMM, 4 * n),
           k(mix, DFT_GEMM, 8 * n), MIN_KERNEL_S, k(nbytes=6 * n)]
    return phase(fwd, 8), phase(bwd, 12)


def dense(t: int, d: int, p: int) -> tuple[float, float]:
    fwd = [k(nbytes=4 * d * d), k(nbytes=8 * d * d), k(nbytes=8 * d * d), k(nbytes=6 * d * d), k(nbytes=6 * d * d),
           gemm(t, d, d)]
    bwd = [gemm(t, d, d), k(2 * t * d * d, GEMM, 2 * (2 * t * d + d * d)), k(nbytes=6 * d * d), k(nbytes=8 * d * d),
           k(nbytes=8 * d * d), k(nbytes=12 * d * d)]
    return phase(fwd, 7), phase(bwd, 8)


def triton(t: int, d: int, p: int) -> tuple[float, float]:
    q = d // p
    fused = gemm(t, d, d) + 1e-6
    kgrad = k(2 * t * d * d * max(1.0, 16 / q), GEMM, 2 * 2 * t * d + 4 * d * d / p)
    return phase([fused], 3), phase([fused, MIN_KERNEL_S, kgrad, MIN_KERNEL_S], 7)


def peft(t: int, d: int, p: int) -> tuple[float, float]:
    n, q = t * d, d // p
    s = 8.0 * n  # full complex64 spectrum
    bmm = k(8 * t * q * q * p, CGEMM, 2 * s)
    fwd = [gemm(t, d, d), k(nbytes=6 * n), k(nbytes=4 * n + s), k(nbytes=2 * s), bmm, k(nbytes=2 * s),
           k(nbytes=2 * s), k(nbytes=s + 4 * n), k(nbytes=8 * n), k(nbytes=6 * n), k(nbytes=6 * n)]
    bwd = [gemm(t, d, d), k(nbytes=6 * n), k(nbytes=8 * n), k(nbytes=4 * n + s), k(nbytes=2 * s), bmm,
           k(nbytes=2 * s), k(nbytes=2 * s), k(nbytes=s + 4 * n), k(nbytes=4 * n + s), k(nbytes=4 * s), bmm,
           MIN_KERNEL_S, k(nbytes=6 * n), k(nbytes=6 * n)]
    return phase(fwd, 12), phase(bwd, 18)


def lora(t: int, d: int, r: int) -> tuple[float, float]:
    n = t * d
    small = 4 * t * r
    fwd = [gemm(t, d, d), k(nbytes=6 * n), k(nbytes=4 * n + small), k(nbytes=small + 4 * n), k(nbytes=8 * n),
           k(nbytes=6 * n), k(nbytes=6 * n)]
    bwd = [gemm(t, d, d), k(nbytes=6 * n), k(nbytes=8 * n), k(nbytes=4 * n + small), k(nbytes=4 * n),
           k(nbytes=4 * n + small), k(nbytes=small + 4 * n), k(nbytes=6 * n), k(nbytes=6 * n)]
    return phase(fwd, 7), phase(bwd, 10)


def predict(path: str, t: int, d: int, p: int | None) -> tuple[float, float, float]:
    """(forward, backward, whole step) in ms, as bench_gpu_kernels.py times them."""
    if path == "base":
        fwd, bwd = phase([gemm(t, d, d)], 1), phase([gemm(t, d, d)], 2)
        return fwd * 1e3, bwd * 1e3, (fwd + bwd) * 1e3
    if path.startswith("lora-r"):
        fwd, bwd = lora(t, d, int(path[6:]))
    elif path in ("torch-rfft", "torch-fft"):
        fwd, bwd = torch_route(t, d, p, path[6:])
    else:
        fwd, bwd = {"dense": dense, "triton": triton, "peft-c3a": peft, "torch-dft": dft}[path](t, d, p)
    return fwd * 1e3, bwd * 1e3, (fwd + bwd + ADAMW_S) * 1e3


def rows(tokens=(4096, 16384), dims=(1024, 4096), block_sizes=(32, 64, 128, 256, 512, 1024)) -> list[dict]:
    out = []
    for t in tokens:
        for d in dims:
            base = predict("base", t, d, None)[2]
            cells = [(path, None) for path in ("base", "lora-r8", "lora-r16")]
            cells += [(path, p) for p in block_sizes if d % p == 0
                      for path in ("triton", "torch-rfft", "torch-fft", "torch-dft", "dense", "peft-c3a")
                      if not (path == "triton" and p > 256)]
            for path, p in cells:
                fwd, bwd, step = predict(path, t, d, p)
                out.append({"tokens": t, "d": d, "p": p or "", "path": path, "fwd_ms": f"{fwd:.4f}",
                            "bwd_ms": f"{bwd:.4f}", "step_ms": f"{step:.4f}", "added_ms": f"{step - base:.4f}"})
    return out


def main() -> int:
    table = rows()
    with OUT.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    print(f"wrote {len(table)} predictions to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
