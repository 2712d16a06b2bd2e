"""``circtune report``: rebuild the HTML report of a ``circtune search`` folder from the files in it."""

from __future__ import annotations

import argparse

NAME = "report"
HELP = "rebuild the HTML report (report.html) of a circtune search folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="a circtune search output folder (adapter_config.json, "
                   "measurements.csv, and optionally profile.json, trials.csv, validation.csv, front.csv, "
                   "allocation.csv)")
    p.add_argument("-o", "--out", default=None, help="the HTML file to write (default: DIR/report.html); an existing "
                   "file is replaced only when it is a circtune report page")
    p.add_argument("--plotlyjs", choices=("inline", "cdn"), default="inline",
                   help="inline: plotly.js inside the file, works offline (about 5 MB); cdn: a small file that loads "
                        "plotly.js from cdn.plot.ly (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace -o even when it is not a circtune report page")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..outputs import MANIFEST, RunFiles, check_page_target, record
    from ..profiling import command_line
    from ..report.render import write_report

    out = check_page_target(args.out if args.out is not None else RunFiles(args.dir).report, "report",
                            force=args.force)
    path = write_report(args.dir, out, plotlyjs=args.plotlyjs)
    if (path.parent / MANIFEST).is_file():  # a run folder: say which command wrote this page
        record(path.parent, [path.name], subcommand=NAME, command=command_line(),
               identity={"dir": str(Path(args.dir).resolve()), "plotlyjs": args.plotlyjs})
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
