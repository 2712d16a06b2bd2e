"""Closed-form FLOP counts of each method's layer: what circtune's FLOP counters
(:func:`circtune.measure.flops.count_flops`) should report for it, written out from what the layer computes.

These formulas live beside the layers because they restate the layers' own arithmetic (a change to a route here is a
change to what the layer runs); the method registry (:mod:`circtune.adapters.methods`) hands each method its formula.
Counting conventions as in :mod:`circtune.measure.flops`: FLOPs = 2 × MACs, nominal FFT counts (5 n log2 n complex,
2.5 n log2 n real input or output), complex arithmetic in real FLOPs, real elementwise work not counted.


Closed forms (:func:`circtune.measure.flops.analytic_flops`); T tokens, G = 2·T·d_in·d_out the base GEMM
--------------------------------------------------------------------------------------------------------
``none``: forward G; backward G (input gradient only, the base is frozen, x requires grad).
``lora`` (rank r): forward G + L with L = 2·T·r·(d_in + d_out); backward G + 2·L (each of A and B: input and
weight gradients).

``c3a`` / ``cdvft``, backend ``torch``: one product (q_in, q_out) for C3A; for CDVFT with m factors, (q_in, q_out)
then m − 2 products (q_out, q_out). With R = 2.5 p log2 p (every forward transform has real input),
I = 2.5 p log2 p (irfft) or 5 p log2 p (ifft), F = p//2 + 1 (rfft) or p (fft), one product costs

* forward: transforms of x and w ``(T·q_in + q_out·q_in)·R``; ``conj(W)·scale`` ``2·q_out·q_in·F``;
  mixing ``mix(q_in → q_out)``; inverse ``T·q_out·I``;
* backward: transforms of g and w ``(T·q_out + q_out·q_in)·R``; input gradient ``2·q_in·q_out·F`` (scale) +
  ``mix(q_out → q_in)`` + ``T·q_in·I``; kernel gradient ``corr`` + ``2·q_out·q_in·F`` +
  ``q_out·q_in·I`` (x's spectrum is kept from the forward for fp32/fp64 activations, the ones counted here;
  bf16/fp16 ones recompute it: ``T·q_in·R`` more);

where, with ``n = q_out·q_in`` block pairs, the mixing is a loop of broadcast multiply-adds while n ≤ 16
(``_LOOP_MAX_PAIRS``) and a frequency-batched complex bmm above:
``mix(a → b)`` = ``T·b·F·(8a − 2)`` (a multiplies, a − 1 adds) or ``8·T·a·b·F``;
``corr`` = ``q_out·q_in·F·(8T − 2)`` (T multiplies, T − 1 additions in the token sum) or ``8·T·q_out·q_in·F``.
Forward total G + Σ products; backward G + Σ products (the diagonals' multiplies are real, not counted).

Kernel gradient of one product from x and g, ``S(q_in, q_out)`` (:func:`spectral_kernel_grad_flops`): spectral
``rfft`` (``_circulant.spectral_kernel_grad``) ``T·(q_in + q_out)·R + corr + 2·q_out·q_in·F + q_out·q_in·I``;
spectral ``dft`` (``_dft.dft_kernel_grad``) ``2·2F·p·T·(q_in + q_out) + 4·2F·T·q_out·q_in + 2·2F·p·q_out·q_in``;
``gemm`` (``gᵀx``, or the triton kernel) ``2·T·d_in·d_out``.

``c3a``, backend ``dense``: ΔW gathered (free) and added to W0 (real, not counted); forward G; backward G (input
gradient through the folded matrix) + the kernel gradient: S for p >= 8 (``DENSE_SPECTRAL_MIN_P``), else the GEMM
form. ``cdvft``, backend ``dense`` (autograd through the materialised chain): m − 2 products
``[d_out, d_out] @ [d_out, d_in]``, K = 2·d_out²·d_in each. Forward G + (m − 2)·K; backward 2·G (input and weight
gradient of the one GEMM) + 2·(m − 2)·K.

``c3a`` / ``cdvft``, backend ``triton``: each circulant product is one implicit GEMM (custom ops whose FLOP formulas
:mod:`circtune.kernels.block_circulant_linear` registers), 2·T·d_in·d_out for the first factor (W0 fused into it for
C3A) and P = 2·T·d_out² for each later one; its input gradient the same; its kernel gradient by the route taken
(``kernel_grad_route``; None: the rule off CUDA, ``rfft`` for p >= 8, else ``gemm``; on CUDA the autotuner
picks, and the counted FLOPs follow its pick): the GEMM form or S of that product.
C3A: forward G; backward G + S. CDVFT (the frozen layer separate): forward G + F, backward G + F + Σ S, with
F = G + (m − 2)·P.

``peft-c3a`` (PEFT's C3ALinear, frozen base): full complex transforms and a bmm always, C = 5 p log2 p:
forward G + (T·q_in + q_out·q_in)·R + 8·T·q_in·q_out·p + T·q_out·C; backward G + (T·q_out + q_out·q_in)·R +
8·T·q_in·q_out·p + T·q_in·C (input gradient) + T·q_in·R + 8·T·q_in·q_out·p + q_out·q_in·C (kernel gradient).
That is ``c3a`` with ``transform="fft"`` on the bmm path less our ``scale`` multiplies.
"""

