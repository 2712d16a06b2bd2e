"""The layers circtune measures beside its adapters, as references: LoRA (its own small module, PEFT's computation)
and PEFT's own C3A layer (only when PEFT is installed). Registered as methods of the ``reference`` role in
:mod:`circtune.adapters.methods`; they never appear in an adapter config.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from torch import nn


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) · B(A(x))``, PEFT's LoRA computation without dropout: A Kaiming-uniform, B zero.

    As in a model from ``peft.get_peft_model`` (``autocast_adapter_dtype=True``), the factors are float32 whatever
    the base dtype: the input is cast to float32 for them and their output back. (Half-precision factors would
    not train: AdamW's eps underflows in float16.)
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        self.base_layer = base.requires_grad_(False)
        kw = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **kw)
        self.scaling = (alpha if alpha is not None else 2 * rank) / rank
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        delta = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scaling
        return self.base_layer(x) + delta.to(x.dtype)


def peft_c3a_layer(base: nn.Linear, block_size: int) -> nn.Module:
    """PEFT's ``C3ALinear`` around ``base`` (frozen), its kernel float32 as ``get_peft_model`` leaves it."""
    if not peft_available():
        raise RuntimeError("the peft-c3a reference needs PEFT: pip install 'circtune[peft]'")
    from peft import C3AConfig
    from peft.tuners.c3a.layer import C3ALinear as PeftC3ALinear
    from peft.tuners.tuners_utils import cast_adapter_dtype

    layer = PeftC3ALinear(base, "default", C3AConfig(block_size=block_size, init_weights="gaussian"), block_size)
    cast_adapter_dtype(layer, "default")
    base.requires_grad_(False)
    return layer
