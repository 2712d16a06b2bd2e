"""The block-circulant product with the DFT as real GEMMs (``transform="dft"``): pure functions and one Function.

The block axis is transformed by multiplying with precomputed cos/sin bases instead of calling torch.fft, so every
step of a training step is a (batched) real GEMM: on a GPU, in bf16/fp16, those run on tensor cores, which
torch.fft and complex matmuls never do. Orientation and products as in :mod:`._circulant` (forward
``Y = Σ_j conj(W_ij) X_j``, input gradient ``DX = Σ_i W_ij G_i``, kernel gradient ``DW = Σ_t conj(G_i) X_j``).

Bases (cached per (p, dtype, device), built in float64 and rounded once): F = p//2 + 1 frequencies of a real
signal; rows ordered (frequency, real/imag):

* forward ``B[2f] = cos(2π f s/p) / p``, ``B[2f+1] = −sin(2π f s/p) / p``: ``[2F, p]``. The 1/p sits here, not in
  the inverse, so a spectrum is a *mean* of its block: in float16 the zero-frequency bin of a loss-scaled gradient
  cannot overflow where every value fits (the un-normalised sum of p values can).
* inverse ``B⁻[2f] = c_f cos(2π f u/p)``, ``B⁻[2f+1] = −c_f sin(2π f u/p)`` with c_f = 1 for the zero and (p even)
  the p/2 bin, 2 otherwise (the Hermitian half counted twice): ``[2F, p]``.

Layout: activations ``[N, q·p]`` are ``[N·q, p]`` row-major; the spectrum is ``B @ xᵀ = [2F, N·q]``, i.e.
``[F, 2, N, q]``: frequency-major straight out of the GEMM (the transposed operand is a stride, not a copy), real
and imaginary planes of one frequency stacked along the tokens. The inverse is ``specᵀ @ B⁻ = [N·q, p]``, again a
transposed operand, landing in the activation layout. No permute copy anywhere.

Complex multiply as real GEMMs, per frequency (batch F): with the planes stacked, ``[Xr; Xi] @ Mr`` is one GEMM
(``Xr·Mr`` and ``Xi·Mr``), then ``Xi·Mi`` and ``Xr·Mi`` are accumulated into the two halves by ``baddbmm_`` (GEMM
with β = 1: no elementwise pass). 4 real products in 3 calls. The 3-multiplication (Gauss) form needs
``Xr + Xi`` and two combines (three activation-sized elementwise passes) to save a quarter of the mixing FLOPs;
on the 2-core CPU (T=512, d=1024, forward + backward mixing, fp32) it was slower at every p measured: see
:data:`MIX_FORM`. The kernel gradient ``DWr = [Gr; Gi]ᵀ[Xr; Xi]`` is one GEMM with the tokens *and* the planes
as its inner dimension; ``DWi = Grᵀ Xi − Giᵀ Xr`` two more.

Precision. float64 and float32 compute in their dtype. bf16/fp16 activations run every GEMM in that dtype (torch
accumulates in fp32 on the GPU and in the CPU's bf16 kernels): precision is lost where a GEMM's result is rounded
to 8 (bf16) or 11 (fp16) significant bits: the bases themselves, the spectra of x and g, the mixed spectra, the
output and the input gradient, and the kernel-gradient spectrum before its (fp32) inverse. Each rounding is
relative to the largest values of its tensor, so the error is ≈ a few units of the last place of ‖y‖, not of
each element. The kernel's spectrum is computed in fp32 (or fp64) from the fp32 parameter and rounded once.

Passes over activation-sized buffers per training step (one product; a kernel reading or writing an [N, d]-sized
tensor or its spectrum; the kernel's own small tensors not counted), counted in full-buffer equivalents (a GEMM
over one plane of a spectrum is half of one): forward 4 (transform x, mixing 4 half-plane GEMMs = 2, inverse);
backward 6 (transform g, mixing 2, inverse; kernel gradient 4 half-plane GEMMs reading both spectra = 2, x's
spectrum kept from the forward, so x is not transformed again). No permute copy and no dtype cast in bf16 (the
GEMMs take it); fp16 adds 2 casts to fp32 before the kernel-gradient GEMMs. The torch.fft routes' counts are in
:mod:`._circulant` (5 + 7 after this change, 5 + 9 before, for fp32).

Measured against the rfft route (2-core EPYC shared with other jobs, load ≈ 6–10, 1 thread, T=512, d=1024,
product fwd+bwd, stacked vs Gauss mixing): p = 32: 18.6 / 22.7 ms (rfft 30.0 before its leaner path), p = 64:
17.7 / 22.7 (rfft 16.1), p = 128: 34.2 / 37.8 (rfft 27.4). The DFT costs 2·(p+2) FLOPs per element and transform
against the FFT's ≈ 2.5·log2 p: on this CPU it wins at p ≤ 32 only; its case is a GPU in bf16/fp16.
"""

