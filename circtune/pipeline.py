"""The main job after profiling: search, validate, pick, and write the output folder.

The problem is cut to the allocation rule's windows and picked by the capacity rule (:mod:`circtune.allocation`).
Writes ``adapter_config.json`` (the pick, with budget, totals, predicted and measured times, capacity, device,
tokens, dtype and command), ``peft/adapter_config.json`` when every picked layer is C3A, ``trials.csv``,
``validation.csv``, ``front.csv`` and ``allocation.csv`` (:mod:`circtune.pick_files`) and ``report.html``; the
profiler has already written ``measurements.csv`` and ``profile.json``, and the study sits in the same database as
the measurements.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from ._io import write_csv_atomic
from ._search import (
    check_study_identity,
    complete_trials,
    existing_study,
    ranked_assignments,
    run_study,
    trials_frame,
)
from .adapters.config import AdapterConfig
from .allocation import allocate, best_capacity, capacity_front, capacity_pick, eligible, supported_points
from .baselines import VALIDATED, Baseline, whole_model_baselines
from .exact import exact_optimum, neighbours, uniform_c3a
from .measure.store import MeasurementStore, masked_url, this_worker
from .measure.timing import TimingSettings
from .models import ModelInfo, build_model
from .options import WHOLE_MODEL, SearchOptions
from .outputs import (
    ALLOCATION_FILE,
    CONFIG_FILE,
    FRONT_FILE,
    PEFT_CONFIG_FILE,
    REPORT_FILE,
    TRIALS_FILE,
    VALIDATION_FILE,
    RunFiles,
    record,
    same_identity,
    written_by,
)
from .pick_files import allocation_frame, baseline_rows, front_frame
from .problem import Assignment, Problem, build_problem, to_layer_map
from .report.render import write_report
from .space import DTYPES, Candidate
from .validate import Plan, Validation, baseline_plan, candidate_label, candidate_plan, validate, within_noise

# Every file a search may write after profiling (the folder is checked for them before anything is measured).
SEARCH_FILES = (CONFIG_FILE, PEFT_CONFIG_FILE, TRIALS_FILE, VALIDATION_FILE, FRONT_FILE, ALLOCATION_FILE, REPORT_FILE)
# measured_overhead_ms*: the per-pair differences (adapted minus frozen step, timed side by side); overhead_pct: of
# the frozen model's median step in the same window; within_noise_of_pick: validate.within_noise against the pick.
VALIDATION_COLUMNS = ("label", "kind", "baseline", "total_params", "predicted_overhead_ms", "measured_overhead_ms",
                      "measured_overhead_ms_p25", "measured_overhead_ms_p75", "overhead_pct", "within_noise_of_pick",
                      "measured_base_step_ms", "predicted_step_ms", "measured_step_ms", "measured_step_ms_p25",
                      "measured_step_ms_p75", "predicted_mem_mb", "measured_mem_mb", "picked", "status")


def whole_model_timing(device_type: str, min_time: float | None = None) -> TimingSettings:
    """The validation's timing on this kind of device (``options.WHOLE_MODEL``), ``min_time`` replacing its floor."""
    d = WHOLE_MODEL["cuda" if device_type == "cuda" else "cpu"]
    return TimingSettings(warmup=d["warmup"], min_reps=d["min_reps"], max_reps=d["max_reps"],
                          min_time_s=d["min_time"] if min_time is None else min_time)


def adapter_config(model: ModelInfo, problem: Problem, a: Assignment, **metadata) -> AdapterConfig:
    layers = {name: o.candidate.layer_config() for name, o in to_layer_map(problem, a).items()}
    return AdapterConfig(model.name, layers, metadata)


def baseline_plans(model: ModelInfo, full: Problem, baselines: Sequence[Baseline]) -> list[Plan]:
    """The validated baselines of the table (:data:`circtune.baselines.VALIDATED`) as plans: references replace
    each target with their module, adapter assignments are applied as configs (``full``: their problem)."""
    plans = []
    for b in baselines:
        if b.id not in VALIDATED:
            continue
        if b.assignment is not None:
            plans.append(candidate_plan(b.label, adapter_config(model, full, b.assignment), b.params, b.step_ms,
                                        b.mem_mb, kind="baseline", baseline=b.id))
        else:
            plans.append(baseline_plan(b.label, b.layers, b.params, b.step_ms, b.mem_mb, baseline=b.id))
    return plans


