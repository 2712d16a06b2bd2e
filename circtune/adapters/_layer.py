"""What C3A and CDVFT layers share: a frozen base ``nn.Linear``, a block size, a backend, merge and unmerge."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ._backends import get_backend
from ._circulant import block_circulant_matrix, check_transform


def valid_block_sizes(d_in: int, d_out: int) -> list[int]:
    """Every block size p that divides both dimensions (the divisors of their gcd)."""
    g = math.gcd(d_in, d_out)
    return [p for p in range(1, g + 1) if g % p == 0]


def check_block_size(block_size: int, d_in: int, d_out: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise ValueError(f"block_size must be an int, got {block_size!r}")
    valid = valid_block_sizes(d_in, d_out)
    if block_size not in valid:
        raise ValueError(f"block_size={block_size} does not divide the layer's shape (d_in={d_in}, d_out={d_out}); "
                         f"valid block sizes: {', '.join(map(str, valid))}")
    return block_size


class CirculantLinear(nn.Module):
    """Base of the circulant-family adapters: ``forward(x) = base_layer(x) + ΔW x``.

    Subclasses define the factors: ``circulant_factors()`` (kernels ``[q_out, q_in, p]``, applied first to last),
    ``diagonal_factors()`` (None, or one more vector than circulants, interleaved), ``circulant_scale`` and
    ``alpha``. The base layer's parameters are frozen.
    """

    method: str = ""
    alpha: float = 1.0
    circulant_scale: float = 1.0

    def __init__(self, base: nn.Linear, block_size: int, *, transform: str = "rfft", backend: str = "torch"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps an nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.block_size = check_block_size(block_size, self.in_features, self.out_features)
        self.transform = check_transform(transform)
        self._backend = get_backend(backend)
        self.base_layer = base
        base.requires_grad_(False)
        self.merged = False

    @property
    def backend(self) -> str:
        return self._backend.name

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = get_backend(name)

    @property
    def weight(self) -> torch.Tensor:
        # Code that reads `layer.weight` of a linear layer (tied embeddings, dtype probes) keeps working.
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def circulant_factors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def diagonal_factors(self) -> list[torch.Tensor] | None:
        return None

    def _param_device_dtype(self) -> dict:
        w = self.base_layer.weight
        return {"device": w.device, "dtype": torch.float32}

    def delta_weight(self) -> torch.Tensor:
        """ΔW as a dense ``[d_out, d_in]`` matrix in the parameters' dtype (differentiable)."""
        diagonals = self.diagonal_factors()
        delta = None
        for k, kernel in enumerate(self.circulant_factors()):
            c = block_circulant_matrix(kernel) * self.circulant_scale
            if diagonals is not None:
                # C_k diag(D_k) (left of it what came before): scale the columns.
                c = c * diagonals[k]
            delta = c if delta is None else c @ delta
        if diagonals is not None:
            delta = (diagonals[-1] * self.alpha).unsqueeze(1) * delta
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return self._backend.forward(self, x)

    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW into the base weight; forward then costs the base layer alone."""
        if self.merged:
            warnings.warn(f"{type(self).__name__} is already merged; nothing to do", stacklevel=2)
            return
        w = self.base_layer.weight
        w.add_(self.delta_weight().to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW from the base weight again (exact up to the weight dtype's rounding)."""
        if not self.merged:
            warnings.warn(f"{type(self).__name__} is not merged; nothing to do", stacklevel=2)
            return
        w = self.base_layer.weight
        w.sub_(self.delta_weight().to(w.dtype))
        self.merged = False

    def adapter_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The adapter's own parameters (the base layer's excluded), by name."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("base_layer.")]

    def num_adapter_params(self) -> int:
        return sum(p.numel() for _, p in self.adapter_named_parameters())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"transform={self.transform!r}, backend={self.backend!r}, merged={self.merged}")
