"""FLOPs of one layer: forward with fvcore's ``FlopCountAnalysis``, forward + backward with ``FlopCounterMode``.

Conventions (both counters, and the closed forms of :mod:`circtune.adapters._flops`)
-----------------------------------------------------------------------------------
* **FLOPs = 2 × MACs.** fvcore's built-in handles return multiply-adds: our fvcore handles return FLOPs / 2 and
  :func:`count_flops` doubles fvcore's total. ``FlopCounterMode`` already counts 2 per MAC for mm/addmm/bmm.
* **FFTs, nominal (benchFFT) counts**, per transform of length n, whatever n's factors are: complex-to-complex
  (``fft_fft``/``fft_ifft`` of complex input; ``_fft_c2c``) 5 n log2 n; real input (``fft_rfft``, ``fft_fft`` of a
  real tensor; ``_fft_r2c``, onesided or not) 2.5 n log2 n; complex-to-real inverse (``fft_irfft``; ``_fft_c2r``,
  n = output length) 2.5 n log2 n. The batch is the number of transforms.
* **Complex arithmetic in real FLOPs:** complex × complex elementwise multiply 6 per output element; complex × real
  (tensor or scalar) 2; complex add/sub 2 per output element; complex sum 2 per addition performed (input numel −
  output numel); complex mm/bmm/matmul/einsum/linear 8 per complex MAC (4 real MACs).
* **Not counted**, as in both libraries' defaults: real elementwise work (scales, diagonal multiplies, residual adds,
  the bias, real reductions such as a bias or diagonal gradient, ``index_add``), gathers, copies, conj, ``.real``.

PEFT's C3A is an autograd Function, which the JIT trace shows to fvcore as one opaque
``prim::PythonOp.BlockCircularConvolution``: it gets a handle counting what its forward runs (two real-input
transforms, a complex einsum (a bmm), a complex transform), so fvcore's forward count is meaningful.
``FlopCounterMode`` works at dispatch level and sees inside it (and inside ours) without help.
"""

from __future__ import annotations

import importlib.util
import math
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import (
    addmm_flop_jit,
    bmm_flop_jit,
    einsum_flop_jit,
    get_shape,
    linear_flop_jit,
    matmul_flop_jit,
)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from ..adapters._flops import SPECTRAL_MIN_P, fft_flops, spectral_kernel_grad_flops
from ..adapters.methods import get_method

aten = torch.ops.aten


@dataclass(frozen=True)
class FlopCounts:
    fwd: int  # forward FLOPs (fvcore FlopCountAnalysis, converted to FLOPs = 2 x MACs)
    fwd_bwd: int  # forward + backward FLOPs (FlopCounterMode)


# --- dispatch level (FlopCounterMode): formulas get the raw arguments (`_get_raw`), so they see dtypes ----------

def _raw(fn: Callable) -> Callable:
    fn._get_raw = True
    return fn


def _is_complex(v) -> bool:
    return v.is_complex() if isinstance(v, torch.Tensor) else isinstance(v, complex)


