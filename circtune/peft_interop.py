"""Interop with PEFT's C3A (PEFT is optional): config conversion and weights both ways, on base and task models.

circtune's ``C3ALinear.kernel`` and PEFT's ``c3a_kernel`` are the same tensor (same shape, orientation and 1/d_in
scale), so conversion is a renaming of keys. PEFT checkpoints key them ``base_model.model.<module>.c3a_kernel``
and store the modules trained in full (``modules_to_save``, e.g. a classifier head) as
``base_model.model.<module>.<parameter>``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .adapters.c3a import C3ALinear
from .adapters.config import FORMAT, AdapterConfig, AdapterConfigError, load_config
from .adapters.inject import HEADS_ATTR, WITHIN_ATTR, adapter_layers, config_from_model, heads_state_dict, load_state
from .adapters.task import default_heads, resolve_prefix
from .adapters.task import task_type as model_task_type

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
    """A ``block_size_pattern`` key that PEFT's C3A matches against ``name`` and ``<any prefix>.name`` only.

    PEFT 0.21 picks the first key for which ``re.match(rf".*\\.{key}$", module_name)`` holds, so a key must follow a
    dot and a plain full name never matches. The key is the last component of ``name``, behind one of two
    fixed-width lookbehinds: the rest of the name at the start of the module name (the base model) or after a dot
    (the same layer inside a task model, ``roberta.encoder...``). ``encoder.layer.1...`` never matches
    ``encoder.layer.11...``.
    """
    prefix, _, last = name.rpartition(".")
    rest = re.escape(prefix) + r"\."
    return f"(?:(?<=^{rest})|(?<=\\.{rest})){re.escape(last)}"


def to_peft_config(config: AdapterConfig | Mapping | str | os.PathLike, model: nn.Module | None = None, *,
                   task_type: str | None = None, modules_to_save: Iterable[str] | None = None):
    """A ``peft.C3AConfig`` equivalent to ``config``; every layer must be C3A.

    Without ``model`` the config's names are kept: ``target_modules`` lists them (PEFT matches a name or any
    dotted suffix) and ``block_size_pattern`` has one entry per nested layer that matches that layer alone, in the
    base model or under any prefix of a task model (see :func:`_peft_pattern_key`). With ``model`` (a base or task
    model) the names are first resolved in it as :func:`circtune.apply_adapter` does, ``task_type`` defaults to
    the model's (``SEQ_CLS``, ``TOKEN_CLS``, ``QUESTION_ANS``, ``CAUSAL_LM``, ``FEATURE_EXTRACTION`` for a base
    model) and ``modules_to_save`` to the modules it trains in full. Top-level layers (no dot in the name) cannot
    be matched by PEFT's patterns and take ``block_size``, so they must agree on it.
    """
    peft = _require_peft()
    cfg = load_config(config)
    not_c3a = [f"{name} ({lc.method})" for name, lc in cfg.layers.items() if lc.method != "c3a"]
    if not_c3a:
        raise ValueError("PEFT's C3AConfig can only express C3A layers; these are not: " + ", ".join(not_c3a))
    layers = dict(cfg.layers)
    if model is not None:
        modules = dict(model.named_modules())
        resolution = resolve_prefix(cfg.layers, modules)
        if resolution.prefix is None:
            raise AdapterConfigError(f"for {type(model).__name__}", [resolution.problem(model, modules)])
        layers = {resolution.prefix + n: lc for n, lc in cfg.layers.items()}
        task_type = task_type or model_task_type(model)
        if modules_to_save is None:
            modules_to_save = getattr(model, HEADS_ATTR, None)
            modules_to_save = default_heads(model) if modules_to_save is None else modules_to_save
    top = {name: lc.block_size for name, lc in layers.items() if "." not in name}
    if len(set(top.values())) > 1:
        raise ValueError(f"PEFT's C3AConfig cannot give top-level modules different block sizes: {top}")
    sizes = Counter(lc.block_size for lc in layers.values())
    # Longest names first: PEFT takes the first key that matches, and a longer name is the more specific layer.
    nested = sorted((n for n in layers if "." in n), key=len, reverse=True)
    return peft.C3AConfig(
        block_size=next(iter(top.values())) if top else sizes.most_common(1)[0][0],
        target_modules=list(layers),
        block_size_pattern={_peft_pattern_key(n): layers[n].block_size for n in nested},
        init_weights=True,  # zeros, as circtune's default: a no-op adapter until trained or loaded
        task_type=task_type,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
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
    """Write ``model``'s C3A adapters, and the modules it trains in full, as a PEFT checkpoint folder that
    ``PeftModel.from_pretrained`` loads into a model of the same class.

    Export the model that PEFT will load into: the keys carry ``model``'s module names. The base model inside a
    task model that circtune adapted (``classifier.roberta``) is refused, since its keys would miss the
    ``roberta.`` that PEFT expects for the task model.
    """
    from safetensors.torch import save_file

    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no circtune adapter layers to export")
    within = getattr(model, WITHIN_ATTR, None)
    if within is not None:
        raise ValueError(f"this {type(model).__name__} is the {within[1][:-1]!r} of a {within[0]} whose adapter "
                         f"circtune applied; export that model (export_peft(task_model, folder)): PEFT loads a "
                         f"{within[0]} from keys under '{within[1]}'")
    not_c3a = [name for name, m in layers.items() if not isinstance(m, C3ALinear)]
    if not_c3a:
        raise ValueError("only C3A layers convert to PEFT; these are not: " + ", ".join(not_c3a))
    peft_config = to_peft_config(config_from_model(model), model)
    state = c3a_state_dict_to_peft({f"{n}.kernel": m.kernel.detach() for n, m in layers.items()})
    heads = getattr(model, HEADS_ATTR, ())
    state.update({_PEFT_PREFIX + k: v.clone() for k, v in heads_state_dict(model, heads).items()})
    os.makedirs(folder, exist_ok=True)
    peft_config.save_pretrained(os.fspath(folder))
    save_file({k: v.contiguous().cpu() for k, v in state.items()}, os.path.join(folder, PEFT_WEIGHTS_NAME))


def _head_of(key: str, entries: list[str]) -> str | None:
    """The module of a saved ``modules_to_save`` weight: the dotted prefix of ``key`` named by an entry (PEFT
    matches an entry against a module's name or its dotted suffix)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        module = ".".join(parts[:i])
        if any(module == e or module.endswith("." + e) for e in entries):
            return module
    return None


def import_peft(model: nn.Module, folder: str | os.PathLike, *, backend: str = "torch",
                transform: str = "rfft") -> nn.Module:
    """Apply the C3A adapters of a PEFT checkpoint folder to a plain ``model`` and load their kernels, and the
    weights of the modules the checkpoint trained in full (its ``modules_to_save``).

    ``model`` may be the model the checkpoint was saved from or, for a checkpoint of a base model, a task model
    built on it (names resolved as :func:`circtune.apply_adapter` does). The block size of each layer is read from
    its kernel's shape, so any ``block_size_pattern`` round-trips. Everything is checked before anything changes.
    """
    from safetensors.torch import load_file

    folder = os.fspath(folder)
    path = os.path.join(folder, PEFT_WEIGHTS_NAME)
    if not os.path.exists(path):
        raise ValueError(f"{folder}: no {PEFT_WEIGHTS_NAME} (a PEFT C3A checkpoint folder holds one)")
    try:
        with open(os.path.join(folder, PEFT_CONFIG_NAME)) as f:
            peft_config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder}: cannot read {PEFT_CONFIG_NAME} ({e})") from None
    if not isinstance(peft_config, dict) or peft_config.get("peft_type") != "C3A":
        found = peft_config.get("peft_type") if isinstance(peft_config, dict) else None
        raise ValueError(f"{folder}: peft_type is {found!r}; only C3A checkpoints convert to circtune")
    entries = list(peft_config.get("modules_to_save") or [])
    kernels, others = {}, {}
    for key, value in load_file(path).items():
        (kernels if re.search(r"\.c3a_kernel(?:\.[^.]+)?$", key) else others)[key.removeprefix(_PEFT_PREFIX)] = value
    heads = {}
    for key in others:
        head = _head_of(key, entries)
        if head is None:
            raise ValueError(f"{folder}: {key} is neither a C3A kernel nor a weight of the checkpoint's "
                             f"modules_to_save ({', '.join(entries) or 'none'})")
        heads[head] = None
    state = c3a_state_dict_from_peft(kernels)
    layers = {key.removesuffix(".kernel"): {"method": "c3a", "block_size": int(w.shape[-1]), "backend": backend,
                                            "transform": transform} for key, w in state.items()}
    cfg = AdapterConfig.from_dict({"format": FORMAT, "base_model": type(model).__name__, "layers": layers},
                                  source=f"from {folder}")
    return load_state(model, cfg, {**state, **others}, heads, f"PEFT checkpoint {folder}")


__all__ = [
    "c3a_state_dict_from_peft",
    "c3a_state_dict_to_peft",
    "export_peft",
    "import_peft",
    "to_peft_config",
]
