"""Capacity-aware allocation: the balance rule and its error, the exact time-versus-capacity front and the pick
rule, each against brute force on small problems."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest

from circtune import allocation
from circtune._search import memory_matters, ranked_assignments, run_study, study_directions, trials_frame
from circtune.allocation import (
    ALLOCATIONS,
    allocate,
    balance_windows,
    best_capacity,
    capacity_front,
    capacity_pick,
    eligible,
    supported_points,
    working_budgets,
)
from circtune.exact import exact_optimum, neighbours, uniform_c3a
from circtune.models import TargetLayer
from circtune.options import ALLOCATIONS as OPTION_ALLOCATIONS
from circtune.options import BudgetError
from circtune.problem import Option, Problem
from circtune.space import Candidate


def test_the_options_name_the_rules_allocation_knows():
    assert OPTION_ALLOCATIONS == ALLOCATIONS


def _capacity(names, energy):
    """A stand-in for circtune.capacity.Capacity: the layers' energies (the tests give options their capacity)."""
    return SimpleNamespace(source="calibration", energy=dict(zip(names, energy, strict=True)))


def _random_problem(rng: random.Random, n_layers: int, n_options: int, min_fill: float) -> Problem:
    """Layers with options of random size, time, memory and capacity (sizes from a few multiples, so that
    several totals coincide and ties occur)."""
    layers = tuple(TargetLayer(f"l{i}", 8, 8) for i in range(n_layers))
    options = []
    for i in range(n_layers):
        opts = {}
        while len(opts) < n_options:
            c = Candidate("c3a", rng.randint(1, 64), None, "rfft", f"b{i}")
            opts[c] = Option(c, rng.choice([4, 8, 12, 16, 24]), round(rng.uniform(0.1, 10), 3),
                             round(rng.uniform(0, 5), 3), round(rng.uniform(0, 1), 3))
        options.append(tuple(sorted(opts.values(), key=lambda o: o.params)))
    sizes = [sum(o.params for o in opts) / len(opts) for opts in options]
    return Problem(layers, tuple(options), int(sum(sizes) * rng.uniform(0.7, 1.2)), min_fill)


def _feasible(problem: Problem):
    """Every feasible assignment as (time, capacity, memory, choice)."""
    for choice in itertools.product(*(range(len(o)) for o in problem.options)):
        params, step, mem = problem.totals(choice)
        if problem.feasible(params):
            yield step, problem.capacity(choice), mem, choice


def _pareto(points):
    """The (time, capacity) values no other point beats on both (lower time, higher capacity)."""
    out = set()
    for t, c, *_ in points:
        if not any(t2 <= t and c2 >= c and (t2 < t or c2 > c) for t2, c2, *_ in points):
            out.add((round(t, 9), round(c, 9)))
    return out


@pytest.mark.parametrize("seed", range(30))
def test_front_and_pick_equal_brute_force(seed):
    rng = random.Random(seed)
    problem = _random_problem(rng, rng.randint(2, 4), rng.randint(2, 4), rng.choice([0.0, 0.5, 0.9]))
    points = list(_feasible(problem))
    if not points:
        with pytest.raises(BudgetError):
            best_capacity(problem)
        assert capacity_front(problem) == []
        return
    front = capacity_front(problem)
    assert {(round(a.step_ms, 9), round(a.capacity, 9)) for a in front} == _pareto(points)
    for a in front:  # each point is the assignment it says
        assert problem.feasible(a.params) and a.step_ms == pytest.approx(problem.totals(a.choice)[1])
        assert a.capacity == pytest.approx(problem.capacity(a.choice))
    # Time-optimal and capacity-optimal assignments are on it, at its two ends.
    assert front[0].step_ms == pytest.approx(min(t for t, *_ in points))
    best = max(c for _, c, *_ in points)
    assert front[-1].capacity == pytest.approx(best) and best_capacity(problem).capacity == pytest.approx(best)
    # The supported points are those some time - lambda * capacity (lambda >= 0) minimises.
    supported = {(round(a.step_ms, 9), round(a.capacity, 9)) for a in supported_points(front)}
    for lam in (0.0, 0.1, 1.0, 3.0, 10.0, 100.0, 1e4):
        least = min(t - lam * c for t, c, *_ in points)
        assert any(t - lam * c == pytest.approx(least) for t, c in supported), lam
    for tolerance in (0.0, 0.05, 0.3, 0.99):
        floor = (1 - tolerance) * best - 1e-9
        ok = [p for p in points if p[1] >= floor]
        pick = capacity_pick(problem, tolerance, "latency")
        assert pick.step_ms == pytest.approx(min(t for t, *_ in ok)) and pick.capacity >= floor
        assert capacity_pick(problem, tolerance, "memory").mem_mb == pytest.approx(min(m for _, _, m, _ in ok))
        t0, m0 = min(t for t, *_ in ok) or 1.0, min(m for _, _, m, _ in ok) or 1.0
        mixed = capacity_pick(problem, tolerance, "balanced")
        assert mixed.step_ms / t0 + mixed.mem_mb / m0 == pytest.approx(min(t / t0 + m / m0 for t, _, m, _ in ok))


