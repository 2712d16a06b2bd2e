"""FLOPs of one layer: forward with fvcore's ``FlopCountAnalysis``, forward + backward with ``FlopCounterMode``.

Conventions (both counters, and the closed forms below)
-------------------------------------------------------
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

Closed forms (:func:`analytic_flops`); T tokens, G = 2·T·d_in·d_out the base GEMM
--------------------------------------------------------------------------------
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

from ..adapters._circulant import _LOOP_MAX_PAIRS, DENSE_SPECTRAL_MIN_P, check_transform

# The triton backend's rule off CUDA (kernels/block_circulant_linear.SPECTRAL_MIN_P; that module needs Triton, this
# one does not): the kernel gradient is spectral from this block size on.
SPECTRAL_MIN_P = 8

aten = torch.ops.aten
METHODS = ("none", "lora", "c3a", "cdvft", "peft-c3a")


@dataclass(frozen=True)
class FlopCounts:
    fwd: int  # forward FLOPs (fvcore FlopCountAnalysis, converted to FLOPs = 2 x MACs)
    fwd_bwd: int  # forward + backward FLOPs (FlopCounterMode)


def fft_flops(n: int, transforms: int = 1, *, real: bool) -> float:
    """Nominal FLOPs of ``transforms`` FFTs of length ``n``: 5 n log2 n each, half that when ``real`` (real input
    or real output)."""
    return (2.5 if real else 5.0) * n * math.log2(n) * transforms if n > 1 else 0.0


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


# --- closed forms ----------------------------------------------------------------------------------------------

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


def analytic_flops(method: str, d_in: int, d_out: int, tokens: int, *, block_size: int | None = None,
                   factors: int | None = None, transform: str = "rfft", backend: str = "torch",
                   rank: int | None = None, kernel_grad_route: str | None = None) -> FlopCounts:
    """The closed forms of the module docstring: what :func:`count_flops` should report for ``method``'s layer on
    ``tokens`` tokens of a frozen ``d_in → d_out`` linear, x requiring grad. ``factors`` (CDVFT) defaults to 2.
    ``kernel_grad_route`` (backend triton: gemm, rfft or dft) defaults to the rule used off CUDA."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; valid methods: {', '.join(METHODS)}")
    gemm = 2 * tokens * d_in * d_out
    if method == "none":
        return FlopCounts(gemm, 2 * gemm)
    if method == "lora":
        adapter = 2 * tokens * _require(rank, "rank", method) * (d_in + d_out)
        return FlopCounts(gemm + adapter, 2 * gemm + 3 * adapter)

    p = _require(block_size, "block_size", method)
    if d_in % p or d_out % p:
        raise ValueError(f"block_size={p} does not divide the layer's shape (d_in={d_in}, d_out={d_out})")
    q_in, q_out = d_in // p, d_out // p
    if method == "peft-c3a":
        fwd, bwd = _peft_c3a_flops(tokens, q_in, q_out, p)
        return FlopCounts(round(gemm + fwd), round(2 * gemm + fwd + bwd))

    m = 2 if method == "c3a" or factors is None else _require(factors, "factors", method)
    if m < 2:
        raise ValueError(f"factors={m} is not supported for CDVFT: it needs an int >= 2")
    if backend == "dense":
        if method == "c3a":
            route = "rfft" if p >= DENSE_SPECTRAL_MIN_P else "gemm"
            return FlopCounts(gemm, round(2 * gemm + spectral_kernel_grad_flops(tokens, q_in, q_out, p, route)))
        chain = (m - 2) * 2 * d_out * d_out * d_in
        return FlopCounts(gemm + chain, 3 * gemm + 3 * chain)
    if backend == "triton":
        route = kernel_grad_route or ("rfft" if p >= SPECTRAL_MIN_P else "gemm")
        kgrad = sum(spectral_kernel_grad_flops(tokens, qi, q_out, p, route) for qi in [q_in] + [q_out] * (m - 2))
        if method == "c3a":
            return FlopCounts(gemm, round(2 * gemm + kgrad))
        factors_flops = gemm + (m - 2) * 2 * tokens * d_out * d_out
        return FlopCounts(gemm + factors_flops, round(2 * gemm + 2 * factors_flops + kgrad))
    if backend != "torch":
        raise ValueError(f"backend={backend!r} has no closed form; valid backends: torch, dense, triton")
    check_transform(transform)
    fwd = bwd = 0.0
    for qi in [q_in] + [q_out] * (m - 2):
        f, b = _product_flops(tokens, qi, q_out, p, transform)
        fwd, bwd = fwd + f, bwd + b
    return FlopCounts(round(gemm + fwd), round(2 * gemm + fwd + bwd))
