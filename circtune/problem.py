"""The search's problem: one adapter option per target layer, under a trainable-parameter budget.

The profiler's measurements give, for every target layer, its options: the candidates measured ``ok`` for its
shape, each with parameters, added step time and added memory. Each option also carries its
*capacity*: the share of the layer's gradient energy that the option's updates can express, weighted by the layer's
share of the model's gradient energy (:mod:`circtune.capacity`; 0 when unknown). An assignment picks one option
per layer; its predicted cost and its capacity are sums over layers (additive model). Constraint:
``min_fill·budget ≤ Σ params ≤ budget``. Its exact solutions (the latency-only knapsack, neighbours, uniform C3A,
the repair of a proposal) are :mod:`circtune.exact`; the capacity-aware rules (balance windows per layer, the exact
time-versus-capacity front and the pick) are :mod:`circtune.allocation`; the Optuna study around them is
:mod:`circtune._search`.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pandas as pd

from .adapters.methods import method_names
from .candidate import Candidate
from .models import TargetLayer
from .options import OBJECTIVES, BudgetError
from .preflight import format_count

if TYPE_CHECKING:
    from .capacity import Capacity



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
