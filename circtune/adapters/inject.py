"""Put adapters into a model from a config, save and load their weights, merge them away."""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import AdapterConfig, AdapterConfigError, LayerConfig, load_config, problems_message
from ._layer import CirculantLinear
from .c3a import C3ALinear
from .cdvft import CDVFTLinear

WEIGHTS_FORMAT = "circtune.adapter-weights/1"


def build_layer(base: nn.Linear, lc: LayerConfig) -> CirculantLinear:
    """The adapter layer that ``lc`` describes, wrapped around ``base``."""
    if lc.method == "c3a":
        return C3ALinear(base, lc.block_size, transform=lc.transform, backend=lc.backend, init=lc.init)
    return CDVFTLinear(base, lc.block_size, lc.factors or 2, alpha=lc.alpha, transform=lc.transform,
                       backend=lc.backend)


def layer_config(layer: CirculantLinear) -> LayerConfig:
    """The config entry that rebuilds ``layer``."""
    if isinstance(layer, CDVFTLinear):
        return LayerConfig("cdvft", layer.block_size, layer.factors, layer.transform, layer.backend, alpha=layer.alpha)
    assert isinstance(layer, C3ALinear), type(layer)
    return LayerConfig("c3a", layer.block_size, None, layer.transform, layer.backend, init=layer.init)


def adapter_layers(model: nn.Module) -> dict[str, CirculantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, CirculantLinear)}


def config_from_model(model: nn.Module, base_model: str | None = None, **metadata) -> AdapterConfig:
    layers = {name: layer_config(m) for name, m in adapter_layers(model).items()}
    return AdapterConfig(base_model or type(model).__name__, layers, metadata)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_adapter(model: nn.Module, config: AdapterConfig | Mapping | str | os.PathLike) -> nn.Module:
    """Replace each configured ``nn.Linear`` of ``model`` with its adapter layer and freeze everything else.

    ``config`` is an :class:`AdapterConfig`, a dict, or the path of an ``adapter_config.json``. Every layer is
    checked before any is replaced: a missing name, a module that is not an ``nn.Linear`` or a block size that
    does not divide it raises :class:`AdapterConfigError` listing all of them, and the model is left untouched.
    """
    cfg = load_config(config)
    modules = dict(model.named_modules())
    trainable = {p: p.requires_grad for p in model.parameters()}  # layers freeze their base when built
    problems, built = [], {}
    for name, lc in cfg.layers.items():
        key = f"layers[{name!r}]"
        module = modules.get(name)
        if module is None:
            close = difflib.get_close_matches(name, [n for n, m in modules.items() if isinstance(m, nn.Linear)], 3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            problems.append(f"{key}: {type(model).__name__} has no module of that name{hint}")
        elif isinstance(module, CirculantLinear):
            problems.append(f"{key}: already has a circtune adapter")
        elif not isinstance(module, nn.Linear):
            problems.append(f"{key}: is a {type(module).__name__}, not an nn.Linear")
        else:
            try:
                built[name] = build_layer(module, lc)
            except ValueError as e:
                problems.append(f"{key}: {e}")
    if problems:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        raise AdapterConfigError(f"for {type(model).__name__}", problems)
    # Freeze before swapping in: the adapter layers' own parameters are not in the model yet and stay trainable.
    model.requires_grad_(False)
    for name, layer in built.items():
        _set_submodule(model, name, layer)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' own parameters (no base weights), keyed ``<module name>.<parameter name>``."""
    state = {}
    for name, layer in adapter_layers(model).items():
        for pname, p in layer.adapter_named_parameters():
            state[f"{name}.{pname}"] = p.detach()
    return state


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter weights (only) to a safetensors file; the layer config travels in its metadata."""
    state = adapter_state_dict(model)
    if not state:
        raise ValueError(f"{type(model).__name__} has no circtune adapter layers to save; apply_adapter first")
    config = config_from_model(model)
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.contiguous().cpu() for k, v in state.items()}, tmp,
              metadata={"format": WEIGHTS_FORMAT, "config": json.dumps(config.to_dict())})
    os.replace(tmp, path)


def _read_weights(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(path), metadata
    except FileNotFoundError:
        raise ValueError(f"adapter weights {path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"adapter weights {path}: not a readable safetensors file ({e})") from None


def stored_config(path: str, metadata: Mapping[str, str]) -> AdapterConfig:
    """The adapter config that :func:`save_adapter` stored in a weights file's metadata."""
    source = f"stored in {path}"
    try:
        config = json.loads(metadata.get("config", ""))
    except json.JSONDecodeError as e:
        raise AdapterConfigError(source, [f"not valid JSON ({e})"]) from None
    return AdapterConfig.from_dict(config, source=source)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load adapter weights saved by :func:`save_adapter`.

    If ``model`` has no adapters yet, the config stored in the file is applied first. Every key and shape is
    checked before anything is copied: a mismatch raises ``ValueError`` naming the tensor, the file's shape and
    the model's.
    """
    path = os.fspath(path)
    weights, metadata = _read_weights(path)
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"adapter weights {path}: format {metadata.get('format')!r} is not {WEIGHTS_FORMAT!r} "
                         "(not written by circtune.save_adapter; a PEFT checkpoint loads with circtune.import_peft)")
    if not adapter_layers(model):
        apply_adapter(model, stored_config(path, metadata))
    own = adapter_state_dict(model)
    problems = [f"{k}: in the file, not in the model" for k in weights if k not in own]
    problems += [f"{k}: in the model, not in the file" for k in own if k not in weights]
    problems += [f"{k}: file has shape {list(weights[k].shape)}, model expects {list(v.shape)}"
                 for k, v in own.items() if k in weights and weights[k].shape != v.shape]
    if problems:
        raise ValueError(problems_message(f"adapter weights {path} do not fit {type(model).__name__}", problems))
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(weights[k])
    return model


def merge_adapter(model: nn.Module, unload: bool = True) -> nn.Module:
    """Fold every adapter's ΔW into its base weight. With ``unload`` the adapter layers are replaced by their
    (merged) base ``nn.Linear``, leaving a plain model to export."""
    for name, layer in adapter_layers(model).items():
        if not layer.merged:
            layer.merge()
        if unload:
            _set_submodule(model, name, layer.base_layer)
    return model
