"""Backends: how a layer computes ``base(x) + ΔW x``. Chosen per layer by name from one registry.

* ``torch``: the transform route, hand-written backward: ``transform`` picks torch.fft's rfft or fft, or dft (real
  GEMMs against cos/sin bases, circtune.adapters._dft).
* ``dense``: materialise ΔW from the parameters and fold it into the frozen weight, so forward and input
  gradient are the one GEMM the base layer needs anyway; the kernel gradient is spectral (rfft of x and g, a
  per-frequency token reduction; ``gᵀx`` summed along the circulant diagonals for p < 8). The transform knob does
  not apply.

The ``triton`` backend (circtune.kernels.triton_backend) is registered by circtune.adapters when Triton is
installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ._circulant import block_circulant_product, dense_block_circulant_linear

if TYPE_CHECKING:
    from ._layer import CirculantLinear


@dataclass(frozen=True)
class Backend:
    name: str
    # (layer, x) -> base(x) + ΔW x, for any CirculantLinear (C3A and CDVFT share the factor structure).
    forward: Callable[[CirculantLinear, torch.Tensor], torch.Tensor]
    # device -> None when usable there, else the reason it is not (the search space records it).
    unavailable_reason: Callable[[torch.device], str | None]
    uses_transform: bool
    # (p, d_in, d_out) -> None when the backend covers block size p for that shape, else why not (the search space
    # records it); None: every p.
    block_size_reason: Callable[[int, int, int], str | None] | None = None


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    if backend.name in _REGISTRY:
        raise ValueError(f"backend {backend.name!r} is already registered; registered: {', '.join(_REGISTRY)}")
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend={name!r} is not supported; valid backends: {', '.join(available_backends())}") \
            from None


def available_backends() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def _factored_delta(layer: CirculantLinear, x: torch.Tensor) -> torch.Tensor:
    """ΔW x applied factor by factor, right to left: diagonal, circulant, diagonal, ..."""
    h = x
    diagonals = layer.diagonal_factors()
    for k, kernel in enumerate(layer.circulant_factors()):
        if diagonals is not None:
            h = h * diagonals[k].to(h.dtype)
        h = block_circulant_product(h, kernel, scale=layer.circulant_scale, transform=layer.transform)
    if diagonals is not None:
        h = h * (diagonals[-1] * layer.alpha).to(h.dtype)
    return h


def _torch_forward(layer: CirculantLinear, x: torch.Tensor) -> torch.Tensor:
    return layer.base_layer(x) + _factored_delta(layer, x)


def _dense_forward(layer: CirculantLinear, x: torch.Tensor) -> torch.Tensor:
    base = layer.base_layer
    kernels = layer.circulant_factors()
    if len(kernels) == 1 and layer.diagonal_factors() is None:  # C3A: spectral kernel gradient, one fused add
        return dense_block_circulant_linear(x, kernels[0], scale=layer.circulant_scale, weight=base.weight,
                                            bias=base.bias)
    weight = base.weight + layer.delta_weight().to(base.weight.dtype)
    return F.linear(x, weight, base.bias)


def _always(device: torch.device) -> None:
    return None


register_backend(Backend("torch", _torch_forward, _always, True))  # transform route (rfft, fft, dft), own backward
register_backend(Backend("dense", _dense_forward, _always, False))  # materialised ΔW folded into the base GEMM