def choose(top: Sequence[Assignment], measured: dict[str, Validation], objective: str) -> int:
    """Index into ``top`` (best predicted first) of the pick: the best measured one, where the measurement tells
    them apart — a later one replaces the current pick only if its median added time (paired with the frozen
    model) is below the pick's 25th percentile (latency) or its memory is lower by more than 1 % (memory);
    otherwise the better prediction stands. ``measured`` is keyed by :func:`validate.candidate_label`."""
    best = 0
    for i in range(1, len(top)):
        a, b = measured.get(candidate_label(i)), measured.get(candidate_label(best))
        if a is None or a.overhead is None:
            continue
        if b is None or b.overhead is None:
            best = i
        elif objective == "memory" and a.mem_mb < 0.99 * b.mem_mb:
            best = i
        elif objective != "memory" and a.overhead.median < b.overhead.p25:
            best = i
    return best


def _plus(base: float | None, added: float | None) -> float | None:
    return None if base is None or added is None else base + added


def validation_frame(results: Sequence[Validation], base: Validation | None, picked: str | None) -> pd.DataFrame:
    """One row per validated plan. Predicted whole-model numbers are the frozen model's measured median step (of
    the plan's own pairs, else the ``no adapter`` plan's) plus the summed per-layer additions, so that they compare
    with the measured ones; ``within_noise_of_pick`` compares each paired added time with ``picked``'s."""
    base_ms = base.step.median if base and base.step else None
    base_mem = base.mem_mb if base else None
    pick = next((v for v in results if v.label == picked), None)
    rows = []
    for v in results:
        own_base = v.base_step.median if v.base_step else base_ms
        added = v.overhead
        rows.append({"label": v.label, "kind": v.kind, "baseline": v.baseline, "total_params": v.total_params,
                     "predicted_overhead_ms": v.predicted_overhead_ms, "measured_overhead_ms": added and added.median,
                     "measured_overhead_ms_p25": added and added.p25, "measured_overhead_ms_p75": added and added.p75,
                     "overhead_pct": v.overhead_pct,
                     "within_noise_of_pick": within_noise(added, pick.overhead if pick else None),
                     "measured_base_step_ms": v.base_step and v.base_step.median,
                     "predicted_step_ms": _plus(own_base, v.predicted_overhead_ms),
                     "measured_step_ms": v.step and v.step.median, "measured_step_ms_p25": v.step and v.step.p25,
                     "measured_step_ms_p75": v.step and v.step.p75,
                     "predicted_mem_mb": _plus(base_mem, v.predicted_mem_mb),
                     "measured_mem_mb": v.mem_mb, "picked": v.label == picked, "status": v.status})
    return pd.DataFrame(rows, columns=list(VALIDATION_COLUMNS))


def run_search(opts: SearchOptions, *, model: ModelInfo, info, settings, out: Path, storage: str,
               frame: pd.DataFrame, batch: int, seq_len: int, dtype: str, command: str | None,
               identity: dict | None = None, capacity=None, calibration: dict | None = None) -> dict:
    """Everything after profiling; returns the summary that the CLI prints, with the files ``written`` (or, when
    another worker writes or wrote this study's outputs, ``{"skipped": why}``). ``identity`` is what the output
    folder's manifest records for every file (the options that decide their content); ``capacity`` the layers'
    :class:`~circtune.capacity.Capacity` (None: no capacity, the latency-only pick); ``calibration`` what the
    metadata says of the calibration texts (None without)."""
    identity = dict(identity or {})
    here = frame[(frame.tokens == settings.tokens) & (frame.dtype == dtype)]
    if capacity is not None:  # CDVFT fits take seconds per layer: once, with a progress bar
        capacity.precompute(model.targets, [Candidate.from_row(r) for r in here[here.status == "ok"].itertuples()],
                            progress=opts.progress)
    full = build_problem(model.targets, here, opts.budget, opts.min_fill, methods=opts.methods,
                         backends=opts.backends, capacity=capacity)
    problem = allocate(full, capacity, opts.allocation)
    pick = capacity_pick(problem, opts.capacity_tolerance, opts.objective)
    front = capacity_front(problem)
    # Uniform C3A only where it meets the window (elsewhere the repaired trial would carry a misleading label).
    seeds = [pick, *_spread(supported_points(front), 12), *_spread(front, 12), *neighbours(problem, pick),
             *(u for u in uniform_c3a(problem) if problem.feasible(u.params))]
    choice = {"full": full, "pick": pick, "front": front, "best": best_capacity(problem),
              "latency_only": replace(exact_optimum(full), label="latency-only optimum"), "capacity": capacity,
              "calibration": calibration}
    name = opts.study_name or f"circtune-{model.name}-{info.fingerprint}-t{settings.tokens}-{dtype}-{problem.key()}"
    worker = this_worker()
    chosen = {**study_identity(identity), "problem": problem.key()}
    # A derived name holds the problem's digest: runs that reach it choose from the same options, whichever options
    # they were given (--backends torch on a torch-only space). A name the user chose must also match them.
    study = run_study(problem, storage=storage, study_name=name, n_trials=opts.trials, seeds=seeds,
                      sampler=opts.sampler, seed=opts.seed, progress=opts.progress, worker=worker,
                      identity=chosen, identity_ignore=() if opts.study_name else [k for k in chosen if k != "problem"])
    store = MeasurementStore(storage)
    lock = f"study-outputs:{name}"
    try:
        if not store.claim(lock, worker, opts.claim_timeout):
            return {"skipped": f"study {name} is complete; another worker is writing its outputs "
                               f"({_own_trials(study, worker)})"}
        try:
            written = _outputs_written(study, opts, out, name, identity)
            if written:
                return {"skipped": f"study {name} is complete and its outputs for these options were written by "
                                   f"{written['worker']} to {written['folder']} ({_own_trials(study, worker)}); "
                                   "pass a larger --trials to search further"}
            summary = _write_outputs(opts, model=model, info=info, settings=settings, out=out,
                                     storage=storage, problem=problem, here=here, choice=choice, study=study,
                                     name=name, batch=batch, seq_len=seq_len, dtype=dtype, command=command)
            trials = len(complete_trials(study))
            record(out, summary["written"], subcommand="search", command=command, identity=identity, study=name,
                   trials=trials, worker=worker)
            study.set_user_attr("outputs", {"folder": str(out.resolve()), "host": socket.gethostname(),
                                            "worker": worker, "trials": trials, **_output_options(opts)})
            return summary
        finally:
            store.release(lock, worker)
    finally:
        store.close()