@_raw
def _r2c_flops(x, dim, *args, out_val=None, **kwargs) -> float:
    n = math.prod(x.shape[d] for d in dim)
    return fft_flops(n, x.numel() // n, real=True)


@_raw
def _c2r_flops(x, dim, *args, out_val=None, **kwargs) -> float:
    n = math.prod(out_val.shape[d] for d in dim)
    return fft_flops(n, out_val.numel() // n, real=True)


@_raw
def _c2c_flops(x, dim, *args, out_val=None, **kwargs) -> float:
    n = math.prod(x.shape[d] for d in dim)
    return fft_flops(n, x.numel() // n, real=False)


@_raw
def _mul_flops(a, b, *args, out_val=None, **kwargs) -> int:
    if not out_val.is_complex():
        return 0
    return (6 if _is_complex(a) and _is_complex(b) else 2) * out_val.numel()


@_raw
def _add_flops(a, *args, out_val=None, **kwargs) -> int:
    return 2 * out_val.numel() if out_val.is_complex() else 0


@_raw
def _sum_flops(a, *args, out_val=None, **kwargs) -> int:
    return 2 * (a.numel() - out_val.numel()) if a.is_complex() else 0


def _complex_gemm(default: Callable) -> Callable:
    """torch's formula (2 per MAC), times 4 when the operands are complex (one complex MAC = 4 real MACs)."""
    @_raw
    def formula(*args, out_val=None, **kwargs) -> int:
        flops = default(*args, out_val=out_val, **kwargs)
        return 4 * flops if out_val.is_complex() else flops
    return formula


FLOP_COUNTER_FORMULAS = types.MappingProxyType({
    aten._fft_r2c: _r2c_flops, aten._fft_c2r: _c2r_flops, aten._fft_c2c: _c2c_flops,
    aten.mul: _mul_flops, aten.mul_: _mul_flops,
    aten.add: _add_flops, aten.add_: _add_flops, aten.sub: _add_flops, aten.sub_: _add_flops,
    aten.sum: _sum_flops,
    **{op: _complex_gemm(flop_registry[op]) for op in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm)},
})


# --- JIT level (fvcore): handles get torch._C.Value inputs/outputs and return MACs, i.e. FLOPs / 2 ---------------

def _jit_is_complex(v) -> bool:
    t = v.type()
    if isinstance(t, torch._C.TensorType):
        return (t.scalarType() or "").startswith("Complex")
    return isinstance(t, torch._C.ComplexType)


def _jit_constant(v):
    return v.toIValue() if v.node().kind() == "prim::Constant" else None


def _jit_fft(kind: str) -> Callable:
    """Handle for ``aten::fft_{fft,ifft,rfft,irfft}(self, n, dim, norm)``; kind is "c2c", "r2c" or "c2r"."""
    def handle(inputs, outputs) -> float:
        out = get_shape(outputs[0])
        dim = _jit_constant(inputs[2])
        dim = -1 if dim is None else dim
        if kind == "r2c":  # the output holds n//2 + 1 frequencies: read n from the argument or the input
            n = _jit_constant(inputs[1]) or get_shape(inputs[0])[dim]
        else:
            n = out[dim]
        real = kind != "c2c" or not _jit_is_complex(inputs[0])
        return fft_flops(n, math.prod(out) // out[dim], real=real) / 2
    return handle


def _jit_mul(inputs, outputs) -> float:
    if not _jit_is_complex(outputs[0]):
        return 0
    per = 6 if _jit_is_complex(inputs[0]) and _jit_is_complex(inputs[1]) else 2
    return per * math.prod(get_shape(outputs[0])) / 2


def _jit_add(inputs, outputs) -> float:
    return 2 * math.prod(get_shape(outputs[0])) / 2 if _jit_is_complex(outputs[0]) else 0


def _jit_sum(inputs, outputs) -> float:
    if not _jit_is_complex(inputs[0]):
        return 0
    return 2 * (math.prod(get_shape(inputs[0])) - math.prod(get_shape(outputs[0]))) / 2


def _jit_complex_gemm(default: Callable) -> Callable:
    def handle(inputs, outputs) -> float:
        return default(inputs, outputs) * (4 if _jit_is_complex(outputs[0]) else 1)
    return handle


def _jit_peft_c3a(inputs, outputs) -> float:
    """PEFT's ``BlockCircularConvolution.forward``: ifft(x) and fft(w) of real input, einsum (a complex bmm), fft."""
    x, (q_out, q_in, p) = get_shape(inputs[0]), get_shape(inputs[1])
    tokens = math.prod(x) // x[-1]
    flops = (fft_flops(p, tokens * q_in + q_out * q_in, real=True) + 8 * tokens * q_in * q_out * p
             + fft_flops(p, tokens * q_out, real=False))
    return flops / 2


def _fvcore_handles() -> dict[str, Callable]:
    gemms = {"aten::addmm": addmm_flop_jit, "aten::bmm": bmm_flop_jit, "aten::einsum": einsum_flop_jit,
             "aten::matmul": matmul_flop_jit, "aten::mm": matmul_flop_jit, "aten::linear": linear_flop_jit}
    return {
        "aten::fft_fft": _jit_fft("c2c"), "aten::fft_ifft": _jit_fft("c2c"),
        "aten::fft_rfft": _jit_fft("r2c"), "aten::fft_irfft": _jit_fft("c2r"),
        "aten::mul": _jit_mul, "aten::mul_": _jit_mul,
        "aten::add": _jit_add, "aten::add_": _jit_add, "aten::sub": _jit_add, "aten::sub_": _jit_add,
        "aten::sum": _jit_sum,
        **{op: _jit_complex_gemm(handle) for op, handle in gemms.items()},
        "prim::PythonOp.BlockCircularConvolution": _jit_peft_c3a,
    }


FVCORE_HANDLES = types.MappingProxyType(_fvcore_handles())


def _register_kernel_ops() -> None:
    """The triton backend's custom ops carry their FLOP formulas: import them now, so that every counter made from
    here on sees them (FlopCounterMode copies the formula registry when it is made). Imports no kernel."""
    if importlib.util.find_spec("triton") is None:
        return
    try:
        from ..kernels import block_circulant_linear  # noqa: F401
    except Exception:  # a broken Triton install: the backend reports it as unavailable itself
        pass


_register_kernel_ops()


def count_flops(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> FlopCounts:
    """Forward FLOPs (fvcore trace of ``module(x)``) and forward + backward FLOPs (``module(x).backward(grad)``
    under ``FlopCounterMode``), FLOPs = 2 × MACs. Gradients the backward leaves on ``x`` and the parameters are
    dropped again (any ``.grad`` held before is restored untouched)."""
    analysis = (FlopCountAnalysis(module, (x,)).set_op_handle(**FVCORE_HANDLES)
                .unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none"))
    fwd = round(2 * analysis.total())

    leaves = [p for p in module.parameters() if p.requires_grad] + ([x] if x.is_leaf and x.requires_grad else [])
    saved = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    try:
        with FlopCounterMode(display=False, custom_mapping=dict(FLOP_COUNTER_FORMULAS)) as counter:
            module(x).backward(grad)
    finally:
        for t, g in zip(leaves, saved):
            t.grad = g
    return FlopCounts(fwd=fwd, fwd_bwd=round(counter.get_total_flops()))


def analytic_flops(method: str, d_in: int, d_out: int, tokens: int, *, block_size: int | None = None,
                   factors: int | None = None, transform: str = "rfft", backend: str = "torch",
                   rank: int | None = None, kernel_grad_route: str | None = None) -> FlopCounts:
    """What :func:`count_flops` should report for ``method``'s layer on ``tokens`` tokens of a frozen
    ``d_in → d_out`` linear, x requiring grad: the method's closed form (:mod:`circtune.adapters._flops`, through
    the method registry). ``factors`` is CDVFT's m (default 2) and ``rank`` LoRA's r; ``kernel_grad_route``
    (backend triton: gemm, rfft or dft) defaults to the rule used off CUDA."""
    formula = get_method(method).flops
    fwd, fwd_bwd = formula(d_in, d_out, tokens, block_size=block_size, factors=rank if method == "lora" else factors,
                           transform=transform, backend=backend, kernel_grad_route=kernel_grad_route)
    return FlopCounts(round(fwd), round(fwd_bwd))


__all__ = ["FLOP_COUNTER_FORMULAS", "FVCORE_HANDLES", "SPECTRAL_MIN_P", "FlopCounts", "analytic_flops", "count_flops",
           "fft_flops", "spectral_kernel_grad_flops"]
