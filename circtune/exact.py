"""Exact solutions over a :class:`~circtune.problem.Problem`: the latency-only optimum (a multiple-choice knapsack,
dynamic programming over parameter totals in units of the gcd of every option's count, minimising the summed step
time; :func:`knapsack` for any additive value), the neighbours of an assignment, uniform C3A at each block size, and
:func:`repair`, which moves a proposal into the budget window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from .options import BudgetError
from .problem import Assignment, Problem, _assignment

# Above this many parameter-total cells the knapsack table would not fit comfortably in memory.
_MAX_CELLS = 4_000_000


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
