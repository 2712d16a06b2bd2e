"""The ``triton`` backend: every block-circulant product of C3A and CDVFT through circtune.kernels.

Importing this module never imports Triton: circtune.adapters registers :func:`backend` when Triton is
*installed*, and the kernel modules are imported on the first forward. So ``import circtune`` works without
Triton, and a test can set ``TRITON_INTERPRET=1`` before the kernels are decorated (Triton reads it then).

* C3A: ``(W0 + ΔW) x + b`` is one implicit GEMM (the circulant tile generated from the kernel and added to W0's
  tile); its input gradient is one more; the kernel gradient is one implicit Hankel GEMM.
* CDVFT: the frozen layer through ``base_layer``; each circulant factor through the same kernels; the diagonals as
  elementwise multiplies (autograd gives their gradients). Fusing them into the tile loads would save about two
  activation passes per factor; left until the GPU measurements say it pays.

Declared range: ``1 <= p <= 256`` (any p in it, powers of two or not; fp32, bf16, fp16 and fp64 activations). The
kernels are correct beyond it, but there the transform route is predicted to win: its mixing FLOPs fall as
``4·T·d_in·d_out/p`` while the implicit GEMM's stay ``2·T·d_in·d_out``, and the kernel gradient's row tile (16 at
least) pads ``q_out = d_out/p`` rows, wasting MMA work once ``d_out/p < 16``.

Why implicit GEMMs (the circulant tile generated inside the GEMM) rather than the DFT as a matmul, with numbers.
H100, bf16 at ≈ 800 TFLOP/s, ≈ 3 TB/s; T = 4096, d_in = d_out = 1024, p = 64. The frozen layer's own step is two GEMMs
(forward, input gradient; its weight gradient is not needed): 2 × 8.6 GFLOP ≈ 22 µs.

============================  ==========================================  ==========================================
product                       implicit GEMM (this backend)                DFT as matmul (fused, not built)
============================  ==========================================  ==========================================
forward, input gradient       inside the base GEMMs: +0 FLOPs, + gathers  2·T·(d_in+d_out)·(p+2) + 4·T·d_in·d_out/p
                              of w (cache-resident): predicted +0–2 µs    = 1.4 GFLOP ≈ 2 µs, but a separate pass
                                                                          over x and Δz (16 MB ≈ 5 µs) each
kernel gradient               2·T·d_in·d_out = 8.6 GFLOP ≈ 11 µs          1.4 GFLOP; reads g and x: ≈ 5–6 µs
============================  ==========================================  ==========================================

So for forward and input gradient the fused implicit GEMM is predicted to win at every p (its extra cost is the tile
generation alone), and it is exact for any p with one code path. For the kernel gradient the DFT-as-matmul route
does ``d / (2(p+2) + 2d/p)``× fewer FLOPs for a square layer (6× here; 2× at d = 1024, p = 256; 16× at d = 4096,
p = 64) and, being memory-bound, is predicted ≈ 2× faster at this size, ≈ 7× at d = 4096, T = 16384, p = 64
(≈ 0.1 ms against ≈ 0.7 ms): that kernel is the next one to write if the GPU measurements
(benchmarks/bench_triton.py --kernels: ``kgrad`` against ``gTx-gemm``) show the kernel gradient dominating.
Predicted step overhead of this backend: ≈ one base GEMM (+50 % over the frozen layer), against the torch route's
≈ 50–100 µs of memory-bound passes at this size.
"""

from __future__ import annotations

import importlib.util

import torch

from circtune.adapters._backends import Backend

MAX_BLOCK_SIZE = 256


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "Triton kernels need a CUDA device; TRITON_INTERPRET=1 runs them on the CPU for tests only"
    try:
        import triton  # noqa: F401
    except Exception as e:  # a broken install is a reason, not a crash of the whole search
        return f"triton does not import: {type(e).__name__}: {e}"
    return None


def dtype_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the kernels can run ``dtype`` operands on ``device``, else why not: bf16 ``tl.dot`` needs bf16
    tensor-core MMA, which starts with compute capability 8.0 (Ampere)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    from circtune.measure.device import BF16_CAPABILITY, cuda_capability

    index = torch.cuda.current_device() if device.index is None else device.index
    major, minor = cuda_capability(torch.device("cuda", index))
    if (major, minor) >= BF16_CAPABILITY:
        return None
    name = torch.cuda.get_device_properties(index).name
    return (f"bf16 needs compute capability {BF16_CAPABILITY[0]}.{BF16_CAPABILITY[1]} (sm_80) or newer for tl.dot; "
            f"cuda:{index} ({name}) has {major}.{minor}: use fp16 or fp32 there")


def block_size_reason(p: int, d_in: int, d_out: int) -> str | None:
    if p > MAX_BLOCK_SIZE:
        return (f"outside its declared range p <= {MAX_BLOCK_SIZE} (the transform route's mixing FLOPs fall as 1/p "
                "while the implicit GEMM's do not, and d_out/p < 16 pads the kernel gradient's row tile)")
    return None


def triton_forward(layer, x: torch.Tensor) -> torch.Tensor:
    if torch.jit.is_tracing():
        # A tracer (fvcore's forward FLOP count in the profiler) cannot follow a kernel launch, and under it the
        # token count is a traced tensor that the launchers' autotune keys cannot use: trace the same product as
        # plain torch ops (one GEMM per circulant factor, W0 fused as in the kernel), as the torch backend does.
        from .block_circulant_linear import block_circulant_linear_reference as block_circulant_linear
    else:
        from .block_circulant_linear import block_circulant_linear

        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled(x.device.type) else x.dtype
        reason = dtype_reason(x.device, dtype)
        if reason is not None:
            raise ValueError(f"triton backend: {reason}")

    base = layer.base_layer
    kernels = layer.circulant_factors()
    diagonals = layer.diagonal_factors()
    if diagonals is None and len(kernels) == 1:
        return block_circulant_linear(x, kernels[0], scale=layer.circulant_scale, weight=base.weight, bias=base.bias)
    h = x
    for k, kernel in enumerate(kernels):
        if diagonals is not None:
            h = h * diagonals[k].to(h.dtype)
        h = block_circulant_linear(h, kernel, scale=layer.circulant_scale)
    if diagonals is not None:
        h = h * (diagonals[-1] * layer.alpha).to(h.dtype)
    return base(x) + h


def backend() -> Backend | None:
    """The ``triton`` backend when Triton is installed (found without importing it); None otherwise.
    circtune.adapters registers it."""
    if importlib.util.find_spec("triton") is None:
        return None
    # Triton implicit GEMMs: circulant tiles generated from w inside the base GEMM (p <= MAX_BLOCK_SIZE)
    return Backend("triton", triton_forward, unavailable_reason, False, block_size_reason=block_size_reason)