def test_tolerance_zero_is_the_most_capacious_and_near_one_the_latency_optimum():
    rng = random.Random(7)
    for _ in range(10):
        problem = _random_problem(rng, 4, 4, 0.5)
        if not list(_feasible(problem)):
            continue
        most = capacity_pick(problem, 0.0)
        assert most.capacity == pytest.approx(best_capacity(problem).capacity)
        # every assignment of this problem has capacity > 0.1 % of the best, so 0.999 lets all of them in
        assert capacity_pick(problem, 0.999).step_ms == pytest.approx(exact_optimum(problem).step_ms)
        assert most.step_ms >= exact_optimum(problem).step_ms - 1e-9


def _square_layers(n: int, d: int = 1024) -> tuple[TargetLayer, ...]:
    return tuple(TargetLayer(f"encoder.layer.{i // 2}.{'query' if i % 2 == 0 else 'value'}", d, d) for i in range(n))


def _roberta_like(budget: int = 100_000, energy=None, n: int = 48) -> tuple[Problem, object]:
    """``n`` layers of 1024 x 1024 with C3A at p = 32..1024 (p = 1024 the fastest, as measured on a CPU) and the
    uniform capacity of C3A (1/p of the layer's energy)."""
    layers = _square_layers(n)
    energy = energy or [1 / n] * n
    times = {1024: 2.5, 512: 3.7, 256: 4.4, 128: 3.8, 64: 4.8, 32: 4.7}
    options = tuple(tuple(Option(Candidate("c3a", p, None, "rfft", "torch"), 1024 * 1024 // p, times[p], 2.0 + 1 / p,
                                 e / p) for p in sorted(times, reverse=True)) for e in energy)
    return Problem(layers, options, budget, 0.9), _capacity([t.name for t in layers], energy)


def test_balanced_allocation_caps_every_layer_at_twice_its_share():
    problem, capacity = _roberta_like()
    assert exact_optimum(problem).params <= problem.hi  # free: the latency-only optimum piles up in few layers
    free = capacity_pick(problem, 0.05)
    assert max(o.params for o in free.layer_options(problem)) > 2 * problem.budget / 48
    balanced = allocate(problem, capacity, "balanced")
    for a in (capacity_pick(balanced, 0.05), *capacity_front(balanced), exact_optimum(balanced)):
        params = [o.params for o in a.layer_options(balanced)]
        mean_share = problem.budget / 48
        assert max(params) <= 2 * mean_share and min(params) >= 0.5 * mean_share
        assert problem.feasible(a.params)
    # Windows follow the energy: a layer with 4x the energy gets a 4x window.
    energy = [4 / 57] * 3 + [1 / 57] * 45
    skewed, cap = _roberta_like(100_000, energy)
    windows = balance_windows(skewed, cap)
    assert windows[0][0] == pytest.approx(0.5 * 100_000 * 4 / 57)
    assert windows[5][1] == pytest.approx(2 * 100_000 / 57)
    restricted = allocate(skewed, cap, "balanced")
    pick = capacity_pick(restricted, 0.05)
    params = [o.params for o in pick.layer_options(restricted)]  # choices index the restricted problem's options
    assert min(params[:3]) > max(params[3:])
    assert allocate(skewed, cap, "free") is skewed


