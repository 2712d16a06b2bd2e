"""``circtune check``: validate an adapter config (and optionally its weights) against the model it is meant for.

The model is built on the meta device (shapes only: no weights, no download, seconds even for 8B models), the
config is applied to it exactly as a training script's ``circtune.apply_adapter`` would, and a safetensors file
is checked key by key and shape by shape as ``circtune.load_adapter`` would. Nothing is written. Nothing is
unpickled, and a ``module:callable`` model is imported only when ``--model`` names it: a config file never chooses
code to run.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

NAME = "check"
HELP = "check an adapter config (and optionally its safetensors weights) against its model, without training"

# Layer settings that change what stored weights mean; transform and backend only change how they are computed.
_WEIGHT_FIELDS = ("method", "block_size", "factors", "alpha")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG_OR_FOLDER",
                   help="an adapter_config.json, or a circtune search output folder holding one")
    p.add_argument("--model", metavar="SPEC",
                   help="the model the config is for: a built-in name, a folder with config.json, or "
                        "package.module:callable (default: the config's model_spec or base_model, when that is a "
                        "built-in name or a folder)")
    p.add_argument("--weights", metavar="FILE",
                   help="adapter weights written by circtune.save_adapter (.safetensors) to check and load")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def config_path(given: str) -> Path:
    """The adapter config file that ``given`` names: the file itself, or a folder's adapter_config.json."""
    from ..outputs import RunFiles

    path = Path(given)
    if path.is_dir():
        inside = RunFiles(path).config
        if not inside.is_file():
            raise ValueError(f"{given}: folder holds no adapter_config.json (expected the output folder of "
                             "'circtune search', or the config file itself)")
        return inside
    if not path.exists():
        raise ValueError(f"{given}: no such file or folder (expected an adapter_config.json or a folder holding one)")
    return path


def model_spec(given: str | None, config) -> str:
    """``--model``, else the spec the config records; a module:callable only from the command line."""
    from ..errors import UsageError
    from ..models import BUILTIN_MODELS, _lookup_builtin

    if given:
        return given
    spec = config.metadata.get("model_spec")
    if isinstance(spec, str) and spec:
        if _lookup_builtin(spec) is not None or os.path.isdir(os.path.expanduser(spec)):
            return spec
        if ":" in spec:
            raise UsageError(f"the config names the model {spec!r}, a module:callable; circtune check imports code "
                             f"only when the command line names it: pass --model {spec}")
    if _lookup_builtin(config.base_model) is not None:
        return config.base_model
    raise UsageError(f"cannot tell which model the config is for (base_model {config.base_model!r} is not a built-in "
                     f"model); pass --model, e.g. --model {next(iter(BUILTIN_MODELS))}")


def _weights_mismatch(stored, config, prefix: str = "") -> list[str]:
    """Layers whose stored weights were trained under settings other than the config's (the file may name them
    under the task model's ``prefix``)."""
    from ..adapters.methods import get_method

    problems = []
    for name, lc in config.layers.items():
        other = stored.layers.get(name) or stored.layers.get(prefix + name)
        if other is None:
            continue  # load_adapter reports the missing tensors
        for field in _WEIGHT_FIELDS:
            mine, theirs = getattr(lc, field), getattr(other, field)
            if field == "alpha" and "alpha" not in get_method(lc.method).options:
                continue  # a method without alpha (C3A)
            if mine != theirs:
                problems.append(f"layers[{name!r}].{field}: the weights were saved with {theirs!r}, the config "
                                f"says {mine!r}")
            if field == "method" and mine != theirs:
                break  # another method: its block size, factors and alpha say nothing more
    return problems


