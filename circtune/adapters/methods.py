"""The method registry: every way circtune adapts a frozen linear layer, or measures one beside its adapters.

A method is registered once (:func:`register_method`, as PEFT registers its tuners and torchao its config handlers)
and everything that depends on the method asks the registry instead of testing its name: the search space and the
candidate key (which fields key it, what its label says), the adapter config (which options an entry takes), the
layers put into a model, the profiler (which module to time), the FLOP counters' closed forms and the capacity score
(which set of weight updates it can express).

Two roles:

* ``adapter``: a circtune layer that an adapter config can name (``c3a``, ``cdvft``);
* ``reference``: measured beside the adapters so that every figure has something to be compared with, never put in
  an adapter config: the frozen base layer alone (``none``), LoRA with rank r (``lora``), PEFT's own C3A layer
  (``peft-c3a``).

Adding a method is one :class:`Method` here (or a :func:`register_method` call elsewhere): its layer, parameter
count, FLOP formula and the kind of update it expresses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from . import _flops
from ._references import LoRALinear, peft_c3a_layer
from .c3a import C3ALinear, c3a_num_params
from .cdvft import CDVFTLinear, cdvft_num_params

ROLES = ("adapter", "reference")
# The sets of updates ΔW a method can express; the capacity score has one rule per set (circtune.capacity).
EXPRESSES = ("nothing", "low-rank", "block-circulant", "circulant-diagonal")


@dataclass(frozen=True)
class Method:
    """One method and what the rest of circtune needs to know about it.

    ``num_params(d_in, d_out, block_size, factors)`` counts the trainable parameters it adds; ``build(base, *,
    block_size, factors, transform, backend, **options)`` wraps a frozen ``nn.Linear``; ``flops(d_in, d_out, tokens,
    *, block_size, factors, transform, backend, kernel_grad_route)`` is its closed form (forward, forward + backward).
    ``factors`` is the letter its ``factors`` field goes by in labels (CDVFT's ``m``, LoRA's ``r``), None when the
    method has no such field; ``options`` are the adapter-config keys it takes beyond the key, with their defaults.
    """

    name: str
    role: str
    title: str  # how charts and prose name it
    expresses: str
    num_params: Callable[[int, int, int | None, int | None], int]
    build: Callable[..., nn.Module]
    flops: Callable[..., tuple[float, float]]
    block_size: bool = True
    factors: str | None = None
    min_factors: int = 1
    default_factors: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    layer_class: type[nn.Module] | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"method {self.name!r}: role {self.role!r} is not one of {', '.join(ROLES)}")
        if self.expresses not in EXPRESSES:
            raise ValueError(f"method {self.name!r}: expresses {self.expresses!r} is not one of "
                             f"{', '.join(EXPRESSES)}")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def is_adapter(self) -> bool:
        return self.role == "adapter"

    def label(self, block_size: int | None = None, factors: int | None = None, transform: str | None = None,
              backend: str | None = None) -> str:
        """``c3a p=256 rfft/torch``, ``cdvft p=64 m=3 dense``, ``lora r=8``, ``peft-c3a p=16``; a method keyed by
        nothing is its title (``base layer``)."""
        if not self.block_size and self.factors is None:
            return self.title
        parts = [self.name]
        if self.block_size:
            parts.append(f"p={block_size}")
        if self.factors and factors is not None:
            parts.append(f"{self.factors}={factors}")
        if backend:
            parts.append(f"{transform}/{backend}" if transform else backend)
        return " ".join(parts)


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (a name is registered once)."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered; registered: {', '.join(_REGISTRY)}")
    _REGISTRY[method.name] = method
    return method


def find_method(name: str) -> Method | None:
    """The registered method ``name``, or None (a row of a method this installation does not know)."""
    return _REGISTRY.get(name) if isinstance(name, str) else None


def get_method(name: str) -> Method:
    method = find_method(name)
    if method is None:
        raise ValueError(f"method={name!r} is not supported; valid methods: {', '.join(_REGISTRY)}")
    return method


def method_names(role: str | None = None) -> tuple[str, ...]:
    """The registered methods (of ``role``), in registration order."""
    return tuple(name for name, m in _REGISTRY.items() if role is None or m.role == role)


# ---- the built-in methods -------------------------------------------------------------------------------------

def _base_layer(base: nn.Linear, **_) -> nn.Module:
    return base


def _lora(base: nn.Linear, *, factors: int, **_) -> nn.Module:
    return LoRALinear(base, factors)


def _peft_c3a(base: nn.Linear, *, block_size: int, **_) -> nn.Module:
    return peft_c3a_layer(base, block_size)


def _c3a(base: nn.Linear, *, block_size: int, transform: str = "rfft", backend: str = "torch", init: str = "zeros",
         **_) -> nn.Module:
    return C3ALinear(base, block_size, transform=transform, backend=backend, init=init)


def _cdvft(base: nn.Linear, *, block_size: int, factors: int | None = None, transform: str = "rfft",
           backend: str = "torch", alpha: float = 1.0, **_) -> nn.Module:
    return CDVFTLinear(base, block_size, factors or 2, alpha=alpha, transform=transform, backend=backend)


def _no_params(d_in: int, d_out: int, block_size: int | None, factors: int | None) -> int:
    return 0


def _lora_params(d_in: int, d_out: int, block_size: int | None, rank: int | None) -> int:
    return rank * (d_in + d_out)


def _c3a_params(d_in: int, d_out: int, block_size: int | None, factors: int | None) -> int:
    return c3a_num_params(d_in, d_out, block_size)


def _cdvft_params(d_in: int, d_out: int, block_size: int | None, factors: int | None) -> int:
    return cdvft_num_params(d_in, d_out, block_size, factors or 2)


register_method(Method("c3a", "adapter", "C3A", "block-circulant", _c3a_params, _c3a, _flops.c3a_flops,
                       options={"init": "zeros"}, layer_class=C3ALinear))
register_method(Method("cdvft", "adapter", "CDVFT", "circulant-diagonal", _cdvft_params, _cdvft, _flops.cdvft_flops,
                       factors="m", min_factors=2, default_factors=2, options={"alpha": 1.0}, layer_class=CDVFTLinear))
register_method(Method("none", "reference", "base layer", "nothing", _no_params, _base_layer, _flops.none_flops,
                       block_size=False))
register_method(Method("lora", "reference", "LoRA", "low-rank", _lora_params, _lora, _flops.lora_flops,
                       block_size=False, factors="r", layer_class=LoRALinear))
register_method(Method("peft-c3a", "reference", "PEFT C3A", "block-circulant", _c3a_params, _peft_c3a,
                       _flops.peft_c3a_flops))

__all__ = ["EXPRESSES", "ROLES", "Method", "find_method", "get_method", "method_names", "register_method"]