def test_a_budget_the_rule_cannot_meet_names_the_rule_layers_and_working_budgets():
    # One layer holds 70 % of the energy: its window (35,000..140,000) holds no option (C3A tops out at 32,768), so
    # it is widened to the nearest one, p = 32; the others (0.3/47 each) fit p = 1024 for 80,213..320,853, and
    # 32,768 + 47 x 1,024 = 80,896 parameters fill 90 % of budgets up to 89,884.
    problem, capacity = _roberta_like(100_000, [0.7] + [0.3 / 47] * 47)
    with pytest.raises(BudgetError) as caught:
        allocate(problem, capacity, "balanced")
    message = str(caught.value)
    assert "\n" not in message and caught.value.option == "budget"
    assert "--allocation balanced" in message and "--allocation free" in message and "gradient energy" in message
    assert "its nearest options" in message and "cannot total 90,000..100,000 parameters" in message
    assert "budgets 80,896..89,884 meet the rule" in message
    for budget, works in ((80_895, False), (80_896, True), (89_884, True), (89_885, False)):
        at = replace(problem, budget=budget)
        if works:
            allocate(at, capacity, "balanced")
        else:
            with pytest.raises(BudgetError):
                allocate(at, capacity, "balanced")
    # Without calibration the rule is the mean share: every layer within half and twice budget / layers.
    uniform, _ = _roberta_like(100_000)
    with pytest.raises(BudgetError, match=r"0.5-2x the mean share of the budget"):
        allocate(replace(uniform, budget=30_000, min_fill=0.0), None, "balanced")


def test_a_window_without_options_takes_the_nearest_ones():
    # At random init the query layers get ~1e-5 of the gradient energy: their windows (a few parameters) lie under
    # every option, so they take their smallest one; the rest of the budget follows the other layers' energy.
    energy = [1e-5 if i % 2 == 0 else 1.0 for i in range(48)]
    energy = [e / sum(energy) for e in energy]
    problem, capacity = _roberta_like(150_000, energy)
    windows = balance_windows(problem, capacity)
    assert windows[0] == (1024.0, 1024.0) or windows[0][0] <= 1024 <= windows[0][1]
    restricted = allocate(problem, capacity, "balanced")
    assert {o.params for o in restricted.options[0]} == {1024}  # the smallest option only
    pick = capacity_pick(restricted, 0.05)
    params = [o.params for o in pick.layer_options(restricted)]
    assert all(p == 1024 for p in params[0::2]) and problem.feasible(pick.params)
    share = problem.budget * energy[1]
    assert all(0.5 * share <= p <= 2 * share for p in params[1::2])
    assert allocation.fitting([8, 16, 64], 20, 40) == [16, 64]  # a window between two options: both neighbours
    assert allocation.fitting([8, 16, 64], 100, 200) == [64] and allocation.fitting([8, 16], 0, 1) == [8]


@pytest.mark.parametrize("seed", range(6))
def test_working_budgets_are_exactly_the_budgets_the_rule_meets(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 3)
    layers = tuple(TargetLayer(f"l{i}", 8, 8) for i in range(n))
    sizes = sorted(rng.sample([4, 8, 12, 16, 24, 32, 48], 3))
    options = tuple(tuple(Option(Candidate("c3a", s, None, "rfft", "torch"), s, 1.0, 0.0, s / 64) for s in sizes)
                    for _ in layers)
    energy = [rng.uniform(0.2, 1.0) for _ in layers]
    energy = [e / sum(energy) for e in energy]
    capacity = _capacity([t.name for t in layers], energy)
    problem = Problem(layers, options, 60, rng.choice([0.5, 0.9]))
    ranges = working_budgets(problem, energy)
    for budget in range(1, 400):
        at = replace(problem, budget=budget)
        try:
            allocate(at, capacity, "balanced")
            works = True
        except BudgetError:
            works = False
        # the ends of the segments are not tried on their own: a budget exactly there may be missed
        ends = {x for e in energy for s in sizes for x in (s / (2 * e), 2 * s / e)}
        if any(abs(budget - x) < 1 for x in ends):
            continue
        assert works == any(a <= budget <= b for a, b in ranges), (budget, ranges)


def test_memory_is_a_third_objective_only_where_it_trades_against_time():
    problem, _ = _roberta_like()
    assert not memory_matters(problem)  # here memory falls as time rises: no trade-off
    traded = replace(problem, options=tuple(tuple(replace(o, mem_mb=10.0 - o.step_ms) for o in opts)
                                            for opts in problem.options))
    assert memory_matters(traded) and study_directions(traded) == ["minimize", "maximize", "minimize"]
    unmeasured = replace(problem, options=tuple(tuple(replace(o, mem_mb=0.0) for o in opts)
                                                for opts in problem.options))
    assert study_directions(unmeasured) == ["minimize", "maximize"]


