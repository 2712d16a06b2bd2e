"""The adapter config file: which layer gets which circulant adapter, versioned and validated.

```json
{"format": "circtune.adapter/1", "base_model": "roberta-large",
 "layers": {"roberta.encoder.layer.0.attention.self.query":
            {"method": "c3a", "block_size": 64, "factors": null, "transform": "rfft", "backend": "torch"}},
 "...": "any further metadata (budget, device, totals) is kept as it is"}
```
Loading reports every problem at once, each with the key that caused it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ._backends import available_backends
from ._circulant import TRANSFORMS
from .c3a import C3A_INITS
from .methods import get_method, method_names

FORMAT = "circtune.adapter/1"
_LAYER_KEYS = ("method", "block_size", "factors", "transform", "backend", "alpha", "init")
_EXAMPLE = (f'{{"format": "{FORMAT}", "base_model": "...", '
            '"layers": {"<module name>": {"method": "c3a", "block_size": 64}}}')


def problems_message(head: str, problems: list[str]) -> str:
    """``head: first problem`` on one line (what a command prints as its error), then any further problems one
    per line below it."""
    more = problems[1:]
    first = f"{head}: {problems[0]}" + (f" (and {len(more)} more below)" if more else "")
    return "\n".join([first, *(f"  - {p}" for p in more)])


class AdapterConfigError(ValueError):
    """An adapter config that cannot be used; the message names the first problem with its key on its first line
    and lists every further one below."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        super().__init__(problems_message(f"invalid adapter config {source}", problems))


@dataclass(frozen=True)
class LayerConfig:
    """One target layer's adapter."""

    method: str  # an adapter method of circtune.adapters.methods: "c3a" or "cdvft"
    block_size: int  # p: divides both d_in and d_out of the layer
    factors: int | None = None  # cdvft: number of diagonal factors m >= 2; c3a: None
    transform: str = "rfft"  # "rfft", "fft" or "dft" (ignored by the dense backend)
    backend: str = "torch"  # a name from circtune.available_backends()
    alpha: float = 1.0  # cdvft: scale of ΔW
    init: str = "zeros"  # c3a: kernel initialisation

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        options = get_method(self.method).options
        for key in ("alpha", "init"):
            if key not in options:
                del d[key]  # another method's option
        return d


def _short(v: Any, limit: int = 60) -> str:
    """repr(v), cut to ``limit`` characters: a hostile file's value goes into one readable line."""
    text = repr(v)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _layer_problems(key: str, raw: Any) -> list[str]:
    if not isinstance(raw, Mapping):
        return [f"{key}: expected an object with keys {', '.join(_LAYER_KEYS)}, got {type(raw).__name__}"]
    problems = [f"{key}.{k}: unknown key; accepted: {', '.join(_LAYER_KEYS)}" for k in raw if k not in _LAYER_KEYS]
    method = raw.get("method")
    adapters = method_names("adapter")
    if method not in adapters:
        problems.append(f"{key}.method: {_short(method)} is not a method; accepted: {', '.join(adapters)}")
    p = raw.get("block_size")
    if not _is_int(p) or p < 1:
        problems.append(f"{key}.block_size: {_short(p)} is not a positive integer")
    m = raw.get("factors")
    if method in adapters:
        spec = get_method(method)
        if spec.factors and m is not None and (not _is_int(m) or m < spec.min_factors):
            problems.append(f"{key}.factors: {_short(m)} is not valid for {method}; accepted: an integer >= "
                            f"{spec.min_factors}")
        if not spec.factors and m not in (None, 1):
            problems.append(f"{key}.factors: {_short(m)} is not valid for {method}; accepted: null ({method} has one "
                            "circulant factor)")
    if raw.get("transform", "rfft") not in TRANSFORMS:
        problems.append(f"{key}.transform: {_short(raw.get('transform'))} is not a transform; accepted: "
                        f"{', '.join(TRANSFORMS)}")
    if raw.get("backend", "torch") not in available_backends():
        problems.append(f"{key}.backend: {_short(raw.get('backend'))} is not a backend here; accepted: "
                        f"{', '.join(available_backends())}")
    alpha = raw.get("alpha", 1.0)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        problems.append(f"{key}.alpha: {_short(alpha)} is not a number")
    if raw.get("init", "zeros") not in C3A_INITS:
        problems.append(f"{key}.init: {_short(raw.get('init'))} is not an init; accepted: {', '.join(C3A_INITS)}")
    return problems


@dataclass
class AdapterConfig:
    """A whole model's adapter assignment plus free-form metadata (budget, device, totals, command, ...)."""

    base_model: str
    layers: dict[str, LayerConfig]
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> AdapterConfig:
        if not isinstance(data, Mapping):
            raise AdapterConfigError(source, [f"top level: expected a JSON object, got {type(data).__name__}"])
        problems = []
        if data.get("format") != FORMAT:
            problems.append(f"format: {_short(data.get('format'))} is not supported; accepted: {FORMAT!r}")
        base_model = data.get("base_model")
        if not isinstance(base_model, str) or not base_model:
            problems.append(f"base_model: expected a non-empty string, got {_short(base_model)}")
        raw_layers = data.get("layers")
        if not isinstance(raw_layers, Mapping) or not raw_layers:
            problems.append("layers: expected a non-empty object of module name -> adapter, got "
                            f"{_short(raw_layers)}")
            raw_layers = {}
        layers = {}
        for name, raw in raw_layers.items():
            layer_problems = _layer_problems(f"layers[{name!r}]", raw)
            problems += layer_problems
            if not layer_problems:
                kw = {k: raw[k] for k in _LAYER_KEYS if k in raw}
                spec = get_method(kw["method"])
                kw["factors"] = (kw.get("factors") or spec.default_factors) if spec.factors else None
                layers[name] = LayerConfig(**kw)
        if problems:
            raise AdapterConfigError(source, problems)
        metadata = {k: v for k, v in data.items() if k not in ("format", "base_model", "layers")}
        return cls(base_model=base_model, layers=layers, metadata=metadata)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "base_model": self.base_model,
                "layers": {name: lc.to_dict() for name, lc in self.layers.items()}, **self.metadata}

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON atomically (a temporary file renamed), so a reader never sees half a file."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AdapterConfig:
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise AdapterConfigError(path, ["file not found"]) from None
        except IsADirectoryError:
            raise AdapterConfigError(path, ["is a folder, not a JSON file (a circtune search folder holds "
                                            "adapter_config.json)"]) from None
        except OSError as e:
            raise AdapterConfigError(path, [f"cannot read it: {e.strerror or e}"]) from None
        except UnicodeDecodeError as e:
            raise AdapterConfigError(path, [f"not a UTF-8 text file ({e.reason} at byte {e.start}); expected "
                                            "JSON"]) from None
        except json.JSONDecodeError as e:
            problem = f"not valid JSON: {e}" if e.doc.strip() else "the file is empty"
            raise AdapterConfigError(path, [f"{problem}; expected a JSON object like {_EXAMPLE}"]) from None
        except RecursionError:
            raise AdapterConfigError(path, ["not usable JSON: nested too deeply"]) from None
        return cls.from_dict(data, source=path)


def load_config(config: AdapterConfig | Mapping | str | os.PathLike) -> AdapterConfig:
    """An AdapterConfig from itself, a dict, or a JSON file path."""
    if isinstance(config, AdapterConfig):
        return config
    if isinstance(config, Mapping):
        return AdapterConfig.from_dict(config)
    if isinstance(config, str | os.PathLike):
        return AdapterConfig.load(config)
    raise TypeError(f"config must be an AdapterConfig, a dict or a path, got {type(config).__name__}")
