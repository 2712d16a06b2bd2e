"""The search's study: Optuna around the problem of :mod:`circtune.problem`.

A multi-objective Optuna study — predicted added step time (down), captured capacity (up) and, where it matters
(:func:`memory_matters`), predicted added memory (down); the budget as constraints set with
``trial.set_constraint``, Optuna 5's way — starts from enqueued trials: the exact capacity pick
(:func:`~circtune.allocation.capacity_pick`), points of the exact time-versus-capacity front, the pick's one-layer
neighbours and the uniform-C3A assignments, and then lets TPE or NSGA-II explore. A proposal is first moved into
the budget window by :func:`~circtune.exact.repair` (random per-layer picks almost never land in it); the
problem's options are already cut to the balance windows (:func:`~circtune.allocation.allocate`), so a repaired
assignment obeys them too. The repaired assignment is what the trial records and is scored on. The study lives in
the same database as the measurements and resumes by name. :func:`ranked_assignments` orders the feasible trials
by the pick rule; validation measures the best few.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .exact import repair
from .problem import Assignment, Problem, _assignment, pick_order

# Seeds of these sources are enqueued once per study (by label).
SEEDED = ("optimum", "front", "seed")

SAMPLERS = ("tpe", "nsga2")


def _sampler(name: str, seed: int | None):
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    raise ValueError(f"sampler {name!r} is not supported; accepted: {', '.join(SAMPLERS)}")


# Optuna's heartbeat: a worker's running trial is stamped this often; one not stamped for twice as long (its worker
# died) is failed by the next worker and enqueued again, at most 3 times.
HEARTBEAT_S = 30
MAX_RETRY = 3


def study_storage(url: str, heartbeat_s: int = HEARTBEAT_S):
    """Optuna's ``RDBStorage`` on ``url`` with heartbeats and a retry callback for trials left stale by a dead
    worker; SQLite files get the store's write-ahead-log pragmas and transactions that take the write lock first
    (:func:`~circtune.measure.store.sqlite_pragmas`, :func:`~circtune.measure.store.sqlite_immediate_transactions`),
    so that Optuna's read-then-write steps are atomic across workers."""
    import warnings

    import optuna

    from .measure.store import sqlite_immediate_transactions, sqlite_pragmas

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():  # heartbeats and the retry callback are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
    sqlite_pragmas(storage.engine)
    sqlite_immediate_transactions(storage.engine)
    return storage


