"""``circtune devices``: the description and fingerprint of each device measurements could come from."""

from __future__ import annotations

import argparse
import json

NAME = "devices"
HELP = "print the fingerprint of every visible device (each CUDA device, then the CPU), or of one"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="describe only this device, e.g. cuda:0 or cpu (default: every visible one)")
    p.add_argument("--threads", type=int, help="CPU threads to record (default: torch.get_num_threads())")
    p.add_argument("--json", action="store_true", help="print a JSON list of the descriptions instead")


def _format(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "; ".join(map(str, value))
    return str(value)


def _block(title: str, rows: dict[str, object]) -> str:
    width = max(map(len, rows)) + 1
    return "\n".join([title, *(f"  {k + ':':<{width}} {_format(v)}" for k, v in rows.items())])


def run(args: argparse.Namespace) -> int:
    import torch

    from circtune.errors import UsageError
    from circtune.measure.device import describe_device

    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if args.device:
        names = [args.device]
    else:
        names = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        names.append("cpu")
    try:
        infos = [describe_device(name, threads=args.threads) for name in names]
    except ValueError as e:
        raise UsageError(f"--device: {e}") from e

    if args.json:
        print(json.dumps([info.to_dict() for info in infos], indent=2))
        return 0
    blocks = []
    for info in infos:
        where = "cpu" if info.index is None else f"cuda:{info.index}"
        rows = {"fingerprint": info.fingerprint, "label": info.label, **info.properties}
        blocks.append(_block(f"{where}  {info.name}", rows))
    # The software is the same for every device and is keyed apart from the fingerprint: show it once.
    blocks.append(_block("software", infos[0].software))
    print("\n\n".join(blocks))
    return 0