from __future__ import annotations

import functools
import math

import torch

# "stacked": 4 real GEMM products in 3 calls, accumulating in place; "gauss": 3 products + 3 elementwise passes.
# Measured (module docstring): stacked faster at p = 32, 64, 128 on the CPU; kept as a switch for other devices.
MIX_FORM = "stacked"

# Keep the input's spectrum for the backward when it costs at most this many times x's bytes (the forward then
# saves it *instead of* x). Shared with the torch.fft routes. Here the spectrum has x's dtype and (p+2)/p of its size
# (2x at p = 1, 2): always kept, so the backward transforms g only. Set to 0 to always recompute.
KEEP_SPECTRUM_FACTOR = 2.0

_BASIS_CACHE = 64


def num_freqs(p: int) -> int:
    return p // 2 + 1


@functools.lru_cache(maxsize=_BASIS_CACHE)
def _bases(p: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    f = torch.arange(num_freqs(p), dtype=torch.float64).view(-1, 1)
    s = torch.arange(p, dtype=torch.float64).view(1, -1)
    angle = (2 * math.pi / p) * torch.remainder(f * s, p)  # remainder: exact angles for large f·s
    cos, sin = torch.cos(angle), torch.sin(angle)
    fwd = torch.cat([cos, -sin]) / p  # [2F, p], rows (re/im, f)
    weight = torch.full((num_freqs(p), 1), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    if p % 2 == 0:
        weight[-1] = 1.0
    inv = torch.cat([weight * cos, -weight * sin])  # [2F, p]
    return fwd.to(device=device, dtype=dtype), inv.to(device=device, dtype=dtype)


def dft_bases(p: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(forward ``[2F, p]``, inverse ``[2F, p]``) bases for block size p; cached and shared: do not modify."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _bases(int(p), dtype, device)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any operand is, else the activations' own dtype (bf16/fp16 GEMMs, fp32 accumulation)."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return tensors[0].dtype


def spectrum(v: torch.Tensor, p: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``v[..., q·p]`` -> its normalised half spectrum ``[2, F, N, q]`` (N = tokens): one GEMM, frequency-major."""
    dtype = dtype or v.dtype
    rows = v.reshape(-1, p).to(dtype)  # [N·q, p]; no copy for a contiguous v of that dtype
    q = v.shape[-1] // p
    fwd, _ = dft_bases(p, dtype, v.device)
    return (fwd @ rows.T).view(2, num_freqs(p), -1, q)


def inverse(spec: torch.Tensor, p: int) -> torch.Tensor:
    """``[2, F, N, q]`` -> ``[N, q·p]``: one GEMM with the transposed spectrum (a stride, not a copy)."""
    _, freqs, n, q = spec.shape
    _, inv = dft_bases(p, spec.dtype, spec.device)
    return (spec.reshape(2 * freqs, n * q).T @ inv).view(n, q * p)


def kernel_spectrum(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w[q_out, q_in, p]`` -> its *un-normalised* spectrum ``[2, F, q_out, q_in]`` (small; float32/64 math)."""
    q_out, q_in, p = w.shape
    exact = torch.float64 if dtype == torch.float64 else torch.float32
    spec = spectrum(w.reshape(1, q_out * q_in * p), p, exact) * p  # [2, F, 1, q_out·q_in]
    return spec.view(2, num_freqs(p), q_out, q_in)


def _gemm_acc(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, sign: int,
              out: torch.Tensor) -> None:
    """``out = a@b + sign·c@d`` (batched): the second product accumulated by the GEMM itself (β = 1), no
    elementwise pass. ``baddbmm(out=)`` rather than ``baddbmm_``: FlopCounterMode counts the former only."""
    torch.bmm(a, b, out=out)
    torch.baddbmm(out, c, d, alpha=sign, out=out)


def mix(spec: torch.Tensor, mr: torch.Tensor, mi: torch.Tensor, form: str | None = None) -> torch.Tensor:
    """``out = spec · (mr + i·mi)`` per frequency: spec ``[2, F, N, a]``, mr/mi ``[F, a, b]`` -> ``[2, F, N, b]``."""
    xr, xi = spec[0], spec[1]
    if (form or MIX_FORM) == "gauss":
        # Re = t1 − t3, Im = t1 + t2 with t1 = (Xr + Xi)·Mr, t2 = Xr·(Mi − Mr), t3 = Xi·(Mr + Mi).
        t1 = torch.bmm(xr + xi, mr)
        return torch.stack([t1 - torch.bmm(xi, mr + mi), t1 + torch.bmm(xr, mi - mr)])
    if torch.jit.is_tracing():  # out-of-place, so that tracers (fvcore) see four plain bmm
        return torch.stack([torch.bmm(xr, mr) - torch.bmm(xi, mi), torch.bmm(xr, mi) + torch.bmm(xi, mr)])
    out = spec.new_empty(2, *xr.shape[:2], mr.shape[2])
    # Re = Xr·Mr − Xi·Mi, Im = Xr·Mi + Xi·Mr: the second product of each accumulated by the GEMM (β = 1).
    _gemm_acc(xr, mr, xi, mi, -1, out[0])
    _gemm_acc(xr, mi, xi, mr, 1, out[1])
    return out


def correlate(g_spec: torch.Tensor, x_spec: torch.Tensor) -> torch.Tensor:
    """``Σ_t conj(G_i)·X_j`` per frequency: ``[2, F, N, q_g]``, ``[2, F, N, q_x]`` -> ``[2, F, q_g, q_x]``."""
    gr, gi = g_spec[0].transpose(1, 2), g_spec[1].transpose(1, 2)  # [F, q_g, N]: transposed operands, no copy
    xr, xi = x_spec[0], x_spec[1]
    out = x_spec.new_empty(2, gr.shape[0], gr.shape[1], xr.shape[2])
    _gemm_acc(gr, xr, gi, xi, 1, out[0])  # Re: Grᵀ Xr + Giᵀ Xi
    _gemm_acc(gr, xi, gi, xr, -1, out[1])  # Im: Grᵀ Xi − Giᵀ Xr
    return out


def _mixing_matrices(w: torch.Tensor, dtype: torch.dtype, scale: float, *, adjoint: bool) -> tuple:
    """(mr, mi) for the forward (``conj(W)ᵀ``, [F, q_in, q_out]) or the input gradient (``W``, [F, q_out, q_in])."""
    w_spec = kernel_spectrum(w, dtype) * scale
    if adjoint:
        return w_spec[0].to(dtype), w_spec[1].to(dtype)
    return w_spec[0].transpose(1, 2).to(dtype), w_spec[1].transpose(1, 2).neg().to(dtype)


def dft_forward(x: torch.Tensor, w: torch.Tensor, scale: float = 1.0,
                x_spec: torch.Tensor | None = None) -> torch.Tensor:
    """``scale · C(w) x`` for ``x[..., q_in·p]``: ``[N, q_out·p]`` in the compute dtype (flattened tokens)."""
    p = w.shape[2]
    dtype = compute_dtype(x, w)
    if x_spec is None:
        x_spec = spectrum(x, p, dtype)
    mr, mi = _mixing_matrices(w, dtype, scale, adjoint=False)
    return inverse(mix(x_spec, mr, mi), p)


def dft_input_grad(g: torch.Tensor, w: torch.Tensor, scale: float = 1.0,
                   g_spec: torch.Tensor | None = None) -> torch.Tensor:
    """``scale · C(w)ᵀ g`` for ``g[..., q_out·p]``: ``[N, q_in·p]`` in the compute dtype."""
    p = w.shape[2]
    dtype = compute_dtype(g, w)
    if g_spec is None:
        g_spec = spectrum(g, p, dtype)
    mr, mi = _mixing_matrices(w, dtype, scale, adjoint=True)
    return inverse(mix(g_spec, mr, mi), p)


def dft_kernel_grad(x: torch.Tensor | None, g: torch.Tensor | None, p: int, scale: float = 1.0, *,
                    x_spec: torch.Tensor | None = None, g_spec: torch.Tensor | None = None,
                    out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The kernel gradient ``∂L/∂w [q_out, q_in, p]`` of ``y = scale · C(w) x`` from ``x[..., d_in]`` and the
    upstream gradient ``g[..., d_out]`` (or their spectra, as :func:`spectrum` returns them): two transforms, the
    per-frequency token reduction as real GEMMs, one small inverse. Any backend can call it."""
    if x_spec is None:
        x_spec = spectrum(x, p, compute_dtype(x, g) if g is not None else x.dtype)
    if g_spec is None:
        g_spec = spectrum(g, p, x_spec.dtype)
    if x_spec.dtype == torch.float16:
        # The kernel gradient sums over every token and need not fit float16 (w's gradient is float32): a fp16 GEMM
        # result would overflow to inf. bf16 has float32's range and keeps its GEMMs.
        x_spec, g_spec = x_spec.float(), g_spec.float()
    corr = correlate(g_spec, x_spec)  # [2, F, q_out, q_in], normalised spectra: Σ conj(G)X / p²
    exact = torch.float64 if out_dtype == torch.float64 or corr.dtype == torch.float64 else torch.float32
    q_out, q_in = corr.shape[2], corr.shape[3]
    dw = inverse(corr.to(exact).view(2, num_freqs(p), 1, q_out * q_in), p)  # [1, q_out·q_in·p]
    return (dw * (scale * p)).view(q_out, q_in, p).to(out_dtype)


def _keep_spectrum(x: torch.Tensor, p: int, dtype: torch.dtype) -> bool:
    spec_bytes = 2 * num_freqs(p) * (x.numel() // p) * torch.empty((), dtype=dtype).element_size()
    return spec_bytes <= KEEP_SPECTRUM_FACTOR * x.numel() * x.element_size()


class DFTBlockCirculantProduct(torch.autograd.Function):
    """``y = scale · C(w) x`` through the DFT GEMMs. Saves x's spectrum instead of x when it is small (see
    :data:`KEEP_SPECTRUM_FACTOR`), so the backward transforms only g."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
        q_out, q_in, p = w.shape
        dtype = compute_dtype(x, w)
        x_spec = spectrum(x, p, dtype)
        y = dft_forward(x, w, scale, x_spec=x_spec)
        keep = _keep_spectrum(x, p, dtype)
        ctx.save_for_backward(x_spec if keep else x, w)
        ctx.keep, ctx.scale, ctx.dtype, ctx.x_shape, ctx.x_dtype = keep, scale, dtype, x.shape, x.dtype
        return y.view(*x.shape[:-1], q_out * p).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved, w = ctx.saved_tensors
        p = w.shape[2]
        dtype = ctx.dtype
        g_spec = spectrum(grad, p, dtype)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = dft_input_grad(grad, w, ctx.scale, g_spec=g_spec).view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            x_spec = saved if ctx.keep else spectrum(saved, p, dtype)
            dw = dft_kernel_grad(None, None, p, ctx.scale, x_spec=x_spec, g_spec=g_spec, out_dtype=w.dtype)
        return dx, dw, None


def dft_product_traced(x: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    """The forward in plain ops (jit tracing: tracers see the GEMMs; autograd differentiates them)."""
    return dft_forward(x, w, scale).view(*x.shape[:-1], w.shape[0] * w.shape[2]).to(x.dtype)
