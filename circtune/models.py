"""Model specs to target layers: built-in names, local config folders and ``module:callable``.

A spec resolves to a model built on the meta device (shapes only, no weights, no download) and
from it to the list of target ``nn.Linear`` layers with their shapes; the rest of circtune works
on that list and on its unique shapes. The built-in models and the family of each transformers model type are
data, in :mod:`circtune._architectures`; their names stay importable from here.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._architectures import _FAMILY_BY_MODEL_TYPE, BUILTIN_MODELS, BuiltinModel, _lookup_builtin, builtin_names

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "ModelInfo",
    "TargetLayer",
    "build_model",
    "builtin_names",
    "default_targets",
    "find_targets",
    "model_config",
    "resolve_model",
]


@dataclass(frozen=True)
class TargetLayer:
    """One target ``nn.Linear``: its full module name and shape."""

    name: str  # full module name, e.g. "encoder.layer.0.attention.self.query"
    d_in: int  # in_features
    d_out: int  # out_features

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_in, self.d_out)


@dataclass(frozen=True)
class ModelInfo:
    """A resolved model spec: which layers are targets and which shapes they have."""

    spec: str  # what the user passed
    name: str  # short label for files and CSV rows: built-in name, folder name or callable name
    family: str  # "encoder", "vision", "decoder" or "custom"
    target_names: tuple[str, ...]  # the target patterns used (defaults or --targets)
    targets: tuple[TargetLayer, ...]  # in module order

    @property
    def shapes(self) -> dict[tuple[int, int], int]:
        """Unique (d_in, d_out) -> number of target layers with it, in first-seen order."""
        counts: dict[tuple[int, int], int] = {}
        for t in self.targets:
            counts[t.shape] = counts.get(t.shape, 0) + 1
        return counts

    def to_dict(self) -> dict:
        return {
            "spec": self.spec,
            "name": self.name,
            "family": self.family,
            "target_names": list(self.target_names),
            "targets": [{"name": t.name, "d_in": t.d_in, "d_out": t.d_out} for t in self.targets],
            "shapes": [{"d_in": i, "d_out": o, "count": n} for (i, o), n in self.shapes.items()],
        }


# Default targets per family: the first alternative with any pattern present wins, and only the
# patterns present are kept (Phi has no gate_proj; ViT is query/value before transformers 5 and
# q_proj/v_proj from it; DeBERTa-v2 says query_proj/value_proj).
_DECODER_DEFAULTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ENCODER_DEFAULTS = (("query", "value"), ("query_proj", "value_proj"), ("q_proj", "v_proj"))
_DEFAULT_TARGETS: dict[str, tuple[tuple[str, ...], ...]] = {
    "encoder": _ENCODER_DEFAULTS,
    "vision": _ENCODER_DEFAULTS,
    "decoder": (_DECODER_DEFAULTS,),
    # a custom module: decoder-style names first, then encoder-style ones
    "custom": (_DECODER_DEFAULTS, ("query", "value")),
}



def _config_folder(spec: str) -> str | None:
    path = os.path.expanduser(spec)
    return path if os.path.isdir(path) else None


def _folder_config(folder: str):
    from transformers import CONFIG_MAPPING, __version__

    file = os.path.join(folder, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"model folder {folder!r} holds no config.json")
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {file}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
    model_type = data.get("model_type")
    if not model_type or not isinstance(model_type, str):
        raise ValueError(f"{file} has no 'model_type' string (got {model_type!r}); transformers needs it to know "
                         "the architecture")
    try:
        config_class = CONFIG_MAPPING[model_type]
    except KeyError:
        # One line: transformers' own message lists every model type it knows (about 12,000 characters).
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
            "; a newer transformers may know it (pip install -U transformers)"
        raise ValueError(f"{file}: model_type {_brief(model_type)} is not known to transformers {__version__}"
                         f"{hint}") from None
    try:
        return config_class.from_dict(data)
    except Exception as e:  # whatever the config class rejects, say which file it came from
        raise ValueError(f"invalid config in {file}: {type(e).__name__}: {e}") from e


def _brief(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _unknown_model(spec: str) -> ValueError:
    names = builtin_names()
    by_key = {a.lower(): n for n, b in BUILTIN_MODELS.items() for a in (n, *b.aliases)}
    looks_like_path = spec.startswith(("~", ".", "/"))
    if "/" in spec and not looks_like_path:
        # A Hugging Face Hub id: suggest a built-in only when it is nearly one of their hub ids; "did you mean
        # roberta-base" for microsoft/deberta-v3-base would send the user to another model.
        aliases = {a.lower(): n for n, b in BUILTIN_MODELS.items() for a in b.aliases}
        close = difflib.get_close_matches(spec.lower(), list(aliases), n=1, cutoff=0.9)
        near = f"did you mean {aliases[close[0]]!r}? otherwise: " if close else ""
        return ValueError(f"model {_brief(spec)} is not a built-in name, and there is no such folder here ({near}"
                          "circtune never downloads: a hub model needs a local folder holding its config.json, e.g. "
                          f"`huggingface-cli download {spec} config.json --local-dir DIR`, then --model DIR); built-in "
                          f"models: {', '.join(names)}")
    close = difflib.get_close_matches(spec.lower(), list(by_key), n=1)
    if close:
        hint = f" (did you mean {by_key[close[0]]!r}?)"
    elif looks_like_path:
        hint = " (no such folder here; circtune never downloads)"
    else:
        hint = ""
    return ValueError(f"unknown model {_brief(spec)}{hint}; built-in models: {', '.join(names)}; "
                      f"or pass a folder with config.json, or module:callable")


def _parse(spec: str) -> tuple[str, str, Any]:
    """(label, family, transformers config or None for module:callable), in the documented order."""
    found = _lookup_builtin(spec)
    if found is not None:
        from transformers import AutoConfig

        name, b = found
        return name, b.family, AutoConfig.for_model(b.model_type, **b.config)
    folder = _config_folder(spec)
    if folder is not None:
        config = _folder_config(folder)
        label = os.path.basename(os.path.normpath(os.path.abspath(folder)))
        return label, _FAMILY_BY_MODEL_TYPE.get(config.model_type, "custom"), config
    if ":" in spec:
        return re.split(r"[.:]", spec)[-1], "custom", None
    raise _unknown_model(spec)


def model_config(spec: str):
    """The transformers config for a built-in name or a config folder; None for ``module:callable``."""
    return _parse(spec)[2]


def _load_callable(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model spec {spec!r} must look like package.module:callable")
    if os.getcwd() not in sys.path and "" not in sys.path:
        # As `python -m` would: a module in the working directory is importable from the `circtune` script too.
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises while importing
        raise ValueError(f"model spec {spec!r}: cannot import module {module_name!r}: {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model spec {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model spec {spec!r}: {attr!r} is a {type(obj).__name__}, not callable")
    return obj


def build_model(spec: str, *, device: torch.device | str = "meta", dtype: torch.dtype | None = None) -> nn.Module:
    """Build the model a spec names: shapes only on "meta", random weights on a real device."""
    return _build(spec, _parse(spec)[2], device, dtype)


def _build(spec: str, config, device: torch.device | str, dtype: torch.dtype | None) -> nn.Module:
    if config is not None:
        import transformers
        from transformers import AutoModel

        kwargs = {}
        if dtype is not None:
            kwargs["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = dtype
        try:
            with torch.device(device):
                return AutoModel.from_config(config, **kwargs)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"model {spec!r}: transformers cannot build it with AutoModel.from_config: "
                             f"{type(e).__name__}: {e}") from e
    factory = _load_callable(spec)
    try:
        with torch.device(device):
            model = factory()
    except Exception as e:  # user code: say which spec failed; --debug shows the traceback
        raise ValueError(f"model spec {spec!r}: calling it failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ValueError(f"model spec {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model if dtype is None else model.to(dtype)


def _matches(name: str, pattern: str) -> bool:
    # PEFT's list semantics: the whole name, or a dotted suffix of it.
    return name == pattern or name.endswith("." + pattern)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def default_targets(model: nn.Module, family: str) -> tuple[str, ...]:
    """The default target patterns for a family, keeping those present among the model's Linear layers."""
    leaves = {_leaf(n) for n in _linear_names(model)}
    # a known family whose names are all missing falls back to the same inference as a custom model
    for alternative in (*_DEFAULT_TARGETS.get(family, ()), *_DEFAULT_TARGETS["custom"]):
        present = tuple(p for p in alternative if p in leaves)
        if present:
            return present
    raise ValueError(f"no default target modules are known for this {family} model; pass --targets\n"
                     f"nn.Linear names found: {', '.join(sorted(leaves)) or '(none)'}")


