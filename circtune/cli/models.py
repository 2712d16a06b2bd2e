"""``circtune models``: list the built-in models, or show the target layers and shapes of one model spec."""

from __future__ import annotations

import argparse
import json
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..models import ModelInfo, TargetLayer

NAME = "models"
HELP = "list the built-in models, or show a model's target layers and their unique shapes"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", metavar="MODEL",
                   help="a built-in name, a folder with config.json, or package.module:callable "
                        "(omit to list the built-in models)")
    p.add_argument("--targets", action="append", metavar="NAMES",
                   help="target module names, comma-separated or repeated (default: the family's defaults)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def parse_targets(values: list[str] | None) -> list[str] | None:
    """``--targets a,b --targets c`` -> ["a", "b", "c"]; None when the option was not given."""
    if values is None:
        return None
    return [t.strip() for v in values for t in v.split(",") if t.strip()]


def format_shape(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0..2,5,7..8"."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(v) if v == start else f"{start}..{v}")
            start = None
    return ",".join(out)


_INDEX = re.compile(r"(?<![^.])\d+(?![^.])")  # a whole numeric name part: the 3 in "layer.3.query"


def group_layers(targets: tuple[TargetLayer, ...]) -> list[tuple[str, int, tuple[int, int]]]:
    """Fold layers that differ only in their numeric name parts: (pattern, count, shape), first-seen order.

    ``encoder.layer.{0..23}.attention.self.query`` stands for 24 layers; when the indices are not a
    full grid (the pattern would claim layers that are not there), the names are listed one by one.
    """
    groups: dict[tuple[str, tuple[int, int]], list[TargetLayer]] = {}
    for t in targets:
        template = _INDEX.sub("\0", t.name)
        groups.setdefault((template, t.shape), []).append(t)
    rows = []
    for (template, shape), layers in groups.items():
        if len(layers) == 1 or "\0" not in template:
            rows.extend((t.name, 1, shape) for t in layers)
            continue
        slots = [sorted({int(p) for p in column})
                 for column in zip(*(_INDEX.findall(t.name) for t in layers), strict=True)]
        grid = 1
        for s in slots:
            grid *= len(s)
        if grid != len(layers):
            rows.extend((t.name, 1, shape) for t in layers)
            continue
        parts = template.split("\0")
        name = parts[0] + "".join((f"{{{_ranges(s)}}}" if len(s) > 1 else str(s[0])) + rest
                                  for s, rest in zip(slots, parts[1:], strict=True))
        rows.append((name, len(layers), shape))
    return rows


def _print_table(header: list[str], rows: list[list[str]], right: set[int]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        print("  ".join(cells).rstrip())


def _list_builtins(as_json: bool) -> int:
    from ..models import BUILTIN_MODELS, resolve_model

    infos = {name: resolve_model(name) for name in BUILTIN_MODELS}
    if as_json:
        print(json.dumps([{**info.to_dict(), "model_type": BUILTIN_MODELS[name].model_type,
                           "hidden_size": BUILTIN_MODELS[name].hidden_size,
                           "num_layers": BUILTIN_MODELS[name].num_layers,
                           "description": BUILTIN_MODELS[name].description}
                          for name, info in infos.items()], indent=2))
        return 0
    rows = [[name, info.family, str(BUILTIN_MODELS[name].hidden_size), str(BUILTIN_MODELS[name].num_layers),
             ",".join(info.target_names), str(len(info.targets)), " ".join(format_shape(s) for s in info.shapes)]
            for name, info in infos.items()]
    _print_table(["name", "family", "hidden", "layers", "default targets", "targets", "unique shapes (d_in x d_out)"],
                 rows, right={2, 3, 5})
    print("\nalso accepted: a folder with config.json, or package.module:callable returning an nn.Module")
    return 0


def _show(info: ModelInfo) -> None:
    print(f"{info.name} ({info.family}): {len(info.targets)} target layers matching {', '.join(info.target_names)}")
    rows = [[pattern, str(count), format_shape(shape)] for pattern, count, shape in group_layers(info.targets)]
    _print_table(["layers", "count", "d_in x d_out"], rows, right={1, 2})
    print()
    _print_table(["unique shape", "layers"], [[format_shape(s), str(n)] for s, n in info.shapes.items()],
                 right={0, 1})


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..models import resolve_model

    targets = parse_targets(args.targets)
    if args.spec is None:
        if targets is not None:
            raise UsageError("--targets needs a MODEL")
        return _list_builtins(args.json)
    if targets is not None and not targets:
        raise UsageError("--targets is empty; give at least one module name, e.g. --targets query,value")
    info = resolve_model(args.spec, targets)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        _show(info)
    return 0
