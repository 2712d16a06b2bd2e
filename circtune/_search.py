"""The search: one adapter configuration per target layer, under a trainable-parameter budget.

The profiler's measurements give, for every target layer, its options: the candidates measured ``ok`` for its
shape, each with parameters, added step time and added memory. An assignment picks one option per layer; its
predicted cost is the sum over layers (additive model). Constraint: ``min_fill·budget ≤ Σ params ≤ budget``.

1. :func:`exact_optimum` solves the additive problem exactly: a multiple-choice knapsack, dynamic programming over
   parameter totals (in units of the gcd of every option's count), minimising the summed step time.
2. An Optuna study (two objectives: predicted step time and predicted memory; the budget as constraints set with
   ``trial.set_constraint``, Optuna 5's way) starts from enqueued trials — the optimum, its one-layer neighbours
   and the uniform-C3A baselines — and then lets TPE or NSGA-II explore. A proposal is first moved into the
   budget window by :func:`repair` (random per-layer picks almost never land in it), and the repaired
   assignment is what the trial records and is scored on. The study lives in the same database as
   the measurements and resumes by name.
3. :func:`ranked_assignments` orders the feasible trials by the chosen objective; validation measures the best few.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from .models import TargetLayer
from .options import OBJECTIVES, BudgetError, format_count, parse_budget  # noqa: F401  (the search's names)
from .space import Candidate

# Above this many parameter-total cells the knapsack table would not fit comfortably in memory.
_MAX_CELLS = 4_000_000


@dataclass(frozen=True)
class Option:
    candidate: Candidate
    params: int
    step_ms: float
    mem_mb: float

    @property
    def label(self) -> str:
        return self.candidate.label


def options_by_shape(frame: pd.DataFrame, *, methods: Sequence[str] | None = None,
                     backends: Sequence[str] | None = None) -> dict[tuple[int, int], list[Option]]:
    """The adapter options of each shape: ok rows of ``methods`` and ``backends``, sorted by params then time."""
    ok = frame[(frame.status == "ok") & frame.method.isin(list(methods or ("c3a", "cdvft")))]
    if backends:
        ok = ok[ok.backend.isin(list(backends))]
    out: dict[tuple[int, int], list[Option]] = {}
    for row in ok.itertuples():
        # An adapter cannot make the step faster or smaller: a negative added median is timing noise on a layer
        # whose cost is below the resolution, and counts as zero.
        mem = 0.0 if pd.isna(row.peak_mem_mb) else max(0.0, float(row.peak_mem_mb))
        out.setdefault((int(row.d_in), int(row.d_out)), []).append(
            Option(Candidate.from_row(row), int(row.params), max(0.0, float(row.step_ms)), mem))
    for opts in out.values():
        opts.sort(key=lambda o: (o.params, o.step_ms, o.mem_mb))
    return out


@dataclass(frozen=True)
class Problem:
    """One option list per target layer and the parameter window [lo, hi]."""

    layers: tuple[TargetLayer, ...]
    options: tuple[tuple[Option, ...], ...]  # per layer
    budget: int
    min_fill: float

    @property
    def lo(self) -> int:
        return math.ceil(self.min_fill * self.budget)

    @property
    def hi(self) -> int:
        return self.budget

    def totals(self, choice: Sequence[int]) -> tuple[int, float, float]:
        """(params, step_ms, mem_mb) of an assignment given as one option index per layer."""
        opts = [self.options[i][k] for i, k in enumerate(choice)]
        return sum(o.params for o in opts), sum(o.step_ms for o in opts), sum(o.mem_mb for o in opts)

    def feasible(self, params: int) -> bool:
        return self.lo <= params <= self.hi

    def signature(self, choice: Sequence[int]) -> tuple:
        """What an assignment is up to swapping layers of one shape: equal signatures have equal predictions."""
        return tuple(sorted(Counter((layer.shape, k) for layer, k in zip(self.layers, choice, strict=True)).items()))

    def key(self) -> str:
        """A short digest of what the study chooses from (layers and their options) and the budget window."""
        h = hashlib.sha256(f"{self.budget}:{self.min_fill}".encode())
        for layer, opts in zip(self.layers, self.options, strict=True):
            h.update(f"{layer.name}:{'|'.join(o.label for o in opts)}".encode())
        return h.hexdigest()[:10]


def build_problem(layers: Sequence[TargetLayer], frame: pd.DataFrame, budget: int, min_fill: float = 0.9, *,
                  methods: Sequence[str] | None = None, backends: Sequence[str] | None = None) -> Problem:
    """The search problem for ``layers`` from the measurement frame; errors if a shape has no usable option or if
    no assignment can meet the budget window (stating the smallest and largest feasible totals)."""
    if not 0 <= min_fill <= 1:
        raise BudgetError(f"min fill must be within [0, 1], got {min_fill}")
    by_shape = options_by_shape(frame, methods=methods, backends=backends)
    missing = sorted({layer.shape for layer in layers} - set(by_shape))
    if missing:
        shapes = ", ".join(f"{a}x{b}" for a, b in missing)
        raise ValueError(f"no measured adapter option for shape(s) {shapes} (methods {', '.join(methods or ())}"
                         f"{'; backends ' + ', '.join(backends) if backends else ''}): see measurements.csv status")
    problem = Problem(tuple(layers), tuple(tuple(by_shape[layer.shape]) for layer in layers), budget, min_fill)
    smallest = sum(min(o.params for o in opts) for opts in problem.options)
    largest = sum(max(o.params for o in opts) for opts in problem.options)
    if smallest > problem.hi or largest < problem.lo:
        raise BudgetError(
            f"budget {format_count(budget)} cannot be met: with {len(layers)} target layers and this space, totals "
            f"range from {smallest:,} to {largest:,} parameters (smallest and largest feasible), and the budget "
            f"needs {problem.lo:,}..{problem.hi:,} (--min-fill {min_fill:g})")
    return problem


@dataclass(frozen=True)
class Assignment:
    choice: tuple[int, ...]  # option index per layer
    params: int
    step_ms: float
    mem_mb: float
    label: str = ""

    def layer_options(self, problem: Problem) -> list[Option]:
        return [problem.options[i][k] for i, k in enumerate(self.choice)]


def _assignment(problem: Problem, choice: Sequence[int], label: str = "") -> Assignment:
    return Assignment(tuple(int(k) for k in choice), *problem.totals(choice), label)


def exact_optimum(problem: Problem) -> Assignment:
    """The least total step time over all assignments with lo ≤ Σ params ≤ hi (multiple-choice knapsack).

    Dynamic programming over parameter totals in units of g, the gcd of every option's count: ``best[s]`` is the
    least time to reach total ``s·g`` with the layers so far; each layer takes the minimum over its options of the
    table shifted by the option's size. Exact whenever the table (hi/g cells) fits; otherwise ValueError.
    """
    g = 0
    for opts in problem.options:
        for o in opts:
            g = math.gcd(g, o.params)
    g = g or 1
    hi = problem.hi // g
    lo = -(-problem.lo // g)
    if hi + 1 > _MAX_CELLS:
        raise ValueError(f"the exact optimum needs a table of {hi + 1:,} parameter totals (budget {problem.hi:,} "
                         f"in units of {g}); more than {_MAX_CELLS:,}")
    best = np.full(hi + 1, np.inf)
    best[0] = 0.0
    parents = np.zeros((len(problem.options), hi + 1), dtype=np.int32)
    for i, opts in enumerate(problem.options):
        new = np.full(hi + 1, np.inf)
        arg = np.zeros(hi + 1, dtype=np.int32)
        for k, o in enumerate(opts):
            w = o.params // g
            if w > hi:
                continue
            shifted = best[: hi + 1 - w] + o.step_ms
            better = shifted < new[w:]
            new[w:][better] = shifted[better]
            arg[w:][better] = k
        best, parents[i] = new, arg
    window = best[lo:]
    if not np.isfinite(window).any():
        raise BudgetError(f"no assignment reaches {problem.lo:,}..{problem.hi:,} parameters exactly with these "
                          "options (totals skip over the window); widen --min-fill or change the budget")
    s = lo + int(np.argmin(window))
    choice = []
    for i in range(len(problem.options) - 1, -1, -1):
        k = int(parents[i, s])
        choice.append(k)
        s -= problem.options[i][k].params // g
    return _assignment(problem, choice[::-1], "exact optimum")


def neighbours(problem: Problem, base: Assignment, limit: int = 8) -> list[Assignment]:
    """Feasible assignments one layer away from ``base``, cheapest first (seeds near the optimum)."""
    seen, out = {problem.signature(base.choice)}, []
    for i, opts in enumerate(problem.options):
        for k in range(len(opts)):
            choice = list(base.choice)
            choice[i] = k
            a = _assignment(problem, choice, "optimum neighbour")
            if problem.signature(a.choice) not in seen and problem.feasible(a.params):
                seen.add(problem.signature(a.choice))
                out.append(a)
    out.sort(key=lambda a: (a.step_ms, a.mem_mb))
    return [replace(a, label=f"optimum neighbour {n}") for n, a in enumerate(out[:limit], 1)]


def uniform_c3a(problem: Problem) -> list[Assignment]:
    """For each C3A block size measured for every layer: every layer C3A at that p (its fastest path)."""
    common = None
    for opts in problem.options:
        sizes = {o.candidate.block_size for o in opts if o.candidate.method == "c3a"}
        common = sizes if common is None else common & sizes
    out = []
    for p in sorted(common or ()):
        choice = [min((k for k, o in enumerate(opts) if o.candidate.method == "c3a" and o.candidate.block_size == p),
                      key=lambda k, opts=opts: opts[k].step_ms) for opts in problem.options]
        out.append(_assignment(problem, choice, f"uniform c3a p={p}"))
    return out


def repair(problem: Problem, choice: Sequence[int]) -> list[int]:
    """Move an assignment into the parameter window, one layer at a time: while over budget, the layer with the
    most parameters takes its fastest option with fewer; while under the fill, the layer with the fewest takes its
    fastest option with more (that does not overshoot the budget, when one exists). Samplers propose freely; the
    study evaluates the repaired assignment, so almost every trial is feasible."""
    choice = list(choice)
    params = problem.totals(choice)[0]
    for _ in range(4 * sum(len(o) for o in problem.options)):
        if params > problem.hi:
            order = sorted(range(len(choice)), key=lambda i: -problem.options[i][choice[i]].params)
            smaller = lambda o, cur: o.params < cur.params  # noqa: E731
        elif params < problem.lo:
            order = sorted(range(len(choice)), key=lambda i: problem.options[i][choice[i]].params)
            smaller = lambda o, cur: o.params > cur.params  # noqa: E731
        else:
            break
        for i in order:
            opts, cur = problem.options[i], problem.options[i][choice[i]]
            moves = [k for k, o in enumerate(opts) if smaller(o, cur)]
            if params < problem.lo:
                fitting = [k for k in moves if params - cur.params + opts[k].params <= problem.hi]
                moves = fitting or moves
            if moves:
                k = min(moves, key=lambda k, opts=opts: opts[k].step_ms)
                params += opts[k].params - cur.params
                choice[i] = k
                break
        else:
            break
    return choice


def pick_order(assignments: Sequence[Assignment], objective: str) -> list[Assignment]:
    """Sort by the objective: latency (time, then memory), memory (memory, then time), balanced (each
    normalised by its best value, summed)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not supported; accepted: {', '.join(OBJECTIVES)}")
    if objective == "latency":
        return sorted(assignments, key=lambda a: (a.step_ms, a.mem_mb))
    if objective == "memory":
        return sorted(assignments, key=lambda a: (a.mem_mb, a.step_ms))
    t0 = min((a.step_ms for a in assignments), default=1.0) or 1.0
    m0 = min((a.mem_mb for a in assignments), default=1.0) or 1.0
    return sorted(assignments, key=lambda a: a.step_ms / abs(t0) + a.mem_mb / abs(m0))


