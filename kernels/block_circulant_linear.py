"""``y = x · (scale·C(w) + W0)ᵀ + b`` with autograd: the thin Function over the two kernels.

forward          one implicit GEMM (block_circulant_matmul), W0's tile and the generated C(w) tile summed in
                 registers;
input gradient   the same kernel on ``g`` with ``transpose_kernel(w)`` and ``W0ᵀ`` (a strided view, no copy);
kernel gradient  block_circulant_kernel_grad (implicit Hankel GEMM, no d_out × d_in intermediate).

Saves only ``x``, ``w`` and ``W0`` (already alive). ``W0`` and ``b`` get gradients (plain torch) only if they ask
for them: the adapters freeze them.
"""

from __future__ import annotations

import torch

from ._tuning import TileConfig
from .block_circulant_kernel_grad import block_circulant_kernel_grad
from .block_circulant_matmul import block_circulant_matmul, block_circulant_matmul_reference, transpose_kernel


class _BlockCirculantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, scale: float, weight: torch.Tensor | None,
                bias: torch.Tensor | None, configs: tuple[TileConfig | None, TileConfig | None, TileConfig | None]):
        ctx.save_for_backward(x, w, weight)
        ctx.scale, ctx.configs = scale, configs
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return block_circulant_matmul(x, w, scale=scale, weight=weight, bias=bias, config=configs[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w, weight = ctx.saved_tensors
        dx = dw = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dx = block_circulant_matmul(g, transpose_kernel(w), scale=ctx.scale,
                                        weight=weight.T if weight is not None else None, config=ctx.configs[1])
        if ctx.needs_input_grad[1]:
            dw = block_circulant_kernel_grad(g, x, w.shape[2], scale=ctx.scale, config=ctx.configs[2]).to(w.dtype)
        if ctx.needs_input_grad[3]:
            dweight = (g.T.to(torch.float32) @ x.to(torch.float32)).to(weight.dtype)
        if ctx.needs_input_grad[4]:
            dbias = g.sum(0, dtype=torch.float64 if g.dtype == torch.float64 else torch.float32).to(ctx.bias_dtype)
        return dx, dw, None, dweight, dbias, None


def block_circulant_linear(x: torch.Tensor, w: torch.Tensor, *, scale: float = 1.0, weight: torch.Tensor | None = None,
                           bias: torch.Tensor | None = None, forward_config: TileConfig | None = None,
                           input_grad_config: TileConfig | None = None,
                           kernel_grad_config: TileConfig | None = None) -> torch.Tensor:
    """``x · (scale·C(w) + weight)ᵀ + bias`` over the last axis of ``x [..., q_in·p]`` -> ``[..., q_out·p]``.

    ``w [q_out, q_in, p]``; ``weight`` (``[q_out·p, q_in·p]``) and ``bias`` optional. Output in ``x``'s dtype;
    ``w``'s gradient in ``w``'s dtype; under autocast ``x``, ``weight`` and ``bias`` are cast to the autocast dtype
    first, as ``F.linear`` would. The three configs set the tiles of the three kernels (None: autotuned).
    """
    if w.dim() != 3 or x.shape[-1] != w.shape[1] * w.shape[2]:
        raise ValueError(f"block_circulant_linear: kernel of shape {tuple(w.shape)} does not fit input of shape "
                         f"{tuple(x.shape)}: expected x[..., q_in * p] for w[q_out, q_in, p]")
    if torch.is_autocast_enabled(x.device.type):
        # As F.linear under autocast: the GEMM runs in the autocast dtype. (w stays as it is: its tile is generated
        # in fp32 and rounded once, and its gradient comes back in w's dtype.)
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = (t.to(dtype) if t is not None else None for t in (x, weight, bias))
    lead = x.shape[:-1]
    configs = (forward_config, input_grad_config, kernel_grad_config)
    y = _BlockCirculantLinear.apply(x.reshape(-1, x.shape[-1]), w, float(scale), weight, bias, configs)
    return y.reshape(*lead, y.shape[-1])


def block_circulant_linear_reference(x: torch.Tensor, w: torch.Tensor, *, scale: float = 1.0,
                                     weight: torch.Tensor | None = None,
                                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same op in plain torch (differentiable by autograd): the baseline the kernels are profiled against."""
    lead = x.shape[:-1]
    y = block_circulant_matmul_reference(x.reshape(-1, x.shape[-1]), w, scale=scale, weight=weight, bias=bias)
    return y.reshape(*lead, y.shape[-1])

