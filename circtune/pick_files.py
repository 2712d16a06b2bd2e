"""The search's capacity files: ``front.csv`` (the exact front, the ranked candidates and the baselines, each with
its predicted added time and memory and its capacity) and ``allocation.csv`` (the pick layer by layer).

``front.csv`` columns: ``label, kind, params, step_ms, mem_mb, capacity, picked``. ``kind``: ``front`` (a point of
the exact time-versus-capacity front, :func:`circtune.allocation.capacity_front`), ``candidate`` (the ranked
assignments validation measures, labelled as validation.csv labels them), ``baseline`` (``uniform c3a p=<p>``,
``LoRA r=<r>``, ``PEFT C3A p=<p>``, ``latency-only optimum``: the least predicted time with no balance rule and no
capacity). ``step_ms``/``mem_mb``: predicted added over the frozen model; ``capacity``: the captured share (0..1)
of the total weighted gradient energy; ``picked``: True on the pick's row.

``allocation.csv`` columns: ``layer, d_in, d_out, method, block_size, factors, backend, transform, params, share,
window_lo, window_hi, energy, fraction, capacity``: ``share`` is the layer's importance-weighted share of the budget
(budget × energy), ``window_lo``/``window_hi`` the balance rule's window around it (½ and 2 × share; written under
``--allocation free`` too, where it was not enforced), ``fraction`` the share of the layer's gradient energy its
configuration can express, ``capacity`` = energy × fraction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd

from .allocation import BALANCE, layer_energy
from .cost import ok_table, summed_cost
from .models import ModelInfo
from .problem import Assignment, Problem, to_layer_map, uniform_c3a
from .space import Candidate, lora_rank_for_budget

if TYPE_CHECKING:
    from .capacity import Capacity

FRONT_COLUMNS = ("label", "kind", "params", "step_ms", "mem_mb", "capacity", "picked")
ALLOCATION_COLUMNS = ("layer", "d_in", "d_out", "method", "block_size", "factors", "backend", "transform", "params",
                      "share", "window_lo", "window_hi", "energy", "fraction", "capacity")


def uniform_baseline(problem: Problem, budget: int) -> Assignment | None:
    """Every layer C3A at the one block size whose total is the largest within ``budget`` (its fastest path)."""
    fitting = [u for u in uniform_c3a(problem) if u.params <= budget]
    return max(fitting, key=lambda u: u.params) if fitting else None


def _capacity_of(model: ModelInfo, capacity: Capacity | None, candidate: Candidate) -> float | None:
    if capacity is None:
        return None
    try:
        return math.fsum(capacity.score(t, candidate) for t in model.targets)
    except ValueError:  # a block size that does not divide some layer: no such baseline there
        return None


def baseline_rows(model: ModelInfo, full: Problem, frame: pd.DataFrame, budget: int, capacity: Capacity | None,
                  latency_only: Assignment) -> list[dict]:
    """The baselines of ``front.csv``: uniform C3A, LoRA at the budget and PEFT's C3A (as validation plans them),
    and the latency-only optimum of the unrestricted problem ``full``."""
    table = ok_table(frame)

    def predicted(candidate: Candidate) -> tuple[float | None, float | None]:
        cost = summed_cost(((t.name, t.shape, candidate) for t in model.targets), table)
        return (cost.step_ms, cost.mem_mb) if cost.step_ms is not None else (None, None)

    rows = []
    uniform = uniform_baseline(full, budget)
    if uniform is not None:
        (p,) = {o.candidate.block_size for o in to_layer_map(full, uniform).values()}
        rows.append(_row(f"uniform c3a p={p}", "baseline", uniform))
        if not frame[frame.method == "peft-c3a"].empty:
            peft = Candidate("peft-c3a", block_size=p)
            rows.append({"label": f"PEFT C3A p={p}", "kind": "baseline", "params": uniform.params,
                         **dict(zip(("step_ms", "mem_mb"), predicted(peft), strict=True)),
                         "capacity": _capacity_of(model, capacity, peft), "picked": False})
    rank = lora_rank_for_budget(budget, [t.shape for t in model.targets])
    lora = Candidate("lora", factors=rank)
    rows.append({"label": f"LoRA r={rank}", "kind": "baseline",
                 "params": sum(lora.params(t.d_in, t.d_out) for t in model.targets),
                 **dict(zip(("step_ms", "mem_mb"), predicted(lora), strict=True)),
                 "capacity": _capacity_of(model, capacity, lora), "picked": False})
    rows.append(_row("latency-only optimum", "baseline", latency_only))
    return rows


def _row(label: str, kind: str, a: Assignment, picked: bool = False) -> dict:
    return {"label": label, "kind": kind, "params": a.params, "step_ms": a.step_ms, "mem_mb": a.mem_mb,
            "capacity": a.capacity, "picked": picked}


def front_frame(front: Sequence[Assignment], candidates: Sequence[tuple[str, Assignment]], baselines: list[dict],
                picked: str | None) -> pd.DataFrame:
    """``front.csv``: the front's points, the candidates (label, assignment) with ``picked`` marking the pick's
    label, and the baseline rows."""
    rows = [_row(a.label, "front", a) for a in front]
    rows += [_row(label, "candidate", a, label == picked) for label, a in candidates]
    rows += baselines
    return pd.DataFrame(rows, columns=list(FRONT_COLUMNS))


def allocation_frame(problem: Problem, pick: Assignment, capacity: Capacity | None) -> pd.DataFrame:
    """``allocation.csv``: one row per target layer of ``pick`` (an assignment of ``problem``)."""
    energy = layer_energy(problem, capacity)
    rows = []
    for layer, option, e in zip(problem.layers, pick.layer_options(problem), energy, strict=True):
        c = option.candidate
        share = problem.budget * e
        fraction = capacity.fraction(layer, c) if capacity is not None else None
        rows.append({"layer": layer.name, "d_in": layer.d_in, "d_out": layer.d_out, "method": c.method,
                     "block_size": c.block_size, "factors": c.factors, "backend": c.backend,
                     "transform": c.transform, "params": option.params, "share": share,
                     "window_lo": BALANCE[0] * share, "window_hi": BALANCE[1] * share, "energy": e,
                     "fraction": fraction, "capacity": option.capacity})
    return pd.DataFrame(rows, columns=list(ALLOCATION_COLUMNS))
