"""C3A: a block-circulant ΔW (Chen et al., "Parameter-Efficient Fine-Tuning via Circular Convolution")."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._layer import CirculantLinear

C3A_INITS = ("zeros", "gaussian", "xavier_uniform", "kaiming_uniform")


def c3a_num_params(d_in: int, d_out: int, block_size: int) -> int:
    """Trainable parameters of a C3A layer: ``d_in · d_out / p``."""
    return d_in * d_out // block_size


class C3ALinear(CirculantLinear):
    """``base(x) + (1/d_in) · C(kernel) x`` with ``kernel`` of shape ``[d_out/p, d_in/p, p]`` (float32).

    The same function as PEFT's ``C3ALinear`` for the same kernel tensor, so weights move both ways
    (:mod:`circtune.peft_interop`). ``init`` follows PEFT's names: ``zeros`` (ΔW = 0 at step 0; the kernel's
    gradient is not zero, so training moves), ``gaussian``, ``xavier_uniform``, ``kaiming_uniform``.
    """

    method = "c3a"

    def __init__(self, base: nn.Linear, block_size: int, *, transform: str = "rfft", backend: str = "torch",
                 init: str = "zeros"):
        super().__init__(base, block_size, transform=transform, backend=backend)
        if init not in C3A_INITS:
            raise ValueError(f"init={init!r} is not supported; valid inits: {', '.join(C3A_INITS)}")
        self.init = init
        p = self.block_size
        self.circulant_scale = 1.0 / self.in_features
        self.kernel = nn.Parameter(torch.empty(self.out_features // p, self.in_features // p, p,
                                               **self._param_device_dtype()))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.init == "zeros":
            nn.init.zeros_(self.kernel)
        elif self.init == "gaussian":
            nn.init.normal_(self.kernel)
        elif self.init == "xavier_uniform":
            a = math.sqrt(6.0 / (self.in_features + self.out_features))
            nn.init.uniform_(self.kernel, -a, a)
        else:
            a = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.kernel, -a, a)

    def circulant_factors(self) -> list[torch.Tensor]:
        return [self.kernel]
