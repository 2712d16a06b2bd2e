"""``circtune compare``: two search folders from different devices, written by the search's writers from fixed
measurements; ratios and regret by hand."""

import argparse
import json
import math
import re

import pytest
from test_report import H100, PICK, TORCH32, UP, Q, write_run

from circtune.report.compare import build_compare_data, render_compare_html

A100 = {**H100, "name": "NVIDIA A100-SXM4-80GB", "fingerprint": "bbbb2222bbbb2222",
        "properties": {"total_memory_mb": 81920, "sm_count": 108, "l2_cache_mb": 40}}
# On the A100 everything takes twice as long, dense three times, and C3A p=16 with rfft/torch runs as fast as on A:
# so its pick uses c3a p=16 rfft/torch where A's uses dense on layer 0's q_proj.
SLOWER = {("c3a", "16", "", "", "dense"): 3.0, ("c3a", "16", "", "rfft", "torch"): 1.0}
SCALE = {key: SLOWER.get(key, 2.0) for key in [("none", "", "", "", ""), ("lora", "", "2", "", ""),
                                               ("peft-c3a", "16", "", "", ""), *SLOWER,
                                               ("c3a", "32", "", "rfft", "torch"), ("c3a", "32", "", "fft", "torch"),
                                               ("cdvft", "32", "2", "rfft", "torch")]}
RFFT16 = {"method": "c3a", "block_size": 16, "factors": None, "transform": "rfft", "backend": "torch", "init": "zeros"}
PICK_B = {**PICK, "model.layers.0.attn.q_proj": (Q, RFFT16)}
TRITON = {UP: {("c3a", "32", "", "", "triton"): (256, 0.5, 1.0, 2.5e6)}}


@pytest.fixture
def folders(tmp_path):
    a = write_run(tmp_path / "h100")
    b = write_run(tmp_path / "a100", device=A100, scale=SCALE, pick=PICK_B, extra=TRITON, failed={})
    return a, b


def test_ratios_per_candidate_and_shape(folders):
    data = build_compare_data(folders)
    json.dumps(data, allow_nan=False)
    assert [r["tag"] for r in data["runs"]] == ["A", "B"] and data["differences"] == []
    shapes = {(s["d_in"], s["d_out"]): s for s in data["shapes"]}
    q = {r["label"]: r for r in shapes[Q]["rows"]}
    assert q["c3a p=16 dense"]["step_ms"] == [1.5, 4.5] and q["c3a p=16 dense"]["ratio"] == [1.0, 3.0]
    assert q["c3a p=16 rfft/torch"]["ratio"][1] == pytest.approx(1.0)
    assert q["base layer"]["ratio"][1] == pytest.approx(2.0)
    assert [r["label"] for r in shapes[Q]["rows"]][0] == "base layer"
    # geometric mean over everything but the base layer: 2 (lora) 2 (peft) 1 3 2 2 2
    assert shapes[Q]["geomean"][1] == pytest.approx(math.exp(math.log(2 ** 5 * 3) / 7))
    # the failed triton row on A is not a measurement; B's triton row is listed as measured on B only
    assert "c3a p=64 triton" not in {r["label"] for r in shapes[UP]["rows"]}
    assert shapes[UP]["only_some"] == [{"label": "c3a p=32 triton", "in": ["B"]}]


def test_devices_side_by_side(folders):
    rows = {r[0]: r[1:] for r in build_compare_data(folders)["devices"]}
    assert rows["name"] == ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"]
    assert rows["fingerprint"] == ["aaaa1111aaaa1111", "bbbb2222bbbb2222"]
    assert rows["sm_count"] == ["132", "108"]
    assert rows["l2_cache_mb"] == ["", "40"] and rows["power_limit_w"] == ["700", ""]
    assert rows["cuda version"] == ["12.8", "12.8"]


def test_picks_and_regret_by_hand(folders):
    data = build_compare_data(folders)
    assert [(lay["name"], lay["choices"]) for lay in data["layers"] if not lay["same"]] == [
        ("model.layers.0.attn.q_proj", ["c3a p=16 dense", "c3a p=16 rfft/torch"])]
    assert data["picks"][1]["classes"] == [{"label": "c3a p=16 rfft/torch", "layers": 1},
                                           {"label": "c3a p=32 rfft/torch", "layers": 2},
                                           {"label": "cdvft p=32 m=2 rfft/torch", "layers": 2}]
    assert [p["measured_overhead_ms"] for p in data["picks"]] == [10.0, 10.0]  # adapter_config.json's, paired
    regret = {(r["pick_of"], r["on"]): r for r in data["regret"]}
    # A's pick on B: dense 4.5 + 2.0 (q1) + 2 x 4.2 (up) + 2.0 (lm_head) = 16.9; B's own: 2.0 + 2.0 + 8.4 + 2.0 = 14.4
    ab = regret[("A", "B")]
    assert ab["cost_ms"] == pytest.approx(16.9) and ab["own_ms"] == pytest.approx(14.4)
    assert ab["regret_ms"] == pytest.approx(2.5) and ab["regret_pct"] == pytest.approx(100 * 2.5 / 14.4)
    assert ab["missing"] == [] and ab["note"] == ""
    # B's pick on A: 2.0 + 1.0 + 2 x 2.1 + 1.0 = 8.2 against A's own 1.5 + 1.0 + 4.2 + 1.0 = 7.7
    ba = regret[("B", "A")]
    assert ba["cost_ms"] == pytest.approx(8.2) and ba["regret_ms"] == pytest.approx(0.5)
    assert ba["cost_mem_mb"] == pytest.approx(0.8 + 0.6 + 2 * 1.5 + 0.6)


