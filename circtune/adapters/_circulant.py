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


def compute_dtype(dtype: torch.dtype, p: int, device: torch.device) -> torch.dtype:
    """The real dtype the transforms run in for activations of ``dtype``.

    torch.fft has no bfloat16 at all, and float16 only on CUDA (cuFFT) for power-of-two lengths. float16 is
    upcast anyway: the zero-frequency bin sums all p values of a block, so a loss-scaled gradient (scales of 2^16
    are usual) overflows float16's 65504 in the transform although every value and the result fit. So bf16 and
    fp16 both transform in float32 (``dtype``, ``p`` and ``device`` no longer change that, the signature stays);
    float64 stays float64 (gradcheck).
    """
    if dtype == torch.float64:
        return torch.float64
    return torch.float32


def _spectrum_dtype(real: torch.dtype) -> torch.dtype:
    # Mixing runs in complex64 at least: batched GEMMs on complex32 are not implemented by torch.
    return torch.complex128 if real == torch.float64 else torch.complex64


def _forward_transform(v: torch.Tensor, transform: str) -> torch.Tensor:
    return torch.fft.rfft(v, dim=-1) if transform == "rfft" else torch.fft.fft(v, dim=-1)


def _inverse_transform(spec: torch.Tensor, p: int, transform: str) -> torch.Tensor:
    if transform == "rfft":
        return torch.fft.irfft(spec, n=p, dim=-1)
    return torch.fft.ifft(spec, n=p, dim=-1).real


# Up to this many (q_out · q_in) block pairs the mixing is a short loop of broadcast multiplies; past it, a
# frequency-batched GEMM. Measured on the 2-core CPU (T=512, d=1024, forward): q=2 (4 pairs) 1.07 ms loop vs
# 3.17 ms GEMM, q=4 (16) 1.48 vs 1.90, q=8 (64) 5.12 vs 1.81.
_LOOP_MAX_PAIRS = 16


