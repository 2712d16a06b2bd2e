"""The report of a search folder: its data for a fixed measurement table, escaping, offline HTML, the CLI."""

import argparse
import json
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from circtune._io import write_csv_atomic
from circtune._search import study_directions, trials_frame
from circtune.adapters.config import AdapterConfig, LayerConfig
from circtune.baselines import Baseline
from circtune.capacity import Capacity
from circtune.measure.store import Measurement, MeasurementKey, to_frame
from circtune.measure.timing import Spread
from circtune.models import TargetLayer
from circtune.pick_files import allocation_frame, baseline_rows, front_frame
from circtune.pipeline import validation_frame
from circtune.problem import Assignment, Problem, options_by_shape
from circtune.report.data import FolderError, build_report_data, load_folder, pareto_front, short_modules
from circtune.report.render import render_html, write_report
from circtune.space import Candidate
from circtune.validate import Validation

# Two shapes, two layer indices and one unindexed layer. Times are per layer (ms) added over the frozen layer,
# except "none" (absolute); FLOPs include the base layer's (1e6 for 64x64, 2e6 for 64x128).
Q, UP = (64, 64), (64, 128)
BASE_TIMES = {  # shape -> candidate -> (params, step_ms, peak_mem_mb, flops_fwd_bwd)
    Q: {("none", "", "", "", ""): (0, 10.0, 1.0, 1.0e6),
        ("lora", "", "2", "", ""): (256, 1.2, 0.5, 1.1e6),
        ("peft-c3a", "16", "", "", ""): (256, 4.0, 2.0, 1.4e6),
        ("c3a", "16", "", "rfft", "torch"): (256, 2.0, 0.8, 1.5e6),
        ("c3a", "16", "", "", "dense"): (256, 1.5, 0.9, 2.0e6),
        ("c3a", "32", "", "rfft", "torch"): (128, 1.0, 0.6, 1.3e6),
        ("c3a", "32", "", "fft", "torch"): (128, 1.8, 0.7, 1.2e6),
        ("cdvft", "32", "2", "rfft", "torch"): (256, 2.5, 1.1, 1.6e6)},
    UP: {("none", "", "", "", ""): (0, 20.0, 2.0, 2.0e6),
         ("lora", "", "2", "", ""): (384, 2.4, 1.0, 2.2e6),
         ("c3a", "16", "", "rfft", "torch"): (512, 3.0, 1.6, 2.9e6),
         ("c3a", "16", "", "", "dense"): (512, 4.0, 1.8, 4.0e6),
         ("c3a", "32", "", "rfft", "torch"): (256, 2.0, 1.2, 2.5e6),
         ("c3a", "32", "", "fft", "torch"): (256, 2.2, 1.4, 2.4e6),
         ("cdvft", "32", "2", "rfft", "torch"): (448, 2.1, 1.5, 2.6e6)},
}
FAILED = {UP: [(("c3a", "64", "", "", "triton"), "out of memory")]}  # triton uses no transform
DENSE16 = {"method": "c3a", "block_size": 16, "factors": None, "transform": "rfft", "backend": "dense", "init": "zeros"}
TORCH32 = {"method": "c3a", "block_size": 32, "factors": None, "transform": "rfft", "backend": "torch", "init": "zeros"}
CDVFT32 = {"method": "cdvft", "block_size": 32, "factors": 2, "transform": "rfft", "backend": "torch", "alpha": 1.0}
PICK = {"model.layers.0.attn.q_proj": (Q, DENSE16), "model.layers.1.attn.q_proj": (Q, TORCH32),
        "model.layers.0.mlp.up_proj": (UP, CDVFT32), "model.layers.1.mlp.up_proj": (UP, CDVFT32),
        "lm_head": (Q, TORCH32)}
H100 = {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "index": 0,
        "properties": {"total_memory_mb": 81559, "sm_count": 132, "power_limit_w": 700},
        "software": {"torch": "2.13.0", "triton": "3.5.0", "circtune": "0.1.0", "python": "3.11.7", "cuda": "12.8"},
        "fingerprint": "aaaa1111aaaa1111"}
def _validation(label, kind, params, predicted_ms, predicted_mem, added=None, mem=None, status="ok", baseline=None):
    """A whole-model result as validate() returns it: the frozen step is (99, 100, 101) ms in every plan's pairs,
    ``added`` the (p25, median, p75) of the per-pair differences; ``baseline`` the baseline's id."""
    if added is None:
        return Validation(label, kind, params, predicted_ms, predicted_mem, status=status, baseline=baseline)
    base = Spread(99.0, 100.0, 101.0)
    step = Spread(*(100.0 + a for a in added))
    return Validation(label, kind, params, predicted_ms, predicted_mem, step, mem, status, base_step=base,
                      overhead=Spread(*added), baseline=baseline)


