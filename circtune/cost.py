"""The additive cost model: what adapters add to a model's training step is the sum, over its target layers, of
what each layer's adapter added in its own measurement (step time, and peak memory where it was measured).

The search sums its options (:meth:`circtune.problem.Problem.totals`, on its hot path); everything that prices an
assignment from measurement rows — the baselines' predictions, a report's pick, one device's pick on another
device — goes through :func:`summed_cost`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from .candidate import Candidate, finite_number

Shape = tuple[int, int]
Table = Mapping[Shape, Mapping[Candidate, Mapping[str, Any]]]


def ok_table(frame: pd.DataFrame) -> dict[Shape, dict[Candidate, dict[str, Any]]]:
    """(d_in, d_out) -> candidate -> its successful measurement row (as a dict; of equal keys, the last: a frame
    of one token count and dtype has none)."""
    out: dict[Shape, dict[Candidate, dict[str, Any]]] = {}
    for row in frame[frame.status == "ok"].to_dict("records"):
        out.setdefault((int(row["d_in"]), int(row["d_out"])), {})[Candidate.from_row(row)] = row
    return out


@dataclass(frozen=True)
class Cost:
    """Summed added step time and memory; both None when a layer's configuration was not measured (``missing``
    names each such layer as ``name: label``). Memory not measured on a layer counts as zero."""

    step_ms: float | None
    mem_mb: float | None
    missing: tuple[str, ...]


def summed_cost(layers: Iterable[tuple[str, Shape | None, Candidate]], table: Table) -> Cost:
    """The cost of giving each ``(name, shape, candidate)`` layer its candidate, from ``table`` (see
    :func:`ok_table`); a layer of unknown shape (None) is missing."""
    step, mem, missing = 0.0, 0.0, []
    for name, shape, c in layers:
        row = (table.get(shape) or {}).get(c) if shape else None
        ms = finite_number(row["step_ms"]) if row is not None else None
        if ms is None:
            missing.append(f"{name}: {c.label}" + ("" if shape else " (shape unknown)"))
            continue
        step += ms
        mem += finite_number(row.get("peak_mem_mb")) or 0.0
    return Cost(None if missing else step, None if missing else mem, tuple(missing))