def check(config_arg: str, model_arg: str | None = None, weights: str | None = None) -> dict:
    """Validate and return the summary that ``circtune check`` prints; raises ValueError (or UsageError)."""
    import torch

    from ..adapters.config import AdapterConfig, AdapterConfigError, problems_message
    from ..adapters.inject import (
        WEIGHTS_FORMAT,
        _read_weights,
        adapter_layers,
        apply_adapter,
        load_adapter,
        stored_config,
    )
    from ..models import build_model

    path = config_path(config_arg)
    config = AdapterConfig.load(path)
    spec = model_spec(model_arg, config)
    model = build_model(spec, device="meta")
    try:
        apply_adapter(model, config)
    except AdapterConfigError as e:
        raise AdapterConfigError(f"{path} for model {spec!r}", e.problems) from None
    prefix = model.circtune_prefix  # a task model holds the config's names under one prefix
    rows = []
    for name, layer in adapter_layers(model).items():
        name = name.removeprefix(prefix)
        lc = config.layers[name]
        params = sum(p.numel() for _, p in layer.adapter_named_parameters())
        rows.append({"name": name, "d_in": layer.in_features, "d_out": layer.out_features, **lc.to_dict(),
                     "params": params})
    summary = {"config": str(path), "model": spec, "base_model": config.base_model, "layers": rows,
               "methods": {m: sum(r["method"] == m for r in rows) for m in dict.fromkeys(r["method"] for r in rows)},
               "trainable_params": sum(r["params"] for r in rows), "weights": None}
    summary["warnings"] = _cannot_run_here(rows)
    recorded = config.metadata.get("total_params")
    if isinstance(recorded, int) and recorded != summary["trainable_params"]:
        summary["note"] = (f"the config records total_params {recorded}, the layers have "
                           f"{summary['trainable_params']}")
    if weights is not None:
        weights = os.fspath(weights)
        tensors, metadata = _read_weights(weights)
        if metadata.get("format") == WEIGHTS_FORMAT and "config" in metadata:
            mismatch = _weights_mismatch(stored_config(weights, metadata), config, prefix)
            if mismatch:
                raise ValueError(problems_message(f"adapter weights {weights} were saved for another config than "
                                                  f"{path}", mismatch))
        load_adapter(model, weights)  # format, keys and shapes (on the meta device: nothing is copied)
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise ValueError(problems_message(f"adapter weights {weights} hold NaN or Inf",
                                              [f"{k}: not finite" for k in bad]))
        summary["weights"] = {"path": weights, "tensors": len(tensors), "loaded": True,
                              "params": sum(t.numel() for t in tensors.values())}
    return summary


def _cannot_run_here(rows: list[dict]) -> list[str]:
    """Backends of the config that this machine cannot run. A warning, not a refusal: checking a GPU machine's
    config on a laptop before shipping it is what check is for; training with it here would fail."""
    import torch

    from ..adapters import get_backend

    here = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = []
    for backend in dict.fromkeys(r["backend"] for r in rows):
        reason = get_backend(backend).unavailable_reason(here)
        if reason:
            n = sum(r["backend"] == backend for r in rows)
            out.append(f"{n} layer(s) use backend {backend}, which cannot run on this machine ({here.type}: "
                       f"{reason}); the config is valid, but apply it where the backend runs, or change the backend")
    return out


def _format(summary: dict) -> str:
    methods = ", ".join(f"{n} {m}" for m, n in summary["methods"].items())
    lines = [f"{summary['config']}: valid for {summary['model']}: {len(summary['layers'])} layers ({methods}), "
             f"{summary['trainable_params']:,} trainable parameters"]
    header = ["layer", "d_in x d_out", "method", "p", "m", "transform", "backend", "params"]
    table = [[r["name"], f"{r['d_in']}x{r['d_out']}", r["method"], str(r["block_size"]),
              "-" if r["factors"] is None else str(r["factors"]), r["transform"], r["backend"], f"{r['params']:,}"]
             for r in summary["layers"]]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if "note" in summary:
        lines.append(f"note: {summary['note']}")
    lines += [f"warning: {w}" for w in summary["warnings"]]
    w = summary["weights"]
    lines.append("weights: not checked (pass --weights FILE.safetensors)" if w is None else
                 f"weights {w['path']}: loaded, {w['tensors']} tensors, {w['params']:,} values, all finite, every "
                 "key and shape matches")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    summary = check(args.config, args.model, args.weights)
    print(json.dumps(summary, indent=2) if args.json else _format(summary))
    return 0
