"""Put adapters into a model from a config, save and load their weights, merge them away.

The model is the base model the config was written for (``RobertaModel``) or a task model built on it
(``RobertaForSequenceClassification``): the config's layer names are found under one prefix (see
:func:`circtune.adapters.task.resolve_prefix`), and the task head can be trained and saved with the adapter
(``modules_to_save``, as in PEFT). Everything is checked before anything changes: a call that fails leaves the model
exactly as it was (same modules, same ``requires_grad`` flags, same values).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ._layer import CirculantLinear
from .config import AdapterConfig, AdapterConfigError, LayerConfig, load_config, problems_message
from .methods import get_method, method_names
from .task import default_heads, resolve_prefix

WEIGHTS_FORMAT = "circtune.adapter-weights/1"
# Set on a model by apply_adapter/load_adapter/import_peft: where the config's layer names were found, and which
# modules train (and are saved) with the adapter.
PREFIX_ATTR = "circtune_prefix"
HEADS_ATTR = "circtune_modules_to_save"
# Set on the base model inside an adapted task model: (task model class, prefix), so that exporting the inner model
# alone (whose names lack the prefix) can be refused.
WITHIN_ATTR = "circtune_adapted_within"

log = logging.getLogger("circtune")


def build_layer(base: nn.Linear, lc: LayerConfig) -> CirculantLinear:
    """The adapter layer that ``lc`` describes, wrapped around ``base``."""
    method = get_method(lc.method)
    return method.build(base, block_size=lc.block_size, factors=lc.factors, transform=lc.transform,
                        backend=lc.backend, **{k: getattr(lc, k) for k in method.options})


def layer_config(layer: CirculantLinear) -> LayerConfig:
    """The config entry that rebuilds ``layer``."""
    method = next((m for m in map(get_method, method_names("adapter")) if type(layer) is m.layer_class), None)
    if method is None:
        raise TypeError(f"{type(layer).__name__} is not the layer of a registered adapter method")
    return LayerConfig(method.name, layer.block_size, layer.factors if method.factors else None, layer.transform,
                       layer.backend, **{k: getattr(layer, k) for k in method.options})


def adapter_layers(model: nn.Module) -> dict[str, CirculantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, CirculantLinear)}


def config_from_model(model: nn.Module, base_model: str | None = None, **metadata) -> AdapterConfig:
    """The config of ``model``'s adapter layers, under their names in ``model``."""
    layers = {name: layer_config(m) for name, m in adapter_layers(model).items()}
    return AdapterConfig(base_model or type(model).__name__, layers, metadata)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _head_problems(model: nn.Module, modules: Mapping[str, nn.Module], heads: Iterable, targets: Iterable[str],
                   ) -> list[str]:
    problems = []
    for h in heads:
        key = f"modules_to_save[{h!r}]"
        if not isinstance(h, str) or not h:
            problems.append(f"{key}: expected the non-empty name of a module of {type(model).__name__}")
        elif h not in modules:
            problems.append(f"{key}: {type(model).__name__} has no module of that name; accepted: its top-level "
                            f"modules {', '.join(n for n, _ in model.named_children())} or a dotted name below")
        else:
            inside = [t for t in targets if t == h or t.startswith(h + ".") or h.startswith(t + ".")]
            if inside or isinstance(modules[h], CirculantLinear):
                problems.append(f"{key}: overlaps the adapter layer {(inside or [h])[0]!r}; a module is either "
                                "adapted or trained in full")
    return problems


@dataclass
class _Plan:
    """Adapter layers built but not yet in the model: :meth:`commit` puts them in, :meth:`rollback` undoes the one
    side effect of building them (their base layers were frozen)."""

    model: nn.Module
    prefix: str
    built: dict[str, CirculantLinear]  # full module name -> layer
    heads: tuple[str, ...]  # full module names
    flags: dict[nn.Parameter, bool]

    def rollback(self) -> None:
        for p, flag in self.flags.items():
            p.requires_grad_(flag)

    def commit(self) -> None:
        model = self.model
        # Freeze before swapping in: the new layers' own parameters are not in the model yet and stay trainable.
        model.requires_grad_(False)
        for name, layer in self.built.items():
            _set_submodule(model, name, layer)
        heads = tuple(dict.fromkeys((*getattr(model, HEADS_ATTR, ()), *self.heads)))
        for layer in adapter_layers(model).values():  # layers of an earlier apply_adapter stay trainable too
            for _, p in layer.adapter_named_parameters():
                p.requires_grad_(True)
        for h in heads:
            model.get_submodule(h).requires_grad_(True)
        setattr(model, PREFIX_ATTR, self.prefix)
        setattr(model, HEADS_ATTR, heads)
        if self.prefix:
            setattr(model.get_submodule(self.prefix[:-1]), WITHIN_ATTR, (type(model).__name__, self.prefix))
        log.info("circtune: %d adapter layers in %s under the prefix %r; trained in full: %s", len(self.built),
                 type(model).__name__, self.prefix, ", ".join(heads) or "nothing else")


