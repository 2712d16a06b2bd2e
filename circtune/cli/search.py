"""``circtune search``: profile, search per-layer adapters under a parameter budget, validate, write the config."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .profile import PROFILE_FILES, add_model_arguments, command_line

NAME = "search"
HELP = "pick an adapter per target layer under a parameter budget, from measurements on this device"

# Whole-model validation runs at the profile's token count: on the CPU a small one keeps the default run short.
SEARCH_CPU = {"batch": 1, "seq_len": 128}
SEARCH_GPU = {"batch": 8, "seq_len": 512}
SEARCH_FILES = ("adapter_config.json", "peft/adapter_config.json", "trials.csv", "validation.csv", "report.html")


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
    add_model_arguments(p, tokens_default=f"{SEARCH_CPU['batch'] * SEARCH_CPU['seq_len']} on the CPU (batch "
                           f"{SEARCH_CPU['batch']} x {SEARCH_CPU['seq_len']}), "
                           f"{SEARCH_GPU['batch'] * SEARCH_GPU['seq_len']} on a GPU ({SEARCH_GPU['batch']} x "
                           f"{SEARCH_GPU['seq_len']})")


def _csv(value: str | None, option: str, accepted: tuple[str, ...]) -> list[str] | None:
    from .main import UsageError

    values = [v.strip() for v in value.split(",") if v.strip()] if value else None
    if value is not None and not values:
        raise UsageError(f"{option} is empty; accepted: {', '.join(accepted)}")
    for v in values or ():
        if v not in accepted:
            raise UsageError(f"{option}: {v!r} is not accepted; accepted: {', '.join(accepted)}")
    return values


def _max_seq_len(spec: str) -> int:
    """The default sequence length's ceiling: the model's positions, at most 512."""
    from ..models import model_config
    from ..preflight import max_positions

    return min(512, max_positions(model_config(spec)) or 512)


def _batch_shape(args: argparse.Namespace, cuda: bool) -> tuple[int, int]:
    """Batch size and sequence length of the whole-model steps; their product is the profile's token count."""
    if args.batch_size:
        return args.batch_size, args.seq_len
    d = SEARCH_GPU if cuda else SEARCH_CPU
    tokens = args.tokens or d["batch"] * d["seq_len"]
    seq = min(tokens, _max_seq_len(args.model))
    while tokens % seq:
        seq -= 1
    return tokens // seq, seq


def _search_checks(args: argparse.Namespace, budget: int, methods: list[str] | None, backends: list[str] | None,
                   batch: int, seq_len: int):
    """The search's checks that need the model and the space but no measurement; returns the search's options for
    the output folder's identity."""
    from ..models import build_model, model_config
    from ..preflight import PreflightError, check_budget, check_seq_len, max_positions

    def checks(model, space, plans, info, device, tokens) -> dict:
        config = model_config(model.spec)
        if config is not None:
            check_seq_len(seq_len, max_positions(config), model.name)
        by_shape = {(p.d_in, p.d_out): p for p in plans}
        ranges = []
        for shape, plan in by_shape.items():
            params = [c.params(*shape) for c in plan.candidates if (not methods or c.method in methods)
                      and (not backends or c.backend in backends)]
            if not params:
                why = sorted({e.reason for e in plan.excluded if e.backend and backends and e.backend in backends})
                raise PreflightError(f"no candidate of search space {space.source} for the {shape[0]}x{shape[1]} "
                                     f"target layers with --methods {','.join(methods or ('c3a', 'cdvft'))}"
                                     f"{' --backends ' + ','.join(backends) if backends else ''}"
                                     f"{': ' + '; '.join(why) if why else ''}")
            ranges += [(min(params), max(params))] * plan.layers
        filters = "".join(f" {o} {','.join(v)}" for o, v in (("--methods", methods), ("--backends", backends)) if v)
        check_budget(budget, args.min_fill, ranges, f"the {len(model.targets)} target layers of {model.name} with "
                     f"search space {space.source}{filters}")
        if not args.no_validate:
            from ..validate import ModelStep, hidden_size

            try:
                net = build_model(model.spec, device="meta")
                ModelStep(net)
                hidden_size(net)
            except ValueError as e:
                raise PreflightError(f"model {model.spec!r} cannot be validated as a whole: "
                                     f"{str(e).splitlines()[0]}; pass --no-validate to search without whole-model "
                                     "steps") from None
        return {"budget": budget, "min_fill": args.min_fill, "objective": args.objective, "methods": methods,
                "backends": backends, "sampler": args.sampler, "seed": args.seed, "study_name": args.study_name,
                "top": args.top, "validate": not args.no_validate, "batch_size": batch, "seq_len": seq_len}

    return checks


def run(args: argparse.Namespace) -> int:
    from ..config import METHODS
    from ..preflight import check_trials
    from ..search import BudgetError, parse_budget
    from ..space import KNOWN_BACKENDS
    from .main import UsageError
    from .profile import check_values

    started = time.perf_counter()
    try:
        budget = parse_budget(args.budget)
    except BudgetError as e:
        raise UsageError(str(e)) from None
    check_trials(args.trials)
    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    if not 0 <= args.min_fill <= 1:
        raise UsageError(f"--min-fill must be within [0, 1], got {args.min_fill}")
    methods = _csv(args.methods, "--methods", METHODS)
    backends = _csv(args.backends, "--backends", KNOWN_BACKENDS)
    check_values(args)

    import torch

    from ..measure.device import default_device
    from ..space import resolve_dtype

    device = torch.device(args.device) if args.device else default_device()  # auto: bf16 if *this* device has it
    cuda = device.type == "cuda"
    batch, seq_len = _batch_shape(args, cuda)
    dtype = resolve_dtype(args.dtype or "auto", device)
    args.dtype = dtype
    from ..pipeline import check_named_study, run_search
    from .profile import profile

    model, info, settings, out, store_url, plans, result, frame, identity = profile(
        args, {"tokens": batch * seq_len}, budget, {"budget": budget},
        _search_checks(args, budget, methods, backends, batch, seq_len), files=PROFILE_FILES + SEARCH_FILES,
        last_check=lambda identity, url: check_named_study(url, args.study_name, identity, budget, args.min_fill))

    summary = run_search(args, budget=budget, model=model, info=info, settings=settings, out=out,
                         storage=store_url, frame=frame, batch=batch, seq_len=seq_len, dtype=dtype,
                         command=command_line(), identity=identity, methods=methods, backends=backends)
    if "skipped" in summary:
        print(summary["skipped"], file=sys.stderr)
        return 0
    print(json.dumps(summary["printed"], indent=2))
    print(f"wrote {', '.join(summary['written'])} in {out} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return 0