def _fail_dead_workers(study, storage) -> int:
    """Fail the running trials of workers on this host whose process is gone (a killed run being re-run) and
    enqueue them again through the storage's retry callback, without waiting for the heartbeat's grace period.
    Returns how many were failed."""
    import copy

    import optuna

    from ._optuna_compat import trial_id
    from .measure.store import dead_local_worker

    failed = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not dead_local_worker(t.user_attrs.get("worker", "")):
            continue
        tid = trial_id(storage, study, t)  # Optuna's FrozenTrial has the id only as a private attribute
        try:
            if not storage.set_trial_state_values(tid, optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first
            continue
        failed += 1
        storage.get_heartbeat_stale_trial_callback()(study, copy.deepcopy(storage.get_trial(tid)))
    return failed


def memory_matters(problem: Problem) -> bool:
    """Whether predicted memory is the study's third objective: it was measured (some option adds memory) and
    trades against time — in some layer a faster option adds more memory than a slower one, by at least 1 % of
    the layer's largest addition. Where memory falls with time (or was not measured), the two other objectives
    already order it."""
    for opts in problem.options:
        top = max((o.mem_mb for o in opts), default=0.0)
        if not top > 0:
            continue
        by_time = sorted(opts, key=lambda o: o.step_ms)
        least_after = float("inf")
        for o in reversed(by_time):  # least memory among the slower options, from the slowest down
            if o.mem_mb > least_after + 0.01 * top:
                return True
            least_after = min(least_after, o.mem_mb)
    return False


def study_directions(problem: Problem) -> list[str]:
    """time down, capacity up, and memory down where :func:`memory_matters`."""
    return ["minimize", "maximize"] + (["minimize"] if memory_matters(problem) else [])


def complete_trials(study) -> list:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def run_study(problem: Problem, *, storage: str, study_name: str, n_trials: int, seeds: Sequence[Assignment] = (),
              sampler: str = "tpe", seed: int | None = 0, progress: bool = True, worker: str | None = None,
              heartbeat_s: int = HEARTBEAT_S, identity: Mapping | None = None, identity_ignore: Sequence[str] = ()):
    """Create or join the study ``study_name`` in ``storage`` (a SQLAlchemy URL) and run trials until it holds
    ``n_trials`` complete ones; returns the study.

    Optuna's own distributed machinery: every worker samples against the shared ``RDBStorage`` (so each sees
    the others' trials), with heartbeats and a retry callback (:func:`study_storage`). ``seeds`` (each with a
    ``source``/``label`` user attribute) are enqueued once per study, under a lock in the store's claims table,
    so workers that start together do not enqueue them twice, and a run killed while enqueuing completes them.
    Every trial records its ``worker`` (``host:pid``); a killed run loses only the trial in flight, which the
    next run fails and enqueues again. Several workers may overshoot ``n_trials`` by one trial each at most.
    ``identity`` (JSON-able: what the study chooses from) is recorded when the study is created; joining a study
    of another identity (a ``--study-name`` reused with another budget, say; ``identity_ignore`` keys aside)
    raises :class:`StudyMismatch`.
    """
    import optuna

    from ._signals import check_interrupted, note_kept
    from .measure.store import MeasurementStore, this_worker

    # ERROR: a trial fails only when the run is interrupted (the objective is arithmetic), and Optuna would log
    # that with a traceback before the CLI's one-line summary.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    worker = worker or this_worker()
    labels = [[o.label for o in opts] for opts in problem.options]
    store = MeasurementStore(storage)
    try:
        # Optuna creates its tables and records its schema version on first use: workers starting together on a
        # new database would collide there, so one at a time. Seeds likewise.
        with store.lock("optuna-storage", worker):
            rdb = study_storage(storage, heartbeat_s)
            directions = study_directions(problem)
            study = optuna.create_study(study_name=study_name, storage=rdb, directions=directions,
                                        sampler=_sampler(sampler, seed), load_if_exists=True)
        _fail_dead_workers(study, rdb)
        with store.lock(f"study-seeds:{study_name}", worker):
            if "budget" not in study.user_attrs:
                study.set_user_attr("budget", problem.budget)
                study.set_user_attr("min_fill", problem.min_fill)
                if identity is not None:
                    study.set_user_attr("identity", _plain(identity))
            else:
                check_study_identity(study, identity, budget=problem.budget, min_fill=problem.min_fill,
                                     storage=storage, ignore=identity_ignore)
            have = {t.user_attrs.get("label") for t in study.get_trials(deepcopy=False)
                    if t.user_attrs.get("source") in SEEDED}
            for a in seeds:
                if a.label in have:
                    continue
                params = {layer.name: labels[i][k] for i, (layer, k) in enumerate(zip(problem.layers, a.choice,
                                                                                       strict=True))}
                source = ("optimum" if a.label in ("exact optimum", "capacity pick")
                          else "front" if a.label.startswith("front ") else "seed")
                study.enqueue_trial(params, user_attrs={"source": source, "label": a.label})
                have.add(a.label)
    finally:
        store.close()

    with_memory = len(directions) == 3

    def objective(trial) -> tuple[float, ...]:
        check_interrupted()  # a signal that came during Optuna's own work stops here: the trial is recorded failed
        trial.set_user_attr("worker", worker)
        proposed = [labels[i].index(trial.suggest_categorical(layer.name, labels[i]))
                    for i, layer in enumerate(problem.layers)]
        choice = repair(problem, proposed)
        trial.set_user_attr("choice", choice)
        params, step_ms, mem_mb = problem.totals(choice)
        trial.set_constraint("over_budget", params - problem.hi)
        trial.set_constraint("under_fill", problem.lo - params)
        trial.set_user_attr("params", params)
        trial.set_user_attr("source", trial.user_attrs.get("source", "sampler"))
        capacity = problem.capacity(choice)
        return (step_ms, capacity, mem_mb) if with_memory else (step_ms, capacity)

    def note(study, _trial) -> None:
        done = len(complete_trials(study))
        note_kept("study", f"{done} of {n_trials} trials in study {study_name}")
        check_interrupted()

    note(study, None)
    remaining = n_trials - len(complete_trials(study))
    if remaining > 0:
        stop = optuna.study.MaxTrialsCallback(n_trials, states=(optuna.trial.TrialState.COMPLETE,))
        try:
            study.optimize(objective, n_trials=remaining, show_progress_bar=progress, callbacks=[stop, note])
        except KeyboardInterrupt:  # the trial in flight may have been stored after the last note: count again
            note(study, None)
            raise
    return study


class StudyMismatch(ValueError):
    """A study name that already holds a study of another search."""


def _plain(identity: Mapping | None) -> dict:
    import json

    return json.loads(json.dumps(dict(identity or {}), default=str))


def check_study_identity(study, identity: Mapping | None, *, budget: int, min_fill: float, storage: str,
                         ignore: Sequence[str] = ()) -> None:
    """Refuse (:class:`StudyMismatch`) to join a study made for another search: its recorded identity (or, for
    studies recorded before identities were, its budget and fill) must match, ``ignore`` keys aside."""
    from .measure.store import masked_url

    found = study.user_attrs.get("identity")
    if found is not None and identity is not None:
        wanted = _plain(identity)
        diff = [f"{k} {found.get(k)!r} (this run: {wanted.get(k)!r})" for k in dict.fromkeys([*found, *wanted])
                if k not in ignore and found.get(k) != wanted.get(k)]
    else:
        diff = [f"{k} {study.user_attrs.get(k)!r} (this run: {v!r})"
                for k, v in (("budget", budget), ("min_fill", min_fill)) if study.user_attrs.get(k) != v]
    if diff:
        raise StudyMismatch(f"study {study.study_name!r} in {masked_url(storage)} was made for another search: "
                            f"{', '.join(diff[:3])}{' ...' if len(diff) > 3 else ''}; pass another --study-name, or "
                            "this study's options")


def existing_study(storage: str, study_name: str):
    """The study ``study_name`` in ``storage`` if the store holds Optuna's tables and that study, else None; creates
    nothing."""
    import optuna
    from sqlalchemy import create_engine, inspect

    engine = create_engine(storage)
    try:
        if not inspect(engine).has_table("studies"):
            return None
    finally:
        engine.dispose()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        return optuna.load_study(study_name=study_name, storage=study_storage(storage))
    except KeyError:
        return None


def trial_assignments(problem: Problem, study) -> list[tuple[object, Assignment]]:
    """Every complete trial of ``study`` as (trial, assignment), skipping trials whose choices are not options of
    ``problem`` (a study made from other measurements)."""
    import optuna

    labels = [{o.label: k for k, o in enumerate(opts)} for opts in problem.options]
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        try:
            choice = [labels[i][t.params[layer.name]] for i, layer in enumerate(problem.layers)]
        except KeyError:
            continue
        repaired = t.user_attrs.get("choice")
        if repaired is not None and len(repaired) == len(choice):
            choice = repaired
        out.append((t, _assignment(problem, choice, t.user_attrs.get("label", ""))))
    return out


def trials_frame(problem: Problem, study) -> pd.DataFrame:
    """``trials.csv``: number, state, source, label, step_ms, mem_mb, capacity, total_params, feasible, pareto (on
    the front of the study's objectives among feasible trials: step_ms down, capacity up, and mem_mb down where
    memory is an objective)."""
    rows = [{"number": t.number, "state": t.state.name, "source": t.user_attrs.get("source", "sampler"),
             "label": a.label, "step_ms": a.step_ms, "mem_mb": a.mem_mb, "capacity": a.capacity,
             "total_params": a.params, "feasible": problem.feasible(a.params)}
            for t, a in trial_assignments(problem, study)]
    frame = pd.DataFrame(rows, columns=["number", "state", "source", "label", "step_ms", "mem_mb", "capacity",
                                        "total_params", "feasible"])
    feasible = frame[frame.feasible]
    # Each objective as "lower is better".
    axes = [feasible.step_ms.to_numpy(), -feasible.capacity.to_numpy()]
    if memory_matters(problem):
        axes.append(feasible.mem_mb.to_numpy())
    front = set()
    for n, number in enumerate(feasible.number):
        no_worse = np.all([a <= a[n] for a in axes], axis=0)
        better = np.any([a < a[n] for a in axes], axis=0)
        if not (no_worse & better).any():
            front.add(number)
    frame["pareto"] = frame.number.isin(front)
    return frame


def ranked_assignments(problem: Problem, study, objective: str, top: int, *, tolerance: float | None = None,
                       best_capacity: float | None = None) -> list[Assignment]:
    """The ``top`` best feasible assignments of the study, distinct up to swapping layers of one shape (those
    predict the same). Without ``tolerance``: ordered by ``objective``. With it, by the pick rule
    (:mod:`circtune.allocation`): first those whose capacity is at least ``(1 - tolerance) · best_capacity``,
    ordered by ``objective`` (the exact capacity pick, enqueued, comes first unless a trial beats it under the
    rule), then the others, most capacious first."""
    from .allocation import eligible

    seen, unique = set(), []
    for _, a in trial_assignments(problem, study):
        if problem.feasible(a.params) and problem.signature(a.choice) not in seen:
            seen.add(problem.signature(a.choice))
            unique.append(a)
    if tolerance is None:
        return pick_order(unique, objective)[:top]
    best = max((a.capacity for a in unique), default=0.0) if best_capacity is None else best_capacity
    ok = [a for a in unique if eligible(a, best, tolerance)]
    rest = sorted((a for a in unique if not eligible(a, best, tolerance)),
                  key=lambda a: (-a.capacity, a.step_ms, a.mem_mb))
    return (pick_order(ok, objective) + rest)[:top]