def test_the_study_is_multi_objective_seeded_with_the_pick_and_resumes(tmp_path, with_memory=True):
    """Three objectives here (test_search's study has two: memory not measured there)."""
    import optuna

    problem, capacity = _roberta_like(25_000, n=12)
    if with_memory:
        problem = replace(problem, options=tuple(tuple(replace(o, mem_mb=10.0 - o.step_ms) for o in opts)
                                                 for opts in problem.options))
    problem = allocate(problem, capacity, "balanced")
    pick = capacity_pick(problem, 0.05)
    front = capacity_front(problem)
    seeds = [pick, *front, *neighbours(problem, pick), *uniform_c3a(problem)]
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = run_study(problem, storage=storage, study_name="cap", n_trials=25, seeds=seeds, progress=False)
    assert len(study.directions) == (3 if with_memory else 2)
    assert study.directions[1] == optuna.study.StudyDirection.MAXIMIZE
    first = study.trials[0]
    assert first.user_attrs["source"] == "optimum" and first.values[1] == pytest.approx(pick.capacity)
    assert {t.user_attrs["source"] for t in study.trials} >= {"optimum", "front", "seed"}
    trials = trials_frame(problem, study)
    assert "capacity" in trials and trials.pareto.any()
    best = best_capacity(problem).capacity
    top = ranked_assignments(problem, study, "latency", 3, tolerance=0.05, best_capacity=best)
    assert top[0].step_ms == pytest.approx(pick.step_ms) and eligible(top[0], best, 0.05)
    for a in top:  # every trial obeys the balance windows
        assert all(lo <= o.params <= hi for o, (lo, hi) in zip(a.layer_options(problem), problem.windows,
                                                                strict=True))
    again = run_study(problem, storage=storage, study_name="cap", n_trials=30, seeds=seeds, progress=False)
    assert len(again.trials) == 30
    labels = [t.user_attrs["label"] for t in again.trials if t.user_attrs["source"] in ("optimum", "front", "seed")]
    assert len(labels) == len(set(labels)) == len({a.label for a in seeds})


def test_problem_key_holds_capacity_and_allocation():
    problem, capacity = _roberta_like()
    other = replace(problem, options=tuple(tuple(replace(o, capacity=o.capacity * 2) for o in opts)
                                           for opts in problem.options))
    assert problem.key() != other.key()
    assert allocate(problem, capacity, "balanced").key() != problem.key()


def test_pick_rule_on_uniform_energy_spreads_the_budget():
    problem, capacity = _roberta_like()
    restricted = allocate(problem, capacity, "balanced")
    pick = capacity_pick(restricted, 0.05)
    params = [o.params for o in pick.layer_options(restricted)]
    assert max(params) / (sum(params) / len(params)) <= 2.0
    assert math.isclose(pick.capacity, restricted.capacity(pick.choice))


def test_allocation_rejects_an_unknown_rule():
    problem, capacity = _roberta_like()
    with pytest.raises(ValueError, match="accepted: balanced, free"):
        allocation.allocate(problem, capacity, "even")


def test_a_named_study_of_another_allocation_is_not_joined(tmp_path):
    from circtune._search import StudyMismatch

    problem, capacity = _roberta_like(25_000, n=12)
    balanced = allocate(problem, capacity, "balanced")
    storage = f"sqlite:///{tmp_path / 's.db'}"
    run_study(balanced, storage=storage, study_name="named", n_trials=2, progress=False,
              identity={"allocation": "balanced", "problem": balanced.key()})
    with pytest.raises(StudyMismatch, match="allocation 'balanced' \\(this run: 'free'\\)"):
        run_study(problem, storage=storage, study_name="named", n_trials=2, progress=False,
                  identity={"allocation": "free", "problem": problem.key()})


def test_swapping_layers_of_one_shape_is_the_same_assignment_only_when_they_weigh_the_same():
    uniform, _ = _roberta_like(25_000, n=4)
    skewed, _ = _roberta_like(25_000, [0.4, 0.3, 0.2, 0.1], n=4)
    for problem, same in ((uniform, True), (skewed, False)):
        a, b = (0, 1, 1, 1), (1, 0, 1, 1)
        assert (problem.signature(a) == problem.signature(b)) is same
        assert (problem.capacity(a) == pytest.approx(problem.capacity(b))) is same
