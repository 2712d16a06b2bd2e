"""benchmarks/bench_capacity.py: the planted updates are what the docstring says, the whole benchmark runs end to end
on a tiny setting (a made-up latency table instead of a profile, 3 steps), and its verdict and bad input."""

import csv
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_capacity as bench  # noqa: E402


def _frame(d: int = 128) -> pd.DataFrame:
    """A latency table in the profiler's columns for the benchmark's target shape: every configuration of its space,
    made-up times (dense faster than torch, more parameters slower)."""
    from circtune.space import Candidate

    rows = []
    for method in ("c3a", "cdvft"):
        for p in (8, 16, 32, 64, 128):
            for backend in ("torch", "dense"):
                c = Candidate(method, p, None if method == "c3a" else 2, "rfft" if backend == "torch" else None,
                              backend)
                params = c.params(d, d)
                rows.append({**c.frame_values(), "d_in": d, "d_out": d, "params": params, "status": "ok",
                             "step_ms": (1.0 if backend == "dense" else 1.5) + params / 4000 + (p == 128) * 0.1,
                             "peak_mem_mb": params * 4 / 2**20})
    return pd.DataFrame(rows)


def test_planted_update_has_the_stated_norm_and_structure():
    from circtune.capacity import captured_fraction
    from circtune.space import Candidate

    base = bench.build_base(0)
    teacher = bench.build_teacher(base, 0)
    planted = {p.layer: p for p in bench.PLANTS}
    for name, w in base.named_parameters():
        delta = (teacher.get_parameter(name) - w).double()
        module = name.rsplit(".", 1)[0]
        if module not in planted or not name.endswith("weight"):
            assert torch.equal(teacher.get_parameter(name), w), name  # nothing planted elsewhere
            continue
        plant = planted[module]
        assert delta.norm() / w.double().norm() == pytest.approx(plant.scale, rel=1e-5)
        # the block-circulant part is expressed in full at its block size, the rank-4 part only ~1/p of it
        share = captured_fraction(delta, Candidate("c3a", plant.block_size))
        assert plant.circulant_share - 0.05 < share < plant.circulant_share + 0.1, (module, share)
        assert captured_fraction(delta, Candidate("lora", factors=plant.rank)) < 0.5


def test_runs_end_to_end_and_writes_every_run(tmp_path, capsys):
    table = tmp_path / "measurements.csv"
    _frame().to_csv(table, index=False)
    out = tmp_path / "runs.csv"
    assert bench.main(["--steps", "3", "--seeds", "0", "--lrs", "0.01", "--profile-csv", str(table),
                       "--csv", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed and "machine: " in printed and "command: python " in printed
    rows = list(csv.DictReader(out.open()))
    names = [r["allocation"] for r in rows]
    assert names[:2] == ["latency-only", "uniform c3a p=32"]
    assert "capacity-aware (free)" in names and "balanced, no calibration" in names
    for r in rows:
        assert int(r["params_used"]) <= 4096 and int(r["params_used"]) >= 0.9 * 4096, r
        assert 0 < float(r["final_loss"]) < float(r["initial_loss"]), r  # 3 Adam steps lower the loss
        assert len(r["layers"].split()) == 8
        assert 0 <= float(r["capacity"]) <= 1
    # uniform C3A at p=32: 512 parameters in each of the three planted layers
    assert rows[1]["planted_params"] == "1536"
    assert "capacity-aware (free) wins" in printed or "capacity-aware (free) does NOT win" in printed


def _run(name: str, final: float, lr: float = 0.1, seed: int = 0) -> "bench.Run":
    a = bench.Allocation(name, {}, 100, 1.0)
    return bench.Run(a, seed, lr, 10, 100, 1.0, final, 100, 0, None, 0.1)


def test_verdict_says_when_capacity_does_not_win():
    runs = [_run("latency-only", 0.2), _run("latency-only", 0.5, lr=1.0), _run("capacity-aware", 0.3),
            _run("uniform c3a p=32", 0.25)]
    text = bench.verdict(runs)
    assert text.startswith("capacity-aware does NOT win: latency-only") and "(50% higher)" in text
    runs.append(_run("capacity-aware", 0.1, lr=1.0))
    assert bench.verdict(runs).startswith("capacity-aware wins")
    assert "did not run" in bench.verdict(runs[:2])
    assert "| latency-only | 0.2 (0.2) | 20.0% | 0.1 |" in bench.table(runs)


@pytest.mark.parametrize("args", [["--lrs", "fast"], ["--lrs", "0.1,-1"], ["--seeds", ""], ["--steps", "0"],
                                  ["--targets", "gate_proj"], ["--profile-csv", "/nonexistent/measurements.csv"]])
def test_bad_input_exits_2(args, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: " in last and args[0] in last  # one line naming the flag