def study_identity(identity: dict) -> dict:
    """A study's identity: what it chooses from. Its name, its trial count and how its outputs are picked and
    validated are not part of it."""
    return {k: v for k, v in identity.items()
            if k not in ("study_name", "objective", "top", "validate", "capacity_tolerance")}


def check_named_study(storage: str, name: str | None, identity: dict, budget: int, min_fill: float) -> None:
    """Before profiling: refuse a ``--study-name`` that names a study of another search in the store (its problem
    digest, known only after profiling, is checked when the study is joined)."""
    if not name:
        return
    study = existing_study(storage, name)
    if study is not None:
        check_study_identity(study, study_identity(identity), budget=budget, min_fill=min_fill, storage=storage,
                             ignore=("problem",))


def _own_trials(study, worker: str) -> str:
    trials = complete_trials(study)
    mine = sum(t.user_attrs.get("worker") == worker for t in trials)
    return f"{len(trials)} trials, {mine} of them from this worker"


def _spread(points: Sequence[Assignment], limit: int) -> list[Assignment]:
    """At most ``limit`` of ``points``, evenly spaced along them (both ends kept): the front's seeds."""
    if len(points) <= limit:
        return list(points)
    return [points[round(i * (len(points) - 1) / (limit - 1))] for i in range(limit)]


def _output_options(opts: SearchOptions) -> dict:
    return {"objective": opts.objective, "top": opts.top, "validate": opts.validate,
            "capacity_tolerance": opts.capacity_tolerance}


def _outputs_written(study, opts: SearchOptions, out: Path, name: str, identity: dict) -> dict | None:
    """Where this study's outputs for these options and at least ``opts.trials`` trials already are, if anywhere:
    this folder, when its manifest says this study wrote its adapter_config.json with these options (and the file
    is there); or the folder another worker of the study wrote them to (the outputs are written once per study;
    the others say where). A folder whose files say otherwise (another run wrote over them) is written again."""
    mine = written_by(out, CONFIG_FILE)
    if (mine and mine.get("study") == name and same_identity(mine.get("options"), identity)
            and mine.get("trials", 0) >= opts.trials and RunFiles(out).config.is_file()):
        return {"worker": mine.get("worker"), "folder": str(out)}
    record_ = study.user_attrs.get("outputs")
    if (record_ and record_.get("trials", 0) >= opts.trials
            and all(record_.get(k) == v for k, v in _output_options(opts).items())
            and not (record_.get("host") == socket.gethostname() and Path(record_["folder"]) == out.resolve())):
        return record_
    return None


