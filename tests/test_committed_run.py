"""The committed roberta-large run (reports/roberta-large-cpu-amd-epyc-2t) against today's code: its measurements
give the same search problem (the study's name holds the problem's digest), the same rule pick and the same
predictions for the candidates its validation measured. A refactoring that changed what the search picks on the
same measurements fails here."""

import json
from pathlib import Path

import pandas as pd
import pytest

from circtune.allocation import allocate, capacity_pick
from circtune.capacity import capacity_from_gradients
from circtune.models import resolve_model
from circtune.problem import build_problem, to_layer_map

RUN = Path(__file__).resolve().parents[1] / "reports" / "roberta-large-cpu-amd-epyc-2t"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_committed_runs_measurements_give_its_problem_and_its_first_prediction():
    meta = json.loads((RUN / "adapter_config.json").read_text())
    frame = pd.read_csv(RUN / "measurements.csv")
    frame[["transform", "backend"]] = frame[["transform", "backend"]].fillna("")
    here = frame[(frame.tokens == meta["tokens"]) & (frame.dtype == meta["dtype"])]
    model = resolve_model("roberta-large")
    capacity = capacity_from_gradients(model.targets, None)  # the run had no calibration
    assert meta["capacity_source"] == "uniform" and meta["allocation"] == "balanced"
    full = build_problem(model.targets, here, meta["budget"], meta["min_fill"], capacity=capacity)
    problem = allocate(full, capacity, meta["allocation"])
    assert meta["study"]["name"].endswith(f"-{problem.key()}")  # the same problem, so the same study

    pick = capacity_pick(problem, meta["capacity_tolerance"], meta["objective"])
    first = pd.read_csv(RUN / "validation.csv").set_index("label").loc["predicted #1"]
    assert pick.params == first.total_params
    assert pick.step_ms == pytest.approx(first.predicted_overhead_ms, rel=1e-5)
    assert {o.candidate.label for o in to_layer_map(problem, pick).values()} == {"c3a p=512 rfft/torch"}
    # the pick the run validated (predicted #3) is in the same window, at the committed capacity
    assert problem.feasible(meta["total_params"])
    assert meta["capacity"] >= (1 - meta["capacity_tolerance"]) * pick.capacity
