"""Where the budget goes: balance windows per layer, the exact time-versus-capacity front, and the pick.

Every option of the search problem (:mod:`circtune.problem`) has a predicted added step time and a *capacity*:
the share of the model's gradient energy that the option lets its layer's update express (the layer's energy
share times the option's captured fraction, :mod:`circtune.capacity`). Both add up over layers, so the exact
knapsack machinery carries over.

**Balance rule** (``allocation="balanced"``, the default): layer ``l`` may hold only options whose parameter count
lies within ``[½, 2] × share_l``, where ``share_l = budget × energy_l`` is its importance-weighted share of the
budget (uniform energy without calibration data: every layer gets the mean share). This is the cap PEFT's
reallocators use (at most twice, at least half the mean rank). A window that holds no option — a layer whose
gradient energy is tiny (at random init attention's query layers get ~1e-5 of it) or huge, or whose options jump
over its window — is widened to the nearest option below it and the nearest above it: a layer's adapter cannot be
smaller than its smallest option, and refusing the budget for it would make the rule unusable on real gradients.
``allocation="free"`` drops the windows. A budget the rule cannot meet (the windows' options cannot total the
budget window) is a :class:`~circtune.options.BudgetError` that names the rule and the budgets that would meet it.

**The front** (:func:`capacity_front`): every assignment within the parameter window that no other one beats on
both predicted time (lower) and capacity (higher), computed exactly — not only the supported (convex-hull) points
a Lagrangian sweep of ``time − λ·capacity`` would find, but the non-supported ones too. The dynamic programme runs
over parameter totals as :func:`~circtune.exact.exact_optimum` does, keeping at every total the whole Pareto
list of (time, capacity) pairs instead of one number; dominated partial assignments are dropped as they appear
(a partial assignment that another one with the same parameter total beats on both counts can never become part
of the front, since the remaining layers add the same to both). Equal points within 1e-12 (relative) count as one.
:func:`supported_points` marks the convex-hull subset.

**The pick** (:func:`capacity_pick`): let ``C*`` be the largest capacity any assignment in the window reaches
(exact knapsack). The eligible assignments are those with capacity ≥ ``(1 − tolerance) · C*``
(``capacity_tolerance``, default 0.05: within 5 % of the best capacity at this budget); the pick is the best
eligible one under the objective: latency — the fastest; memory — the least added memory; balanced — the least
``time/t₀ + memory/m₀`` (``t₀``, ``m₀``: the least time and the least memory among the eligible). Ties go to the
higher capacity. It is found exactly: the same Pareto dynamic programme on (objective cost, capacity), with two
bounds that drop only partial assignments that cannot win — one that cannot reach ``(1 − tolerance) · C*`` even
with every remaining layer at its most capacious option, and one that cannot beat the cost of the max-capacity
assignment (which is eligible) even with every remaining layer at its cheapest. Tolerance 0 picks the most
capacious assignment (the fastest of those); a tolerance near 1 the latency-only optimum within the windows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from .exact import _MAX_CELLS, knapsack, param_unit
from .options import BudgetError
from .preflight import format_count
from .problem import Assignment, Option, Problem, _assignment

if TYPE_CHECKING:
    from .capacity import Capacity

ALLOCATIONS = ("balanced", "free")
# A layer's window: these multiples of its importance-weighted share of the budget.
BALANCE = (0.5, 2.0)
# Points closer than this (relative to the largest total) count as equal: sums in different orders differ by
# rounding.
_REL = 1e-12
# The error message's working budgets: at most this many segments of constant allowed options, nearest first.
_MAX_SEGMENTS = 400


def layer_energy(problem: Problem, capacity: Capacity | None) -> list[float]:
    """Each target layer's share of the gradient energy, over the problem's layers (sums to 1): the capacity's
    energies (renormalised), or 1/L each without capacity or when every energy is 0."""
    n = len(problem.layers)
    if capacity is None:
        return [1.0 / n] * n
    energy = [max(0.0, float(capacity.energy.get(layer.name, 0.0))) for layer in problem.layers]
    total = math.fsum(energy)
    if not total > 0:
        return [1.0 / n] * n
    return [e / total for e in energy]


def balance_windows(problem: Problem, capacity: Capacity | None) -> list[tuple[float, float]]:
    """Per layer, the parameter window of the balance rule: ``[½, 2] × budget × energy_l``, widened to the nearest
    option below and above where it holds none (:func:`fitting`)."""
    out = []
    for opts, e in zip(problem.options, layer_energy(problem, capacity), strict=True):
        lo, hi = BALANCE[0] * problem.budget * e, BALANCE[1] * problem.budget * e
        sizes = fitting(sorted({o.params for o in opts}), lo, hi)
        out.append((lo, hi) if not sizes or lo <= sizes[0] and sizes[-1] <= hi else
                   (float(min(lo, sizes[0])), float(max(hi, sizes[-1]))))
    return out


def fitting(sizes: Sequence[int], lo: float, hi: float) -> list[int]:
    """The parameter counts among ``sizes`` (ascending) that a layer with window [lo, hi] may take: those inside
    it, or, when none is, the nearest below ``lo`` and the nearest above ``hi`` (whichever exist)."""
    inside = [w for w in sizes if lo <= w <= hi]
    if inside:
        return inside
    below = [w for w in sizes if w < lo]
    above = [w for w in sizes if w > hi]
    return below[-1:] + above[:1]


def restrict(problem: Problem, windows: Sequence[tuple[float, float]], allocation: str = "balanced") -> Problem:
    """The problem with each layer's options cut to those whose parameter count lies in its window."""
    if len(windows) != len(problem.layers):
        raise ValueError(f"{len(windows)} windows for {len(problem.layers)} layers")
    options = tuple(tuple(o for o in opts if lo <= o.params <= hi)
                    for opts, (lo, hi) in zip(problem.options, windows, strict=True))
    return replace(problem, options=options, allocation=allocation,
                   windows=tuple((float(lo), float(hi)) for lo, hi in windows))