VALIDATION = [  # deliberately not in display order; the pick is the second best predicted (measured faster)
    _validation("LoRA r=2", "baseline", 1408, None, None, (13.0, 15.0, 17.0), 530.0, baseline="lora"),
    _validation("uniform c3a p=32", "baseline", 896, 8.5, 25.0, (9.0, 11.0, 13.0), 515.0, baseline="uniform-c3a"),
    _validation("predicted #1", "candidate", 1400, 8.0, 22.0, (11.0, 13.0, 15.0), 512.0),
    _validation("no adapter", "baseline", 0, 0.0, 0.0, (-1.0, 0.0, 1.0), 480.0, baseline="none"),
    _validation("predicted #2", "candidate", 1408, 7.7, 20.0, (8.0, 10.0, 12.0), 520.0),
    _validation("PEFT C3A p=16", "baseline", 1280, None, None, status="failed: out of memory", baseline="peft-c3a"),
]
# front.csv, as the search hands it to its writer: label, params, step_ms, mem_mb, capacity of the exact front's
# points, of the ranked candidates validation measured (the pick is the second) and of the baselines (id first, in
# the order of circtune.baselines' table).
FRONT = [("front 1", 1200, 6.5, 4.0, 0.30), ("front 2", 1408, 7.7, 5.2, 0.42)]
CANDIDATES = [("predicted #1", 1400, 8.0, 5.0, 0.40), ("predicted #2", 1408, 7.7, 5.2, 0.42)]
PICKED = "predicted #2"
BASELINES = [("lora", "LoRA r=2", 1408, 12.0, 6.0, 0.55), ("peft-c3a", "PEFT C3A p=16", 1280, 20.0, 9.0, 0.35),
             ("uniform-c3a", "uniform c3a p=32", 896, 8.5, 4.4, 0.25),
             ("latency-only", "latency-only optimum", 1390, 6.0, 5.0, 0.20)]
# The calibration's gradient energy of a layer, by its shape (relative: each layer's share is its value over the sum
# for the pick's layers; PICK's q_proj layers get 280 / 1500 of the budget).
ENERGY = {Q: 280, UP: 330}
RFFT16_KEY, RFFT32_KEY = ("c3a", "16", "", "rfft", "torch"), ("c3a", "32", "", "rfft", "torch")
TRIALS = [  # the study's complete trials: source, label, the layers whose configuration differs from the pick's
    ("optimum", "exact optimum", {}),  # the pick: 7.7 ms, 1408 parameters
    ("seed", "uniform c3a p=32", dict.fromkeys(PICK, RFFT32_KEY)),  # faster (7 ms) but under the fill (896)
    ("sampler", "", {"model.layers.0.attn.q_proj": RFFT16_KEY}),  # slower than the pick, less memory: on the front
    ("sampler", "", {"model.layers.1.attn.q_proj": ("c3a", "32", "", "fft", "torch")}),  # slower, more memory
    ("sampler", "", dict.fromkeys(["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"], RFFT16_KEY)),  # 1536
]


