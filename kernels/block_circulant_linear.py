"""``y = x · (scale·C(w) + W0)ᵀ + b`` with autograd: the thin layer of custom ops over the two kernels.

forward          one implicit GEMM (block_circulant_matmul), W0's tile and the generated C(w) tile summed in
                 registers;
input gradient   the same kernel on ``g`` with ``transpose_kernel(w)`` and ``W0ᵀ`` (a strided view, no copy);
kernel gradient  one of three routes (:data:`KERNEL_GRAD_ROUTES`): ``gemm``, block_circulant_kernel_grad (implicit
                 Hankel GEMM, no d_out × d_in intermediate, ``2·T·d_in·d_out`` FLOPs: a full weight gradient's);
                 ``rfft``, the spectral form through torch.fft (rfft of x and g, ``Σ_t conj(G)ᵀX`` per frequency
                 as a complex bmm, a small irfft: ≈ ``4·T·d_in·d_out/p`` FLOPs plus the transforms); ``dft``, the
                 same with the transforms and the reduction as real GEMMs (tensor cores in bf16/fp16).
                 On CUDA the routes are timed once per problem key and the fastest kept
                 (:func:`._tuning.autotune_route`);
                 on the interpreter the rule :func:`default_kernel_grad_route` decides (``rfft`` from p = 8 on, the
                 GEMM below: the crossover measured on the CPU, where the GEMM form wins only at p <= 4). An
                 explicit kernel-gradient tile means the GEMM route.

The three are ``torch.library`` custom ops (``circtune::block_circulant_linear`` with its autograd,
``circtune::block_circulant_input_grad``, ``circtune::block_circulant_kernel_grad``), each with a fake
(meta) implementation and a FLOP formula registered with ``torch.utils.flop_counter``: a kernel launch is invisible
to dispatch-level counters such as ``FlopCounterMode``, an op is not. Each is one GEMM's work, 2·M·N·K FLOPs, however
the kernel generates its operand tile: forward ``2·T·d_in·d_out`` (W0 fused: its GEMM is this one), input gradient
the same, GEMM kernel gradient ``2·T·d_in·d_out`` (``q_out × d_in`` outputs, each a sum over T tokens × p
positions). The spectral kernel gradient is a fourth op, ``circtune::block_circulant_kernel_grad_spectral``, whose
formula is the closed form of its route (:func:`circtune.measure.flops.spectral_kernel_grad_flops`), so the count
follows the route actually taken.
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
# How the kernel gradient is computed; "" (auto) in the op's schema means: chosen per problem (module docstring).
KERNEL_GRAD_ROUTES = ("gemm", "rfft", "dft")
# From this block size on the interpreter/CPU rule takes the spectral route (measured crossover, module docstring).
SPECTRAL_MIN_P = 8


def default_kernel_grad_route(p: int) -> str:
    """The deterministic rule off CUDA: ``rfft`` for p >= :data:`SPECTRAL_MIN_P`, else ``gemm``."""
    return "rfft" if p >= SPECTRAL_MIN_P else "gemm"


def check_kernel_grad_route(route: str | None) -> str | None:
    if route is not None and route not in KERNEL_GRAD_ROUTES:
        raise ValueError(f"kernel_grad_route={route!r} is not supported; valid routes: None (chosen per problem), "
                         f"{', '.join(KERNEL_GRAD_ROUTES)}")
    return route


@torch.library.custom_op("circtune::block_circulant_linear", mutates_args=())
def _linear(x: torch.Tensor, w: torch.Tensor, scale: float, weight: torch.Tensor | None, bias: torch.Tensor | None,
            forward_config: list[int], input_grad_config: list[int], kernel_grad_config: list[int],
            kernel_grad_route: str) -> torch.Tensor:
    from .block_circulant_matmul import block_circulant_matmul

    return block_circulant_matmul(x, w, scale=scale, weight=weight, bias=bias, config=_decode(forward_config))


@_linear.register_fake
def _(x, w, scale, weight, bias, forward_config, input_grad_config, kernel_grad_config, kernel_grad_route):
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


@torch.library.custom_op("circtune::block_circulant_kernel_grad_spectral", mutates_args=())
def _kernel_grad_spectral(g: torch.Tensor, x: torch.Tensor, block_size: int, scale: float,
                          transform: str) -> torch.Tensor:
    """The kernel gradient from the spectra of ``x`` and ``g``: ``transform`` ``rfft`` (torch.fft) or ``dft``
    (real GEMMs against cos/sin bases). fp32 out (fp64 for fp64 inputs), as the GEMM route."""
    from circtune.adapters._circulant import spectral_kernel_grad
    from circtune.adapters._dft import dft_kernel_grad

    if transform not in ("rfft", "dft"):
        raise ValueError(f"block_circulant_kernel_grad_spectral: transform={transform!r} is not supported; "
                         "valid transforms: rfft, dft")
    wide = torch.float64 if torch.float64 in (g.dtype, x.dtype) else torch.float32
    if transform == "rfft":
        return spectral_kernel_grad(x, g, block_size, scale, out_dtype=wide, physical_conj=True)
    return dft_kernel_grad(x, g.to(x.dtype), block_size, scale, out_dtype=wide)


@_kernel_grad_spectral.register_fake
def _(g, x, block_size, scale, transform):
    wide = torch.float64 if torch.float64 in (g.dtype, x.dtype) else torch.float32
    return g.new_empty(g.shape[1] // block_size, x.shape[1] // block_size, block_size, dtype=wide)


def _run_kernel_grad(route: str, g: torch.Tensor, x: torch.Tensor, p: int, scale: float,
                     config: list[int]) -> torch.Tensor:
    if route == "gemm":
        return torch.ops.circtune.block_circulant_kernel_grad(g, x, p, scale, config)
    return torch.ops.circtune.block_circulant_kernel_grad_spectral(g, x, p, scale, route)


def choose_kernel_grad_route(g: torch.Tensor, x: torch.Tensor, p: int, scale: float = 1.0) -> str:
    """The route for this problem: timed once per key on CUDA (the GEMM route with its own autotuned tile against
    both spectral ones), :func:`default_kernel_grad_route` elsewhere."""
    from ._tuning import autotune_route, input_precision, layout, size_bucket

    if x.device.type != "cuda":
        return default_kernel_grad_route(p)
    tokens = x.shape[0]
    # What changes any route's speed besides the device (added by autotune_route): both dtypes, the GEMM route's
    # dot precision and operand layouts, the token bucket and the block structure.
    key = ("block_circulant_kernel_grad route", g.dtype, x.dtype, input_precision(x.dtype), layout(g), layout(x),
           size_bucket(tokens), tokens % 16 == 0, g.shape[1] // p, x.shape[1], p)
    return autotune_route(key, KERNEL_GRAD_ROUTES, lambda route: _run_kernel_grad(route, g, x, p, scale, []),
                          x.device)


def _setup_context(ctx, inputs, output) -> None:
    x, w, scale, weight, bias, _, input_grad_config, kernel_grad_config, kernel_grad_route = inputs
    ctx.save_for_backward(x, w, weight)
    ctx.scale, ctx.input_grad_config, ctx.kernel_grad_config = scale, input_grad_config, kernel_grad_config
    ctx.kernel_grad_route = kernel_grad_route
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, g: torch.Tensor):
    x, w, weight = ctx.saved_tensors
    dx = dw = dweight = dbias = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.circtune.block_circulant_input_grad(g, w, ctx.scale, weight, ctx.input_grad_config)
    if ctx.needs_input_grad[1]:
        p = w.shape[2]
        route = ctx.kernel_grad_route or ("gemm" if ctx.kernel_grad_config else
                                          choose_kernel_grad_route(g, x, p, ctx.scale))
        dw = _run_kernel_grad(route, g, x, p, ctx.scale, ctx.kernel_grad_config).to(w.dtype)
    if ctx.needs_input_grad[3]:
        dweight = (g.T.to(torch.float32) @ x.to(torch.float32)).to(weight.dtype)
    if ctx.needs_input_grad[4]:
        dbias = g.sum(0, dtype=torch.float64 if g.dtype == torch.float64 else torch.float32).to(ctx.bias_dtype)
    return dx, dw, None, dweight, dbias, None, None, None, None


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


@register_flop_formula(torch.ops.circtune.block_circulant_kernel_grad_spectral)
def _kernel_grad_spectral_flops(g_shape, x_shape, block_size, scale, transform, *args, out_shape=None,
                                **kwargs) -> int:
    from circtune.measure.flops import spectral_kernel_grad_flops

    p = block_size
    return round(spectral_kernel_grad_flops(g_shape[0], x_shape[1] // p, g_shape[1] // p, p, transform))


# --------------------------------------------------------------------------------------------------- entry points
def block_circulant_linear(x: torch.Tensor, w: torch.Tensor, *, scale: float = 1.0, weight: torch.Tensor | None = None,
                           bias: torch.Tensor | None = None, forward_config: TileConfig | None = None,
                           input_grad_config: TileConfig | None = None,
                           kernel_grad_config: TileConfig | None = None,
                           kernel_grad_route: str | None = None) -> torch.Tensor:
    """``x · (scale·C(w) + weight)ᵀ + bias`` over the last axis of ``x [..., q_in·p]`` -> ``[..., q_out·p]``.

    ``w [q_out, q_in, p]``; ``weight`` (``[q_out·p, q_in·p]``) and ``bias`` optional. Output in ``x``'s dtype;
    ``w``'s gradient in ``w``'s dtype; under autocast ``x``, ``weight`` and ``bias`` are cast to the autocast dtype
    first, as ``F.linear`` would. The three configs set the tiles of the three kernels (None: autotuned).
    ``kernel_grad_route`` (:data:`KERNEL_GRAD_ROUTES`) fixes the kernel gradient's route; None chooses it per
    problem (the GEMM route when ``kernel_grad_config`` is given).
    """
    if w.dim() != 3 or x.shape[-1] != w.shape[1] * w.shape[2]:
        raise ValueError(f"block_circulant_linear: kernel of shape {tuple(w.shape)} does not fit input of shape "
                         f"{tuple(x.shape)}: expected x[..., q_in * p] for w[q_out, q_in, p]")
    check_kernel_grad_route(kernel_grad_route)
    if kernel_grad_route in ("rfft", "dft") and kernel_grad_config is not None:
        raise ValueError(f"kernel_grad_config is a tile of the GEMM route; kernel_grad_route={kernel_grad_route!r} "
                         "takes none")
    if torch.is_autocast_enabled(x.device.type):
        # As F.linear under autocast: the GEMM runs in the autocast dtype. (w stays as it is: its tile is generated
        # in fp32 and rounded once, and its gradient comes back in w's dtype.)
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = (t.to(dtype) if t is not None else None for t in (x, weight, bias))
    lead = x.shape[:-1]
    y = torch.ops.circtune.block_circulant_linear(
        x.reshape(-1, x.shape[-1]), w, float(scale), weight, bias,
        _encode(forward_config, "block_circulant_matmul"), _encode(input_grad_config, "block_circulant_matmul"),
        _encode(kernel_grad_config, "block_circulant_kernel_grad"), kernel_grad_route or "")
    return y.reshape(*lead, y.shape[-1])


def block_circulant_linear_reference(x: torch.Tensor, w: torch.Tensor, *, scale: float = 1.0,
                                     weight: torch.Tensor | None = None,
                                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same op in plain torch (differentiable by autograd): the baseline the kernels are profiled against."""
    from .block_circulant_matmul import block_circulant_matmul_reference

    lead = x.shape[:-1]
    y = block_circulant_matmul_reference(x.reshape(-1, x.shape[-1]), w, scale=scale, weight=weight, bias=bias)
    return y.reshape(*lead, y.shape[-1])
