"""Build the module a :class:`~circtune.space.Candidate` describes around a frozen ``nn.Linear``.

Adapter candidates become circtune's own layers (:func:`circtune.adapters.inject.build_layer`); the baselines are
the base layer itself (``none``), :class:`LoRALinear` (``lora``) and PEFT's ``C3ALinear`` (``peft-c3a``, only
when PEFT is installed).
"""

from __future__ import annotations

import importlib.util
import math

import torch
from torch import nn

from ..adapters.inject import build_layer
from ..space import Candidate


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


def build_module(candidate: Candidate, base: nn.Linear) -> nn.Module:
    """The layer to measure for ``candidate``; ``base`` is frozen here and wrapped, not copied."""
    base.requires_grad_(False)
    if candidate.method == "none":
        return base
    if candidate.method == "lora":
        return LoRALinear(base, candidate.factors)
    if candidate.method == "peft-c3a":
        if not peft_available():
            raise RuntimeError("peft-c3a baseline needs PEFT: pip install 'circtune[peft]'")
        from peft import C3AConfig
        from peft.tuners.c3a.layer import C3ALinear as PeftC3ALinear
        from peft.tuners.tuners_utils import cast_adapter_dtype

        p = candidate.block_size
        layer = PeftC3ALinear(base, "default", C3AConfig(block_size=p, init_weights="gaussian"), p)
        cast_adapter_dtype(layer, "default")  # float32 kernel, as get_peft_model leaves it
        base.requires_grad_(False)
        return layer
    return build_layer(base, candidate.layer_config())