def write_run(folder, *, model="tiny-llama", budget=1500, device=H100, scale=None, pick=PICK, files=None,
              extra=None, failed=FAILED):
    """A search folder, every file written by the search's writers; ``scale`` maps a candidate (method, p, m,
    transform, backend) to a time factor, ``extra`` adds measured rows ({shape: {candidate: (params, step_ms, mem,
    flops)}}). Every configuration of ``pick`` must be measured ok, as a search picks nothing else."""
    folder.mkdir(parents=True, exist_ok=True)
    files = files or ("profile.json", "trials.csv", "validation.csv", "validated", "front.csv", "allocation.csv")
    layers = {name: cfg for name, (_, cfg) in pick.items()}
    config = {"format": "circtune.adapter/1", "base_model": model, "layers": layers, "budget": budget,
              "min_fill": 0.9, "total_params": 1408, "predicted_overhead_ms": 7.7, "optimum_overhead_ms": 7.7,
              "base_step_ms": 100.0, "predicted_step_ms": 107.7, "measured_step_ms": 110.0, "predicted_mem_mb": 500.0,
              "measured_mem_mb": 520.0, "device": device, "tokens": 256, "dtype": "bf16",
              "pick_label": "predicted #2", "measured_overhead_ms": 10.0, "measured_overhead_ms_p25": 8.0,
              "measured_overhead_ms_p75": 12.0, "capacity_source": "calibration", "capacity": 0.42,
              "capacity_tolerance": 0.05, "allocation": "balanced",
              "command": f"circtune search --model {model} --budget {budget}", "objective": "latency",
              "study": {"name": "s-1", "storage": "sqlite:///circtune.db", "trials": 5}}
    # Both files through the writers a search uses: what the report reads is what the producer writes.
    meta = {k: v for k, v in config.items() if k not in ("format", "base_model", "layers")}
    AdapterConfig(model, {n: LayerConfig(**cfg) for n, cfg in layers.items()}, meta).save(
        folder / "adapter_config.json")
    counts = {shape: sum(1 for s, _ in pick.values() if s == shape) for shape in BASE_TIMES}
    rows = [(s, k, v, "ok") for s, cands in BASE_TIMES.items() for k, v in cands.items()]
    rows += [(s, k, v, "ok") for s, cands in (extra or {}).items() for k, v in cands.items()]
    rows += [(s, k, (None, None, None, None), why) for s, fails in failed.items() for k, why in fails]
    measurements = [_measurement(device, shape, key, values, status, scale) for shape, key, values, status in rows]
    frame = to_frame(measurements, model, counts)
    write_csv_atomic(frame, folder / "measurements.csv")
    if "profile.json" in files:
        profile = {"model": {"spec": model, "name": model, "targets": [{"name": n, "d_in": s[0], "d_out": s[1]}
                                                                      for n, (s, _) in pick.items()]},
                   "space": {"description": "both methods, p in [16, 64]"}, "device": device,
                   "timing": {"warmup": 2, "min_reps": 15, "max_reps": 60, "min_time_s": 0.75, "flush_l2": True},
                   "command": f"circtune profile --model {model}", "measured": 17, "reused": 0, "failed": 1,
                   "excluded": {"64x64": [{"what": "backend=triton", "reason": "triton unavailable"}]}}
        (folder / "profile.json").write_text(json.dumps(profile))
    # The other files through the search's writers (pipeline._write_outputs), from the search's problem over these
    # measurements.
    capacity = Capacity("calibration", _energy(pick))
    problem = _problem(pick, frame, budget, config["min_fill"], capacity)
    chosen = [Candidate.from_layer(cfg) for cfg in layers.values()]
    if "trials.csv" in files:
        write_csv_atomic(trials_frame(problem, _study(problem, chosen)), folder / "trials.csv")
    if "validation.csv" in files:  # from validate()'s results
        base = next(v for v in VALIDATION if v.label == "no adapter")
        results = VALIDATION if "validated" in files else []
        write_csv_atomic(validation_frame(results, base, PICKED), folder / "validation.csv")
    if "front.csv" in files:
        baselines = baseline_rows([Baseline(*row) for row in BASELINES])
        write_csv_atomic(front_frame([_row(*r) for r in FRONT], [(r[0], _row(*r)) for r in CANDIDATES], baselines,
                                     PICKED), folder / "front.csv")
    if "allocation.csv" in files:
        write_csv_atomic(allocation_frame(problem, _assignment(problem, _choice(problem, chosen)), capacity),
                         folder / "allocation.csv")
    return folder


def _row(label, params, step_ms, mem_mb, capacity) -> Assignment:
    """A point of front.csv: its numbers are the fixture's (which layers it assigns, front.csv does not say)."""
    return Assignment((), params, step_ms, mem_mb, label, capacity)


def _energy(pick) -> dict[str, float]:
    total = sum(ENERGY[shape] for shape, _ in pick.values())
    return {name: ENERGY[shape] / total for name, (shape, _) in pick.items()}


def _problem(pick, frame, budget, min_fill, capacity) -> Problem:
    """The search's problem over the pick's layers: each layer's measured adapter options, scored by ``capacity``, as
    build_problem makes it (without its refusal of a budget these options cannot meet: some fixtures change the
    budget alone)."""
    layers = tuple(TargetLayer(name, *shape) for name, (shape, _) in pick.items())
    by_shape = options_by_shape(frame)
    options = tuple(tuple(replace(o, capacity=float(capacity.score(t, o.candidate))) for o in by_shape[t.shape])
                    for t in layers)
    return Problem(layers, options, budget, min_fill)


def _choice(problem, candidates) -> tuple[int, ...]:
    """Each layer's option index of its candidate; a search picks only configurations measured ok."""
    choice = []
    for layer, options, c in zip(problem.layers, problem.options, candidates, strict=True):
        measured = [o.candidate for o in options]
        assert c in measured, f"{layer.name}: {c.label} has no ok measurement"
        choice.append(measured.index(c))
    return tuple(choice)


def _assignment(problem, choice, label="") -> Assignment:
    return Assignment(choice, *problem.totals(choice), label, problem.capacity(choice))


