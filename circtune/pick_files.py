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

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd

from .allocation import BALANCE, layer_energy
from .baselines import Baseline
from .problem import Assignment, Problem

if TYPE_CHECKING:
    from .capacity import Capacity

FRONT_COLUMNS = ("label", "kind", "baseline", "params", "step_ms", "mem_mb", "capacity", "picked")
ALLOCATION_COLUMNS = ("layer", "d_in", "d_out", "method", "block_size", "factors", "backend", "transform", "params",
                      "share", "window_lo", "window_hi", "energy", "fraction", "capacity")


def baseline_rows(baselines: Sequence[Baseline]) -> list[dict]:
    """The baselines of ``front.csv`` (every one but the frozen model), from the table of
    :func:`circtune.baselines.whole_model_baselines`."""
    return [{"label": b.label, "kind": "baseline", "baseline": b.id, "params": b.params, "step_ms": b.step_ms,
             "mem_mb": b.mem_mb, "capacity": b.capacity, "picked": False} for b in baselines if b.id != "none"]


def _row(label: str, kind: str, a: Assignment, picked: bool = False) -> dict:
    return {"label": label, "kind": kind, "baseline": None, "params": a.params, "step_ms": a.step_ms,
            "mem_mb": a.mem_mb, "capacity": a.capacity, "picked": picked}


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
