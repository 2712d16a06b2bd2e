"""The candidate key: one way to adapt a layer (or a reference measured beside the adapters), and its codecs.

A :class:`Candidate` is (method, block_size, factors, transform, backend); what each field means for a method is the
method registry's (:mod:`circtune.adapters.methods`). The key takes several forms outside this module — a row of the
measurement store (which holds no NULL: ``0`` and ``""``), a row of ``measurements.csv`` or its DataFrame (NaN and
empty strings), an adapter-config layer entry — and every writer and reader goes through the codecs here, so the
key that was measured is the key that is picked, reported and compared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .adapters import get_backend
from .adapters.config import LayerConfig
from .adapters.methods import Method, find_method, get_method


@dataclass(frozen=True, order=True)
class Candidate:
    """One way to adapt a layer: an adapter configuration, or a reference to measure beside them.

    ``factors`` is CDVFT's m, LoRA's rank, and None otherwise; ``transform`` is None for backends that do not
    use one (dense) and for references; ``block_size`` is None for ``none`` and ``lora``. What each field means
    for a method is the method registry's (:attr:`spec`).
    """

    method: str
    block_size: int | None = None
    factors: int | None = None
    transform: str | None = None
    backend: str | None = None

    @property
    def spec(self) -> Method:
        """The method's registry entry."""
        return get_method(self.method)

    @property
    def is_reference(self) -> bool:
        """Measured beside the adapters (the base layer, LoRA, PEFT's C3A), never written into a config."""
        return not self.spec.is_adapter

    def params(self, d_in: int, d_out: int) -> int:
        """Trainable parameters this candidate adds to a ``d_in -> d_out`` layer."""
        return self.spec.num_params(d_in, d_out, self.block_size, self.factors)

    # ---- the key in the forms it takes outside this class; every writer and reader goes through these
    def layer_config(self) -> LayerConfig:
        """The adapter-config entry for this candidate (adapter methods only). A backend without a transform gets
        LayerConfig's default one, which it ignores (:meth:`from_layer` drops it again)."""
        if self.is_reference:
            raise ValueError(f"the reference {self.label} has no circtune adapter config")
        return LayerConfig(self.method, self.block_size, self.factors, self.transform or "rfft", self.backend)

    @classmethod
    def from_layer(cls, layer: LayerConfig | Mapping[str, Any]) -> Candidate:
        """The candidate an adapter-config layer entry names (a LayerConfig or its JSON object; defaults as in
        LayerConfig): the transform only where the backend uses one, so the key is the one that was measured."""
        get = (lambda k: getattr(layer, k, None)) if isinstance(layer, LayerConfig) else layer.get
        method = str(get("method"))
        backend = _text(get("backend")) or "torch"
        spec = find_method(method)
        factors = (_whole(get("factors")) or spec.default_factors) if spec is None or spec.factors else None
        transform = (_text(get("transform")) or "rfft") if uses_transform(backend) else None
        return cls(method, _whole(get("block_size")), factors, transform, backend)

    @classmethod
    def from_row(cls, row: Any) -> Candidate:
        """The candidate of a measurement row: a store row (``0``/``""`` for absent fields), a DataFrame row or
        namedtuple (NaN), or a mapping read from measurements.csv."""
        get = row.get if isinstance(row, Mapping) else (lambda k: getattr(row, k, None))
        method = str(get("method"))
        spec = find_method(method)
        return cls(method, _whole(get("block_size")), _whole(get("factors")) if spec is None or spec.factors else None,
                   _text(get("transform")), _text(get("backend")))

    def store_values(self) -> dict[str, Any]:
        """The key's columns in the measurement store, which holds no NULL in a key (``0`` and ``""``)."""
        return {"method": self.method, "block_size": self.block_size or 0, "factors": self.factors or 0,
                "transform": self.transform or "", "backend": self.backend or ""}

    def frame_values(self) -> dict[str, Any]:
        """The key's columns in measurements.csv and its DataFrame (None numbers, empty strings)."""
        return {"method": self.method, "block_size": self.block_size, "factors": self.factors,
                "transform": self.transform or "", "backend": self.backend or ""}

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. ``c3a p=256 rfft/torch``, ``cdvft p=64 m=3 dense``, ``lora r=8``."""
        spec = find_method(self.method)
        if spec is None:  # a row of a method this installation does not know (a newer circtune's file)
            return " ".join(str(v) for v in (self.method, self.block_size and f"p={self.block_size}",
                                             self.factors and f"factors={self.factors}", self.backend) if v)
        return spec.label(self.block_size, self.factors, self.transform, self.backend)


def uses_transform(backend: str) -> bool:
    """Whether ``backend`` computes through a transform (torch does; dense and triton do not). A backend this
    process has not registered (triton without Triton) uses none."""
    from .adapters import available_backends

    return backend in available_backends() and get_backend(backend).uses_transform


def finite_number(v: Any) -> float | None:
    """A field read from any row form (CSV, SQL, JSON) as a finite float: None for missing, blank, non-numeric, NaN
    and infinities."""
    if v is None or isinstance(v, str) and not v.strip():
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _whole(v: Any) -> int | None:
    """A key's integer field from any row form: None, NaN, "" and 0 are absent."""
    f = finite_number(v)
    return int(round(f)) if f else None


def _text(v: Any) -> str | None:
    """A key's text field from any row form: None, NaN and "" are absent."""
    if v is None or isinstance(v, float) and math.isnan(v):
        return None
    return str(v).strip() or None