def _study(problem, chosen):
    """An in-memory study holding :data:`TRIALS` (on the pick ``chosen``) as the search's study records them."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(directions=study_directions(problem))
    for source, label, changes in TRIALS:
        cands = [fixture_candidate(changes[t.name]) if t.name in changes else c
                 for t, c in zip(problem.layers, chosen, strict=True)]
        a = _assignment(problem, _choice(problem, cands), label)
        values = [a.step_ms, a.capacity, a.mem_mb][:len(study.directions)]
        study.add_trial(optuna.trial.create_trial(
            params={t.name: options[k].label for t, options, k in zip(problem.layers, problem.options, a.choice,
                                                                       strict=True)},
            distributions={t.name: optuna.distributions.CategoricalDistribution([o.label for o in options])
                           for t, options in zip(problem.layers, problem.options, strict=True)},
            values=values, user_attrs={"source": source, "choice": list(a.choice), **({"label": label} if label
                                                                                        else {})}))
    return study


NONE = ("none", "", "", "", "")


def fixture_candidate(key) -> Candidate:
    """A fixture key (method, p, m, transform, backend) as the candidate the profiler measures."""
    method, p, m, transform, backend = key
    return Candidate(method, int(p) if p else None, int(m) if m else None, transform or None, backend or None)


def _measurement(device, shape, key, values, status, scale) -> Measurement:
    """The store's record of one fixture row: absolute times and memory (the base layer's plus the added ones, as
    the paired timing records them), so that to_frame gives back the fixture's added numbers."""
    params, ms, mem, flops = values
    mkey = MeasurementKey(device["fingerprint"], "2.13.0", "3.5.0", "0.1.0", shape[0], shape[1], 256, "bf16",
                          fixture_candidate(key))
    common = {"timestamp": "2026-11-24T10:00:00+00:00"}
    if status != "ok":
        return Measurement(mkey, status, device["name"], params or 0, **common)
    ms *= (scale or {}).get(key, 1.0)
    if key == NONE:
        half = Spread(ms * 0.45, ms / 2, ms * 0.55)  # (the base row's forward and backward, which to_frame reads)
        return Measurement(mkey, "ok", device["name"], 0, fwd=half, bwd=half, step=Spread(ms * 0.9, ms, ms * 1.1),
                           peak_mem_mb=mem,
                           flops_fwd_bwd=int(flops), reps=20, **common)
    _, base_ms, base_mem, _ = BASE_TIMES[shape][NONE]
    ref = base_ms * (scale or {}).get(NONE, 1.0)
    return Measurement(mkey, "ok", device["name"], params, step=Spread(ref + ms * 0.9, ref + ms, ref + ms * 1.1),
                       peak_mem_mb=base_mem + mem, flops_fwd_bwd=int(flops), reps=20, ref_step_ms=ref, **common)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_report_data(load_folder(write_run(tmp_path_factory.mktemp("run") / "h100")))


def test_report_data_is_json(data):
    json.dumps(data, allow_nan=False)
    assert data["header"]["model"] == "tiny-llama" and data["header"]["budget"] == 1500
    assert data["header"]["device"]["fingerprint"] == "aaaa1111aaaa1111"
    assert ["sm_count", "132"] in data["header"]["device"]["properties"]
    assert data["notes"] == ["whole-model validation failed for 1 assignment(s): PEFT C3A p=16 (failed: out of memory)"]


def test_pareto_front_per_shape(data):
    shapes = {(s["d_in"], s["d_out"]): s for s in data["landscape"]}
    assert [(p["label"], p["params"], p["step_ms"]) for p in shapes[Q]["pareto"]] == [
        ("c3a p=32 rfft/torch", 128, 1.0), ("c3a p=16 dense", 256, 1.5)]
    assert [(p["label"], p["params"], p["step_ms"]) for p in shapes[UP]["pareto"]] == [
        ("c3a p=32 rfft/torch", 256, 2.0), ("cdvft p=32 m=2 rfft/torch", 448, 2.1), ("c3a p=16 rfft/torch", 512, 3.0)]
    q = shapes[Q]
    assert q["layers"] == 3 and q["base"]["step_ms"] == 10.0
    assert {p["label"] for p in q["references"]} == {"lora r=2", "peft-c3a p=16"}
    # the pick uses dense p=16 once and p=32 rfft/torch twice (layer 1 and lm_head) on 64x64
    assert {p["label"]: p["picked_layers"] for p in q["candidates"]} == {
        "c3a p=32 rfft/torch": 2, "c3a p=32 fft/torch": 0, "c3a p=16 rfft/torch": 0, "c3a p=16 dense": 1,
        "cdvft p=32 m=2 rfft/torch": 0}
    # FLOPs added over the base layer; the fewest (fft) is not the fastest (rfft)
    assert {p["label"]: p["flops_added"] for p in q["candidates"]}["c3a p=32 fft/torch"] == pytest.approx(2e5)
    assert q["flops"]["fewest"]["label"] == "c3a p=32 fft/torch"
    assert q["flops"]["fastest"]["label"] == "c3a p=32 rfft/torch"
    assert shapes[UP]["failed"] == [{"label": "c3a p=64 triton", "status": "out of memory"}]
    assert q["excluded"] == [{"what": "backend=triton", "reason": "triton unavailable"}]


