"""The module to measure for a :class:`~circtune.candidate.Candidate`, around a frozen ``nn.Linear``: what the method
registry builds for its method (circtune's adapter layers, or the references: the base layer itself, LoRA, PEFT's
C3A layer when PEFT is installed)."""

from __future__ import annotations

from torch import nn

from ..adapters._references import LoRALinear, peft_available
from ..adapters.inject import build_layer
from ..candidate import Candidate


def build_module(candidate: Candidate, base: nn.Linear) -> nn.Module:
    """The layer to measure for ``candidate``; ``base`` is frozen here and wrapped, not copied."""
    base.requires_grad_(False)
    if candidate.spec.is_adapter:
        return build_layer(base, candidate.layer_config())  # with the config's defaults for the method's options
    return candidate.spec.build(base, block_size=candidate.block_size, factors=candidate.factors)


__all__ = ["LoRALinear", "build_module", "peft_available"]