def _no_match(model: nn.Module, pattern: str, linear: list[str]) -> ValueError:
    leaves = sorted({_leaf(n) for n in linear})
    others = sorted({type(m).__name__ for n, m in model.named_modules() if n and _matches(n, pattern)})
    if others:
        first = f"target {pattern!r} matches only modules that are not nn.Linear ({', '.join(others)})"
    else:
        # offer leaf names and the index-free dotted suffixes ("attention.self.query"), never "layer.3.x"
        candidates = set(leaves)
        for n in linear:
            parts = n.split(".")
            for i in range(len(parts) - 1):
                suffix = parts[i:]
                if not any(p.isdigit() for p in suffix):
                    candidates.add(".".join(suffix))
        close = difflib.get_close_matches(pattern, sorted(candidates), n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        first = f"target {pattern!r} matches no nn.Linear module{hint}"
    return ValueError(f"{first}\nnn.Linear names found: {', '.join(leaves) or '(none)'}")


def find_targets(model: nn.Module, targets: Sequence[str] | None,
                 family: str) -> tuple[tuple[str, ...], tuple[TargetLayer, ...]]:
    """Target patterns (the given ones, or the family defaults) and the nn.Linear layers they match."""
    if targets is None:
        patterns = default_targets(model, family)
    else:
        patterns = tuple(dict.fromkeys(t.strip() for t in targets if t and t.strip()))
        if not patterns:
            raise ValueError("no target modules given; pass at least one name, e.g. --targets query,value")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = list(linears)
    for p in patterns:
        if not any(_matches(n, p) for n in names):
            raise _no_match(model, p, names)
    layers = tuple(TargetLayer(n, m.in_features, m.out_features)
                   for n, m in linears.items() if any(_matches(n, p) for p in patterns))
    return patterns, layers


def resolve_model(spec: str, targets: Sequence[str] | None = None) -> ModelInfo:
    """Build the model on the meta device and list its target layers (fast even for 8B models)."""
    name, family, config = _parse(spec)
    model = _build(spec, config, "meta", None)
    try:
        patterns, layers = find_targets(model, targets, family)
    except ValueError as e:
        raise ValueError(f"model {spec!r}: {e}") from None
    return ModelInfo(spec=spec, name=name, family=family, target_names=patterns, targets=layers)