def test_pareto_front_function():
    pts = [dict(label=k, params=a, step_ms=b) for k, a, b in
           [("a", 10, 5), ("b", 20, 4), ("c", 20, 6), ("d", 30, 7), ("e", 40, 3), ("f", 5, 1), ("g", 40, 3)]]
    assert [p["label"] for p in pareto_front(pts)] == ["f", "e"]


def test_backends_per_block_size(data):
    b = next(s for s in data["landscape"] if (s["d_in"], s["d_out"]) == Q)["backends"]
    assert b["groups"] == [{"family": "c3a", "block_size": 16}, {"family": "c3a", "block_size": 32},
                           {"family": "cdvft m=2", "block_size": 32}]
    assert b["series"] == [{"variant": "rfft/torch", "step_ms": [2.0, 1.0, 2.5]},
                           {"variant": "fft/torch", "step_ms": [None, 1.8, None]},
                           {"variant": "dense", "step_ms": [1.5, None, None]}]


def test_per_layer_map_and_totals(data):
    m = data["pick"]["map"]
    assert m["x"] == ["0", "1", "–"] and m["y"] == ["q_proj", "up_proj", "lm_head"]
    cells = {(c["x"], c["y"]): c["class"] for c in m["cells"]}
    assert cells == {("0", "q_proj"): "c3a p=16", ("1", "q_proj"): "c3a p=32", ("0", "up_proj"): "cdvft p=32",
                     ("1", "up_proj"): "cdvft p=32", ("–", "lm_head"): "c3a p=32"}
    assert [(k["class"], k["layers"], k["params"]) for k in m["classes"]] == [
        ("c3a p=16", 1, 256), ("c3a p=32", 2, 256), ("cdvft p=32", 2, 896)]
    layers = {lay["name"]: lay for lay in data["pick"]["layers"]}
    # the dense layer's config says transform "rfft": it still matches the dense measurement (no transform)
    assert layers["model.layers.0.attn.q_proj"]["label"] == "c3a p=16 dense"
    assert layers["model.layers.0.attn.q_proj"]["step_ms"] == 1.5
    t = data["pick"]["totals"]
    assert t["layers"] == 5 and t["total_params"] == 1408 and t["sum_layer_params"] == 1408
    assert t["sum_layer_step_ms"] == pytest.approx(1.5 + 1.0 + 2.1 + 2.1 + 1.0)
    assert t["fill"] == pytest.approx(1408 / 1500)


def test_short_module_names():
    assert short_modules(["encoder.layer.attention.self.query", "encoder.layer.attention.output.dense",
                          "encoder.layer.output.dense"]) == {
        "encoder.layer.attention.self.query": "query", "encoder.layer.attention.output.dense": "attention.output.dense",
        "encoder.layer.output.dense": "layer.output.dense"}


def test_bars_order_and_validation(data):
    bars = data["pick"]["bars"]
    assert [b["label"] for b in bars] == ["predicted #2", "predicted #1", "no adapter", "LoRA r=2", "PEFT C3A p=16",
                                         "uniform c3a p=32"]
    assert bars[0]["picked"] and bars[0]["measured_step_ms_p75"] == 112.0
    assert (bars[0]["measured_overhead_ms_p25"], bars[0]["measured_overhead_ms"], bars[0]["overhead_pct"]) == (
        8.0, 10.0, 10.0)
    assert {b["label"]: b["within_noise_of_pick"] for b in bars} == {
        "predicted #2": True, "predicted #1": True, "no adapter": False, "LoRA r=2": False, "PEFT C3A p=16": None,
        "uniform c3a p=32": True}
    v = {r["label"]: r for r in data["validation"]}
    assert set(v) == {"predicted #2", "predicted #1", "no adapter", "uniform c3a p=32"}  # LoRA: nothing predicted
    assert v["predicted #2"]["step_error_pct"] == pytest.approx(100 * (107.7 - 110.0) / 110.0)


def test_search_history(data):
    s = data["search"]
    assert s["counts"] == {"trials": 5, "feasible": 3, "pareto": 2, "seeded": 2}
    assert s["best_so_far"] == [{"number": 0, "step_ms": 7.7}]  # trial 1 is faster but under the fill
    assert [t["number"] for t in s["front"]] == [0, 2]


def test_missing_optional_files_are_noted(tmp_path):
    folder = write_run(tmp_path / "bare", files=("none",))
    data = build_report_data(load_folder(folder))
    assert data["search"] is None and data["validation"] == []
    assert any("trials.csv is missing" in n for n in data["notes"])
    assert any("validation.csv is missing" in n for n in data["notes"])
    assert [b["label"] for b in data["pick"]["bars"]] == ["pick", "no adapter"]
    # without profile.json, two shapes in the measurements: layer shapes are unknown
    assert all(lay["step_ms"] is None for lay in data["pick"]["layers"])
    html = render_html(data)
    assert "No trials.csv in the folder" in html and "no validation.csv" in html