from __future__ import annotations

import math

from ._circulant import _LOOP_MAX_PAIRS, DENSE_SPECTRAL_MIN_P, check_transform

# The triton backend's rule off CUDA (kernels/block_circulant_linear.SPECTRAL_MIN_P; that module needs Triton, this
# one does not): the kernel gradient is spectral from this block size on.
SPECTRAL_MIN_P = 8


def fft_flops(n: int, transforms: int = 1, *, real: bool) -> float:
    """Nominal FLOPs of ``transforms`` FFTs of length ``n``: 5 n log2 n each, half that when ``real`` (real input
    or real output)."""
    return (2.5 if real else 5.0) * n * math.log2(n) * transforms if n > 1 else 0.0



def _require(value: int | None, name: str, method: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not valid for method={method!r}: it needs a positive int")
    return value


def _mix(tokens: int, a: int, b: int, freqs: int) -> int:
    """Σ over a blocks into b blocks per token and frequency (``_circulant._mix``)."""
    if a * b <= _LOOP_MAX_PAIRS:
        return tokens * b * freqs * (8 * a - 2)
    return 8 * tokens * a * b * freqs


def _correlate(tokens: int, q_g: int, q_x: int, freqs: int) -> int:
    """Σ over tokens of conj(G_i)·X_j (``_circulant._correlate``)."""
    if q_g * q_x <= _LOOP_MAX_PAIRS:
        return q_g * q_x * freqs * (8 * tokens - 2)
    return 8 * tokens * q_g * q_x * freqs


def _dft_product_flops(tokens: int, q_in: int, q_out: int, p: int) -> tuple[float, float]:
    """``transform="dft"`` (``_dft``): every step a real GEMM. A transform of n blocks ``2·2F·p·n`` (F = p//2 + 1),
    a complex mixing or token reduction ``8·F·(its three sizes)`` (4 real products); the kernel's spectrum is
    taken in forward and again in backward; x's spectrum is kept from the forward for p >= 3."""
    two_f = 2 * (p // 2 + 1)
    pairs = q_out * q_in
    fwd = 2 * two_f * p * (tokens * q_in + pairs + tokens * q_out) + 4 * two_f * tokens * q_in * q_out
    bwd = (2 * two_f * p * (tokens * q_out + pairs + tokens * q_in + pairs) + 8 * two_f * tokens * q_in * q_out
           + (2 * two_f * p * tokens * q_in if p <= 2 else 0))
    return fwd, bwd


def _product_flops(tokens: int, q_in: int, q_out: int, p: int, transform: str) -> tuple[float, float]:
    """(forward, backward) FLOPs of one ``block_circulant_product`` with both input and kernel gradients."""
    if transform == "dft":
        return _dft_product_flops(tokens, q_in, q_out, p)
    freqs = p // 2 + 1 if transform == "rfft" else p
    fwd_t = fft_flops(p, real=True)
    inv_t = fft_flops(p, real=transform == "rfft")
    pairs = q_out * q_in
    fwd = ((tokens * q_in + pairs) * fwd_t
           + 2 * pairs * freqs + _mix(tokens, q_in, q_out, freqs) + tokens * q_out * inv_t)
    bwd = ((tokens * q_out + pairs) * fwd_t
           + 2 * pairs * freqs + _mix(tokens, q_out, q_in, freqs) + tokens * q_in * inv_t
           + _correlate(tokens, q_out, q_in, freqs) + 2 * pairs * freqs + pairs * inv_t)
    return fwd, bwd


def spectral_kernel_grad_flops(tokens: int, q_in: int, q_out: int, p: int, transform: str = "rfft") -> float:
    """The kernel gradient from x and g: ``gemm`` (``2·T·d_in·d_out``), spectral ``rfft`` or ``dft``."""
    pairs = q_in * q_out
    if transform == "gemm":
        return 2 * tokens * q_in * q_out * p * p
    if transform == "dft":
        two_f = 2 * (p // 2 + 1)
        return 2 * two_f * p * tokens * (q_in + q_out) + 4 * two_f * tokens * pairs + 2 * two_f * p * pairs
    if transform != "rfft":
        raise ValueError(f"transform={transform!r} is not supported; valid kernel-gradient routes: gemm, rfft, dft")
    freqs = p // 2 + 1
    return (tokens * (q_in + q_out) * fft_flops(p, real=True) + _correlate(tokens, q_out, q_in, freqs)
            + 2 * pairs * freqs + pairs * fft_flops(p, real=True))


def _peft_c3a_flops(tokens: int, q_in: int, q_out: int, p: int) -> tuple[float, float]:
    r, c, mac = fft_flops(p, real=True), fft_flops(p, real=False), 8 * tokens * q_in * q_out * p
    fwd = (tokens * q_in + q_out * q_in) * r + mac + tokens * q_out * c
    bwd = (tokens * q_out + q_out * q_in) * r + mac + tokens * q_in * c + tokens * q_in * r + mac + q_out * q_in * c
    return fwd, bwd




# --- one formula per method: (d_in, d_out, tokens, key fields) -> (forward, forward + backward) ------------------

def none_flops(d_in: int, d_out: int, tokens: int, **_) -> tuple[float, float]:
    gemm = 2 * tokens * d_in * d_out
    return gemm, 2 * gemm


def lora_flops(d_in: int, d_out: int, tokens: int, *, factors: int | None = None, **_) -> tuple[float, float]:
    gemm = 2 * tokens * d_in * d_out
    adapter = 2 * tokens * _require(factors, "rank", "lora") * (d_in + d_out)
    return gemm + adapter, 2 * gemm + 3 * adapter


def _blocks(method: str, d_in: int, d_out: int, block_size: int | None) -> tuple[int, int, int]:
    p = _require(block_size, "block_size", method)
    if d_in % p or d_out % p:
        raise ValueError(f"block_size={p} does not divide the layer's shape (d_in={d_in}, d_out={d_out})")
    return p, d_in // p, d_out // p


def peft_c3a_flops(d_in: int, d_out: int, tokens: int, *, block_size: int | None = None, **_) -> tuple[float, float]:
    p, q_in, q_out = _blocks("peft-c3a", d_in, d_out, block_size)
    gemm = 2 * tokens * d_in * d_out
    fwd, bwd = _peft_c3a_flops(tokens, q_in, q_out, p)
    return gemm + fwd, 2 * gemm + fwd + bwd


def c3a_flops(d_in: int, d_out: int, tokens: int, *, block_size: int | None = None, transform: str = "rfft",
              backend: str = "torch", kernel_grad_route: str | None = None, **_) -> tuple[float, float]:
    return _circulant_flops("c3a", d_in, d_out, tokens, block_size, 2, transform, backend, kernel_grad_route)


def cdvft_flops(d_in: int, d_out: int, tokens: int, *, block_size: int | None = None, factors: int | None = None,
                transform: str = "rfft", backend: str = "torch", kernel_grad_route: str | None = None,
                **_) -> tuple[float, float]:
    m = 2 if factors is None else _require(factors, "factors", "cdvft")
    if m < 2:
        raise ValueError(f"factors={m} is not supported for CDVFT: it needs an int >= 2")
    return _circulant_flops("cdvft", d_in, d_out, tokens, block_size, m, transform, backend, kernel_grad_route)


def _circulant_flops(method: str, d_in: int, d_out: int, tokens: int, block_size: int | None, m: int, transform: str,
                     backend: str, kernel_grad_route: str | None) -> tuple[float, float]:
    """C3A (one product, W0 fused where the backend fuses it) and CDVFT with m factors, per backend."""
    p, q_in, q_out = _blocks(method, d_in, d_out, block_size)
    gemm = 2 * tokens * d_in * d_out
    c3a = method == "c3a"
    if backend == "dense":
        if c3a:
            route = "rfft" if p >= DENSE_SPECTRAL_MIN_P else "gemm"
            return gemm, 2 * gemm + spectral_kernel_grad_flops(tokens, q_in, q_out, p, route)
        chain = (m - 2) * 2 * d_out * d_out * d_in
        return gemm + chain, 3 * gemm + 3 * chain
    if backend == "triton":
        route = kernel_grad_route or ("rfft" if p >= SPECTRAL_MIN_P else "gemm")
        kgrad = sum(spectral_kernel_grad_flops(tokens, qi, q_out, p, route) for qi in [q_in] + [q_out] * (m - 2))
        if c3a:
            return gemm, 2 * gemm + kgrad
        factors_flops = gemm + (m - 2) * 2 * tokens * d_out * d_out
        return gemm + factors_flops, 2 * gemm + 2 * factors_flops + kgrad
    if backend != "torch":
        raise ValueError(f"backend={backend!r} has no closed form; valid backends: torch, dense, triton")
    check_transform(transform)
    fwd = bwd = 0.0
    for qi in [q_in] + [q_out] * (m - 2):
        f, b = _product_flops(tokens, qi, q_out, p, transform)
        fwd, bwd = fwd + f, bwd + b
    return gemm + fwd, 2 * gemm + fwd + bwd
