"""Is a backend's result right? One step of a candidate layer compared with the torch backend, before it is timed.

NaN/Inf checks catch a kernel that blows up, not one that is wrong but finite (an off-by-one in a tile edge, a
wrong index in the generated circulant tile): such a kernel would be timed, could be the fastest and be picked.
So every candidate whose backend is not the reference (``torch``) runs one forward and backward on the
profiler's input and upstream gradient, and its output, input gradient and adapter-parameter gradients must match
the torch backend's on the same device, to the activation dtype's tolerance.

The comparison runs on a copy of the layer with random adapter parameters: the adapters start with ΔW = 0 (C3A's
zero kernel), where a wrong forward kernel would still return the base layer's output. The random parameters are
scaled so that ΔW x and the base layer's output have about the same size: both halves of a fused kernel (the
generated circulant tile and the frozen weight's tile) then show their errors against the same yardstick.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ..adapters._backends import _torch_forward
from ..adapters._layer import CirculantLinear

REFERENCE_BACKEND = "torch"

# Largest |candidate - reference| allowed, as a fraction of the reference tensor's largest magnitude. A backend
# may round differently from the reference (TF32 for fp32 matmuls, W0 + ΔW rounded once to bf16/fp16 before
# the GEMM, other summation orders): about one unit in the last place of the dtype, with room to spare. A wrong
# kernel is off by the size of the values themselves. float64 activations keep float32 adapter parameters (the
# dense backend builds ΔW in their dtype): float32's rounding, not float64's.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class WrongResultError(RuntimeError):
    """A backend's result differs from the reference backend's by more than the tolerance."""


def needs_check(layer: nn.Module) -> bool:
    """Whether ``layer`` runs a backend that must be checked against the reference."""
    return isinstance(layer, CirculantLinear) and layer.backend != REFERENCE_BACKEND


def _reference(layer: CirculantLinear, x: torch.Tensor) -> torch.Tensor:
    # The torch backend's own function, not whatever the registry holds under its name: the yardstick stays fixed.
    return _torch_forward(layer, x)


def _step(layer: CirculantLinear, forward: Callable[[CirculantLinear, torch.Tensor], torch.Tensor], x: torch.Tensor,
          grad: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    x = x.detach().clone().requires_grad_()
    params = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    for _, p in params:
        p.grad = None
    y = forward(layer, x)
    y.backward(grad)
    return [("forward output", y.detach()), ("input gradient", x.grad),
            *((f"gradient of {n}", p.grad) for n, p in params)]


@torch.no_grad()
def _randomise(layer: CirculantLinear, x: torch.Tensor, seed: int) -> None:
    """Random adapter parameters, scaled so that ΔW x is about as large as the base layer's output. ΔW is linear in
    each trainable tensor (kernels, diagonals), so scaling each of the n tensors by r^(1/n) scales ΔW x by r."""
    params = [p for p in layer.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32))
    base = layer.base_layer(x).float()
    delta = _reference(layer, x).float() - base
    ratio = float(base.std() / delta.std()) if delta.numel() > 1 else 1.0
    if params and ratio > 0 and ratio != float("inf"):  # (nan compares False)
        for p in params:
            p.mul_(ratio ** (1 / len(params)))


def check_against_reference(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, *, seed: int = 0) -> None:
    """Raise :class:`WrongResultError` naming the first tensor (output, input gradient, a parameter's gradient) of
    one step of ``layer`` that differs from the reference backend's; nothing for a layer that needs no check.
    ``layer`` itself is not changed (a copy is run)."""
    if not needs_check(layer):
        return
    tolerance = TOLERANCE.get(x.dtype, TOLERANCE[torch.float32])
    probe = copy.deepcopy(layer)
    backend = probe.backend
    _randomise(probe, x, seed)
    actual = _step(probe, lambda layer, x: layer(x), x, grad)  # through its backend, as the profiler runs it
    expected = _step(probe, _reference, x, grad)
    for (what, a), (_, b) in zip(actual, expected, strict=True):
        if a is None or b is None:
            if (a is None) != (b is None):
                raise WrongResultError(f"{backend}: {what} is {'missing' if a is None else 'unexpected'}")
            continue
        if a.shape != b.shape:
            raise WrongResultError(f"{backend}: {what} has shape {tuple(a.shape)}, the {REFERENCE_BACKEND} "
                                   f"backend's {tuple(b.shape)}")
        reference = b.double()
        size = float(reference.abs().max()) if reference.numel() else 0.0
        error = float((a.double() - reference).abs().max()) if reference.numel() else 0.0
        if not error <= tolerance * size:  # NaN fails too
            relative = error / size if size else float("inf")
            raise WrongResultError(f"{backend}: {what} differs from the {REFERENCE_BACKEND} backend's by "
                                   f"{relative:.3g} of its largest value (tolerance {tolerance:g} in "
                                   f"{str(x.dtype).removeprefix('torch.')})")
