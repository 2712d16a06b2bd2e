"""``circtune report``: rebuild the HTML report of a ``circtune search`` folder from the files in it."""

from __future__ import annotations

import argparse

NAME = "report"
HELP = "rebuild the HTML report (report.html) of a circtune search folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="a circtune search output folder (adapter_config.json, "
                   "measurements.csv, and optionally profile.json, trials.csv, validation.csv)")
    p.add_argument("-o", "--out", default=None, help="the HTML file to write (default: DIR/report.html)")
    p.add_argument("--plotlyjs", choices=("inline", "cdn"), default="inline",
                   help="inline: plotly.js inside the file, works offline (about 5 MB); cdn: a small file that loads "
                        "plotly.js from cdn.plot.ly (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from circtune.report.render import write_report

    path = write_report(args.dir, args.out, plotlyjs=args.plotlyjs)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
