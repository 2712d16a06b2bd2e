"""The kernel gradient of a block-circulant product, as an implicit GEMM with no diagonal reduction.

``dw[i, j, s] = scale · Σ_t Σ_u g[t, i·p + u] · x[t, j·p + (u + s) mod p]`` — a circular cross-correlation of the
upstream gradient ``g [T, q_out·p]`` with the input ``x [T, q_in·p]``, summed over tokens.

Algorithm. Read it as one GEMM ``dw[i, (j, s)] = Σ_{(t, u)} A[i, (t, u)] · B[(t, u), (j, s)]`` with rows the
``q_out`` block rows, columns the ``q_in·p`` (block, shift) pairs — exactly ``w``'s memory layout — and a reduction
over ``T·p`` (token, offset) pairs, where ``A[i, (t, u)] = g[t, i·p + u]`` is ``g`` re-strided and
``B[(t, u), (j, s)] = x[t, j·p + (u + s) mod p]`` is a Hankel tile generated from ``x`` by index arithmetic (each
``x`` value appears ``p`` times in it; the repeats are cache hits). FLOPs: ``2·T·d_in·d_out``, the same as ``gᵀx``,
but the ``d_out × d_in`` product is never formed and there is no reduction along circulant diagonals afterwards
(which would be ``d_out·d_in`` scattered reads or ``p``-way contended atomics). The output is small
(``d_in·d_out/p`` values), so the reduction is split over tokens (``split`` programs per output tile, fp32
``atomic_add``) to fill the GPU.

Cost of the layout: the row tile is at least 16 (``tl.dot``), so when ``q_out = d_out/p < 16`` a share
``1 - q_out/16`` of the MMA work is padding. That is one reason the triton backend declares ``p <= 256``.
Prediction (H100, bf16, T=4096, d_in=d_out=1024, p=64, q_out=16): ≈ one base GEMM, ≈ 11–15 µs.

Accumulates in fp32 (fp64 for fp64 inputs) and returns fp32 (fp64): the caller casts to the parameter's dtype.
With ``split > 1`` the order of the fp32 additions across splits is not fixed (atomics): not bit-reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tuning import (
    TileConfig,
    acc_dtype,
    autotune,
    check_device,
    check_dtype,
    input_precision,
    layout,
    size_bucket,
)


@triton.jit
def _block_circulant_kernel_grad_kernel(
    g_ptr,  # [T, Q_OUT * P] upstream gradient
    x_ptr,  # [T, D_IN] input of the product
    dw_ptr,  # [Q_OUT, D_IN] = [Q_OUT, Q_IN, P] contiguous, zeroed when USE_ATOMIC
    T, Q_OUT, D_IN, TOKENS_PER_SPLIT,
    stride_gt, stride_gd, stride_xt, stride_xd,
    scale,
    P: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, USE_ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # block row i
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (j, s) = j * P + s
    mask_m = offs_m < Q_OUT
    mask_n = offs_n < D_IN
    j_first = (offs_n // P) * P  # first column of x's block j
    shift = offs_n % P
    g_cols = offs_m * P  # first column of g's block i

    t_begin = pid_s * TOKENS_PER_SPLIT
    t_end = tl.minimum(T, t_begin + TOKENS_PER_SPLIT)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=ACC)
    for k0 in range(t_begin * P, t_end * P, BLOCK_K):
        kappa = k0 + tl.arange(0, BLOCK_K)  # (t, u) = t * P + u
        mask_k = kappa < t_end * P
        t = (kappa // P).to(tl.int64)
        u = kappa % P
        a = tl.load(g_ptr + t[None, :] * stride_gt + (g_cols[:, None] + u[None, :]) * stride_gd,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        col = u[:, None] + shift[None, :]
        col = tl.where(col >= P, col - P, col)
        b = tl.load(x_ptr + t[:, None] * stride_xt + (j_first[None, :] + col) * stride_xd,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)

    acc = acc * scale
    out = dw_ptr + offs_m[:, None] * D_IN + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if USE_ATOMIC:
        tl.atomic_add(out, acc, mask=mask)
    else:
        tl.store(out, acc, mask=mask)


_INTERPRETER_CONFIG = TileConfig(16, 32, 32, num_warps=4, num_stages=1, split=1)


# (largest row tile, column tile, K tile, warps) per operand dtype and dot precision; the row tile is clamped to the
# next power of two of q_out (rows past it would be pure padding). Every tile compiles for sm_90 and sm_80 within the
# A100's shared memory and without spills (tests/test_aot_compile.py).
_HALF_SPECS = ((64, 64, 32, 4), (64, 64, 64, 4), (64, 128, 32, 4), (64, 128, 64, 4),
               (128, 64, 32, 4), (128, 64, 64, 4), (128, 128, 32, 8), (128, 128, 64, 8))
# TF32: as bf16 without 64×128×64 (8 B of spills on sm_80).
_TF32_SPECS = ((64, 64, 32, 4), (64, 64, 64, 4), (64, 128, 32, 4), (128, 64, 32, 4), (128, 64, 64, 4),
               (128, 128, 32, 8), (128, 128, 64, 8))
# ieee fp32 (FMA units): every K tile of 64 spills (up to 12 KB per thread on sm_80); 8 warps for the larger tiles.
_IEEE_SPECS = ((64, 64, 32, 4), (64, 128, 32, 8), (128, 64, 32, 8), (128, 128, 16, 8))
# fp64 (gradcheck only): the bf16 tiles spill (up to 224 B) and 128×128×64 needs 256 KiB of shared memory.
_FP64_SPECS = ((64, 64, 16, 4), (32, 64, 32, 4))


def cuda_configs(q_out: int, dtype: torch.dtype, precision: str) -> tuple[TileConfig, ...]:
    """The tiles the CUDA autotune times for ``q_out`` block rows and operands of ``dtype`` at ``precision``."""
    if dtype == torch.float64:
        specs = _FP64_SPECS
    elif dtype == torch.float32:
        specs = _TF32_SPECS if precision == "tf32" else _IEEE_SPECS
    else:
        specs = _HALF_SPECS
    rows = max(16, triton.next_power_of_2(q_out))
    # A clamped row tile is small: 4 warps.
    tiles = (TileConfig(min(rows, bm), bn, bk, num_warps=warps if rows >= bm else 4, num_stages=3)
             for bm, bn, bk, warps in specs)
    return tuple(dict.fromkeys(tiles))  # clamping can make two specs one tile


def _default_split(cfg: TileConfig, tokens: int, q_out: int, d_in: int, p: int, device: torch.device) -> int:
    """Enough programs for about two waves, while each split still reduces over at least 8 K-tiles."""
    if cfg.split is not None:
        return min(cfg.split, max(1, tokens))
    tiles = triton.cdiv(q_out, cfg.block_m) * triton.cdiv(d_in, cfg.block_n)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    min_tokens = triton.cdiv(8 * cfg.block_k, p)
    return max(1, min(triton.cdiv(2 * sms, tiles), tokens // min_tokens))


def block_circulant_kernel_grad(g: torch.Tensor, x: torch.Tensor, block_size: int, *, scale: float = 1.0,
                                config: TileConfig | None = None) -> torch.Tensor:
    """``dw [q_out, q_in, p]`` of ``scale·C(w) x`` for upstream gradient ``g [T, q_out·p]`` and input ``x [T, q_in·p]``.

    Returns fp32 (fp64 when an input is fp64). ``g`` is cast to ``x``'s dtype (``tl.dot`` takes one operand
    dtype). ``config`` None picks the autotuned default; ``config.split`` None picks the token split.
    """
    op = "block_circulant_kernel_grad"
    p = block_size
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"{op}: block_size must be an int >= 1, got {p!r}")
    if g.dim() != 2 or x.dim() != 2 or g.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: g and x must be 2-D with the same number of tokens, got shapes {tuple(g.shape)} "
                         f"and {tuple(x.shape)}")
    if g.shape[1] % p or x.shape[1] % p:
        raise ValueError(f"{op}: block_size={p} must divide both g's width {g.shape[1]} and x's width {x.shape[1]}")
    check_dtype(op, "g", g)
    check_dtype(op, "x", x)
    device = check_device(op, g, x)
    tokens, q_out, d_in = x.shape[0], g.shape[1] // p, x.shape[1]
    wide = torch.float64 if torch.float64 in (g.dtype, x.dtype) else None
    x = x.to(wide) if wide else x
    g = g.to(x.dtype)
    out_dtype = wide or torch.float32
    precision = input_precision(x.dtype)

    def launch(cfg: TileConfig) -> torch.Tensor:
        split = _default_split(cfg, tokens, q_out, d_in, p, device)
        dw = (torch.zeros if split > 1 else torch.empty)(q_out, d_in // p, p, device=device, dtype=out_dtype)
        if tokens == 0:
            return dw.zero_()
        per_split = triton.cdiv(tokens, split)
        grid = (triton.cdiv(q_out, cfg.block_m), triton.cdiv(d_in, cfg.block_n), triton.cdiv(tokens, per_split))
        _block_circulant_kernel_grad_kernel[grid](
            g, x, dw,
            tokens, q_out, d_in, per_split,
            g.stride(0), g.stride(1), x.stride(0), x.stride(1),
            float(scale),
            P=p, ACC=acc_dtype(out_dtype), PRECISION=precision, USE_ATOMIC=split > 1,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return dw

    if config is None:
        candidates = cuda_configs(q_out, x.dtype, precision) if device.type == "cuda" else (_INTERPRETER_CONFIG,)
        # Everything that changes the compiled kernel besides the tile (see block_circulant_matmul); g is already
        # cast to x's dtype. The split (and so the atomics) follows from the tile, the token count and the GPU.
        key = (op, x.dtype, precision, layout(g), layout(x), size_bucket(tokens), tokens % 16 == 0, q_out, d_in, p)
        config = autotune(key, candidates, launch, device)
    return launch(config.check(op))


def block_circulant_kernel_grad_reference(g: torch.Tensor, x: torch.Tensor, block_size: int, *,
                                          scale: float = 1.0) -> torch.Tensor:
    """The same op in plain torch: ``gᵀx`` then the sum along each block's circulant diagonals."""
    p = block_size
    real = torch.float64 if torch.float64 in (g.dtype, x.dtype) else torch.float32
    q_out, q_in = g.shape[1] // p, x.shape[1] // p
    full = (g.to(real).T @ x.to(real)).reshape(q_out, p, q_in, p).permute(0, 2, 1, 3)  # [i, j, u, t]
    u = torch.arange(p, device=g.device)
    diag = (u.view(1, p) - u.view(p, 1)) % p  # s = (t - u) mod p
    dw = torch.zeros(q_out, q_in, p, dtype=real, device=g.device)
    return dw.index_add_(2, diag.reshape(-1), full.reshape(q_out, q_in, p * p)) * scale
