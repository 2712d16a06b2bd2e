"""Interop with PEFT's C3A (PEFT is optional): config conversion and weights both ways.

circtune's ``C3ALinear.kernel`` and PEFT's ``c3a_kernel`` are the same tensor (same shape, orientation and 1/d_in
scale), so conversion is a renaming of keys. PEFT checkpoints key them ``base_model.model.<module>.c3a_kernel``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping

import torch
from torch import nn

from .adapters.c3a import C3ALinear
from .adapters.inject import adapter_layers, apply_adapter, layer_config
from .config import FORMAT, AdapterConfig, load_config

_PEFT_PREFIX = "base_model.model."
_PEFT_SUFFIX = ".c3a_kernel"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"


def _require_peft():
    try:
        import peft
    except ImportError:
        raise ImportError("PEFT interop needs the peft package: pip install 'circtune[peft]'") from None
    return peft


def _peft_pattern_key(name: str) -> str:
    """A ``block_size_pattern`` key that PEFT's C3A matches against exactly one module, ``name``.

    PEFT 0.21 matches ``re.match(rf".*\\.{key}$", module_name)``: a key must follow a dot, so a plain full name
    never matches. The key is the last component, with a fixed-width lookbehind anchoring the rest of the name.
    """
    prefix, _, last = name.rpartition(".")
    return f"(?<=^{re.escape(prefix)}\\.){re.escape(last)}"


def to_peft_config(config: AdapterConfig | Mapping | str | os.PathLike):
    """A ``peft.C3AConfig`` equivalent to ``config``; every layer must be C3A.

    ``target_modules`` lists the full module names; ``block_size_pattern`` has one entry per nested layer that
    matches that layer alone (see :func:`_peft_pattern_key`). Top-level layers (no dot in the name) cannot be
    matched by PEFT's patterns and take ``block_size``, so they must agree on it.
    """
    peft = _require_peft()
    cfg = load_config(config)
    not_c3a = [f"{name} ({lc.method})" for name, lc in cfg.layers.items() if lc.method != "c3a"]
    if not_c3a:
        raise ValueError("PEFT's C3AConfig can only express C3A layers; these are not: " + ", ".join(not_c3a))
    top = {name: lc.block_size for name, lc in cfg.layers.items() if "." not in name}
    if len(set(top.values())) > 1:
        raise ValueError(f"PEFT's C3AConfig cannot give top-level modules different block sizes: {top}")
    sizes = Counter(lc.block_size for lc in cfg.layers.values())
    return peft.C3AConfig(
        block_size=next(iter(top.values())) if top else sizes.most_common(1)[0][0],
        target_modules=list(cfg.layers),
        block_size_pattern={_peft_pattern_key(n): lc.block_size for n, lc in cfg.layers.items() if "." in n},
        init_weights=True,  # zeros, as circtune's default: a no-op adapter until trained or loaded
    )


def c3a_state_dict_to_peft(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """circtune keys ``<module>.kernel`` -> PEFT keys ``base_model.model.<module>.c3a_kernel``."""
    out = {}
    for key, value in state.items():
        module, _, pname = key.rpartition(".")
        if pname != "kernel":
            raise ValueError(f"{key}: not a C3A kernel; only C3A adapters convert to PEFT")
        out[f"{_PEFT_PREFIX}{module}{_PEFT_SUFFIX}"] = value
    return out


def c3a_state_dict_from_peft(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT keys (with or without the ``base_model.model.`` prefix and an adapter-name suffix) -> circtune keys."""
    out = {}
    for key, value in state.items():
        name = key.removeprefix(_PEFT_PREFIX)
        match = re.fullmatch(r"(.+)\.c3a_kernel(?:\.[^.]+)?", name)
        if match is None:
            raise ValueError(f"{key}: not a PEFT C3A kernel key (expected '<module>.c3a_kernel')")
        out[f"{match.group(1)}.kernel"] = value
    return out


def export_peft(model: nn.Module, folder: str | os.PathLike) -> None:
    """Write ``model``'s C3A adapters as a PEFT checkpoint folder that ``PeftModel.from_pretrained`` loads."""
    from safetensors.torch import save_file

    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no circtune adapter layers to export")
    not_c3a = [name for name, m in layers.items() if not isinstance(m, C3ALinear)]
    if not_c3a:
        raise ValueError("only C3A layers convert to PEFT; these are not: " + ", ".join(not_c3a))
    config = AdapterConfig(type(model).__name__, {n: layer_config(m) for n, m in layers.items()})
    peft_config = to_peft_config(config)
    os.makedirs(folder, exist_ok=True)
    peft_config.save_pretrained(os.fspath(folder))
    state = c3a_state_dict_to_peft({f"{n}.kernel": m.kernel.detach().contiguous().cpu() for n, m in layers.items()})
    save_file(state, os.path.join(folder, PEFT_WEIGHTS_NAME))


def import_peft(model: nn.Module, folder: str | os.PathLike, *, backend: str = "torch",
                transform: str = "rfft") -> nn.Module:
    """Apply the C3A adapters of a PEFT checkpoint folder to a plain ``model`` and load their kernels.

    The block size of each layer is read from its kernel's shape, so any ``block_size_pattern`` round-trips.
    """
    from safetensors.torch import load_file

    path = os.path.join(os.fspath(folder), PEFT_WEIGHTS_NAME)
    if not os.path.exists(path):
        raise ValueError(f"{folder}: no {PEFT_WEIGHTS_NAME} (a PEFT C3A checkpoint folder holds one)")
    with open(os.path.join(folder, PEFT_CONFIG_NAME)) as f:
        peft_type = json.load(f).get("peft_type")
    if peft_type != "C3A":
        raise ValueError(f"{folder}: peft_type is {peft_type!r}; only C3A checkpoints convert to circtune")
    state = c3a_state_dict_from_peft(load_file(path))
    layers = {key.removesuffix(".kernel"): {"method": "c3a", "block_size": int(w.shape[-1]), "backend": backend,
                                            "transform": transform} for key, w in state.items()}
    apply_adapter(model, {"format": FORMAT, "base_model": type(model).__name__, "layers": layers})
    own = {f"{name}.kernel": m.kernel for name, m in adapter_layers(model).items()}
    wrong = [f"{k}: checkpoint has {list(w.shape)}, the layer needs {list(own[k].shape)}"
             for k, w in state.items() if w.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{folder}: kernels do not fit {type(model).__name__}: " + "; ".join(wrong))
    with torch.no_grad():
        for key, w in state.items():
            own[key].copy_(w)
    return model


__all__ = [
    "c3a_state_dict_from_peft",
    "c3a_state_dict_to_peft",
    "export_peft",
    "import_peft",
    "to_peft_config",
]