def _plan(model: nn.Module, cfg: AdapterConfig, heads: Iterable[str] | None, prefix: str | None = None) -> _Plan:
    """Check every layer and head and build the layers, changing nothing the plan cannot roll back.

    ``heads`` are module names of ``model`` (None: :func:`default_heads`); ``prefix`` skips the resolution.
    """
    modules = dict(model.named_modules())
    flags = {p: p.requires_grad for p in model.parameters()}  # layers freeze their base when built
    problems = []
    if prefix is None:
        resolution = resolve_prefix(cfg.layers, modules)
        if resolution.prefix is None:
            problems.append(resolution.problem(model, modules))
        prefix = resolution.best if resolution.prefix is None else resolution.prefix
    heads = default_heads(model) if heads is None else tuple(heads)
    problems += _head_problems(model, modules, heads, [prefix + n for n in cfg.layers])
    built = {}
    try:
        for name, lc in cfg.layers.items():
            key, module = f"layers[{name!r}]", modules.get(prefix + name)
            if module is None:
                continue  # reported by the resolution
            if isinstance(module, CirculantLinear):
                problems.append(f"{key}: already has a circtune adapter")
            elif not isinstance(module, nn.Linear):
                problems.append(f"{key}: is a {type(module).__name__}, not an nn.Linear")
            else:
                try:
                    built[prefix + name] = build_layer(module, lc)
                except ValueError as e:
                    problems.append(f"{key}: {e}")
    except BaseException:
        _Plan(model, prefix, built, heads, flags).rollback()
        raise
    plan = _Plan(model, prefix, built, heads, flags)
    if problems:
        plan.rollback()
        raise AdapterConfigError(f"for {type(model).__name__}", problems)
    return plan


def apply_adapter(model: nn.Module, config: AdapterConfig | Mapping | str | os.PathLike, *,
                  modules_to_save: Iterable[str] | None = None) -> nn.Module:
    """Replace each configured ``nn.Linear`` of ``model`` with its adapter layer and freeze everything else.

    ``config`` is an :class:`AdapterConfig`, a dict, or the path of an ``adapter_config.json``. ``model`` is the
    model the config's layer names come from, or a task model built on it: the names are looked up under the empty
    prefix first, then under the single prefix (``roberta.``, ``model.``) that holds all of them; the prefix used
    is kept as ``model.circtune_prefix``.

    ``modules_to_save`` names modules of ``model`` trained in full with the adapter and saved with it (PEFT's
    convention). The default is PEFT's for the task: the ``classifier``/``score`` head of a sequence or token
    classifier, ``qa_outputs`` of a question-answering model, nothing otherwise (a causal LM, a base model). Pass
    ``[]`` to train the adapter alone. They are kept as ``model.circtune_modules_to_save``.

    Every layer is checked before any is replaced: names found under no prefix (or several), a module that is not
    an ``nn.Linear``, a block size that does not divide it or an unknown head raise :class:`AdapterConfigError`
    listing all of them, and the model is left untouched.
    """
    _plan(model, load_config(config), modules_to_save).commit()
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' own parameters (no base weights), keyed ``<module name>.<parameter name>``."""
    state = {}
    for name, layer in adapter_layers(model).items():
        for pname, p in layer.adapter_named_parameters():
            state[f"{name}.{pname}"] = p.detach()
    return state


def heads_state_dict(model: nn.Module, heads: Iterable[str]) -> dict[str, torch.Tensor]:
    """The full state of each module in ``heads``, keyed ``<module name>.<key>``."""
    return {f"{h}.{k}": v.detach() for h in heads for k, v in model.get_submodule(h).state_dict().items()}


def save_adapter(model: nn.Module, path: str | os.PathLike, *, modules_to_save: Iterable[str] | None = None) -> None:
    """Write the adapter weights to a safetensors file, with those of the modules trained with them
    (``modules_to_save``; default: those :func:`apply_adapter` made trainable). The layer config and the list of
    saved modules travel in its metadata."""
    state = adapter_state_dict(model)
    if not state:
        raise ValueError(f"{type(model).__name__} has no circtune adapter layers to save; apply_adapter first")
    heads = tuple(getattr(model, HEADS_ATTR, ()) if modules_to_save is None else modules_to_save)
    problems = _head_problems(model, dict(model.named_modules()), heads, list(adapter_layers(model)))
    if problems:
        raise ValueError(problems_message(f"cannot save the adapter of {type(model).__name__}", problems))
    # Clones: a head may share storage with the model (tied weights), which safetensors refuses to write.
    state.update({k: v.clone() for k, v in heads_state_dict(model, heads).items()})
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.contiguous().cpu() for k, v in state.items()}, tmp,
              metadata={"format": WEIGHTS_FORMAT, "config": json.dumps(config_from_model(model).to_dict()),
                        "modules_to_save": json.dumps(list(heads))})
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


