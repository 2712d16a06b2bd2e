"""``circtune search``: profile, search per-layer adapters under a parameter budget, validate, write the config."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..options import SEARCH_SHAPE
from .profile import add_model_arguments

NAME = "search"
HELP = "pick an adapter per target layer under a parameter budget, from measurements on this device"

SEARCH_CPU, SEARCH_GPU = SEARCH_SHAPE["cpu"], SEARCH_SHAPE["cuda"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", default="100k", help="trainable-parameter budget: 100k, 1.5M, 250000 "
                                                    "(default: %(default)s)")
    p.add_argument("--min-fill", type=float, default=0.9,
                   help="use at least this fraction of the budget (default: %(default)s)")
    p.add_argument("--objective", choices=("latency", "memory", "balanced"), default="latency",
                   help="among the assignments close enough to the best capacity (--capacity-tolerance), pick the "
                        "fastest (latency), the one adding the least memory (memory) or the best of both "
                        "(balanced) (default: %(default)s)")
    p.add_argument("--calibration", metavar="FILE",
                   help="text file, one text per line, run through the --model folder's own weights and tokenizer: "
                        "each layer's gradient on these texts says how much it matters and how much of it each "
                        "configuration can express (default: none; every layer weighs the same)")
    p.add_argument("--allocation", choices=("balanced", "free"), default="balanced",
                   help="balanced: every layer gets between half and twice its share of the budget (its share: "
                        "the budget split by gradient energy with --calibration, else equally); free: no such "
                        "limit, the time and capacity alone decide (default: %(default)s)")
    p.add_argument("--capacity-tolerance", type=float, default=0.05, metavar="FRACTION",
                   help="the pick is the fastest assignment (per --objective) whose captured capacity is within "
                        "this fraction of the best capacity reachable at this budget: 0 takes the most capacious, "
                        "values near 1 the fastest regardless of capacity (default: %(default)s)")
    p.add_argument("--methods", help="restrict to these methods, comma-separated (c3a, cdvft)")
    p.add_argument("--backends", help="restrict to these backends, comma-separated (torch, dense, triton)")
    p.add_argument("--trials", type=int, default=200,
                   help="complete Optuna trials the study should hold: a re-run, or several workers on one "
                        "study, continue until it does (default: %(default)s)")
    p.add_argument("--sampler", choices=("tpe", "nsga2"), default="tpe", help="Optuna sampler (default: tpe)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default: %(default)s)")
    p.add_argument("--study-name", help="Optuna study name (default: derived from model, device, budget and "
                                        "options, so that a re-run resumes it)")
    p.add_argument("--top", type=int, default=3, help="best assignments to validate on the whole model "
                                                      "(default: %(default)s)")
    p.add_argument("--no-validate", action="store_true", help="skip the whole-model measurements")
    p.add_argument("--validate-min-time", type=float, metavar="SECONDS",
                   help="time each whole model for at least this long (default: 4 on the CPU, 2 on a GPU)")
    p.add_argument("--plotlyjs", choices=("inline", "cdn"), default="inline",
                   help="report.html with plotly.js inlined (works offline) or from the CDN (small file)")
    add_model_arguments(p, tokens_default=f"{SEARCH_CPU['batch'] * SEARCH_CPU['seq_len']} on the CPU (batch "
                           f"{SEARCH_CPU['batch']} x {SEARCH_CPU['seq_len']}), "
                           f"{SEARCH_GPU['batch'] * SEARCH_GPU['seq_len']} on a GPU ({SEARCH_GPU['batch']} x "
                           f"{SEARCH_GPU['seq_len']})")


def run(args: argparse.Namespace) -> int:
    from .. import api
    from ..options import SearchOptions
    from .profile import options_from_args

    started = time.perf_counter()
    result = api.search(options=options_from_args(args, SearchOptions))
    if result.skipped:
        print(result.skipped, file=sys.stderr)
        return 0
    print(json.dumps(result.summary, indent=2))
    line = capacity_line(result.summary)
    if line:
        print(line, file=sys.stderr)
    print(f"wrote {', '.join(result.written)} in {result.folder} ({time.perf_counter() - started:.0f} s)",
          file=sys.stderr)
    return 0


def capacity_line(summary: dict) -> str | None:
    """One line on the pick's capacity against the best at this budget, or None when the summary has none."""
    got, best = summary.get("capacity"), summary.get("capacity_best")
    if got is None or best is None:
        return None
    source = "calibration gradients" if summary.get("capacity_source") == "calibration" else "uniform layers"
    share = f" ({got / best:.1%} of the best at this budget)" if best > 0 else ""
    return (f"capacity: the pick can express {got:.3%} of the gradient energy{share}, "
            f"{summary.get('allocation')} allocation, {source}")
