"""The whole-model baselines: what a search compares its pick with, from end to end, in one table.

Whole-model validation times them on the real model, ``front.csv`` places them beside the front, and the report
compares the pick with them; all three take them from :func:`whole_model_baselines`, and each row carries its
``baseline`` id (a column of ``validation.csv`` and ``front.csv``) so that nothing has to read a label back.

=================  ========================  ====================================================================
id                 label                     what
=================  ========================  ====================================================================
``none``           ``no adapter``            the frozen model (validation only: paired with itself, the noise
                                             floor)
``lora``           ``LoRA r=<r>``            LoRA on every target at the largest rank whose parameters fit the
                                             budget
``peft-c3a``       ``PEFT C3A p=<p>``        PEFT's own C3A layer at the uniform C3A block size (when PEFT was
                                             measured)
``uniform-c3a``    ``uniform c3a p=<p>``     circtune's C3A at the one block size whose total is the largest
                                             within the budget, each layer on its fastest path
``latency-only``   ``latency-only optimum``  the fastest assignment in the parameter window, capacity and the
                                             balance rule ignored (``front.csv`` only: it is what the search would
                                             pick by latency alone)
=================  ========================  ====================================================================

(A *reference*, by contrast, is a per-layer measurement beside the adapter candidates: the base layer, LoRA at a
rank, PEFT's C3A at a block size; see :mod:`circtune.adapters.methods`.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from .candidate import Candidate
from .cost import ok_table, summed_cost
from .exact import uniform_c3a
from .models import ModelInfo
from .problem import Assignment, Problem, to_layer_map
from .space import lora_rank_for_budget

if TYPE_CHECKING:
    from .capacity import Capacity

# The table's order: the report's too.
BASELINE_IDS = ("none", "lora", "peft-c3a", "uniform-c3a", "latency-only")
# Validated on the whole model (the latency-only optimum is a prediction only).
VALIDATED = ("none", "lora", "peft-c3a", "uniform-c3a")


@dataclass(frozen=True)
class Baseline:
    """One baseline: its id and label, parameters, predicted added step time and memory (summed per layer; None
    where a layer was not measured), the capacity it captures (None without a capacity model), and how it is put
    on the model: ``layers`` (each target's reference candidate) or ``assignment`` (an adapter assignment)."""

    id: str
    label: str
    params: int
    step_ms: float | None
    mem_mb: float | None
    capacity: float | None
    layers: Mapping[str, Candidate] | None = None
    assignment: Assignment | None = None


def uniform_baseline(problem: Problem, budget: int) -> Assignment | None:
    """Every layer C3A at the one block size whose total is the largest within ``budget`` (its fastest path)."""
    fitting = [u for u in uniform_c3a(problem) if u.params <= budget]
    return max(fitting, key=lambda u: u.params) if fitting else None


def whole_model_baselines(model: ModelInfo, full: Problem, frame: pd.DataFrame, budget: int,
                          capacity: Capacity | None = None, latency_only: Assignment | None = None) -> list[Baseline]:
    """The baselines of a search on ``model`` at ``budget``, in :data:`BASELINE_IDS` order: ``full`` is the
    unrestricted problem (uniform C3A is taken from it), ``frame`` the measurements (predictions and whether PEFT
    was measured), ``latency_only`` the latency optimum when the caller has it."""
    table = ok_table(frame)

    def same_everywhere(id_: str, label: str, candidate: Candidate, params: int) -> Baseline:
        layers = {t.name: candidate for t in model.targets}
        cost = summed_cost(((t.name, t.shape, candidate) for t in model.targets), table)
        score = None
        if capacity is not None:
            try:
                score = math.fsum(capacity.score(t, candidate) for t in model.targets)
            except ValueError:  # a block size that does not divide some layer: no capacity there
                score = None
        return Baseline(id_, label, params, cost.step_ms, cost.mem_mb, score, layers=layers)

    out = [Baseline("none", "no adapter", 0, 0.0, 0.0, 0.0 if capacity is not None else None,
                    layers={t.name: Candidate("none") for t in model.targets})]
    rank = lora_rank_for_budget(budget, [t.shape for t in model.targets])
    lora = Candidate("lora", factors=rank)
    out.append(same_everywhere("lora", f"LoRA r={rank}", lora, sum(lora.params(*t.shape) for t in model.targets)))
    uniform = uniform_baseline(full, budget)
    if uniform is not None:
        (p,) = {o.candidate.block_size for o in to_layer_map(full, uniform).values()}
        if not frame[frame.method == "peft-c3a"].empty:
            out.append(same_everywhere("peft-c3a", f"PEFT C3A p={p}", Candidate("peft-c3a", block_size=p),
                                       uniform.params))
        out.append(Baseline("uniform-c3a", f"uniform c3a p={p}", uniform.params, uniform.step_ms, uniform.mem_mb,
                            uniform.capacity, assignment=uniform))
    if latency_only is not None:
        out.append(Baseline("latency-only", "latency-only optimum", latency_only.params, latency_only.step_ms,
                            latency_only.mem_mb, latency_only.capacity, assignment=latency_only))
    return out