def to_layer_map(problem: Problem, a: Assignment) -> Mapping[str, Option]:
    return {layer.name: problem.options[i][k] for i, (layer, k) in enumerate(zip(problem.layers, a.choice,
                                                                                  strict=True))}


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

    from .measure.store import dead_local_worker

    failed = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not dead_local_worker(t.user_attrs.get("worker", "")):
            continue
        try:
            if not storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first
            continue
        failed += 1
        storage.get_heartbeat_stale_trial_callback()(study, copy.deepcopy(storage.get_trial(t._trial_id)))
    return failed


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
            study = optuna.create_study(study_name=study_name, storage=rdb, directions=["minimize", "minimize"],
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
                    if t.user_attrs.get("source") in ("optimum", "seed")}
            for a in seeds:
                if a.label in have:
                    continue
                params = {layer.name: labels[i][k] for i, (layer, k) in enumerate(zip(problem.layers, a.choice,
                                                                                       strict=True))}
                source = "optimum" if a.label == "exact optimum" else "seed"
                study.enqueue_trial(params, user_attrs={"source": source, "label": a.label})
                have.add(a.label)
    finally:
        store.close()

    def objective(trial) -> tuple[float, float]:
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
        return step_ms, mem_mb

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
    """``trials.csv``: number, state, source, label, step_ms, mem_mb, total_params, feasible, pareto (on the front
    of (step_ms, mem_mb) among feasible trials)."""
    rows = [{"number": t.number, "state": t.state.name, "source": t.user_attrs.get("source", "sampler"),
             "label": a.label, "step_ms": a.step_ms, "mem_mb": a.mem_mb, "total_params": a.params,
             "feasible": problem.feasible(a.params)} for t, a in trial_assignments(problem, study)]
    frame = pd.DataFrame(rows, columns=["number", "state", "source", "label", "step_ms", "mem_mb", "total_params",
                                        "feasible"])
    feasible = frame[frame.feasible]
    front = set()
    for r in feasible.itertuples():
        dominated = ((feasible.step_ms <= r.step_ms) & (feasible.mem_mb <= r.mem_mb)
                     & ((feasible.step_ms < r.step_ms) | (feasible.mem_mb < r.mem_mb))).any()
        if not dominated:
            front.add(r.number)
    frame["pareto"] = frame.number.isin(front)
    return frame


def ranked_assignments(problem: Problem, study, objective: str, top: int) -> list[Assignment]:
    """The ``top`` best feasible assignments of the study under ``objective``, distinct up to swapping layers of
    one shape (those predict the same)."""
    seen, unique = set(), []
    for _, a in trial_assignments(problem, study):
        if problem.feasible(a.params) and problem.signature(a.choice) not in seen:
            seen.add(problem.signature(a.choice))
            unique.append(a)
    return pick_order(unique, objective)[:top]
