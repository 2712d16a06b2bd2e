"""``circtune search``: profile, search per-layer adapters under a parameter budget, validate, write the config."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from .profile import add_model_arguments, command_line

NAME = "search"
HELP = "pick an adapter per target layer under a parameter budget, from measurements on this device"

# Whole-model validation runs at the profile's token count: on the CPU a small one keeps the default run short.
SEARCH_CPU = {"batch": 1, "seq_len": 128}
SEARCH_GPU = {"batch": 8, "seq_len": 512}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", default="100k", help="trainable-parameter budget: 100k, 1.5M, 250000 "
                                                    "(default: %(default)s)")
    p.add_argument("--min-fill", type=float, default=0.9,
                   help="use at least this fraction of the budget (default: %(default)s)")
    p.add_argument("--objective", choices=("latency", "memory", "balanced"), default="latency",
                   help="which point of the Pareto front to pick (default: %(default)s)")
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
    p.add_argument("--plotlyjs", choices=("inline", "cdn"), default="inline",
                   help="report.html with plotly.js inlined (works offline) or from the CDN (small file)")
    add_model_arguments(p)


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _max_seq_len(spec: str) -> int:
    """The longest sequence the model takes (position embeddings; RoBERTa's start after a padding offset)."""
    from ..models import model_config

    config = model_config(spec)
    limit = getattr(config, "max_position_embeddings", None) or 512
    return max(1, min(512, limit - 2))


def _batch_shape(args: argparse.Namespace, device: torch.device) -> tuple[int, int]:
    """Batch size and sequence length of the whole-model steps; their product is the profile's token count."""
    if args.batch_size:
        return args.batch_size, args.seq_len
    d = SEARCH_GPU if device.type == "cuda" else SEARCH_CPU
    tokens = args.tokens or d["batch"] * d["seq_len"]
    seq = min(tokens, _max_seq_len(args.model))
    while tokens % seq:
        seq -= 1
    return tokens // seq, seq


def run(args: argparse.Namespace) -> int:
    from ..search import BudgetError, parse_budget
    from ..space import resolve_dtype
    from .main import UsageError

    started = time.perf_counter()
    try:
        budget = parse_budget(args.budget)
    except BudgetError as e:
        raise UsageError(str(e)) from None
    for name in ("trials", "top"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.min_fill <= 1:
        raise UsageError(f"--min-fill must be within [0, 1], got {args.min_fill}")
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, seq_len = _batch_shape(args, device)
    dtype = resolve_dtype(args.dtype or "auto", device)
    args.dtype = dtype
    from .profile import profile

    model, info, settings, out, store_url, plans, result, frame = profile(args, {"tokens": batch * seq_len}, budget,
                                                                             {"budget": budget})
    from ..pipeline import run_search

    summary = run_search(args, budget=budget, model=model, info=info, settings=settings, out=out,
                         storage=store_url, frame=frame, batch=batch, seq_len=seq_len, dtype=dtype,
                         command=command_line())
    if "skipped" in summary:
        print(summary["skipped"], file=sys.stderr)
        return 0
    print(json.dumps(summary["printed"], indent=2))
    print(f"wrote {out}/adapter_config.json, measurements.csv, trials.csv, validation.csv and report.html "
          f"in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0
