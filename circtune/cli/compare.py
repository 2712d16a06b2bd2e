"""``circtune compare``: search folders of one model from different devices side by side, in one HTML page."""

from __future__ import annotations

import argparse

NAME = "compare"
HELP = "compare circtune search folders of one model from different devices (time ratios, picks, regret)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", metavar="DIR", nargs="+", help="two or more circtune search output folders; the first is "
                   "the reference (A) for the time ratios")
    p.add_argument("-o", "--out", default="compare.html", help="the HTML file to write (default: %(default)s); an "
                   "existing file is replaced only when it is a circtune compare page")
    p.add_argument("--plotlyjs", choices=("inline", "cdn"), default="inline",
                   help="inline: plotly.js inside the file, works offline; cdn: load it from cdn.plot.ly "
                        "(default: %(default)s)")
    p.add_argument("--allow-different", action="store_true",
                   help="compare runs of different models, budgets, tokens or dtypes on what they share "
                        "(refused otherwise)")
    p.add_argument("--force", action="store_true", help="replace -o even when it is not a circtune compare page")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import UsageError
    from ..outputs import MANIFEST, check_page_target, record
    from ..profiling import command_line
    from ..report.compare import write_compare

    if len(args.dirs) < 2:
        raise UsageError(f"compare needs at least two folders, got {len(args.dirs)}: {args.dirs[0]}")
    out = check_page_target(args.out, "compare", force=args.force)
    path = write_compare(args.dirs, out, plotlyjs=args.plotlyjs, allow_different=args.allow_different)
    if (path.parent / MANIFEST).is_file():  # written into a run folder: say which command wrote this page
        record(path.parent, [path.name], subcommand=NAME, command=command_line(),
               identity={"dirs": [str(Path(d).resolve()) for d in args.dirs], "plotlyjs": args.plotlyjs})
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB), comparing {', '.join(args.dirs)}")
    return 0
