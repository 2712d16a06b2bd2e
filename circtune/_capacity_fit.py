"""The least-squares fits behind :mod:`circtune.capacity`: the block-circulant projection (C3A's set, exact) and
the CDVFT fit of ``D_m C_{m−1} ⋯ C_1 D_1`` to a gradient (alternating least squares for m = 2, Adam steps for each
further factor pair). The rules, their costs and what they are not are in :mod:`circtune.capacity`'s docstring;
this module holds the numerics, with the step counts passed in by the caller (which caps them by sub-block size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# ALS for CDVFT m = 2: stop when a sweep gains less than this share of ‖G‖².
_ALS_TOL = 1e-4
# Adam refinement for CDVFT m >= 3: the learning rate (relative to each factor's size, see refine_cdvft) and the
# seed of the perturbation that moves the new factors off the identity.
_ADAM_LR = 3e-3
FIT_SEED = 0


# ---------------------------------------------------------------------------------------------------------------
# The block-circulant projection


def diagonal_sums(g: torch.Tensor, p: int) -> torch.Tensor:
    """``out[i, j, s] = Σ_u G_block(i, j)[u, (u + s) mod p]``: the sums along each p × p block's circulant
    diagonals, ``[q_out, q_in, p]`` (the C3A kernel gradient's sums). By strides, not by an index tensor: the block
    rows are repeated once (``[.., 2p]``) so that the entry ``(u, u + s)`` sits at offset ``u·(row + 1) + s``."""
    d_out, d_in = g.shape
    q_out, q_in = d_out // p, d_in // p
    twice = torch.cat([g.reshape(q_out, p, q_in, p)] * 2, dim=3).contiguous()  # [q_out, p(u), q_in, 2p]
    row = q_in * 2 * p
    view = twice.as_strided((q_out, q_in, p, p), (p * row, 2 * p, row + 1, 1))  # [i, j, u, s]
    return view.sum(dim=2)


def block_circulant(w: torch.Tensor) -> torch.Tensor:
    """Dense ``[q_out·p, q_in·p]`` matrix of kernel ``w[q_out, q_in, p]`` (circtune's orientation)."""
    q_out, q_in, p = w.shape
    u = torch.arange(p, device=w.device)
    idx = (u.view(1, p) - u.view(p, 1)) % p  # [u, t] -> (t - u) mod p
    return w[:, :, idx].permute(0, 2, 1, 3).reshape(q_out * p, q_in * p)


class _BlockCirculant(torch.autograd.Function):
    """:func:`block_circulant` whose backward is :func:`diagonal_sums` (an advanced-index backward accumulates
    element by element: several times slower on the CPU)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        ctx.p = w.shape[2]
        return block_circulant(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return diagonal_sums(grad, ctx.p)


def block_circulant_projection(g: torch.Tensor, p: int) -> torch.Tensor:
    """``P_p(G)``: the nearest block-circulant matrix (each block's circulant diagonals replaced by their means)."""
    return block_circulant(diagonal_sums(g, p) / p)


# ---------------------------------------------------------------------------------------------------------------
# CDVFT: fitting D_m C_{m-1} ... C_1 D_1 to G


def _safe(den: torch.Tensor) -> torch.Tensor:
    # a denominator to divide by where it is > 0 (torch.where evaluates both branches)
    return den.clamp_min(torch.finfo(den.dtype).tiny)


def als_cdvft2(g: torch.Tensor, p: int, sweeps: int) -> tuple[list[torch.Tensor], float]:
    """Alternating least squares for ``D_2 C D_1``, at most ``sweeps`` sweeps; returns ([d1, w, d2], captured
    energy of ``g``)."""
    d_out, d_in = g.shape
    q_out, q_in = d_out // p, d_in // p
    gb = g.reshape(q_out, p, q_in, p)
    total = float(gb.square().sum(dtype=torch.float64))
    d1 = torch.ones(d_in, dtype=g.dtype)
    d2 = torch.ones(d_out, dtype=g.dtype)
    w = diagonal_sums(g, p) / p  # the optimum at D = 1: C3A's projection
    captured = float(w.square().sum(dtype=torch.float64)) * p
    for _ in range(sweeps):
        dense = block_circulant(w).reshape(q_out, p, q_in, p)
        # D_2 given C, D_1: row a of ΔW is d2[a]·M[a, :], with M = C D_1.
        m = dense * d1.view(1, 1, q_in, p)
        num, den = (gb * m).sum(dim=(2, 3)), m.square().sum(dim=(2, 3))
        d2 = torch.where(den > 0, num / _safe(den), 0.0).reshape(d_out)
        # D_1 given C, D_2: column b is d1[b]·M[:, b], with M = D_2 C.
        m = dense * d2.view(q_out, p, 1, 1)
        num, den = (gb * m).sum(dim=(0, 1)), m.square().sum(dim=(0, 1))
        d1 = torch.where(den > 0, num / _safe(den), 0.0).reshape(d_in)
        # C given D_1, D_2: each kernel entry is a weighted least-squares mean along its diagonal.
        scale = d2.view(q_out, p, 1, 1) * d1.view(1, 1, q_in, p)
        num = diagonal_sums((gb * scale).reshape(d_out, d_in), p)
        den = diagonal_sums(scale.square().reshape(d_out, d_in), p)
        w = torch.where(den > 0, num / _safe(den), 0.0)
        # After the C update, ΔW is G's projection on the span of those entries: captured = Σ num²/den.
        new = float(torch.where(den > 0, num.square() / _safe(den), 0.0).sum(dtype=torch.float64))
        gain, captured = new - captured, max(captured, new)
        if gain < _ALS_TOL * total:
            break
    return [d1, w, d2], captured


def apply_block_circulant(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``C(w) @ x`` for ``x`` of shape ``[q_in·p, n]`` through the real FFT (differentiable): O(d·n·(q + log p))
    instead of a dense GEMM. ``y_i[u] = Σ_j Σ_s w[i, j, s] x_j[(u + s) mod p]`` is a circular cross-correlation,
    ``Y = conj(W)·X`` per frequency. The complex mixing runs as one real bmm against ``[[a, −b], [b, a]]`` (a + ib
    = conj W): torch's complex bmm, and its backward on conjugate views, take a slow path on the CPU (measured
    100x slower at d = 1024, p = 32)."""
    q_out, q_in, p = w.shape
    n = x.shape[1]
    f = p // 2 + 1
    xf = torch.view_as_real(torch.fft.rfft(x.reshape(q_in, p, n), dim=1))  # [q_in, f, n, 2]
    xs = xf.permute(1, 3, 0, 2).reshape(f, 2 * q_in, n)  # [f, (re, im) x q_in, n]
    wf = torch.view_as_real(torch.fft.rfft(w, dim=2)).permute(2, 0, 1, 3)  # [f, q_out, q_in, 2]
    a, b = wf[..., 0], -wf[..., 1]
    mix = torch.cat([torch.cat([a, -b], dim=2), torch.cat([b, a], dim=2)], dim=1)  # [f, 2 q_out, 2 q_in]
    ys = torch.bmm(mix, xs)  # [f, 2 q_out, n]
    yf = torch.complex(ys[:, :q_out], ys[:, q_out:]).permute(1, 0, 2)  # [q_out, f, n]
    return torch.fft.irfft(yf, n=p, dim=1).reshape(q_out * p, n)


def cdvft_delta(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """ΔW of ``[d1, w1, d2, w2, ..., d_m]`` (diagonals and kernels interleaved, applied right to left)."""
    delta = _BlockCirculant.apply(factors[1]) * factors[0]  # C_1 D_1
    for k in range(2, len(factors) - 1, 2):
        delta = apply_block_circulant(factors[k + 1], factors[k].unsqueeze(1) * delta)
    return factors[-1].unsqueeze(1) * delta


def refine_cdvft(g: torch.Tensor, p: int, start: list[torch.Tensor], captured: float, steps: int
                 ) -> tuple[list[torch.Tensor], float]:
    """One more (C, D) pair on top of ``start`` (an (m−1)-factor fit), refined by ``steps`` Adam steps."""
    d_out = g.shape[0]
    q = d_out // p
    gen = torch.Generator().manual_seed(FIT_SEED)
    eye = torch.zeros(q, q, p, dtype=g.dtype)
    eye[torch.arange(q), torch.arange(q), 0] = 1.0  # the identity: block (i, i) is the circulant of e_0
    eye += 1e-3 * torch.randn(eye.shape, generator=gen, dtype=g.dtype) / math.sqrt(q)
    params = [t.detach().clone() for t in start[:-1]]
    params += [start[-1].detach().clone(), eye, torch.ones(d_out, dtype=g.dtype)]
    # Step sizes relative to each factor's scale (its RMS singular value for kernels, its RMS for diagonals), so
    # that the factors' arbitrary relative scaling (D_2·c, C/c) does not change the fit's path.
    lrs = []
    for k, t in enumerate(params):
        rms = float(t.square().mean().sqrt())
        lrs.append(_ADAM_LR * (rms if k % 2 == 0 else rms * math.sqrt(t.shape[1] * p)) + 1e-30)
    for t in params:
        t.requires_grad_(True)
    opt = torch.optim.Adam([{"params": [t], "lr": lr} for t, lr in zip(params, lrs, strict=True)])
    total = float(g.square().sum(dtype=torch.float64))
    best, best_params = captured, [t.detach().clone() for t in params]
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = (g - cdvft_delta(params)).square().sum()
        value = total - float(loss.detach())
        if value > best:
            best, best_params = value, [t.detach().clone() for t in params]
        loss.backward()
        opt.step()
    with torch.no_grad():
        value = total - float((g - cdvft_delta(params)).square().sum())
    if value > best:
        best, best_params = value, [t.detach().clone() for t in params]
    return best_params, best