@pytest.mark.parametrize("missing", ["adapter_config.json", "measurements.csv"])
def test_refuses_folder_without_required_file(tmp_path, missing):
    folder = write_run(tmp_path / "run")
    (folder / missing).unlink()
    with pytest.raises(FolderError, match=re.escape(f"{folder}: missing {missing}")):
        load_folder(folder)


def test_html_escapes_model_and_layer_names(tmp_path):
    evil = "<script>alert(1)</script>"
    pick = {f"model.layers.0.{evil}": (Q, TORCH32), **{k: v for k, v in PICK.items() if "layers.0.attn" not in k}}
    folder = write_run(tmp_path / "evil", model=evil, pick=pick,
                       device={**H100, "name": f"GPU {evil}", "properties": {evil: evil}})
    html = render_html(build_report_data(load_folder(folder)), plotlyjs="cdn")
    assert evil not in html and "alert(1)</" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # only our own script tags: the plotly.js include and its config, and one per chart
    assert len(re.findall(r"<script", html)) == 2 + html.count('class="plotly-graph-div"')


def test_inline_html_is_self_contained_and_cdn_is_small(tmp_path):
    folder = write_run(tmp_path / "run")
    inline = write_report(folder)
    assert inline == folder / "report.html"
    text = inline.read_text()
    assert not re.search(r"<script[^>]+src=", text) and "<link" not in text
    assert text.count("Plotly.newPlot") == text.count('class="plotly-graph-div"') == 17
    cdn = write_report(folder, tmp_path / "cdn.html", plotlyjs="cdn").read_text()
    assert re.findall(r'<script[^>]+src="([^"]+)"', cdn) == [re.search(r"https://cdn\.plot\.ly/plotly-[\d.]+\.min\.js",
                                                                       cdn).group(0)]
    assert len(cdn) < len(text) / 10
    with pytest.raises(ValueError, match="plotlyjs"):
        write_report(folder, plotlyjs="web")


def test_cli_report(tmp_path, capsys):
    from circtune.cli import report

    folder = write_run(tmp_path / "run")
    p = argparse.ArgumentParser()
    report.add_arguments(p)
    assert report.run(p.parse_args([str(folder), "--out", str(tmp_path / "r.html"), "--plotlyjs", "cdn"])) == 0
    assert (tmp_path / "r.html").exists() and "wrote" in capsys.readouterr().out
    with pytest.raises(FolderError, match="missing adapter_config.json and measurements.csv"):
        report.run(p.parse_args([str(tmp_path)]))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(path, profile):
    """Headless Chromium on a file: (DOM after the scripts ran, the page's console lines)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom", path.as_uri()]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_and_compare_render_in_headless_chromium(tmp_path):
    """Every chart is drawn (plotly marks its div js-plotly-plot and adds its SVG) and the page logs nothing to the
    console: an uncaught error, a failed promise or console.error would all show as CONSOLE lines."""
    from circtune.report.compare import write_compare

    report = write_report(write_run(tmp_path / "a"))
    other = write_run(tmp_path / "b", device={**H100, "name": "other GPU", "fingerprint": "b"}, scale={
        ("c3a", "16", "", "", "dense"): 3.0})
    compare = write_compare([tmp_path / "a", other], tmp_path / "compare.html")
    runs = [(path, charts, _chromium(path, tmp_path / f"profile-{i}"))
            for i, (path, charts) in enumerate([(report, 17), (compare, 3)])]
    for path, charts, proc in runs:
        dom, log = proc.communicate(timeout=120)
        assert dom.count('class="plotly-graph-div') == charts, path
        assert dom.count('class="plotly-graph-div js-plotly-plot"') == charts, path
        assert dom.count('class="main-svg"') >= charts, path
        console = [line for line in log.splitlines() if ":CONSOLE" in line]
        assert console == [], (path, console)


# --------------------------------------------------------------------------------------------------- the answers
def _text(html: str) -> str:
    """The page's visible text, tags dropped and entities decoded, whitespace collapsed."""
    import html as html_lib

    return re.sub(r"\s+", " ", html_lib.unescape(re.sub(r"<[^>]+>", " ", html)))


