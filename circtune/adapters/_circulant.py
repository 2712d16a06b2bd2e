"""The block-circulant product: the math every backend, the profiler and the tests share.

A kernel ``w`` of shape ``[q_out, q_in, p]`` defines the ``(q_out·p) × (q_in·p)`` matrix whose block
``(i, j)`` is the circulant with first row ``w[i, j]``, rows shifting right by one::

    C(v)[u, t] = v[(t - u) mod p]          # the orientation of PEFT's C3A

so ``y_i[u] = Σ_j Σ_s w[i, j, s] · x_j[(u + s) mod p]``: a circular cross-correlation. With ``X = DFT(x)``,
``W = DFT(w)`` and ``G = DFT(g)`` (g the upstream gradient) the three products of a training step are

    forward          Y_i  = Σ_j conj(W_ij) · X_j
    input gradient   DX_j = Σ_i W_ij · G_i
    kernel gradient  DW_ij = Σ_tokens conj(G_i) · X_j

each a per-frequency mixing across blocks (a batched complex GEMM) between a transform and its inverse.
For real signals only ``p//2 + 1`` frequencies are needed (``rfft``); ``fft`` keeps all ``p`` and is here
so that the profiler can measure the difference. ``dft`` computes the same half spectrum as real GEMMs against
cached cos/sin bases (:mod:`._dft`): more FLOPs than an FFT (O(p) per element, not O(log p)), but every one of them
in a GEMM, which tensor cores run in bf16/fp16.

Where the code is: the ``rfft`` / ``fft`` arithmetic in :mod:`._fft`, the ``dft`` route in :mod:`._dft`. This module
holds the entry points (:func:`block_circulant_product` picks the route), the circulant matrix and the dense backend,
and re-exports what other modules read of :mod:`._fft` from here (``compute_dtype``, ``spectral_kernel_grad``,
``_LOOP_MAX_PAIRS``).

Passes over activation-sized buffers per training step of one product (a kernel that reads or writes an
``[N, d]``-sized tensor or its spectrum; the kernel's own small tensors not counted), rfft, q_out·q_in > 16 (bmm):

=====================  =====================================================  =====================================
                       before (x saved, spectra permuted by copies)           now
=====================  =====================================================  =====================================
forward                5: rfft x, copy, bmm, copy, irfft                      5: rfft x (+ its copy into the
                                                                              frequency-major buffer), bmm, copy,
                                                                              irfft
backward               9: rfft g, copy, bmm, copy, irfft; rfft x again,       7: rfft g (+ copy), bmm, copy, irfft;
                       copy x, conj-copy g, bmm                               bmm (+ conj-transpose copy of g); x's
                                                                              spectrum kept from the forward
bf16/fp16 activations  +5 casts (x, y, g, dx, x again)                        the same: their complex64 spectrum
                                                                              (≈2x x's bytes) is not kept
=====================  =====================================================  =====================================

Measured (2-core EPYC shared with other jobs, load ≈ 6, 1 thread, T=512, d=1024, product fwd+bwd, medians of 15):
p = 32: 15.5 -> 8.2 ms, p = 64: 10.8 -> 6.0 ms, p = 256: 10.3 -> 8.6 ms, p = 1024: 4.6 -> 3.9 ms; recomputing
x's spectrum instead of keeping it: 12.0, 7.8, 9.8, 4.3 ms. The dft route's counts are in :mod:`._dft`.

The dense backend (:func:`dense_block_circulant_linear`) folds ΔW into the frozen weight: forward and input gradient
are the GEMMs the frozen layer runs anyway. What it adds per step: building ``W0 + scale·C(w)`` (no gather: a tiled
copy of the kernel, d_out·d_in values written, and one add; weight-sized, not activation-sized) and the kernel
gradient. The kernel gradient was ``gᵀx`` (a full weight gradient, ``2·T·d_in·d_out`` FLOPs: 1.07 GFLOP at T = 512,
d = 1024) then a sum along the circulant diagonals; it is now spectral for p >= 8 (:func:`spectral_kernel_grad`: rfft
of x and g, each written frequency-major, one complex bmm over tokens, a kernel-sized irfft; 4 activation passes,
≈ ``4·T·d_in·d_out/p`` FLOPs plus the transforms). Measured (same CPU, load ≈ 4, 1 thread, T = 512, d = 1024, fp32):
kernel gradient 22–25 ms as a GEMM at every p, spectral 22 / 10 / 3.5 / 3.6 / 1.7 / 1.9 ms at p = 4 / 8 / 16 / 64 /
256 / 1024 (and 174 ms at p = 1, 71 at p = 2: the GEMM form stays below p = 8); building the folded weight
7.3 ms by an advanced-index gather (plus its permute, scale and add passes) -> 0.3–0.5 ms.
"""

from __future__ import annotations

import functools

import torch

from . import _dft
from ._fft import _LOOP_MAX_PAIRS as _LOOP_MAX_PAIRS  # re-exported: the closed-form FLOP counts follow it
from ._fft import _fft_product, _FFTBlockCirculantProduct, compute_dtype, spectral_kernel_grad

