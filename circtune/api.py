"""The library: ``circtune.profile(model, **options)`` and ``circtune.search(model, budget, **options)``.

The commands ``circtune profile`` and ``circtune search`` only translate their flags into these calls. Options are
the flags' names (see :mod:`circtune.options`); a refused value raises a ``ValueError``
(:class:`~circtune.errors.OptionError` and its kin) naming it and what is accepted, before anything is measured.
A call never exits the process and leaves it as it found it: Ctrl-C and SIGTERM stop it between database writes
(a ``KeyboardInterrupt`` reaches the caller) only while it runs, after which the caller's signal handlers and
torch's thread count are back.

Example::

    import circtune
    result = circtune.search("roberta-large", "100k", out="runs/rl", trials=200)
    result.config.save("adapter_config.json")
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import OptionError
from .options import SEARCH_SHAPE, ProfileOptions, SearchOptions, make_options, option_names
from .outputs import RunFiles
from .profiling import PROFILE_FILES, Profiled, command_line, profile_to_folder, with_dtype

# Calibration texts per forward-backward pass (gradients are accumulated over all of them).
CALIBRATION_BATCH = 8


@dataclass(frozen=True)
class Exclusion:
    """A configuration of the space left out for one target shape, and why (e.g. a backend this device lacks)."""

    shape: tuple[int, int]
    what: str
    reason: str


@dataclass(frozen=True)
class ProfileResult:
    """``measurements``: one row per configuration (as ``measurements.csv``); ``folder``: where the files are;
    ``exclusions``: what the space holds but was not measured; ``measured``/``reused``/``failed``: counts;
    ``store``: the measurement store's URL (password masked)."""

    measurements: pd.DataFrame
    folder: Path
    exclusions: tuple[Exclusion, ...]
    measured: int
    reused: int
    failed: int
    store: str
    options: ProfileOptions


@dataclass(frozen=True)
class SearchResult:
    """``config``: the picked :class:`~circtune.AdapterConfig` (None only when another worker of the study
    wrote its outputs elsewhere: ``skipped`` says where); ``folder``; ``measurements``; ``trials`` and
    ``validation`` (as ``trials.csv`` and ``validation.csv``); ``report_path``; ``summary``: the pick's totals
    and times (what the command prints); ``written``: the files this call wrote."""

    config: Any  # AdapterConfig | None
    folder: Path
    measurements: pd.DataFrame
    trials: pd.DataFrame | None
    validation: pd.DataFrame | None
    report_path: Path | None
    summary: dict
    written: tuple[str, ...]
    skipped: str | None
    options: SearchOptions


@contextmanager
def call_scope(opts: ProfileOptions) -> Iterator[None]:
    """For the duration of one library call: interrupts handled between database writes, the options' notes
    printed; afterwards the caller's signal handlers and torch's thread count as they were."""
    import torch

    from . import _signals

    threads = torch.get_num_threads()
    try:
        with _signals.handling_interrupts():
            for note in opts.notes:
                print(f"note: {note}", file=sys.stderr)
            yield
    finally:
        if torch.get_num_threads() != threads:  # --threads is the process's setting, not the call's
            torch.set_num_threads(threads)


def _options(kind: type[ProfileOptions], options: dict[str, Any], **given: Any) -> Any:
    passed = options.pop("options", None)
    if passed is not None:  # a ready-made options object, with keywords replacing some of its values
        if not isinstance(passed, kind):
            raise OptionError("options", f"options must be a {kind.__name__}, got {type(passed).__name__}")
        from dataclasses import replace

        changes = {**{k: v for k, v in given.items() if v is not None}, **options}
        unknown = sorted(set(changes) - option_names(kind))
        if unknown:
            raise OptionError(unknown[0], f"unknown option {unknown[0]!r}; accepted: "
                                          f"{', '.join(sorted(option_names(kind)))}")
        return replace(passed, **changes) if changes else passed
    return make_options(kind, {**{k: v for k, v in given.items() if v is not None}, **options})