def test_verdict_answers_first(tmp_path, data):
    v = data["verdict"]
    assert v["validated"] and v["pick"]["label"] == "predicted #2" and v["pick"]["paired"]
    assert (v["pick"]["ms"], v["pick"]["pct"], v["pick"]["interval"]) == (10.0, 10.0, (8.0, 12.0))
    said = {c["label"]: c["sentence"] for c in v["comparisons"]}
    assert list(said) == ["LoRA r=2", "PEFT C3A p=16", "uniform c3a p=32"]
    assert said["LoRA r=2"] == ("LoRA r=2 measured 5 ms slower than the pick (adds 15 ms, +15.0 %), outside noise; "
                                "it captures 55.0 % of the gradient energy against the pick's 42.0 %.")
    assert said["uniform c3a p=32"].startswith("uniform c3a p=32 measured 1 ms slower than the pick") and (
        "within noise" in said["uniform c3a p=32"])
    assert said["PEFT C3A p=16"] == "PEFT C3A p=16: not measured (failed: out of memory)."
    folder = write_run(tmp_path / "run")
    page = _text(render_html(build_report_data(load_folder(folder)), plotlyjs="cdn"))
    head = page[:page.index("Time against capacity")]
    assert "The pick (predicted #2) adds 10 ms (+10.0 %) to the frozen model's 100 ms training step" in head
    assert "p25–p75 8 to 12 ms, measured paired with the frozen model; predicted 7.7 ms" in head
    assert f'model = circtune.apply_adapter(model, "{folder}/adapter_config.json")' in head
    assert "capacity from the calibration texts' gradients" in head
    assert "Noise floor: the frozen model paired with itself adds 0 ms" in head
    # the run's metadata and the device table come after the answers
    assert page.index("sm_count 132") > page.index("How it was measured") > page.index("The answer")


def test_front_and_allocation_charts(tmp_path, data):
    front = data["front"]
    assert [p["label"] for p in front["points"] if p["picked"]] == ["predicted #2"]
    assert {p["label"] for p in front["points"] if p["kind"] == "baseline"} == {
        "uniform c3a p=32", "LoRA r=2", "PEFT C3A p=16", "latency-only optimum"}
    rows = data["allocation"]
    assert [r["short"] for r in rows] == ["0.q_proj", "1.q_proj", "0.up_proj", "1.up_proj", "lm_head"]
    assert rows[0]["config"] == "c3a p=16" and rows[2]["config"] == "cdvft p=32 m=2"
    assert (rows[0]["share"], rows[0]["window_lo"], rows[0]["window_hi"]) == (280, 140, 560)
    html = render_html(data, plotlyjs="cdn")
    assert 'id="front-chart"' in html and 'id="allocation-chart"' in html
    from circtune.report.charts import front_figure

    fig = front_figure(front)
    names = [t.name for t in fig.data]
    assert names == ["front (exact)", "validated candidates", "LoRA r=2", "PEFT C3A p=16", "uniform c3a p=32",
                     "latency-only optimum", "pick (predicted #2)"]  # the baselines in the order the search writes
    assert fig.data[-1].x == (42.0,) and fig.data[-1].y == (7.7,)
    # without the files (an older run): notes instead of charts
    old = build_report_data(load_folder(write_run(tmp_path / "old", files=("profile.json", "validation.csv",
                                                                             "validated"))))
    assert old["front"] is None and old["allocation"] is None
    html = render_html(old, plotlyjs="cdn")
    assert 'id="front-chart"' not in html and 'id="allocation-chart"' not in html
    assert "No front.csv in this folder" in html and "No allocation.csv" in html


def test_a_no_validate_run_shows_no_empty_charts(tmp_path):
    folder = write_run(tmp_path / "skip", files=("profile.json", "trials.csv", "validation.csv", "front.csv"))
    data = build_report_data(load_folder(folder))
    assert not data["verdict"]["validated"] and data["validation"] == [] and data["pick"]["bars"] == []
    html = render_html(data, plotlyjs="cdn")
    for div in ("pick-step", "pick-overhead", "pick-mem", "pred-step", "pred-mem"):
        assert f'id="{div}"' not in html
    page = _text(html)
    assert "Not measured on the whole model: validation was skipped (--no-validate)" in page
    assert "The pick's predicted added time is 7.7 ms per step" in page


def test_predicted_against_measured_points_carry_no_text_labels(data):
    from circtune.report.charts import predicted_figure

    fig = predicted_figure(data["validation"], "step")
    points = [t for t in fig.data if t.name != "measured = predicted"]
    assert all(t.mode == "markers" and t.text is None for t in points)
    assert [t.name for t in points] == ["pick (predicted #2)", "predicted #1", "no adapter", "uniform c3a p=32"]


def test_memory_and_noise_checks():
    from circtune.report.verdict import memory_check, noisy

    bars = [{"label": "predicted #3", "picked": True, "predicted_mem_mb": 333.0, "measured_mem_mb": 223.0},
            {"label": "LoRA r=1", "picked": False, "predicted_mem_mb": 230.0, "measured_mem_mb": 223.0}]
    m = memory_check(bars)
    assert [(o["label"], round(o["off_pct"])) for o in m["rows"]] == [("predicted #3", 49)]
    assert m["why"].startswith("the additive model over-counts")
    assert memory_check(bars[1:]) is None
    steps = [{"label": "a", "measured_step_ms_p25": 90.0, "measured_step_ms": 100.0, "measured_step_ms_p75": 120.0},
             {"label": "b", "measured_step_ms_p25": 95.0, "measured_step_ms": 100.0, "measured_step_ms_p75": 105.0}]
    lora = [{"label": f"lora r={r}", "method": "lora", "factors": r, "variant": "", "params": 100 * r,
             "step_ms": ms} for r, ms in ((1, 2.0), (2, 2.2), (3, 77.9), (4, 2.4), (5, 2.5))]
    flagged = noisy(steps, [{"d_in": 64, "d_out": 64, "candidates": [], "references": lora}])
    assert flagged == ["whole model, a: step 100 ms with p25–p75 90–120 ms (spread 30 % of the median)",
                       "64 × 64, lora r=3: 77.9 ms against 2.2 and 2.4 ms for its neighbours lora r=2 and lora r=4"]


