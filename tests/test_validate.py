"""Whole-model validation: the pairing of frozen and adapted steps, the added time and its spread, the within-noise
rule, the pick chosen on paired overhead, and validation.csv's columns. No timing is asserted: a fake clock and
fake steps make every number exact."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
import torch
from tiny_models import tiny_roberta
from torch import nn

from circtune.adapters.config import AdapterConfig
from circtune.measure.timing import Spread, TimingSettings, paired_step_samples
from circtune.models import build_model
from circtune.pipeline import VALIDATION_COLUMNS, choose, validation_frame
from circtune.space import Candidate
from circtune.validate import (
    Validation,
    baseline_plan,
    candidate_label,
    candidate_plan,
    paired_overhead,
    validate,
    within_noise,
)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeStep(nn.Module):
    """A step that takes ``costs`` (ms, one per call, in turn) on ``clock`` and logs its name when called."""

    def __init__(self, name: str, costs, clock: FakeClock, log: list[str]):
        super().__init__()
        self.name, self.costs, self.clock, self.log = name, iter(costs), clock, log
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(self.name)
        self.clock.now += next(self.costs) / 1e3
        return x * self.w


def test_paired_samples_alternate_base_and_adapted_after_warmup():
    clock, log = FakeClock(), []
    base = FakeStep("base", itertools.repeat(10.0), clock, log)
    adapted = FakeStep("adapted", itertools.chain([99.0, 99.0], [12.0, 13.0, 11.0, 15.0, 10.0]), clock, log)
    x, g = torch.ones(3, requires_grad=True), torch.ones(3)
    opt = torch.optim.SGD(adapted.parameters(), lr=0.0)
    settings = TimingSettings(warmup=2, min_reps=5, max_reps=5, min_time_s=0.0)
    b, a = paired_step_samples(base, adapted, x, g, opt, settings, clock=clock)
    assert log == ["base", "adapted"] * 7  # 2 warm-up pairs (untimed), then 5 timed pairs, base first in each
    assert b == pytest.approx([10.0] * 5) and a == pytest.approx([12.0, 13.0, 11.0, 15.0, 10.0])


def test_paired_samples_stop_at_min_time_once_min_reps_are_taken():
    clock, log = FakeClock(), []
    base = FakeStep("base", itertools.repeat(100.0), clock, log)
    adapted = FakeStep("adapted", itertools.repeat(150.0), clock, log)
    x, g = torch.ones(3, requires_grad=True), torch.ones(3)
    settings = TimingSettings(warmup=0, min_reps=2, max_reps=50, min_time_s=1.0)
    b, a = paired_step_samples(base, adapted, x, g, None, settings, clock=clock)
    assert len(b) == len(a) == 4  # 250 ms of fake time per pair: 1 s reached after 4 pairs


def test_paired_overhead_is_the_spread_of_per_pair_differences():
    # A drifting machine: the base step slows from 100 to 140 ms; the adapted step is always 5 ms slower than the
    # base step of its own pair, plus one slow outlier. The difference of the two medians would say 5 as well
    # here, but the spread of the per-pair differences is what is reported, and it is tight despite the drift.
    base = [100.0, 110.0, 120.0, 130.0, 140.0]
    adapted = [105.0, 115.0, 125.0, 135.0, 190.0]
    b, a, d = paired_overhead(base, adapted)
    assert (b.p25, b.median, b.p75) == (110.0, 120.0, 130.0)
    assert (a.p25, a.median, a.p75) == (115.0, 125.0, 135.0)
    assert (d.p25, d.median, d.p75) == (5.0, 5.0, 5.0)
    v = Validation("x", "candidate", 1, 4.0, 1.0, a, 1.0, base_step=b, overhead=d)
    assert v.overhead_pct == pytest.approx(100 * 5.0 / 120.0)
    with pytest.raises(ValueError, match="aligned"):
        paired_overhead([1.0, 2.0], [1.0])


@pytest.mark.parametrize("a, b, expected", [
    ((1.0, 2.0, 3.0), (2.5, 4.0, 5.0), True),  # overlap
    ((1.0, 2.0, 3.0), (3.0, 4.0, 5.0), True),  # touching ends count as overlapping
    ((1.0, 2.0, 3.0), (3.1, 4.0, 5.0), False),
    ((10.0, 20.0, 30.0), (-5.0, 0.0, 9.9), False),  # the other way round
    ((0.0, 5.0, 10.0), (4.0, 5.0, 6.0), True),  # one inside the other
])
def test_within_noise_is_overlap_of_interquartile_ranges(a, b, expected):
    assert within_noise(Spread(*a), Spread(*b)) is expected
    assert within_noise(Spread(*b), Spread(*a)) is expected
    assert within_noise(Spread(*a), None) is None


def _v(label, kind, added, base=(100.0, 100.0, 100.0), status="ok", mem=10.0):
    d = Spread(*added) if added else None
    b = Spread(*base) if added else None
    step = Spread(*(x + y for x, y in zip(b.__dict__.values(), d.__dict__.values(), strict=True))) if d else None
    return Validation(label, kind, 100, 3.0, 2.0, step, mem if added else None, status, base_step=b, overhead=d)


def test_validation_frame_columns_and_noise_against_the_pick():
    results = [_v("no adapter", "baseline", (-0.5, 0.0, 0.5)),
               _v(candidate_label(0), "candidate", (8.0, 10.0, 12.0)),
               _v(candidate_label(1), "candidate", (4.0, 5.0, 6.0)),
               _v("LoRA r=1", "baseline", (5.5, 7.0, 8.5)),
               _v("PEFT C3A p=16", "baseline", None, status="failed: out of memory")]
    frame = validation_frame(results, results[0], candidate_label(1))
    assert tuple(frame.columns) == VALIDATION_COLUMNS
    rows = frame.set_index("label")
    assert list(rows.index[rows.picked]) == ["predicted #2"]
    assert rows.loc["predicted #2", "measured_overhead_ms"] == 5.0
    assert rows.loc["predicted #2", "overhead_pct"] == pytest.approx(5.0)
    assert (rows.loc["predicted #1", "measured_overhead_ms_p25"], rows.loc["predicted #1",
                                                                           "measured_overhead_ms_p75"]) == (8.0, 12.0)
    assert rows.within_noise_of_pick.to_dict() == {"no adapter": False, "predicted #1": False, "predicted #2": True,
                                                   "LoRA r=1": True, "PEFT C3A p=16": None}
    assert rows.loc["predicted #2", "predicted_step_ms"] == 103.0  # its own pairs' frozen median + predicted 3 ms
    assert pd.isna(rows.loc["PEFT C3A p=16", "measured_overhead_ms"])


def test_labels_name_the_predicted_rank():
    assert [candidate_label(i) for i in range(3)] == ["predicted #1", "predicted #2", "predicted #3"]


def test_choose_takes_a_later_candidate_only_when_its_paired_overhead_is_clearly_lower():
    top = [object(), object(), object()]
    measured = {candidate_label(0): _v(candidate_label(0), "candidate", (8.0, 10.0, 12.0)),
                candidate_label(1): _v(candidate_label(1), "candidate", (7.0, 8.5, 11.0)),  # median not below 8
                candidate_label(2): _v(candidate_label(2), "candidate", (6.0, 7.0, 9.0))}  # 7 < 8: clearly lower
    assert choose(top, measured, "latency") == 2
    measured[candidate_label(2)] = _v(candidate_label(2), "candidate", (7.0, 8.0, 9.0))
    assert choose(top, measured, "latency") == 0


def test_validate_pairs_each_plan_on_the_same_model_and_restores_it(tmp_path):
    net = build_model(str(tiny_roberta(tmp_path / "tiny", hidden=32, layers=1)), device="cpu")
    targets = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]
    originals = [net.get_submodule(t) for t in targets]
    config = AdapterConfig("tiny", {t: Candidate("c3a", 8, None, "rfft", "torch").layer_config() for t in targets})
    plans = [baseline_plan("no adapter", {}, 0, 0.0, 0.0), candidate_plan(candidate_label(0), config, 256, 1.0, 1.0)]
    timing = TimingSettings(warmup=1, min_reps=3, max_reps=3, min_time_s=0.0)
    results = validate(net, targets, plans, batch=1, seq_len=4, dtype=torch.float32, timing=timing, progress=False)
    assert [v.status for v in results] == ["ok", "ok"]
    for v in results:
        assert v.overhead is not None and v.base_step is not None and v.step is not None and v.mem_mb > 0
        assert v.overhead.p25 <= v.overhead.median <= v.overhead.p75
    assert [net.get_submodule(t) for t in targets] == originals
    assert not any(p.requires_grad for p in net.parameters())