TRANSFORMS = ("rfft", "fft", "dft")


def check_transform(transform: str) -> str:
    if transform not in TRANSFORMS:
        raise ValueError(f"transform={transform!r} is not supported; valid transforms: {', '.join(TRANSFORMS)}")
    return transform


@functools.cache
def _circulant_index_cpu(p: int) -> torch.Tensor:
    u = torch.arange(p).view(p, 1)
    t = torch.arange(p).view(1, p)
    return (t - u) % p  # [p(row u), p(col t)]


# One copy per (p, device): built on the device once, so a dense forward or backward on a GPU does no blocking
# host-to-device copy inside the timed region. p·p int64 each (8 MiB at p = 1024); the least recently used go.
_DEVICE_INDEX_CACHE = 64


@functools.lru_cache(maxsize=_DEVICE_INDEX_CACHE)
def _circulant_index_on(p: int, device: torch.device) -> torch.Tensor:
    return _circulant_index_cpu(p).to(device)


def circulant_index(p: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``idx[u, t] = (t - u) mod p``: the kernel entry that sits at row ``u``, column ``t`` of a block.

    Cached per (p, device); the result is shared, so callers must not modify it."""
    # int(): under jit tracing sizes are 0-d tensors, hashed by identity: every trace would add a cache entry.
    device = torch.device(device)
    if device.type == "cpu":
        return _circulant_index_cpu(int(p))
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:N" name one tensor: one cache entry
        device = torch.device("cuda", torch.cuda.current_device())
    return _circulant_index_on(int(p), device)


def _gather_block_circulant(w: torch.Tensor) -> torch.Tensor:
    q_out, q_in, p = w.shape
    dense = w[:, :, circulant_index(p, w.device)]  # [q_out, q_in, p(u), p(t)]
    return dense.permute(0, 2, 1, 3).reshape(q_out * p, q_in * p)


class _BlockCirculantMatrix(torch.autograd.Function):
    """Gather the dense matrix from the kernel; the backward sums the matrix gradient along circulant diagonals."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        ctx.shape = w.shape
        return _gather_block_circulant(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        q_out, q_in, p = ctx.shape
        idx = circulant_index(p, grad.device).reshape(-1)
        blocks = grad.reshape(q_out, p, q_in, p).permute(0, 2, 1, 3).reshape(q_out, q_in, p * p)
        dw = grad.new_zeros(q_out, q_in, p)
        return dw.index_add_(2, idx, blocks)


def block_circulant_matrix(w: torch.Tensor) -> torch.Tensor:
    """The dense ``[q_out·p, q_in·p]`` block-circulant matrix of kernel ``w`` (differentiable)."""
    if w.dim() != 3:
        raise ValueError(f"kernel must have shape [q_out, q_in, p], got {tuple(w.shape)}")
    if torch.jit.is_tracing():
        # A traced autograd.Function is one opaque prim::PythonOp; plain ops let tracers (fvcore) see the work.
        return _gather_block_circulant(w)
    return _BlockCirculantMatrix.apply(w)



def block_circulant_product(x: torch.Tensor, w: torch.Tensor, *, scale: float = 1.0,
                            transform: str = "rfft") -> torch.Tensor:
    """``scale · C(w) x`` over the last axis of ``x`` via torch.fft (``rfft``, ``fft``) or DFT GEMMs (``dft``),
    with a hand-written backward.

    x: [..., q_in·p] in any float dtype; w: [q_out, q_in, p]. Returns [..., q_out·p] in x's dtype.
    """
    check_transform(transform)
    if w.dim() != 3 or x.shape[-1] != w.shape[1] * w.shape[2]:
        raise ValueError(f"kernel of shape {tuple(w.shape)} does not fit input of shape {tuple(x.shape)}: "
                         "expected x[..., q_in * p] for w[q_out, q_in, p]")
    if transform == "dft":
        if torch.jit.is_tracing():
            return _dft.dft_product_traced(x, w, float(scale))
        return _dft.DFTBlockCirculantProduct.apply(x, w, float(scale))
    if torch.jit.is_tracing():
        # As in block_circulant_matrix: tracers see the forward's ops (autograd then differentiates them natively).
        return _fft_product(x, w, float(scale), transform)
    return _FFTBlockCirculantProduct.apply(x, w, float(scale), transform)


def block_circulant_product_dense(x: torch.Tensor, w: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """The same product by materialising the matrix: one GEMM (the dense route)."""
    return torch.nn.functional.linear(x, (block_circulant_matrix(w) * scale).to(x.dtype))


# --- the dense backend: its kernel gradient and the folded product ---------------------------------------------


def gemm_kernel_grad(x: torch.Tensor, g: torch.Tensor, p: int, scale: float = 1.0,
                     out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The same gradient as the full weight gradient ``gᵀx`` (``2·N·d_in·d_out`` FLOPs) summed along the
    circulant diagonals of each block: cheaper than the spectral form only for small p (see
    :func:`dense_kernel_grad_route`)."""
    q_in, q_out = x.shape[-1] // p, g.shape[-1] // p
    real = compute_dtype(torch.float64 if torch.float64 in (x.dtype, g.dtype) else x.dtype, p, x.device)
    full = g.reshape(-1, q_out * p).to(real).T @ x.reshape(-1, q_in * p).to(real)  # [d_out, d_in]
    blocks = full.reshape(q_out, p, q_in, p).permute(0, 2, 1, 3).reshape(q_out, q_in, p * p)
    dw = full.new_zeros(q_out, q_in, p).index_add_(2, circulant_index(p, x.device).reshape(-1), blocks)
    return (dw * scale).to(out_dtype)


# The dense backend's kernel gradient is spectral from this block size on, the GEMM form below it. Measured on
# the 2-core CPU (T=512, d=1024, fp32, kernel gradient alone, see dense_kernel_grad_route): the GEMM form wins at
# p <= 4, the spectral one from p = 8 on.
DENSE_SPECTRAL_MIN_P = 8


def dense_kernel_grad_route(p: int) -> str:
    """"spectral" or "gemm": the dense backend's kernel-gradient form for block size p."""
    return "spectral" if p >= DENSE_SPECTRAL_MIN_P else "gemm"


@torch.no_grad()
def folded_weight(w: torch.Tensor, scale: float, weight: torch.Tensor | None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """``weight + scale · C(w)`` as one contiguous ``[q_out·p, q_in·p]`` matrix in weight's dtype (``dtype``
    without a weight); not differentiable (the dense Function's backward is hand-written).

    No gather: each (scaled, tiny) kernel row is tiled p times, ``B[i, j, m] = w[i, j, m mod p]``, one contiguous
    write of d_out × d_in values; block row u of the circulant starts at ``m = u·(p − 1)`` (≡ −u mod p), so
    ``C[i, u, j, t] = B[i, j, u·(p − 1) + t]`` is a plain strided view, already in the weight's [q_out, p, q_in, p]
    layout, and one add writes ``weight + C`` contiguously. Measured (2-core CPU under load, d = 1024, fp32): 0.3–0.5
    ms at p = 32..1024 where advanced-index gathering took 7 ms (6 at p = 8)."""
    q_out, q_in, p = w.shape
    dtype = weight.dtype if weight is not None else (dtype or w.dtype)
    tiled = (w * scale).to(dtype).repeat(1, 1, p)  # [q_out, q_in, p·p], contiguous, offset 0
    blocks = tiled.as_strided((q_out, p, q_in, p), (q_in * p * p, p - 1, p * p, 1))
    out = torch.empty(q_out * p, q_in * p, dtype=dtype, device=w.device)
    if weight is None:
        out.view(q_out, p, q_in, p).copy_(blocks)
    else:
        torch.add(weight.reshape(q_out, p, q_in, p), blocks, out=out.view(q_out, p, q_in, p))
    return out


class _DenseBlockCirculantLinear(torch.autograd.Function):
    """``x · (weight + scale·C(w))ᵀ + bias``: forward and input gradient are the one GEMM the frozen layer needs
    anyway; the kernel gradient is spectral (or the GEMM form for small p). Saves x, w and the folded matrix (the
    matrix F.linear would save)."""

    @staticmethod
    def forward(ctx, x, w, scale, weight, bias):
        folded = folded_weight(w, scale, weight, x.dtype)
        ctx.save_for_backward(x, w, folded)
        ctx.scale, ctx.bias_dtype = scale, None if bias is None else bias.dtype
        return torch.nn.functional.linear(x, folded.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        x, w, folded = ctx.saved_tensors
        p = w.shape[2]
        dx = dw = dweight = dbias = None
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[0]:
            dx = grad.matmul(folded.to(grad.dtype))
        if ctx.needs_input_grad[1]:
            route = spectral_kernel_grad if dense_kernel_grad_route(p) == "spectral" else gemm_kernel_grad
            dw = route(x2, g2, p, ctx.scale, out_dtype=w.dtype)
        if ctx.needs_input_grad[3]:
            dweight = (g2.T @ x2).to(folded.dtype)
        if ctx.needs_input_grad[4]:
            dbias = g2.sum(0).to(ctx.bias_dtype)
        return dx, dw, None, dweight, dbias


def dense_block_circulant_linear(x: torch.Tensor, w: torch.Tensor, *, scale: float = 1.0,
                                 weight: torch.Tensor | None = None,
                                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x · (weight + scale·C(w))ᵀ + bias`` with ΔW folded into the frozen weight (the dense backend)."""
    if w.dim() != 3 or x.shape[-1] != w.shape[1] * w.shape[2]:
        raise ValueError(f"kernel of shape {tuple(w.shape)} does not fit input of shape {tuple(x.shape)}: "
                         "expected x[..., q_in * p] for w[q_out, q_in, p]")
    if torch.jit.is_tracing():
        delta = block_circulant_matrix(w) * scale
        return torch.nn.functional.linear(x, (delta if weight is None else weight + delta.to(weight.dtype))
                                          .to(x.dtype), bias)
    return _DenseBlockCirculantLinear.apply(x, w, float(scale), weight, bias)
