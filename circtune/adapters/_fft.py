"""The torch.fft route of the block-circulant product (``transform="rfft"`` or ``"fft"``): the dtype rule, the
transforms, the per-frequency block mixings, the frequency-major layout, the product's autograd Function, and the
kernel gradient from x and g (:func:`spectral_kernel_grad`, which the dense and triton backends call too).

A module of its own, as the ``dft`` route has :mod:`._dft`: the FFT arithmetic alone, importing nothing from its
siblings but :mod:`._dft`'s rule for keeping x's spectrum. :mod:`._circulant` states the math (orientation, the three
products, the passes over activation-sized buffers and their measured times), holds the entry points, the circulant
matrix and the dense backend, and re-exports the names other modules import from it.
"""

from __future__ import annotations

import torch

from . import _dft


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