def _write_outputs(opts: SearchOptions, *, model: ModelInfo, info, settings, out: Path,
                   storage: str, problem: Problem, here: pd.DataFrame, choice: dict, study, name: str,
                   batch: int, seq_len: int, dtype: str, command: str | None) -> dict:
    files = RunFiles(out)
    trials = trials_frame(problem, study)
    write_csv_atomic(trials, files.trials)
    best, tolerance = choice["best"].capacity, opts.capacity_tolerance
    top = ranked_assignments(problem, study, opts.objective, opts.top, tolerance=tolerance, best_capacity=best)
    if not top:  # cannot happen with the pick enqueued, unless the study was made from other measurements
        top = [choice["pick"]]
    # Measurement may move the pick only among the candidates that meet the capacity rule.
    ruled = max(1, sum(eligible(a, best, tolerance) for a in top))

    baselines = whole_model_baselines(model, choice["full"], here, opts.budget, choice["capacity"],
                                      choice["latency_only"])
    results: list[Validation] = []
    base = None
    if opts.validate:
        device = settings.device
        net = build_model(model.spec, device=device, dtype=DTYPES[dtype])
        plans = [candidate_plan(candidate_label(i), adapter_config(model, problem, a), a.params, a.step_ms,
                                a.mem_mb) for i, a in enumerate(top)]
        plans += baseline_plans(model, choice["full"], baselines)
        timing = whole_model_timing(device.type, opts.validate_min_time)
        results = validate(net, [t.name for t in model.targets], plans, batch=batch, seq_len=seq_len,
                           dtype=DTYPES[dtype], timing=timing, progress=opts.progress)
        del net
        base = next((v for v in results if v.baseline == "none" and v.step is not None), None)
    base_ms = base.step.median if base else None
    measured = {v.label: v for v in results if v.kind == "candidate"}
    index = choose(top[:ruled], measured, opts.objective) if results else 0
    pick, picked = top[index], measured.get(candidate_label(index))
    write_csv_atomic(validation_frame(results, base, candidate_label(index)), files.validation)
    added = picked.overhead if picked else None
    meta = {
        "model_spec": model.spec, "budget": opts.budget, "min_fill": opts.min_fill, "objective": opts.objective,
        "total_params": pick.params, "predicted_overhead_ms": pick.step_ms,
        "optimum_overhead_ms": choice["latency_only"].step_ms, "base_step_ms": base_ms,
        "predicted_step_ms": None if base_ms is None else base_ms + pick.step_ms,
        "measured_step_ms": picked.step.median if picked and picked.step else None,
        "predicted_extra_mem_mb": pick.mem_mb, "predicted_mem_mb": _plus(base.mem_mb if base else None, pick.mem_mb),
        "measured_mem_mb": picked.mem_mb if picked else None,
        "pick_label": candidate_label(index), "measured_overhead_ms": added and added.median,
        "measured_overhead_ms_p25": added and added.p25, "measured_overhead_ms_p75": added and added.p75,
        "measured_overhead_pct": picked.overhead_pct if picked else None,
        "device": info.to_dict(), "tokens": settings.tokens, "batch_size": batch, "seq_len": seq_len,
        "dtype": dtype, "command": command, "allocation": opts.allocation,
        "capacity_source": choice["capacity"].source if choice["capacity"] is not None else None,
        "capacity": pick.capacity, "capacity_best": best, "capacity_tolerance": tolerance,
        "calibration": choice["calibration"],
        "study": {"name": name, "storage": masked_url(storage), "trials": len(complete_trials(study)),
                  "sampler": opts.sampler},
    }
    config = adapter_config(model, problem, pick, **meta)
    config.save(files.config)
    candidates = [(candidate_label(i), a) for i, a in enumerate(top)]
    write_csv_atomic(front_frame(choice["front"], candidates, baseline_rows(baselines), candidate_label(index)),
                     files.front)
    write_csv_atomic(allocation_frame(problem, pick, choice["capacity"]), files.allocation)
    written = [TRIALS_FILE, VALIDATION_FILE, CONFIG_FILE, FRONT_FILE, ALLOCATION_FILE]
    if all(lc.method == "c3a" for lc in config.layers.values()) and _write_peft(config, files.peft):
        written.append(PEFT_CONFIG_FILE)
    elif files.peft.is_dir():  # a previous pick's PEFT config would contradict this one
        shutil.rmtree(files.peft)
    write_report(out, plotlyjs=opts.plotlyjs)
    written.append(REPORT_FILE)
    keys = ("total_params", "budget", "predicted_overhead_ms", "measured_overhead_ms", "optimum_overhead_ms",
            "base_step_ms", "predicted_step_ms", "measured_step_ms", "predicted_mem_mb", "measured_mem_mb",
            "allocation", "capacity_source", "capacity", "capacity_best", "capacity_tolerance")
    return {"printed": {k: meta[k] for k in keys}, "config": config, "written": written}


def _write_peft(config: AdapterConfig, folder: Path) -> bool:
    from importlib.util import find_spec

    if find_spec("peft") is None:
        return False
    from .peft_interop import to_peft_config

    to_peft_config(config).save_pretrained(str(folder))
    return True