def profile(model: str | None = None, **options: Any) -> ProfileResult:
    """Measure every candidate adapter configuration of ``model``'s target layers on this device (as ``circtune
    profile``), writing ``measurements.csv`` and ``profile.json`` into ``out`` (default ``runs/<model>-<device>-
    profile``). ``options`` are :class:`~circtune.options.ProfileOptions` fields, or ``options=`` one such object."""
    opts = _options(ProfileOptions, options, model=model)
    with call_scope(opts):
        done = profile_to_folder(opts, "profile")
    return _profile_result(done, opts)


def _profile_result(done: Profiled, opts: ProfileOptions) -> ProfileResult:
    from .measure.store import masked_url

    exclusions = tuple(Exclusion((p.d_in, p.d_out), e.what, e.reason) for p in done.plans for e in p.excluded)
    return ProfileResult(done.frame, done.out, exclusions, done.result.measured, done.result.reused,
                         len(done.result.failed), masked_url(done.store_url), opts)


def search(model: str | None = None, budget: int | str | None = None, **options: Any) -> SearchResult:
    """Profile ``model`` on this device, search one adapter per target layer within ``budget`` trainable
    parameters (``100_000`` or ``"100k"``), validate the best few on the whole model and write the output folder
    (as ``circtune search``). ``options`` are :class:`~circtune.options.SearchOptions` fields, or ``options=``
    one such object."""
    opts = _options(SearchOptions, options, model=model, budget=budget)
    with call_scope(opts):
        return _search(opts)


def _search(opts: SearchOptions) -> SearchResult:
    import torch

    from .measure.device import default_device
    from .pipeline import SEARCH_FILES, check_named_study, run_search
    from .space import resolve_dtype

    device = torch.device(opts.device) if opts.device else default_device()  # auto: bf16 if *this* device has it
    batch, seq_len = _batch_shape(opts, SEARCH_SHAPE["cuda" if device.type == "cuda" else "cpu"])
    dtype = resolve_dtype(opts.dtype or "auto", device)
    measured = with_dtype(opts, dtype)
    calibrated: dict = {}
    done = profile_to_folder(
        measured, "search", tokens=batch * seq_len, lora_budget=opts.budget, expected={"budget": opts.budget},
        more_checks=_search_checks(opts, batch, seq_len, calibrated), files=PROFILE_FILES + SEARCH_FILES,
        last_check=lambda identity, url: check_named_study(url, opts.study_name, identity, opts.budget,
                                                           opts.min_fill),
        folder_checked=lambda: calibrated["late"]())
    capacity = calibrated["capacity"]
    summary = run_search(opts, model=done.model, info=done.info, settings=done.settings, out=done.out,
                         storage=done.store_url, frame=done.frame, batch=batch, seq_len=seq_len, dtype=dtype,
                         command=command_line(), identity=done.identity, capacity=capacity,
                         calibration=calibrated.get("metadata"))
    return _search_result(opts, done, summary)


def _search_result(opts: SearchOptions, done: Profiled, summary: dict) -> SearchResult:
    from .adapters.config import load_config

    out, files = done.out, RunFiles(done.out)
    skipped = summary.get("skipped")
    config = summary.get("config")
    if config is None and files.config.is_file():
        config = load_config(files.config)

    def frame(path: Path) -> pd.DataFrame | None:
        return pd.read_csv(path) if path.is_file() else None

    printed = summary.get("printed")
    if printed is None and config is not None:
        printed = {k: config.metadata.get(k) for k in ("total_params", "budget", "predicted_overhead_ms",
                                                       "measured_step_ms")}
    report = files.report
    return SearchResult(config, out, done.frame, frame(files.trials), frame(files.validation),
                        report if report.is_file() else None, json.loads(json.dumps(printed or {})),
                        tuple(summary.get("written", ())), skipped, opts)


def _max_seq_len(spec: str) -> int:
    """The default sequence length's ceiling: the model's positions, at most 512."""
    from .models import model_config
    from .preflight import max_positions

    return min(512, max_positions(model_config(spec)) or 512)


def _batch_shape(opts: SearchOptions, default: dict[str, int]) -> tuple[int, int]:
    """Batch size and sequence length of the whole-model steps; their product is the profile's token count."""
    if opts.batch_size:
        return opts.batch_size, opts.seq_len
    tokens = opts.tokens or default["batch"] * default["seq_len"]
    seq = min(tokens, _max_seq_len(opts.model))
    while tokens % seq:
        seq -= 1
    return tokens // seq, seq