def test_regret_names_configurations_not_measured_on_the_other_device(tmp_path):
    a = write_run(tmp_path / "h100")
    triton_pick = {**PICK, "lm_head": (Q, {**TORCH32, "backend": "triton"})}  # measured on B only
    b = write_run(tmp_path / "a100", device=A100, pick=triton_pick,
                  extra={Q: {("c3a", "32", "", "", "triton"): (128, 0.5, 0.5, 1.2e6)}})
    ba = {(r["pick_of"], r["on"]): r for r in build_compare_data([a, b])["regret"]}[("B", "A")]
    assert ba["regret_ms"] is None and ba["missing"] == ["lm_head: c3a p=32 triton"]
    assert ba["note"] == "1 layer(s) not measured on A"


@pytest.mark.parametrize("change, message", [
    ({"model": "tiny-llama-2"}, "different models: {a} has 'tiny-llama', {b} has 'tiny-llama-2'"),
    ({"budget": 3000}, "different budgets: {a} has 1500, {b} has 3000"),
])
def test_refuses_different_models_or_budgets(tmp_path, change, message):
    a = write_run(tmp_path / "h100")
    b = write_run(tmp_path / "a100", device=A100, **change)
    with pytest.raises(ValueError, match=re.escape(message.format(a=a, b=b))) as e:
        build_compare_data([a, b])
    assert "--allow-different" in str(e.value)
    data = build_compare_data([a, b], allow_different=True)
    assert len(data["differences"]) == 1
    html = render_compare_html(data, plotlyjs="cdn")
    assert "Compared only on what the runs share" in html


def test_different_layers_get_no_regret(tmp_path):
    a = write_run(tmp_path / "h100")
    b = write_run(tmp_path / "a100", device=A100, model="other",
                  pick={k: v for k, v in PICK.items() if k != "lm_head"})
    data = build_compare_data([a, b], allow_different=True)
    assert {r["note"] for r in data["regret"]} == {"A and B adapt different layers", "B and A adapt different layers"}
    assert [lay["choices"] for lay in data["layers"] if lay["name"] == "lm_head"] == [["c3a p=32 rfft/torch", None]]


def test_needs_two_folders(folders):
    with pytest.raises(ValueError, match="at least two"):
        build_compare_data(folders[:1])


def test_compare_html_escapes_and_is_self_contained(tmp_path):
    evil = "<script>alert(1)</script>"
    a = write_run(tmp_path / "h100", model=evil, device={**H100, "name": evil})
    b = write_run(tmp_path / "a100", model=evil, device={**A100, "properties": {evil: 1}})
    html = render_compare_html(build_compare_data([a, b]))
    assert evil not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert not re.search(r"<script[^>]+src=", html)
    assert html.count('class="plotly-graph-div"') == 3  # two shapes' ratios, the regret


def test_cli_compare(folders, tmp_path, capsys):
    from circtune.cli import compare
    from circtune.errors import UsageError

    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    out = tmp_path / "cmp.html"
    assert compare.run(p.parse_args([*map(str, folders), "-o", str(out), "--plotlyjs", "cdn"])) == 0
    assert "A: NVIDIA H100 80GB HBM3" in out.read_text() and "wrote" in capsys.readouterr().out
    with pytest.raises(UsageError, match="at least two folders"):
        compare.run(p.parse_args([str(folders[0])]))
    other = write_run(tmp_path / "other", budget=9)
    with pytest.raises(ValueError, match="different budgets"):
        compare.run(p.parse_args([str(folders[0]), str(other), "-o", str(out)]))
    assert compare.run(p.parse_args([str(folders[0]), str(other), "-o", str(out), "--allow-different"])) == 0


def test_no_ratio_for_added_times_within_the_noise(tmp_path):
    """A paired timing can give an added time at or below zero; it gets no ratio and stays out of the mean."""
    a = write_run(tmp_path / "h100")
    noisy = {**SCALE, ("c3a", "32", "", "fft", "torch"): -1.0}
    b = write_run(tmp_path / "a100", device=A100, scale=noisy, pick=PICK_B)
    q = next(s for s in build_compare_data([a, b])["shapes"] if (s["d_in"], s["d_out"]) == Q)
    assert {r["label"]: r["ratio"][1] for r in q["rows"]}["c3a p=32 fft/torch"] is None
    assert q["no_ratio"] == 1 and q["geomean"][1] == pytest.approx(math.exp(math.log(2 ** 4 * 3) / 6))