def stored_heads(path: str, metadata: Mapping[str, str]) -> tuple[str, ...]:
    """The modules whose weights :func:`save_adapter` stored beside the adapter's (none in older files)."""
    try:
        heads = json.loads(metadata.get("modules_to_save", "[]"))
    except json.JSONDecodeError:
        heads = None
    if not isinstance(heads, list) or not all(isinstance(h, str) and h for h in heads):
        raise ValueError(f"adapter weights {path}: metadata modules_to_save is not a list of module names")
    return tuple(heads)


def load_state(model: nn.Module, cfg: AdapterConfig, tensors: Mapping[str, torch.Tensor], heads: Iterable[str],
               what: str) -> nn.Module:
    """Load ``tensors`` (keyed by ``cfg``'s layer names and ``heads``, as :func:`save_adapter` writes them) into
    ``model``, applying ``cfg`` first if it has no adapters (with its default heads trainable besides ``heads``).
    Every key and shape is checked before anything changes; ``what`` names the source in errors."""
    heads = tuple(heads)
    modules = dict(model.named_modules())
    resolution = resolve_prefix(cfg.layers, modules)
    if resolution.prefix is None:
        raise ValueError(problems_message(f"{what} do not fit {type(model).__name__}",
                                          [resolution.problem(model, modules)]))
    prefix = resolution.prefix
    existing = adapter_layers(model)
    plan = None
    if existing:
        # Every adapter of the model must be in the file, as every layer of the file must be in the model.
        layers = {n.removeprefix(prefix): layer for n, layer in existing.items()}
        problems = _head_problems(model, modules, [prefix + h for h in heads], list(existing))
    else:
        wanted = dict.fromkeys((*default_heads(model), *(prefix + h for h in heads)))
        plan = _plan(model, cfg, wanted, prefix)  # raises on a bad layer, changing nothing
        layers = {n: plan.built[prefix + n] for n in cfg.layers}
        problems = []
    own = {f"{n}.{pname}": p for n, layer in layers.items() for pname, p in layer.adapter_named_parameters()}
    if not problems:
        own.update({k[len(prefix):]: v for k, v in heads_state_dict(model, [prefix + h for h in heads]).items()})
    problems += [f"{k}: in the file, not in the model" for k in tensors if k not in own]
    problems += [f"{k}: in the model, not in the file" for k in own if k not in tensors]
    problems += [f"{k}: file has shape {list(tensors[k].shape)}, model expects {list(v.shape)}"
                 for k, v in own.items() if k in tensors and tensors[k].shape != v.shape]
    if problems:
        if plan is not None:
            plan.rollback()
        raise ValueError(problems_message(f"{what} do not fit {type(model).__name__}", problems))
    if plan is not None:
        plan.commit()
    else:
        for h in heads:
            model.get_submodule(prefix + h).requires_grad_(True)
        setattr(model, HEADS_ATTR, tuple(dict.fromkeys((*getattr(model, HEADS_ATTR, ()),
                                                        *(prefix + h for h in heads)))))
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(tensors[k])
    return model


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load adapter weights (and saved heads) written by :func:`save_adapter`.

    If ``model`` has no adapters yet, the config stored in the file is applied first, as :func:`apply_adapter`
    would (so a file saved from the base model loads into a task model built on it, and the default head is
    trainable), and the heads saved in the file become trainable. Every key and shape is checked before anything
    changes: a mismatch raises ``ValueError`` naming the tensor, the file's shape and the model's, and leaves the
    model as it was.
    """
    path = os.fspath(path)
    weights, metadata = _read_weights(path)
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"adapter weights {path}: format {metadata.get('format')!r} is not {WEIGHTS_FORMAT!r} "
                         "(not written by circtune.save_adapter; a PEFT checkpoint loads with circtune.import_peft)")
    heads = stored_heads(path, metadata)
    return load_state(model, stored_config(path, metadata), weights, heads, f"adapter weights {path}")


def merge_adapter(model: nn.Module, unload: bool = True) -> nn.Module:
    """Fold every adapter's ΔW into its base weight. With ``unload`` the adapter layers are replaced by their
    (merged) base ``nn.Linear``, leaving a plain model to export."""
    for name, layer in adapter_layers(model).items():
        if not layer.merged:
            layer.merge()
        if unload:
            _set_submodule(model, name, layer.base_layer)
    if unload:  # a plain model again: its inner base model may be adapted and exported on its own
        for module in model.modules():
            module.__dict__.pop(WITHIN_ATTR, None)
    return model