def _calibration_file(path: str) -> tuple[list[str], str]:
    """The calibration texts (refused in one line when missing, empty, binary or not UTF-8) and the file's digest."""
    import hashlib

    from .calibration import read_texts

    texts = read_texts(path)
    return texts, hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _check_allocation(opts: SearchOptions, model, by_shape: dict, capacity) -> None:
    """Refuse, before measuring, a budget the balance rule cannot meet with the space's candidates (their parameter
    counts are known; which ones measure ok is not, so the search checks again on the measured options)."""
    from .allocation import allocate
    from .problem import Option, Problem

    options = tuple(tuple(Option(c, c.params(*t.shape), 0.0, 0.0) for c in by_shape[t.shape].candidates
                          if (not opts.methods or c.method in opts.methods)
                          and (not opts.backends or c.backend in opts.backends)) for t in model.targets)
    allocate(Problem(tuple(model.targets), options, opts.budget, opts.min_fill), capacity, opts.allocation)


def _search_checks(opts: SearchOptions, batch: int, seq_len: int, calibrated: dict):
    """The search's checks that need the model and the space but no measurement; returns the search's options for
    the output folder's identity. With ``--calibration``, the texts are read first and their gradients on the model
    folder are computed last, into ``calibrated`` (``capacity``, ``metadata``): before anything is measured or
    written, so that a bad file or folder fails in seconds; then the balance rule is checked on the candidates'
    parameter counts."""
    from .capacity import capacity_from_gradients
    from .models import build_model, model_config
    from .preflight import PreflightError, check_budget, check_seq_len, max_positions

    methods = list(opts.methods) if opts.methods else None
    backends = list(opts.backends) if opts.backends else None

    def checks(model, space, plans, info, device, tokens) -> dict:
        if opts.calibration:
            from .calibration import check_model_folder

            texts, digest = _calibration_file(opts.calibration)
            check_model_folder(opts.model)
        else:
            texts, digest = None, None
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
        check_budget(opts.budget, opts.min_fill, ranges, f"the {len(model.targets)} target layers of {model.name} "
                     f"with search space {space.source}{filters}")
        if opts.validate:
            from .validate import ModelStep, hidden_size

            try:
                net = build_model(model.spec, device="meta")
                ModelStep(net)
                hidden_size(net)
            except ValueError as e:
                raise PreflightError(f"model {model.spec!r} cannot be validated as a whole: "
                                     f"{str(e).splitlines()[0]}; pass --no-validate to search without whole-model "
                                     "steps") from None
        if opts.calibration:
            # The gradients take seconds to minutes: they run once the output folder passed its checks
            # (profiling.prepare's folder_checked), still before anything is measured or written.
            def late() -> None:
                import torch

                from .calibration import calibration_gradients

                gradients, notes = calibration_gradients(
                    opts.model, opts.calibration, [t.name for t in model.targets], batch_size=CALIBRATION_BATCH,
                    max_length=None, device=device, dtype=torch.float32, progress=opts.progress)
                for note in notes:
                    print(f"note: calibration: {note}", file=sys.stderr)
                calibrated["metadata"] = {"file": str(opts.calibration), "texts": len(texts), "notes": list(notes)}
                calibrated["capacity"] = capacity_from_gradients(model.targets, gradients)
                _check_allocation(opts, model, by_shape, calibrated["capacity"])
        else:
            calibrated["capacity"] = capacity_from_gradients(model.targets, None)
            _check_allocation(opts, model, by_shape, calibrated["capacity"])

            def late() -> None:
                return None

        calibrated["late"] = late
        return {"budget": opts.budget, "min_fill": opts.min_fill, "objective": opts.objective, "methods": methods,
                "backends": backends, "sampler": opts.sampler, "seed": opts.seed, "study_name": opts.study_name,
                "top": opts.top, "validate": opts.validate, "batch_size": batch, "seq_len": seq_len,
                "allocation": opts.allocation, "capacity_tolerance": opts.capacity_tolerance,
                "calibration": digest}

    return checks
