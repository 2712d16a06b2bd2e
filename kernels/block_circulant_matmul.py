"""The block-circulant product as an implicit GEMM: ``out = a · (scale·C(w) + W0)ᵀ + bias``.

Forward (``Δz = C(w) x``, optionally fused with the frozen layer) and input gradient (``dx = g · (scale·C(w) + W0)``,
the same kernel with the re-indexed kernel of :func:`transpose_kernel` and ``W0ᵀ``) are both this one op.

Algorithm (an implicit GEMM: the circulant operand is generated, never stored). A tiled GEMM over ``a [M, K]``
whose ``[BLOCK_K, BLOCK_N]`` operand tile is *generated* from ``w [N/p, K/p, p]`` by index arithmetic,
``C(w)[n, k] = w[n // p, k // p, (k - n) mod p]``, in registers — the ``N × K`` matrix never exists in memory —
scaled, optionally added to the base weight's tile (read as a normal GEMM would read it) and fed to ``tl.dot``.
So one GEMM computes ``(W0 + ΔW) x``: the adapter's forward and input gradient cost what the frozen layer's own
two GEMMs cost, plus the gathers of ``w`` (``N·K/p`` values, cache-resident). Tiles need not line up with
circulant blocks, so any ``p`` works, powers of two or not.

Why not the DFT-as-matmul route for small p: it needs ``p`` to be tile-friendly (the transform is a ``p × p`` or
``p × (p+2)`` matmul per block, padded to 16), three chained matmuls per tile with complex mixing in between, and
its FLOPs (``≈ 2·T·(d_in + d_out)·p`` for the transforms plus ``4·T·d_in·d_out/p`` mixing) only beat the GEMM's
``2·T·d_in·d_out`` as an *extra* cost — whereas fused into the base GEMM the extra cost here is ≈ 0. Prediction
(H100, bf16, T=4096, d=1024): base GEMM ≈ 11 µs; this forward ≈ 11–13 µs, i.e. ≈ +0–2 µs over the frozen layer;
to be measured by benchmarks/bench_triton.py.

Precision: operands are cast to ``a``'s dtype for ``tl.dot`` and accumulated in fp32 (fp64 for fp64 inputs). With
``W0`` fused, ``W0 + scale·C(w)`` is summed in fp32 and rounded once to the operand dtype — the rounding
``merge()`` and the dense backend apply too (in bf16, ΔW entries far below ``2^-8·|W0|`` fall under W0's rounding).
The kernel gradient (block_circulant_kernel_grad) does not see that rounding.
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
def _block_circulant_matmul_kernel(
    a_ptr,  # [M, K] activations (x for the forward, g for the input gradient)
    w_ptr,  # [N // P, K // P, P] circulant kernel, contiguous
    base_ptr,  # [N, K] frozen weight (strided; W0ᵀ for the input gradient), unused without HAS_BASE
    bias_ptr,  # [N], unused without HAS_BIAS
    out_ptr,  # [M, N]
    M, N, K, Q_K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
    scale,
    P: tl.constexpr,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M row tiles share each column tile of the (generated) weight while it is in L2.
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    u = offs_n % P  # row inside the circulant block
    w_row = (offs_n // P) * Q_K  # first kernel of block row n // P, in units of P
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # Generated tile [BLOCK_K, BLOCK_N]: C(w)[n, k] = w[n // P, k // P, (k - n) mod P].
        s = (offs_k % P)[:, None] - u[None, :]
        s = tl.where(s < 0, s + P, s)
        tile_mask = mask_k[:, None] & mask_n[None, :]
        b = tl.load(w_ptr + (w_row[None, :] + (offs_k // P)[:, None]) * P + s, mask=tile_mask, other=0.0)
        b = b.to(ACC) * scale
        if HAS_BASE:
            base = tl.load(base_ptr + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk, mask=tile_mask,
                           other=0.0)
            b += base.to(ACC)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION, out_dtype=ACC)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# Candidates the CUDA autotune times, per operand dtype and dot precision; the fastest per problem key is cached.
# Every tile here compiles for sm_90 and sm_80 within the A100's 163 KiB of shared memory and without register
# spills (tests/test_aot_compile.py compiles them all; ``python -m circtune.kernels._aot`` prints the figures).
# bf16/fp16: tensor-core tiles. The 128×128×32 tile has 8 warps (with 4 it spilled 16 B/thread on sm_80) and
# 256×128×32 replaces 128×256×32 (spilled 16–20 B on both targets). 128×128×64 uses 160 KiB, the largest that fits
# the A100.
_HALF_CONFIGS = (
    TileConfig(128, 128, 32, num_warps=8, num_stages=4),
    TileConfig(128, 128, 64, num_warps=8, num_stages=3),
    TileConfig(256, 128, 32, num_warps=8, num_stages=3),
    TileConfig(64, 128, 32, num_warps=4, num_stages=4),
    TileConfig(128, 64, 32, num_warps=4, num_stages=4),
    TileConfig(64, 64, 32, num_warps=4, num_stages=5),
)
# fp32 through TF32 tensor cores: operands take twice the shared memory of bf16, so the bf16 list's 128×128×64
# (256 KiB on sm_90) and 256×128×32 do not fit, and 4-warp 128×128 tiles spill (up to 184 B on sm_80).
_TF32_CONFIGS = (
    TileConfig(128, 128, 32, num_warps=8, num_stages=3),
    TileConfig(128, 128, 32, num_warps=8, num_stages=4),
    TileConfig(64, 128, 32, num_warps=4, num_stages=4),
    TileConfig(128, 64, 32, num_warps=4, num_stages=4),
    TileConfig(64, 64, 32, num_warps=4, num_stages=5),
)
# fp32 with TF32 off ("ieee", as torch's own fp32 matmuls then are): tl.dot runs on the FMA units and holds its
# operand fragments in registers, so the tensor-core tiles spill massively (128×128×32: 24 KB of spill stores per
# thread, 5 of the 6 bf16 tiles spill). These small-K tiles are spill-free. (tf32x3 would keep the big tiles on
# tensor cores, but it is a different precision from torch's fp32, which the triton rows must match.)
_IEEE_CONFIGS = (
    TileConfig(128, 64, 16, num_warps=8, num_stages=3),
    TileConfig(64, 128, 16, num_warps=8, num_stages=3),
    TileConfig(64, 64, 32, num_warps=8, num_stages=3),
    TileConfig(64, 64, 16, num_warps=4, num_stages=3),
    TileConfig(32, 64, 16, num_warps=4, num_stages=3),
    TileConfig(64, 32, 16, num_warps=4, num_stages=3),
)
# fp64 (gradcheck only): FMA units and 8-byte operands; the bf16 tiles need 176–384 KiB of shared memory and spill.
_FP64_CONFIGS = (
    TileConfig(64, 64, 16, num_warps=4, num_stages=3),
    TileConfig(32, 32, 32, num_warps=4, num_stages=3),
)


def cuda_configs(dtype: torch.dtype, precision: str) -> tuple[TileConfig, ...]:
    """The tiles the CUDA autotune times for operands of ``dtype`` with ``tl.dot`` precision ``precision``."""
    if dtype == torch.float64:
        return _FP64_CONFIGS
    if dtype == torch.float32:
        return _TF32_CONFIGS if precision == "tf32" else _IEEE_CONFIGS
    return _HALF_CONFIGS


# The interpreter runs every program instance in numpy: few, mid-sized tiles keep the CPU tests fast.
_INTERPRETER_CONFIG = TileConfig(32, 32, 32, num_warps=4, num_stages=1)


def transpose_kernel(w: torch.Tensor) -> torch.Tensor:
    """The kernel of ``C(w)ᵀ``: ``w'[j, i, s] = w[i, j, (-s) mod p]``, so that ``C(w') = C(w)ᵀ``.

    The input gradient ``g · C(w)`` is then the forward product with ``w'`` — one kernel for both directions.
    """
    return torch.roll(w.flip(-1), 1, dims=-1).transpose(0, 1).contiguous()


def _check(op: str, a: torch.Tensor, w: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None):
    if a.dim() != 2:
        raise ValueError(f"{op}: a must be 2-D [tokens, features], got shape {tuple(a.shape)}")
    if w.dim() != 3:
        raise ValueError(f"{op}: w must have shape [q_out, q_in, p], got {tuple(w.shape)}")
    q_n, q_k, p = w.shape
    if a.shape[1] != q_k * p:
        raise ValueError(f"{op}: kernel of shape {tuple(w.shape)} does not fit a of shape {tuple(a.shape)}: "
                         f"expected a[:, q_in * p] = a[:, {q_k * p}]")
    check_dtype(op, "a", a)
    check_dtype(op, "w", w)
    if weight is not None:
        if tuple(weight.shape) != (q_n * p, q_k * p):
            raise ValueError(f"{op}: weight must have shape [q_out * p, q_in * p] = {(q_n * p, q_k * p)}, "
                             f"got {tuple(weight.shape)}")
        check_dtype(op, "weight", weight)
    if bias is not None:
        if tuple(bias.shape) != (q_n * p,):
            raise ValueError(f"{op}: bias must have shape [{q_n * p}], got {tuple(bias.shape)}")
        check_dtype(op, "bias", bias)
    return check_device(op, a, w, weight, bias)


def block_circulant_matmul(a: torch.Tensor, w: torch.Tensor, *, scale: float = 1.0, weight: torch.Tensor | None = None,
                           bias: torch.Tensor | None = None, config: TileConfig | None = None) -> torch.Tensor:
    """``a · (scale·C(w) + weight)ᵀ + bias`` for ``a [M, q_in·p]``, ``w [q_out, q_in, p]`` -> ``[M, q_out·p]``.

    ``weight [q_out·p, q_in·p]`` (any strides) and ``bias [q_out·p]`` are optional. The result has ``a``'s dtype;
    ``config`` None picks the autotuned default.
    """
    op = "block_circulant_matmul"
    device = _check(op, a, w, weight, bias)
    q_n, q_k, p = w.shape
    m, k, n = a.shape[0], q_k * p, q_n * p
    w = w.contiguous()
    acc = acc_dtype(a.dtype)  # tl.dot's result type follows its operands, which follow a
    precision = input_precision(a.dtype)

    def launch(cfg: TileConfig) -> torch.Tensor:
        out = torch.empty(m, n, device=device, dtype=a.dtype)
        if m == 0:
            return out
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
        base = weight if weight is not None else w  # any pointer: never read without HAS_BASE
        stride_bn, stride_bk = weight.stride() if weight is not None else (0, 0)
        _block_circulant_matmul_kernel[grid](
            a, w, base, bias if bias is not None else w, out,
            m, n, k, q_k,
            a.stride(0), a.stride(1), stride_bn, stride_bk, out.stride(0), out.stride(1),
            float(scale),
            P=p, HAS_BASE=weight is not None, HAS_BIAS=bias is not None,
            ACC=acc, PRECISION=precision,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=8,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return out

    if config is None:
        candidates = cuda_configs(a.dtype, precision) if device.type == "cuda" else (_INTERPRETER_CONFIG,)
        # Everything that changes the compiled kernel besides the tile: operand dtypes, dot precision, layouts
        # (the forward's W0 against the input gradient's W0ᵀ), the fused terms, and Triton's specialisation of M
        # on divisibility by 16; the token count by power-of-two bucket.
        key = (op, a.dtype, w.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype,
               precision, layout(a), layout(weight), size_bucket(m), m % 16 == 0, n, k, p)
        config = autotune(key, candidates, launch, device)
    return launch(config.check(op))


def block_circulant_matmul_reference(a: torch.Tensor, w: torch.Tensor, *, scale: float = 1.0,
                                     weight: torch.Tensor | None = None,
                                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same op in plain torch (materialises the matrix): the profiling baseline and a readable spec."""
    q_n, q_k, p = w.shape
    u = torch.arange(p, device=w.device)
    dense = w[:, :, (u.view(1, p) - u.view(p, 1)) % p]  # [q_n, q_k, p(row u), p(col t)]
    matrix = dense.permute(0, 2, 1, 3).reshape(q_n * p, q_k * p).to(torch.float64 if a.dtype == torch.float64
                                                                     else torch.float32) * scale
    if weight is not None:
        matrix = matrix + weight.to(matrix.dtype)
    out = a.to(matrix.dtype) @ matrix.T
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(a.dtype)