@pytest.mark.parametrize("folder", sorted(p.parent for p in (Path(__file__).parent.parent / "reports").glob(
    "*/adapter_config.json")), ids=lambda p: p.name)
def test_committed_reports_still_render(folder):
    data = build_report_data(load_folder(folder))
    json.dumps(data, allow_nan=False)
    page = _text(render_html(data, plotlyjs="cdn"))
    assert "The answer" in page and "circtune.apply_adapter(model," in page
    validation = pd.read_csv(folder / "validation.csv") if (folder / "validation.csv").is_file() else None
    paired = validation is not None and "measured_overhead_ms" in validation.columns
    if data["verdict"]["validated"] and not paired:  # an older run: the difference of two unpaired medians
        assert "not paired" in page and "LoRA r=" in page
    if paired:  # a run with the paired validation: the verdict says so and compares with LoRA at the budget
        assert "measured paired with the frozen model" in page and "LoRA r=" in page and "not paired" not in page
    if (folder / "front.csv").is_file():
        assert data["front"] is not None and "No front.csv in this folder" not in page
    else:
        assert data["front"] is None and "No front.csv in this folder" in page


# --------------------------------------------------------------------------------------------------- real writers
@pytest.fixture(scope="session")
def searched(tmp_path_factory):
    """Two folders written by a real search of a tiny model (validated with a zero timing floor, and again with
    --no-validate on the same store): the report reads exactly what the writers write."""
    from tiny_models import tiny_roberta

    import circtune
    from circtune.options import SearchOptions

    tmp = tmp_path_factory.mktemp("searched")
    space = tmp / "space.toml"
    space.write_text('methods = ["c3a"]\nblock_sizes = [8, 16, 32]\ntransforms = ["rfft"]\nbackends = ["torch"]\n')
    fast = {"warmup": 0, "min_reps": 2, "max_reps": 2, "min_time": 0, "progress": False, "device": "cpu"}
    common = dict(model=str(tiny_roberta(tmp / "tiny", hidden=32, layers=1)), budget=256, space=str(space),
                  batch_size=2, seq_len=8, trials=4, top=2, store=f"sqlite:///{tmp / 'store.db'}", **fast)
    validated = circtune.search(options=SearchOptions(validate_min_time=0, out=str(tmp / "validated"), **common))
    skipped = circtune.search(options=SearchOptions(validate=False, out=str(tmp / "skipped"), **common))
    return validated.folder, skipped.folder


@pytest.mark.slow
def test_report_of_a_real_search(searched):
    validated, skipped = searched
    data = build_report_data(load_folder(validated))
    json.dumps(data, allow_nan=False)
    v = data["verdict"]
    assert v["validated"] and v["pick"]["paired"] and v["pick"]["label"].startswith("predicted #")
    assert {c["label"].split(" ")[0] for c in v["comparisons"]} >= {"LoRA", "uniform"}
    page = _text((validated / "report.html").read_text())
    head = page[:page.index("Time against capacity")]
    assert re.search(r"The pick \(predicted #\d\) adds -?[\d.,]+ ms \([+-][\d.]+ %\) to the frozen model's", head)
    assert re.search(r"LoRA r=\d+ measured [\d.,]+ ms (faster|slower) than the pick .*(within|outside) noise", head)
    assert f'circtune.apply_adapter(model, "{validated}/adapter_config.json")' in head
    html = (validated / "report.html").read_text()
    assert 'id="front-chart"' in html and 'id="allocation-chart"' in html and 'id="pick-overhead"' in html
    front = {p["label"]: p for p in data["front"]["points"]}
    assert sum(p["picked"] for p in front.values()) == 1 and "latency-only optimum" in front
    assert front[v["pick"]["label"]]["picked"]  # the front names the pick as validation does
    assert len(data["allocation"]) == 2
    bare = build_report_data(load_folder(skipped))
    assert not bare["verdict"]["validated"] and bare["pick"]["bars"] == [] and bare["validation"] == []
    html = (skipped / "report.html").read_text()
    assert all(f'id="{d}"' not in html for d in ("pick-overhead", "pick-step", "pick-mem", "pred-step", "pred-mem"))
    assert "validation was skipped (--no-validate)" in _text(html)