def _mix(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``out[t, i, f] = Σ_j m[i, j, f] · a[t, j, f]`` for a: [T, q_a, F], m: [q_b, q_a, F] -> [T, q_b, F]."""
    q_b, q_a, _ = m.shape
    if q_a * q_b <= _LOOP_MAX_PAIRS:
        out = a[:, 0:1, :] * m[:, 0, :]
        for j in range(1, q_a):
            out += a[:, j : j + 1, :] * m[:, j, :]
        return out
    # Frequency as the batch: [F, T, q_a] @ [F, q_a, q_b] -> [F, T, q_b]. Both operands are made contiguous
    # first: torch's CPU bmm on strided complex operands falls back to one copy per batch entry (10x slower).
    out = torch.bmm(a.permute(2, 0, 1).contiguous(), m.permute(2, 1, 0).contiguous())
    return out.permute(1, 2, 0).contiguous()


def _correlate(g_spec: torch.Tensor, x_spec: torch.Tensor) -> torch.Tensor:
    """``out[i, j, f] = Σ_t conj(g[t, i, f]) · x[t, j, f]`` -> [q_g, q_x, F] (the kernel-gradient mixing)."""
    q_g, q_x = g_spec.shape[1], x_spec.shape[1]
    if q_g * q_x <= _LOOP_MAX_PAIRS:
        return torch.stack([(g_spec[:, i : i + 1, :].conj() * x_spec).sum(0) for i in range(q_g)])
    # [F, q_g, T] @ [F, T, q_x]: the reduction over tokens is the GEMM's inner dimension.
    g_f = g_spec.permute(2, 1, 0).conj().contiguous()
    x_f = x_spec.permute(2, 0, 1).contiguous()
    return torch.bmm(g_f, x_f).permute(1, 2, 0)


def _real_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    return compute_dtype(torch.float64 if torch.float64 in (x.dtype, w.dtype) else x.dtype, w.shape[2], x.device)


def _fft_product(x: torch.Tensor, w: torch.Tensor, scale: float, transform: str) -> torch.Tensor:
    """The forward product in plain torch ops: the Function's forward, and the traced graph under jit tracing."""
    q_out, q_in, p = w.shape
    real = _real_dtype(x, w)
    lead = x.shape[:-1]
    xb = x.reshape(-1, q_in, p).to(real)
    x_spec = _forward_transform(xb, transform).to(_spectrum_dtype(real))
    w_spec = _forward_transform(w.to(x_spec.real.dtype), transform).conj() * scale  # [q_out, q_in, F]
    y = _inverse_transform(_mix(x_spec, w_spec), p, transform)  # [T, q_out, p]
    return y.reshape(*lead, q_out * p).to(x.dtype)


def _spectrum_fmajor(blocks: torch.Tensor, transform: str) -> torch.Tensor:
    """``[N, q, p]`` real -> ``[F, N, q]`` complex, frequency-major, through ``out=`` a permuted view. On the CPU
    torch's r2c still writes a contiguous result and copies it into the strided ``out`` (one pass, as a permute
    copy would be); the gain is that nothing else needs a copy of it afterwards, forward or backward."""
    n, q, p = blocks.shape
    fn = torch.fft.rfft if transform == "rfft" else torch.fft.fft
    if torch.compiler.is_compiling():
        # Dynamo cannot trace an op into a non-contiguous out= (a graph break each time); the compiler chooses the
        # layout itself, so the plain transform and a permute copy say the same thing.
        return fn(blocks, dim=-1).to(_spectrum_dtype(blocks.dtype)).permute(2, 0, 1).contiguous()
    freqs = p // 2 + 1 if transform == "rfft" else p
    out = torch.empty(freqs, n, q, dtype=_spectrum_dtype(blocks.dtype), device=blocks.device)
    fn(blocks, dim=-1, out=out.permute(1, 2, 0))
    return out


def _inverse_fmajor(spec: torch.Tensor, p: int, transform: str) -> torch.Tensor:
    """``[F, N, q]`` -> ``[N, q, p]`` real. The permute copy stays: irfft of the strided view measured 1.6x slower."""
    return _inverse_transform(spec.permute(1, 2, 0).contiguous(), p, transform)


def _keep_spectrum(x: torch.Tensor, spec_numel: int, spec_dtype: torch.dtype) -> bool:
    """The rule shared with the dft route (:data:`._dft.KEEP_SPECTRUM_FACTOR`): fp32/fp64 activations keep their
    complex spectrum ((p+2)/p of x's bytes for rfft, 2x for fft) and skip a transform of x in backward; bf16/fp16
    ones, whose complex64 spectrum is ≈2x (rfft) or 4x (fft) their bytes, recompute it from x."""
    spec_bytes = spec_numel * torch.empty((), dtype=spec_dtype).element_size()
    return spec_bytes <= _dft.KEEP_SPECTRUM_FACTOR * x.numel() * x.element_size()


class _FFTBlockCirculantProduct(torch.autograd.Function):
    """``y = scale · C(w) x`` through torch.fft. Above ``_LOOP_MAX_PAIRS`` block pairs the spectra are
    frequency-major straight out of the transform (no permute copy) and the mixings are complex bmm; x's spectrum is
    kept for the backward when it is small (:data:`KEEP_SPECTRUM_FACTOR`), else recomputed from x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, scale: float, transform: str) -> torch.Tensor:
        q_out, q_in, p = w.shape
        real = _real_dtype(x, w)
        blocks = x.reshape(-1, q_in, p).to(real)
        w_spec = _forward_transform(w.to(real), transform)  # [q_out, q_in, F]
        fmajor = q_out * q_in > _LOOP_MAX_PAIRS
        if fmajor:
            x_spec = _spectrum_fmajor(blocks, transform)  # [F, N, q_in]
            # Small operand made contiguous: torch's CPU bmm copies strided complex operands batch by batch.
            y = _inverse_fmajor(torch.bmm(x_spec, (w_spec.conj() * scale).permute(2, 1, 0).contiguous()), p,
                                transform)
        else:
            x_spec = _forward_transform(blocks, transform).to(_spectrum_dtype(real))  # [N, q_in, F]
            y = _inverse_transform(_mix(x_spec, w_spec.conj() * scale), p, transform)
        keep = _keep_spectrum(x, x_spec.numel(), x_spec.dtype)
        ctx.save_for_backward(x_spec if keep else x, w)
        ctx.keep, ctx.fmajor, ctx.x_shape, ctx.x_dtype = keep, fmajor, x.shape, x.dtype
        ctx.scale, ctx.transform, ctx.real = scale, transform, real
        return y.reshape(*x.shape[:-1], q_out * p).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved, w = ctx.saved_tensors
        q_out, q_in, p = w.shape
        transform, real, scale, fmajor = ctx.transform, ctx.real, ctx.scale, ctx.fmajor
        g_blocks = grad.reshape(-1, q_out, p).to(real)
        w_spec = _forward_transform(w.to(real), transform)  # [q_out, q_in, F]
        if fmajor:
            g_spec = _spectrum_fmajor(g_blocks, transform)  # [F, N, q_out]
        else:
            g_spec = _forward_transform(g_blocks, transform).to(_spectrum_dtype(real))  # [N, q_out, F]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            if fmajor:
                dx = _inverse_fmajor(torch.bmm(g_spec, (w_spec * scale).permute(2, 0, 1).contiguous()), p, transform)
            else:
                dx = _inverse_transform(_mix(g_spec, w_spec.transpose(0, 1) * scale), p, transform)
            dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            if ctx.keep:
                x_spec = saved
            else:
                x_blocks = saved.reshape(-1, q_in, p).to(real)
                x_spec = (_spectrum_fmajor(x_blocks, transform) if fmajor
                          else _forward_transform(x_blocks, transform).to(_spectrum_dtype(real)))
            if fmajor:
                # Σ_t conj(G)ᵀ X per frequency: the conjugate-transposed view goes to the GEMM as is (no copy).
                corr = torch.bmm(g_spec.transpose(1, 2).conj(), x_spec).permute(1, 2, 0)  # [q_out, q_in, F]
            else:
                corr = _correlate(g_spec, x_spec)
            dw = _inverse_transform(corr * scale, p, transform).to(w.dtype)
        return dx, dw, None, None


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


# --- the spectral kernel gradient, and the dense backend's folded product --------------------------------------

def spectral_kernel_grad(x: torch.Tensor, g: torch.Tensor, p: int, scale: float = 1.0,
                         out_dtype: torch.dtype = torch.float32, *, physical_conj: bool = False) -> torch.Tensor:
    """``∂L/∂w [q_out, q_in, p]`` of ``y = scale · C(w) x`` from ``x [N, q_in·p]`` and ``g [N, q_out·p]`` through
    torch.fft: rfft of x and g (frequency-major above ``_LOOP_MAX_PAIRS`` block pairs), ``Σ_t conj(G)ᵀ X`` per
    frequency, one small irfft. ≈ ``8·N·q_out·q_in·(p/2+1)`` FLOPs of mixing (≈ 4·N·d_in·d_out/p) plus the two
    transforms, against the GEMM form's ``2·N·d_in·d_out``. Accumulates in fp32 (fp64 for fp64 operands)."""
    q_in, q_out = x.shape[-1] // p, g.shape[-1] // p
    real = compute_dtype(torch.float64 if torch.float64 in (x.dtype, g.dtype) else x.dtype, p, x.device)
    xb, gb = x.reshape(-1, q_in, p).to(real), g.reshape(-1, q_out, p).to(real)
    # physical_conj: conjugate g's spectrum in place (one pass over it) instead of a lazy conjugate view. A custom
    # op's implementation run by torch.compile's AOT dispatch loses the conj bit (and ihfft's conjugation), giving
    # Σ G·X: the triton backend's op asks for it; the dense backend's Function keeps the free view.
    if q_out * q_in > _LOOP_MAX_PAIRS:
        x_spec, g_spec = _spectrum_fmajor(xb, "rfft"), _spectrum_fmajor(gb, "rfft")  # [F, N, q]
        g_conj = g_spec.conj_physical_() if physical_conj else g_spec.conj()
        corr = torch.bmm(g_conj.transpose(1, 2), x_spec).permute(1, 2, 0)  # [q_out, q_in, F]
    else:
        spec = _spectrum_dtype(real)
        g_spec, x_spec = torch.fft.rfft(gb, dim=-1).to(spec), torch.fft.rfft(xb, dim=-1).to(spec)
        g_conj = g_spec.conj_physical_() if physical_conj else g_spec.conj()
        corr = torch.stack([(g_conj[:, i : i + 1, :] * x_spec).sum(0) for i in range(q_out)])
    return _inverse_transform(corr * scale, p, "rfft").to(out_dtype)


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
