"""CDVFT: ΔW = α · D_m C_{m−1} D_{m−1} ⋯ C_1 D_1, circulant and diagonal factors (Ding et al., IJCAI 2025)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._layer import CirculantLinear


def cdvft_num_params(d_in: int, d_out: int, block_size: int, factors: int = 2) -> int:
    """``d_in + (m−1)·d_out + d_in·d_out/p + (m−2)·d_out²/p`` for m = ``factors``."""
    m, p = factors, block_size
    return d_in + (m - 1) * d_out + d_in * d_out // p + (m - 2) * d_out * d_out // p


class CDVFTLinear(CirculantLinear):
    """``base(x) + α · D_m C_{m−1} ⋯ C_1 D_1 x``, factors applied right to left.

    ``diagonals``: m vectors, the first of length d_in, the others d_out. ``circulants``: m − 1 block-circulant
    kernels (same orientation as C3A, no 1/d_in scale), the first ``[d_out/p, d_in/p, p]``, the others
    ``[d_out/p, d_out/p, p]``. Initialised with the last diagonal zero (ΔW = 0 at step 0, and that diagonal
    has a gradient), the other diagonals one, the circulants uniform in ±1/sqrt(fan_in) so that each factor
    roughly keeps the activation's scale.
    """

    method = "cdvft"

    def __init__(self, base: nn.Linear, block_size: int, factors: int = 2, *, alpha: float = 1.0,
                 transform: str = "rfft", backend: str = "torch"):
        super().__init__(base, block_size, transform=transform, backend=backend)
        if isinstance(factors, bool) or not isinstance(factors, int) or factors < 2:
            raise ValueError(f"factors={factors!r} is not supported for CDVFT: it needs an int >= 2 "
                             "(m diagonal factors interleaved with m-1 circulant ones)")
        self.factors = factors
        self.alpha = float(alpha)
        d_in, d_out, p = self.in_features, self.out_features, self.block_size
        kw = self._param_device_dtype()
        self.diagonals = nn.ParameterList(
            [nn.Parameter(torch.empty(d_in if k == 0 else d_out, **kw)) for k in range(factors)])
        self.circulants = nn.ParameterList(
            [nn.Parameter(torch.empty(d_out // p, (d_in if k == 0 else d_out) // p, p, **kw))
             for k in range(factors - 1)])
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for k, d in enumerate(self.diagonals):
            nn.init.zeros_(d) if k == len(self.diagonals) - 1 else nn.init.ones_(d)
        for k, c in enumerate(self.circulants):
            fan_in = self.in_features if k == 0 else self.out_features
            nn.init.uniform_(c, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    def circulant_factors(self) -> list[torch.Tensor]:
        return list(self.circulants)

    def diagonal_factors(self) -> list[torch.Tensor]:
        return list(self.diagonals)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, factors={self.factors}, alpha={self.alpha}"
