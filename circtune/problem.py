"""The search's problem: one adapter option per target layer, under a trainable-parameter budget, and its exact
solution.

The profiler's measurements give, for every target layer, its options: the candidates measured ``ok`` for its
shape, each with parameters, added step time and added memory. Each option also carries its
*capacity*: the share of the layer's gradient energy that the option's updates can express, weighted by the layer's
share of the model's gradient energy (:mod:`circtune.capacity`; 0 when unknown). An assignment picks one option
per layer; its predicted cost and its capacity are sums over layers (additive model). Constraint:
``min_fill·budget ≤ Σ params ≤ budget``. :func:`exact_optimum` solves the latency-only problem exactly: a
multiple-choice knapsack, dynamic programming over parameter totals (in units of the gcd of every option's count),
minimising the summed step time. :func:`repair` moves a proposal into the budget window. The capacity-aware rules
(balance windows per layer, the exact time-versus-capacity front and the pick) are :mod:`circtune.allocation`; the
Optuna study around them is :mod:`circtune._search`.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .adapters.methods import method_names
from .candidate import Candidate
from .models import TargetLayer
from .options import OBJECTIVES, BudgetError
from .preflight import format_count

if TYPE_CHECKING:
    from .capacity import Capacity

# Above this many parameter-total cells the knapsack table would not fit comfortably in memory.
_MAX_CELLS = 4_000_000


@dataclass(frozen=True)
class Option:
    candidate: Candidate
    params: int
    step_ms: float
    mem_mb: float
    capacity: float = 0.0  # the layer's energy share x the option's captured fraction; 0 when unknown

    @property
    def label(self) -> str:
        return self.candidate.label


def options_by_shape(frame: pd.DataFrame, *, methods: Sequence[str] | None = None,
                     backends: Sequence[str] | None = None) -> dict[tuple[int, int], list[Option]]:
    """The adapter options of each shape: ok rows of ``methods`` and ``backends``, sorted by params then time."""
    ok = frame[(frame.status == "ok") & frame.method.isin(list(methods or method_names("adapter")))]
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
    """One option list per target layer and the parameter window [lo, hi]. ``allocation`` names the rule that
    restricted the options (:mod:`circtune.allocation`; ``free``: none) and ``windows`` its per-layer parameter
    windows (None when free)."""

    layers: tuple[TargetLayer, ...]
    options: tuple[tuple[Option, ...], ...]  # per layer
    budget: int
    min_fill: float
    allocation: str = "free"
    windows: tuple[tuple[float, float], ...] | None = None

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

    def capacity(self, choice: Sequence[int]) -> float:
        """The captured capacity of an assignment: the sum of its options' capacities."""
        return math.fsum(self.options[i][k].capacity for i, k in enumerate(choice))

    def feasible(self, params: int) -> bool:
        return self.lo <= params <= self.hi

    def signature(self, choice: Sequence[int]) -> tuple:
        """What an assignment is up to swapping layers of one shape that weigh the same: equal signatures have equal
        predictions (time, memory and capacity). The option is named by its label and capacity, not its index:
        layers cut to different balance windows, or weighted by different energies, differ there."""
        return tuple(sorted(Counter((layer.shape, self.options[i][k].label, self.options[i][k].capacity)
                                    for i, (layer, k) in enumerate(zip(self.layers, choice, strict=True))).items()))

    def key(self) -> str:
        """A short digest of what the study chooses from (layers, their options and the options' capacities), the
        budget window and the allocation rule."""
        h = hashlib.sha256(f"{self.budget}:{self.min_fill}:{self.allocation}".encode())
        for layer, opts in zip(self.layers, self.options, strict=True):
            h.update(f"{layer.name}:{'|'.join(f'{o.label}={o.capacity:.9g}' for o in opts)}".encode())
        return h.hexdigest()[:10]


def build_problem(layers: Sequence[TargetLayer], frame: pd.DataFrame, budget: int, min_fill: float = 0.9, *,
                  methods: Sequence[str] | None = None, backends: Sequence[str] | None = None,
                  capacity: Capacity | None = None) -> Problem:
    """The search problem for ``layers`` from the measurement frame; errors if a shape has no usable option or if
    no assignment can meet the budget window (stating the smallest and largest feasible totals). With
    ``capacity``, every option's capacity is ``capacity.score(layer, candidate)`` (per layer: the energy is the
    layer's); without, 0."""
    if not 0 <= min_fill <= 1:
        raise BudgetError(f"min fill must be within [0, 1], got {min_fill}")
    by_shape = options_by_shape(frame, methods=methods, backends=backends)
    missing = sorted({layer.shape for layer in layers} - set(by_shape))
    if missing:
        shapes = ", ".join(f"{a}x{b}" for a, b in missing)
        raise ValueError(f"no measured adapter option for shape(s) {shapes} (methods {', '.join(methods or ())}"
                         f"{'; backends ' + ', '.join(backends) if backends else ''}): see measurements.csv status")
    if capacity is None:
        options = tuple(tuple(by_shape[layer.shape]) for layer in layers)
    else:
        options = tuple(tuple(replace(o, capacity=float(capacity.score(layer, o.candidate)))
                              for o in by_shape[layer.shape]) for layer in layers)
    problem = Problem(tuple(layers), options, budget, min_fill)
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
    capacity: float = 0.0  # the sum of the options' capacities

    def layer_options(self, problem: Problem) -> list[Option]:
        return [problem.options[i][k] for i, k in enumerate(self.choice)]


def _assignment(problem: Problem, choice: Sequence[int], label: str = "") -> Assignment:
    return Assignment(tuple(int(k) for k in choice), *problem.totals(choice), label, problem.capacity(choice))


def param_unit(problem: Problem) -> int:
    """The gcd of every option's parameter count: the knapsack tables count totals in these units."""
    g = 0
    for opts in problem.options:
        for o in opts:
            g = math.gcd(g, o.params)
    return g or 1


def exact_optimum(problem: Problem) -> Assignment:
    """The least total step time over all assignments with lo ≤ Σ params ≤ hi (multiple-choice knapsack).

    Dynamic programming over parameter totals in units of g, the gcd of every option's count: ``best[s]`` is the
    least time to reach total ``s·g`` with the layers so far; each layer takes the minimum over its options of the
    table shifted by the option's size. Exact whenever the table (hi/g cells) fits; otherwise ValueError.
    """
    return knapsack(problem, [[o.step_ms for o in opts] for opts in problem.options], label="exact optimum")


def knapsack(problem: Problem, values: Sequence[Sequence[float]], *, maximise: bool = False,
             label: str = "") -> Assignment:
    """The assignment with the least (``maximise``: the largest) sum of ``values[layer][option]`` over all
    assignments with lo ≤ Σ params ≤ hi: the dynamic programme of :func:`exact_optimum` on any additive value."""
    g = param_unit(problem)
    hi = problem.hi // g
    lo = -(-problem.lo // g)
    if hi + 1 > _MAX_CELLS:
        raise ValueError(f"the exact optimum needs a table of {hi + 1:,} parameter totals (budget {problem.hi:,} "
                         f"in units of {g}); more than {_MAX_CELLS:,}")
    sign = -1.0 if maximise else 1.0
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
            shifted = best[: hi + 1 - w] + sign * float(values[i][k])
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
    return _assignment(problem, choice[::-1], label)


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
