"""``y = x · (scale·C(w) + W0)ᵀ + b`` with autograd: the thin layer of custom ops over the two kernels.

forward          one implicit GEMM (block_circulant_matmul), W0's tile and the generated C(w) tile summed in
                 registers;
input gradient   the same kernel on ``g`` with ``transpose_kernel(w)`` and ``W0ᵀ`` (a strided view, no copy);
kernel gradient  block_circulant_kernel_grad (implicit Hankel GEMM, no d_out × d_in intermediate).

The three are ``torch.library`` custom ops (``circtune::block_circulant_linear`` with its autograd,
``circtune::block_circulant_input_grad``, ``circtune::block_circulant_kernel_grad``), each with a fake
(meta) implementation and a FLOP formula registered with ``torch.utils.flop_counter``: a kernel launch is invisible
to dispatch-level counters such as ``FlopCounterMode``, an op is not. Each is one GEMM's work, 2·M·N·K FLOPs, however
the kernel generates its operand tile: forward ``2·T·d_in·d_out`` (W0 fused: its GEMM is this one), input gradient
the same, kernel gradient ``2·T·d_in·d_out`` (``q_out × d_in`` outputs, each a sum over T tokens × p positions).
The formulas are registered when this module is imported: :mod:`circtune.measure.flops` imports it (when Triton is
installed), so every counter made after that sees them.

This module imports no kernel: the launchers (whose ``@triton.jit`` decoration reads ``TRITON_INTERPRET``) are
imported at the first call, so importing this module early does not fix the interpreter setting.

Saves only ``x``, ``w`` and ``W0`` (already alive). ``W0`` and ``b`` get gradients (plain torch) only if they ask
for them: the adapters freeze them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch.utils.flop_counter import register_flop_formula

if TYPE_CHECKING:
    from ._tuning import TileConfig

_NO_CONFIG: list[int] = []


def _encode(config: TileConfig | None, op: str) -> list[int]:
    """A TileConfig as the int list a custom op takes, field by field (None as -1: every field is >= 1 or None).
    Checked first: the list cannot carry a wrong type."""
    if config is None:
        return _NO_CONFIG
    config.check(op)
    return [-1 if v is None else int(v) for v in dataclasses.astuple(config)]


def _decode(values: list[int]) -> TileConfig | None:
    if not values:
        return None
    from ._tuning import TileConfig

    return TileConfig(*(None if v == -1 else v for v in values))


# --------------------------------------------------------------------------------------------------- the ops
@torch.library.custom_op("circtune::block_circulant_linear", mutates_args=())
def _linear(x: torch.Tensor, w: torch.Tensor, scale: float, weight: torch.Tensor | None, bias: torch.Tensor | None,
            forward_config: list[int], input_grad_config: list[int], kernel_grad_config: list[int]) -> torch.Tensor:
    from .block_circulant_matmul import block_circulant_matmul

    return block_circulant_matmul(x, w, scale=scale, weight=weight, bias=bias, config=_decode(forward_config))


@_linear.register_fake
def _(x, w, scale, weight, bias, forward_config, input_grad_config, kernel_grad_config):
    return x.new_empty(x.shape[0], w.shape[0] * w.shape[2])


@torch.library.custom_op("circtune::block_circulant_input_grad", mutates_args=())
def _input_grad(g: torch.Tensor, w: torch.Tensor, scale: float, weight: torch.Tensor | None,
                config: list[int]) -> torch.Tensor:
    """``g · (scale·C(w) + weight)`` for ``g [T, q_out·p]``, ``w [q_out, q_in, p]``, ``weight [q_out·p, q_in·p]``."""
    from .block_circulant_matmul import block_circulant_matmul, transpose_kernel

    return block_circulant_matmul(g, transpose_kernel(w), scale=scale, weight=weight.T if weight is not None else None,
                                  config=_decode(config))


@_input_grad.register_fake
def _(g, w, scale, weight, config):
    return g.new_empty(g.shape[0], w.shape[1] * w.shape[2])


@torch.library.custom_op("circtune::block_circulant_kernel_grad", mutates_args=())
def _kernel_grad(g: torch.Tensor, x: torch.Tensor, block_size: int, scale: float, config: list[int]) -> torch.Tensor:
    from .block_circulant_kernel_grad import block_circulant_kernel_grad

    return block_circulant_kernel_grad(g, x, block_size, scale=scale, config=_decode(config))


@_kernel_grad.register_fake
def _(g, x, block_size, scale, config):
    wide = torch.float64 if torch.float64 in (g.dtype, x.dtype) else torch.float32
    return g.new_empty(g.shape[1] // block_size, x.shape[1] // block_size, block_size, dtype=wide)


def _setup_context(ctx, inputs, output) -> None:
    x, w, scale, weight, bias, _, input_grad_config, kernel_grad_config = inputs
    ctx.save_for_backward(x, w, weight)
    ctx.scale, ctx.input_grad_config, ctx.kernel_grad_config = scale, input_grad_config, kernel_grad_config
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, g: torch.Tensor):
    x, w, weight = ctx.saved_tensors
    dx = dw = dweight = dbias = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.circtune.block_circulant_input_grad(g, w, ctx.scale, weight, ctx.input_grad_config)
    if ctx.needs_input_grad[1]:
        dw = torch.ops.circtune.block_circulant_kernel_grad(g, x, w.shape[2], ctx.scale,
                                                            ctx.kernel_grad_config).to(w.dtype)
    if ctx.needs_input_grad[3]:
        dweight = (g.T.to(torch.float32) @ x.to(torch.float32)).to(weight.dtype)
    if ctx.needs_input_grad[4]:
        dbias = g.sum(0, dtype=torch.float64 if g.dtype == torch.float64 else torch.float32).to(ctx.bias_dtype)
    return dx, dw, None, dweight, dbias, None, None, None


_linear.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------- FLOPs
@register_flop_formula(torch.ops.circtune.block_circulant_linear)
def _linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * out_shape[1]


@register_flop_formula(torch.ops.circtune.block_circulant_input_grad)
def _input_grad_flops(g_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * g_shape[0] * g_shape[1] * out_shape[1]


@register_flop_formula(torch.ops.circtune.block_circulant_kernel_grad)
def _kernel_grad_flops(g_shape, x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * g_shape[0] * g_shape[1] * x_shape[1]


# --------------------------------------------------------------------------------------------------- entry points
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
    y = torch.ops.circtune.block_circulant_linear(
        x.reshape(-1, x.shape[-1]), w, float(scale), weight, bias,
        _encode(forward_config, "block_circulant_matmul"), _encode(input_grad_config, "block_circulant_matmul"),
        _encode(kernel_grad_config, "block_circulant_kernel_grad"))
    return y.reshape(*lead, y.shape[-1])


def block_circulant_linear_reference(x: torch.Tensor, w: torch.Tensor, *, scale: float = 1.0,
                                     weight: torch.Tensor | None = None,
                                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same op in plain torch (differentiable by autograd): the baseline the kernels are profiled against."""
    from .block_circulant_matmul import block_circulant_matmul_reference

    lead = x.shape[:-1]
    y = block_circulant_matmul_reference(x.reshape(-1, x.shape[-1]), w, scale=scale, weight=weight, bias=bias)
    return y.reshape(*lead, y.shape[-1])