def allocate(problem: Problem, capacity: Capacity | None, allocation: str = "balanced") -> Problem:
    """The problem under ``allocation``: unchanged when ``free``; else restricted to the balance windows, or a
    one-line :class:`~circtune.options.BudgetError` naming the rule, the layers it fails on and the budgets that
    would meet it."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation {allocation!r} is not supported; accepted: {', '.join(ALLOCATIONS)}")
    if allocation == "free":
        return problem
    windows = balance_windows(problem, capacity)
    restricted = restrict(problem, windows, allocation)
    if _reaches_window(restricted):
        return restricted
    by_energy = capacity is not None and capacity.source == "calibration"
    rule = (f"--allocation balanced (each layer within {BALANCE[0]:g}-{BALANCE[1]:g}x "
            f"{'its share of the budget by gradient energy' if by_energy else 'the mean share of the budget'}, "
            "or its nearest options)")
    why = (f"the windows' options cannot total {problem.lo:,}..{problem.hi:,} parameters "
           f"(--min-fill {problem.min_fill:g})")
    ranges = working_budgets(problem, layer_energy(problem, capacity))
    near = _nearest(ranges, problem.budget)
    spans = " or ".join(f"{a:,}..{b:,}" if a != b else f"{a:,}" for a, b in near)
    works = f"budgets {spans} meet the rule" if near else "no budget meets the rule with this space"
    raise BudgetError(f"budget {format_count(problem.budget)} cannot be met under {rule}: {why}; {works}; or pass "
                      "--allocation free")


def _count(x: float) -> str:
    """A window end as a parameter count: whole numbers with separators, small fractions as they are."""
    return f"{x:,.0f}" if x >= 10 or x == round(x) else f"{x:.2g}"


def _reaches_window(problem: Problem) -> bool:
    """Whether some assignment's parameter total lies in [lo, hi] (exact, over the reachable totals)."""
    g = param_unit(problem)
    bits = _reachable(problem.options, g)
    lo, hi = -(-problem.lo // g), problem.hi // g
    return (bits >> lo) & ((1 << (hi - lo + 1)) - 1) != 0 if hi >= lo else False


def _reachable(options: Sequence[Sequence[Option]] | Sequence[Sequence[int]], g: int) -> int:
    """The reachable parameter totals (in units of ``g``) as the set bits of an integer."""
    bits = 1
    for opts in options:
        new = 0
        for w in {(o.params if isinstance(o, Option) else int(o)) // g for o in opts}:
            new |= bits << w
        bits = new
    return bits


def working_budgets(problem: Problem, energy: Sequence[float]) -> list[tuple[int, int]]:
    """The budgets (integer ranges, ascending) at which the balance rule can be met with these options and this
    ``min_fill`` (searched from the budget asked for outwards, over at most 400 segments as below).

    A layer's window scales with the budget B, so option w fits layer l for B in ``[w/(2 e_l), 2 w/e_l]``. Between
    consecutive ends of these intervals every layer's allowed options are fixed, and so is the set S of reachable
    totals; B then works when some s in S lies in ``[min_fill·B, B]``, i.e. B in ``[s, s/min_fill]``. Exact on each
    such segment (the ends of segments themselves are not tried on their own)."""
    g = param_unit(problem)
    sizes = [sorted({o.params for o in opts}) for opts in problem.options]
    if not any(e > 0 for e in energy) or any(not ws for ws in sizes):
        return []
    # A layer without energy always takes its smallest option. Past the outer ends every window lies under its
    # layer's smallest option (or over its largest): the allowed options no longer change, so one segment on each
    # side stands for all budgets there.
    ends = sorted({x for e, ws in zip(energy, sizes, strict=True) if e > 0 for w in ws
                   for x in (w / (BALANCE[1] * e), w / (BALANCE[0] * e))})
    ends = [ends[0] / 4, *ends, max(ends[-1] * 4, sum(ws[-1] for ws in sizes) / max(problem.min_fill, 1e-9) + 1)]
    # The segments nearest the budget asked for (the message names the nearest working ranges).
    nearest = sorted(range(len(ends) - 1), key=lambda n: abs(math.log(0.5 * (ends[n] + ends[n + 1])
                                                                    / problem.budget)))[:_MAX_SEGMENTS]
    points = [(ends[n], ends[n + 1]) for n in sorted(nearest)]
    f = problem.min_fill
    pieces: list[np.ndarray] = []
    seen: dict[tuple, np.ndarray] = {}
    for a, b in points:
        m = 0.5 * (a + b)
        allowed = tuple(tuple(fitting(ws, BALANCE[0] * m * e, BALANCE[1] * m * e))
                        for e, ws in zip(energy, sizes, strict=True))
        if allowed not in seen:
            bits = _reachable(allowed, g)
            raw = np.frombuffer(bits.to_bytes((bits.bit_length() + 7) // 8, "little"), dtype=np.uint8)
            seen[allowed] = np.flatnonzero(np.unpackbits(raw, bitorder="little")).astype(np.float64) * g
        s = seen[allowed]
        lo = np.maximum(s, a)
        hi = np.minimum(s / f, b) if f > 0 else np.full_like(s, b)
        keep = np.ceil(lo) <= np.floor(hi)
        if keep.any():
            pieces.append(np.stack([np.ceil(lo[keep]), np.floor(hi[keep])], axis=1))
    if not pieces:
        return []
    spans = np.concatenate(pieces)
    spans = spans[np.argsort(spans[:, 0], kind="stable")]
    out: list[list[int]] = []
    for lo, hi in spans:
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], int(hi))
        else:
            out.append([int(lo), int(hi)])
    return [(a, b) for a, b in out]


def _nearest(ranges: Sequence[tuple[int, int]], budget: int) -> list[tuple[int, int]]:
    """The working range just below ``budget`` and the one just above (or the one holding it)."""
    below = [r for r in ranges if r[1] < budget]
    above = [r for r in ranges if r[1] >= budget]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


# ---- the exact Pareto dynamic programme ---------------------------------------------------------------------------

def _pruned_options(problem: Problem, cost: Sequence[Sequence[float]]) -> list[list[int]]:
    """Per layer, the indices of the options that no other option of the same parameter count beats on both
    cost (not higher) and capacity (not lower); of equal ones, the first."""
    kept = []
    for i, opts in enumerate(problem.options):
        order = sorted(range(len(opts)), key=lambda k, i=i, opts=opts: (opts[k].params, cost[i][k], -opts[k].capacity))
        out, last_w, best_cap = [], None, -math.inf
        for k in order:
            if opts[k].params != last_w:
                last_w, best_cap = opts[k].params, -math.inf
            if opts[k].capacity > best_cap:
                out.append(k)
                best_cap = opts[k].capacity
        kept.append(out)
    return kept


def pareto_assignments(problem: Problem, cost: Sequence[Sequence[float]], *, floor: float = -math.inf,
                       ceiling: float = math.inf) -> list[tuple[float, float, tuple[int, ...]]]:
    """Every (cost, capacity, choice) with lo ≤ Σ params ≤ hi that no other such assignment beats on both Σ cost
    (lower) and Σ capacity (higher), among those with capacity ≥ ``floor`` and cost ≤ ``ceiling``; ascending in
    cost (and so in capacity). Exact: see the module docstring."""
    if not problem.options or any(not opts for opts in problem.options):
        return []
    g = param_unit(problem)
    hi, lo = problem.hi // g, -(-problem.lo // g)
    if hi + 1 > _MAX_CELLS:
        raise ValueError(f"the exact front needs a table of {hi + 1:,} parameter totals; more than {_MAX_CELLS:,}")
    n = len(problem.options)
    kept = _pruned_options(problem, cost)
    w = [np.array([problem.options[i][k].params // g for k in ks], dtype=np.int64) for i, ks in enumerate(kept)]
    c = [np.array([float(cost[i][k]) for k in ks]) for i, ks in enumerate(kept)]
    cap = [np.array([problem.options[i][k].capacity for k in ks]) for i, ks in enumerate(kept)]
    # What the layers from i on can still add at best: bounds that prune partial assignments without loss.
    min_w, max_w, max_cap, min_c = (np.zeros(n + 1, dtype=np.int64), np.zeros(n + 1, dtype=np.int64),
                                    np.zeros(n + 1), np.zeros(n + 1))
    for i in range(n - 1, -1, -1):
        min_w[i], max_w[i] = min_w[i + 1] + w[i].min(), max_w[i + 1] + w[i].max()
        max_cap[i], min_c[i] = max_cap[i + 1] + cap[i].max(), min_c[i + 1] + c[i].min()
    tol_cap = _REL * max(1.0, float(sum(np.abs(x).max() for x in cap)))
    tol_c = _REL * max(1.0, float(sum(np.abs(x).max() for x in c)))
    states: dict[int, tuple[np.ndarray, np.ndarray]] = {0: (np.zeros(1), np.zeros(1))}
    backs: list[dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
    for i in range(n):
        parts: dict[int, list] = {}
        for s, (cs, ks) in states.items():
            for j in range(len(w[i])):
                t = s + int(w[i][j])
                if t + min_w[i + 1] > hi or t + max_w[i + 1] < lo:
                    continue
                parts.setdefault(t, []).append((j, s, cs, ks))
        new, back = {}, {}
        for t, ps in parts.items():
            cc = np.concatenate([cs + c[i][j] for j, _, cs, _ in ps])
            kk = np.concatenate([ks + cap[i][j] for j, _, _, ks in ps])
            opt = np.concatenate([np.full(len(cs), j, dtype=np.int32) for j, _, cs, _ in ps])
            src = np.concatenate([np.full(len(cs), s, dtype=np.int64) for _, s, cs, _ in ps])
            idx = np.concatenate([np.arange(len(cs), dtype=np.int64) for _, _, cs, _ in ps])
            ok = (kk + max_cap[i + 1] >= floor - tol_cap) & (cc + min_c[i + 1] <= ceiling + tol_c)
            if not ok.any():
                continue
            cc, kk, opt, src, idx = cc[ok], kk[ok], opt[ok], src[ok], idx[ok]
            order = np.lexsort((-kk, cc))
            ks = kk[order]
            best_before = np.maximum.accumulate(np.concatenate([[-np.inf], ks[:-1]]))
            keep = order[ks > best_before + tol_cap]
            new[t] = (cc[keep], kk[keep])
            back[t] = (opt[keep], src[keep], idx[keep])
        states = new
        backs.append(back)
    finals = [(float(cs[m]), float(ks[m]), t, m) for t, (cs, ks) in states.items() for m in range(len(cs))
              if lo <= t <= hi and ks[m] >= floor - tol_cap]
    finals.sort(key=lambda x: (x[0], -x[1]))
    out, best = [], -math.inf
    for cost_, cap_, t, m in finals:
        if cap_ <= best + tol_cap:
            continue
        best = cap_
        choice = [0] * n
        for i in range(n - 1, -1, -1):
            opt, src, idx = backs[i][t]
            choice[i] = kept[i][int(opt[m])]
            t, m = int(src[m]), int(idx[m])
        out.append((cost_, cap_, tuple(choice)))
    return out


def _capacities(problem: Problem) -> list[list[float]]:
    return [[o.capacity for o in opts] for opts in problem.options]


def best_capacity(problem: Problem) -> Assignment:
    """An assignment of the largest capacity in the window (exact knapsack), ``C*``."""
    return knapsack(problem, _capacities(problem), maximise=True, label="best capacity")


def capacity_front(problem: Problem) -> list[Assignment]:
    """The exact front of predicted added time against capacity within the parameter window (supported and
    non-supported points), fastest first; labels ``front 1``, ``front 2``, ... It holds the time-optimal
    assignment (the most capacious of the fastest) and the capacity-optimal one (the fastest of the most
    capacious)."""
    points = pareto_assignments(problem, [[o.step_ms for o in opts] for opts in problem.options])
    return [_assignment(problem, choice, f"front {n}") for n, (_, _, choice) in enumerate(points, 1)]


def supported_points(front: Sequence[Assignment]) -> list[Assignment]:
    """The points of ``front`` on its convex hull: those some ``time − λ·capacity`` (λ ≥ 0) minimises."""
    pts = sorted(front, key=lambda a: (a.capacity, a.step_ms))
    hull: list[Assignment] = []
    for p in pts:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = ((b.capacity - a.capacity) * (p.step_ms - a.step_ms)
                     - (b.step_ms - a.step_ms) * (p.capacity - a.capacity))
            if cross <= 0:  # b lies on or above the segment a-p: not supported
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def _min_cost(problem: Problem, cost: list[list[float]], floor: float, incumbent: Sequence[int]) -> tuple[int, ...]:
    ceiling = math.fsum(cost[i][k] for i, k in enumerate(incumbent))
    points = pareto_assignments(problem, cost, floor=floor, ceiling=ceiling)
    return points[0][2] if points else tuple(incumbent)


def capacity_pick(problem: Problem, tolerance: float = 0.05, objective: str = "latency") -> Assignment:
    """The pick rule of the module docstring: the best assignment under ``objective`` among those whose capacity
    is at least ``(1 − tolerance)`` times the best capacity in the window. Labelled ``capacity pick``."""
    from .options import OBJECTIVES

    if not 0 <= tolerance < 1:
        raise ValueError(f"capacity tolerance must be within [0, 1), got {tolerance}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not supported; accepted: {', '.join(OBJECTIVES)}")
    best = best_capacity(problem)
    floor = (1.0 - tolerance) * best.capacity
    time = [[o.step_ms for o in opts] for opts in problem.options]
    mem = [[o.mem_mb for o in opts] for opts in problem.options]
    if objective == "latency":
        choice = _min_cost(problem, time, floor, best.choice)
    elif objective == "memory":
        choice = _min_cost(problem, mem, floor, best.choice)
    else:
        t0 = problem.totals(_min_cost(problem, time, floor, best.choice))[1] or 1.0
        m0 = problem.totals(_min_cost(problem, mem, floor, best.choice))[2] or 1.0
        mixed = [[o.step_ms / abs(t0) + o.mem_mb / abs(m0) for o in opts] for opts in problem.options]
        choice = _min_cost(problem, mixed, floor, best.choice)
    return _assignment(problem, choice, "capacity pick")


def eligible(a: Assignment, best: float, tolerance: float) -> bool:
    """Whether ``a`` meets the pick rule's capacity floor ``(1 − tolerance)·best`` (within rounding)."""
    return a.capacity >= (1.0 - tolerance) * best - _REL * max(1.0, abs(best))
