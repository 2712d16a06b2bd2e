"""Ahead-of-time compile check: every Triton kernel of circtune compiles for sm_90 (H100/H200) and sm_80 (A100)
without a GPU, within each target's shared memory and without register spills (circtune/kernels/_aot.py).

The compiles run in a child process: the kernels must be decorated as compiled ``@triton.jit`` functions, which
they are not once tests/test_kernels.py has set ``TRITON_INTERPRET=1`` in this process.
"""

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")

from circtune.kernels import _aot  # noqa: E402

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
pytestmark = pytest.mark.slow  # Triton compiles in child processes, minutes on a CPU


def _python(code_or_args: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True, timeout=timeout, env=ENV)


def test_the_sample_covers_every_offered_tile_call_site_and_split():
    selected = _aot.checks()
    for target in _aot.TARGETS:
        for dtype in _aot.VARIANTS:
            mine = [c for c in selected if c.target == target and c.dtype == dtype]
            forward = [c for c in mine if c.forward is not None]
            assert {c.forward for c in forward} == set(_aot.offered(dtype)), (target, dtype)
            assert {c.site for c in forward} == set(_aot.FORWARD_SITES), (target, dtype)
            assert {c.p & (c.p - 1) == 0 for c in forward} == {True, False}, "p: powers of two and not"
            grads = [c for c in mine if c.kernel_grad is not None]
            plain = {replace(c.kernel_grad, split=None) for c in grads}
            for q_out in (128, 3, 32):  # the wide layer's whole list; the narrow lists (row tiles 16, 32) sampled
                offered = set(_aot.offered(dtype, q_out))
                assert offered <= plain if q_out == 128 else offered & plain, (target, dtype, q_out)
            assert {c.kernel_grad.split for c in grads} == {1, 4}, "with and without atomics"
            assert {c.p & (c.p - 1) == 0 for c in grads} == {True, False}
    assert Counter(c.target for c in selected)["sm_90"] == Counter(c.target for c in selected)["sm_80"]


def test_every_kernel_compiles_for_sm90_and_sm80_within_shared_memory_and_without_spills(tmp_path):
    out = tmp_path / "aot.json"
    run = _python(["-m", "circtune.kernels._aot", "--json", str(out)], timeout=1200)
    print(run.stdout)  # the table (pytest -s shows it)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    results = json.loads(out.read_text())
    assert len(results) == len(_aot.checks())
    groups = Counter((r["check"]["target"], r["check"]["dtype"]) for r in results)
    assert set(groups) == {(t, d) for t in _aot.TARGETS for d in _aot.VARIANTS}
    for r in results:
        c = r["check"]
        assert r["ok"], (c, r["error"])
        assert 0 < r["shared"] <= _aot.TARGETS[c["target"]][1], c
        assert r["registers"] > 0 and r["spill_stores"] <= _aot.SPILL_BOUND, (c, r)
        # The launch is the call site's own: W0 and bias fused in the C3A forward, W0ᵀ alone in its input
        # gradient, neither for a CDVFT factor; atomics exactly when the tokens are split.
        launch = r["launch"]
        if c["site"] == "kernel gradient":
            assert launch["USE_ATOMIC"] == (c["kernel_grad"]["split"] > 1), c
        else:
            assert (launch["HAS_BASE"], launch["HAS_BIAS"]) == {
                "c3a forward": (True, True), "c3a input gradient": (True, False),
                "cdvft forward": (False, False), "cdvft input gradient": (False, False)}[c["site"]], c
        assert launch["BLOCK_M"] == (c["forward"] or c["kernel_grad"])["block_m"], c


def test_the_check_catches_the_tiles_it_was_written_for():
    """The tiles the autotune used to offer: fp32 with TF32 off spilled kilobytes per thread on the FMA path, fp64
    exceeded the H100's and the A100's shared memory. The check must reject them (and pass a good tile)."""
    code = (
        "import json, sys\n"
        "from circtune.kernels._aot import Check, run, problems\n"
        "from circtune.kernels._tuning import TileConfig as T\n"
        "cases = [Check('sm_90', 'fp32', 'c3a forward', 64, 768, 1536, 512, forward=T(128, 128, 32, 4, 4)),\n"
        "         Check('sm_90', 'fp64', 'c3a forward', 64, 768, 1536, 512, forward=T(128, 128, 64, 8, 3)),\n"
        "         Check('sm_80', 'fp64', 'c3a forward', 64, 768, 1536, 512, forward=T(64, 64, 32, 4, 5)),\n"
        "         Check('sm_80', 'bf16', 'c3a forward', 64, 768, 1536, 512, forward=T(64, 64, 32, 4, 5))]\n"
        "results = run(cases, workers=2)\n"
        "print(json.dumps([problems([r]) for r in results]))\n"
    )
    run = _python(["-c", code], timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(found) == 4
    assert len(found[0]) == 1 and "spills" in found[0][0] and "fp32" in found[0][0], found[0]
    assert any("shared memory, sm_90 has 232448 B" in p for p in found[1]), found[1]
    assert any("shared memory, sm_80 has 166912 B" in p for p in found[2]), found[2]
    assert found[3] == [], found[3]


def test_the_command_line_rejects_bad_arguments():
    run = _python(["-m", "circtune.kernels._aot", "--workers", "0"], timeout=120)
    assert run.returncode == 2 and "--workers must be >= 1, got 0" in run.stderr
    run = _python(["-m", "circtune.kernels._aot", "--target", "sm_75"], timeout=120)
    assert run.returncode == 2 and "invalid choice: 'sm_75'" in run.stderr
