"""A triton pick from search to config to report to compare, on the CPU.

Triton cannot run here, so a stand-in takes the ``triton`` backend's place in the registry: the same name, the
same "no transform" rule, available on the CPU and computing through the torch route. The profiler measures it
like any backend, the search can pick only it (``backends="triton"``), and the report and ``circtune compare`` must
find every picked layer among the measurements (they once looked for ``c3a p=.. rfft/triton``, a key the profiler
never writes)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from tiny_models import tiny_roberta

import circtune
from circtune.adapters import _backends
from circtune.cli.main import main
from circtune.report.compare import build_compare_data
from circtune.report.data import build_report_data, load_folder
from circtune.space import Candidate

SPACE = 'methods = ["c3a"]\nblock_sizes = [16, 32]\ntransforms = ["rfft"]\nbackends = ["torch", "triton"]\n'


def _stand_in(monkeypatch) -> None:
    torch_route = _backends.get_backend("torch")
    triton = _backends._REGISTRY.get("triton") or dataclasses.replace(torch_route, name="triton")
    monkeypatch.setitem(_backends._REGISTRY, "triton", dataclasses.replace(
        triton, forward=torch_route.forward, unavailable_reason=lambda device: None, block_size_reason=None,
        uses_transform=False))


@pytest.mark.slow
def test_a_triton_pick_is_measured_in_the_report_and_in_compare(tmp_path, monkeypatch, capsys):
    _stand_in(monkeypatch)
    folder = tiny_roberta(tmp_path / "tiny", hidden=64, layers=2)
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    result = circtune.search(str(folder), 900, space=str(space), backends="triton", device="cpu", batch_size=1,
                             seq_len=8, warmup=0, min_reps=2, max_reps=2, min_time=0, trials=6, validate=False,
                             peft=False, progress=False, out=tmp_path / "a")
    measured = result.measurements
    assert set(measured[measured.backend == "triton"]["transform"]) == {""}  # what the profiler writes for triton
    layers = result.config.layers
    assert layers and {lc.backend for lc in layers.values()} == {"triton"}
    assert {Candidate.from_layer(lc).label for lc in layers.values()} <= {"c3a p=16 triton", "c3a p=32 triton"}
    # the config on disk names the same measured key
    on_disk = json.loads((result.folder / "adapter_config.json").read_text())["layers"]
    assert {Candidate.from_layer(lc) for lc in on_disk.values()} == {Candidate.from_layer(lc) for lc in layers.values()}

    report = build_report_data(load_folder(result.folder))
    picked = report["pick"]["layers"]
    assert len(picked) == len(layers) and all(lay["step_ms"] is not None for lay in picked), picked
    assert report["pick"]["totals"]["sum_layer_step_ms"] is not None
    assert main(["report", str(result.folder), "-o", str(tmp_path / "report.html")]) == 0

    other = tmp_path / "b"
    shutil.copytree(result.folder, other)
    data = build_compare_data([result.folder, other])
    assert data["regret"] and all(r["missing"] == [] and r["cost_ms"] is not None for r in data["regret"])
    assert main(["compare", str(result.folder), str(other), "-o", str(tmp_path / "compare.html")]) == 0
    capsys.readouterr()


def test_circtune_adapters_registers_triton_explicitly_when_it_is_installed():
    from importlib.util import find_spec

    from circtune.kernels import triton_backend

    from circtune.adapters import available_backends

    assert ("triton" in available_backends()) == (find_spec("triton") is not None)
    before = available_backends()
    made = triton_backend.backend()  # building it registers nothing (importing the module never did either)
    assert available_backends() == before
    assert made is None or (made.name == "triton" and not made.uses_transform)
