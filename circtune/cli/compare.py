"""``circtune compare``: search folders of one model from different devices side by side, in one HTML page."""

from __future__ import annotations

import argparse

NAME = "compare"
HELP = "compare circtune search folders of one model from different devices (time ratios, picks, regret)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", metavar="DIR", nargs="+", help="two or more circtune search output folders; the first is "
                   "the reference (A) for the time ratios")
    p.add_argument("-o", "--out", default="compare.html", help="the HTML file to write (default: %(default)s)")
    p.add_argument("--plotlyjs", choices=("inline", "cdn"), default="inline",
                   help="inline: plotly.js inside the file, works offline; cdn: load it from cdn.plot.ly "
                        "(default: %(default)s)")
    p.add_argument("--allow-different", action="store_true",
                   help="compare runs of different models, budgets, tokens or dtypes on what they share "
                        "(refused otherwise)")


def run(args: argparse.Namespace) -> int:
    from circtune.cli.main import UsageError
    from circtune.report.compare import write_compare

    if len(args.dirs) < 2:
        raise UsageError(f"compare needs at least two folders, got {len(args.dirs)}: {args.dirs[0]}")
    path = write_compare(args.dirs, args.out, plotlyjs=args.plotlyjs, allow_different=args.allow_different)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB), comparing {', '.join(args.dirs)}")
    return 0
