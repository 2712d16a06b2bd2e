"""Fault injection during measurement: out of memory (GPU and CPU), NaN/Inf, a backend that fails to compile or to
launch, a crashing child process. Each fault is raised where a real one arises (an allocation, a backend's forward
or backward, a Triton kernel's compile-and-launch entry point, the measuring child process), never inside the
profiler; the tests check that the candidate is recorded as failed with its reason, its memory is released, every
other candidate is measured, the run finishes and the report lists the failure.

Without CUDA the Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, set here before the kernel
modules are imported, as in tests/test_kernels.py).
"""

import dataclasses
import functools
import gc
import html
import json
import os
import sys
import weakref
from collections import Counter

import pandas as pd
import pytest
import tiny_models
import torch
from tiny_models import crashing_build, poisoning_build, tiny_roberta

from circtune.adapters import _backends
from circtune.adapters.config import AdapterConfig
from circtune.cli.main import main
from circtune.measure import profiler
from circtune.measure.device import describe_device
from circtune.measure.profiler import ProfileSettings, jobs_for, plan_shapes, run_profile
from circtune.measure.store import MeasurementStore
from circtune.measure.timing import TimingSettings
from circtune.models import build_model, resolve_model
from circtune.report.data import report_data, row_candidate
from circtune.space import Candidate, parse_space
from circtune.validate import baseline_plan, candidate_plan, validate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TOO_BIG = 1 << 62  # bytes: more than any address space, so the allocator fails for real
FAST = TimingSettings(warmup=0, min_reps=2, max_reps=2, min_time_s=0.0)
CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
            "1.06 GiB is free.")


@pytest.fixture
def no_automatic_gc():
    """Automatic garbage collection off during the test, so that what a failure left in reference cycles is freed
    only if the code under test collects it (as it must before it empties the CUDA cache)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def measured_statuses(out) -> tuple[pd.DataFrame, dict[str, str]]:
    """A run's measurements.csv, and each configuration's status by its label."""
    frame = pd.read_csv(out / "measurements.csv", keep_default_na=False)
    return frame, {row_candidate(r).label: r["status"] for r in frame.to_dict("records")}


def _stack() -> set[str]:
    """Names of the functions on the caller's stack: where a fault fired."""
    names, frame = set(), sys._getframe(1)
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    return names


def _label(layer) -> tuple[str, int]:
    return ("c3a" if type(layer).__name__ == "C3ALinear" else "cdvft"), layer.block_size


class Faults:
    """Wraps a registered backend's forward (what every layer of that backend calls) to label the layer being run
    and keep weak references to it and its trainable parameters; the injected faults look the label up.
    ``alive()`` lists the labels whose layers or parameters are still referenced somewhere."""

    def __init__(self, monkeypatch, backend: str, **changes):
        self.current: tuple[str, int] | None = None
        self.layers: dict[tuple[str, int], list[weakref.ref]] = {}
        self.calls: Counter = Counter()
        self.fired: dict[tuple[str, int], set[str]] = {}  # label -> the stack where its fault fired
        real = _backends.get_backend(backend)
        faulty = changes.pop("forward", None)  # (faults, layer, x) -> output, calling faults.real.forward

        def labelled(layer, x):
            self.current = _label(layer)
            refs = self.layers.setdefault(self.current, [])
            if not any(r() is layer for r in refs):  # the layer and its trainable parameters (optimizer state)
                refs += [weakref.ref(layer), *(weakref.ref(q) for q in layer.parameters() if q.requires_grad)]
            self.calls[self.current, "forward"] += 1
            return faulty(self, layer, x) if faulty else real.forward(layer, x)

        self.real = real
        monkeypatch.setitem(_backends._REGISTRY, backend, dataclasses.replace(real, forward=labelled, **changes))

    def fire(self, label, exc: BaseException):
        self.fired[label] = _stack()
        raise exc

    def alive(self) -> list[tuple[str, int]]:
        return sorted(label for label, refs in self.layers.items() if any(r() is not None for r in refs))


# ------------------------------------------------------------------------------------------ Triton kernels
def _compilation_error():
    import ast

    from triton.compiler.errors import CompilationError

    src = "def _block_circulant_matmul_kernel(a_ptr, w_ptr):\n    acc = tl.dot(a, b.to(a.dtype), acc)\n"
    node = ast.parse(src).body[0].body[0]  # what triton's code generator points at
    return CompilationError(src, node, "AssertionError('All non-batch values in both first input shape "
                                       "([constexpr[16], constexpr[8]]) and second input shape must be >= 16!')")


def _out_of_resources():
    from triton.runtime.errors import OutOfResources

    return OutOfResources(262144, 232448, "shared memory")


@pytest.fixture
def triton_faults(monkeypatch):
    """The triton backend usable on the CPU (under the interpreter), with faults raised from the kernels' ``run``:
    the entry point of ``kernel[grid](...)`` where a real JITFunction compiles on a cache miss, then launches.

    * c3a p=16: CompilationError at its first forward launch (compile failure, first call);
    * cdvft p=16: OutOfResources at its first forward launch (the binary needs more shared memory than the GPU has);
    * c3a p=32: a CUDA launch failure of the kernel-gradient kernel on its third launch: inside the timed loop;
    * cdvft p=32: no fault (the kernels still work after the others failed)."""
    pytest.importorskip("triton")
    from circtune.kernels import block_circulant_kernel_grad as kgrad
    from circtune.kernels import block_circulant_linear as linear
    from circtune.kernels import block_circulant_matmul as matmul

    # The kernel-gradient fault is placed in the GEMM route's kernel; off CUDA the rule would take the rfft route.
    monkeypatch.setattr(linear, "default_kernel_grad_route", lambda p: "gemm")
    faults = Faults(monkeypatch, "triton", unavailable_reason=lambda device: None)
    plan = {(("c3a", 16), "matmul", 1): _compilation_error,
            (("cdvft", 16), "matmul", 1): _out_of_resources,
            (("c3a", 32), "kernel_grad", 3): lambda: RuntimeError("Triton Error [CUDA]: unspecified launch failure")}

    def wrap(name, kernel):
        real_run = kernel.run

        def run(*args, grid, warmup, **kwargs):
            if not warmup:
                faults.calls[faults.current, name] += 1
                make = plan.get((faults.current, name, faults.calls[faults.current, name]))
                if make is not None:
                    faults.fire(faults.current, make())
            return real_run(*args, grid=grid, warmup=warmup, **kwargs)

        monkeypatch.setattr(kernel, "run", run)

    wrap("matmul", matmul._block_circulant_matmul_kernel)
    wrap("kernel_grad", kgrad._block_circulant_kernel_grad_kernel)
    return faults


TRITON_FAILED = {
    "c3a p=16 triton":
        "error: CompilationError: at 2:4: AssertionError('All non-batch values in both first input shape "
        "([constexpr[16], constexpr[8]]) and second input shape must be >= 16!')",
    "cdvft p=16 m=2 triton":
        "error: OutOfResources: out of resource: shared memory, Required: 262144, Hardware limit: 232448. "
        "Reducing block sizes or `num_stages` may help.",
    "c3a p=32 triton": "error: RuntimeError: Triton Error [CUDA]: unspecified launch failure",
}


@pytest.mark.slow  # a search end to end
@pytest.mark.skipif(torch.cuda.is_available(), reason="the faults are placed for the interpreter, which runs each "
                    "kernel once per call; on CUDA the kernels are compiled and autotuned (several launches, and "
                    "OutOfResources skips a tile configuration by design)")
def test_triton_compile_and_launch_failures_are_recorded_and_the_search_goes_on(tmp_path, triton_faults, capsys,
                                                                               no_automatic_gc):
    folder = tiny_roberta(tmp_path / "tiny", hidden=64, layers=1)
    space = tmp_path / "space.toml"
    space.write_text('methods = ["c3a", "cdvft"]\nblock_sizes = [16, 32]\nfactors = [2]\ntransforms = ["rfft"]\n'
                     'backends = ["torch", "triton"]\n')
    out = tmp_path / "out"
    code = main(["search", "--model", str(folder), "--budget", "600", "--min-fill", "0", "--space", str(space),
                 "--device", "cpu", "--tokens", "8", "--warmup", "0", "--min-reps", "2", "--max-reps", "2",
                 "--min-time", "0", "--trials", "6", "--top", "1", "--no-validate", "--no-peft", "--quiet",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err

    frame, status = measured_statuses(out)
    assert {k: v for k, v in status.items() if v != "ok"} == TRITON_FAILED
    assert status["cdvft p=32 m=2 triton"] == "ok"  # the kernels still run after three failures
    assert len(status) == len(frame) > len(TRITON_FAILED) + 4  # every candidate and baseline has its row
    assert json.loads((out / "profile.json").read_text())["failed"] == len(TRITON_FAILED)
    # The compile failure and the first-launch failure fired in the first (untimed) step, the launch failure of the
    # kernel gradient inside the timed loop: the profiler's one try covers both.
    fired = triton_faults.fired
    assert set(fired) == {("c3a", 16), ("cdvft", 16), ("c3a", 32)}
    for label in (("c3a", 16), ("cdvft", 16)):
        assert {"run_step", "measure_job"} <= fired[label] and "time_step" not in fired[label]
    assert {"time_step", "_time_cpu", "backward"} <= fired[("c3a", 32)]
    # Released: no layer of any candidate, failed or not, nor its parameters, is referenced after the run (freed by
    # the run itself: see no_automatic_gc).
    assert set(triton_faults.layers) == {("c3a", 16), ("cdvft", 16), ("c3a", 32), ("cdvft", 32)}
    assert triton_faults.alive() == []

    # The search never offers a failed candidate, and the report lists each failure with its reason.
    config = json.loads((out / "adapter_config.json").read_text())
    picked = {(lc["method"], lc["block_size"], lc["backend"]) for lc in config["layers"].values()}
    assert not picked & {("c3a", 16, "triton"), ("cdvft", 16, "triton"), ("c3a", 32, "triton")}
    shapes = {s["key"]: s for s in report_data(out)["landscape"]}
    assert {f["label"]: f["status"] for f in shapes["64x64"]["failed"]} == TRITON_FAILED
    page = (out / "report.html").read_text()
    for label, reason in TRITON_FAILED.items():
        assert html.escape(label) in page and html.escape(reason) in page, reason


# ------------------------------------------------------------------------------------------ OOM and NaN mid-run
def test_oom_and_nan_during_the_timed_steps_release_memory_and_the_run_goes_on(tmp_path, monkeypatch,
                                                                               no_automatic_gc):
    """Faults after the first (checked) step: a real CPU allocation failure and a MemoryError in the forward, a
    CUDA OOM from the backward, NaN appearing after the timed steps. Each failed layer, and the activations its
    traceback held, are freed by the time the run returns."""
    scratch: list[weakref.ref] = []

    def forward(faults, layer, x):
        label, n = faults.current, faults.calls[faults.current, "forward"]
        y = faults.real.forward(layer, x)
        if label == ("c3a", 16) and n == 2:  # a real allocation failure of torch's CPU allocator
            big = torch.empty(64 << 20)  # 256 MiB of activations held by the failing frame
            scratch.append(weakref.ref(big))
            faults.fired[label] = _stack()
            torch.empty(TOO_BIG, dtype=torch.uint8)
        if label == ("c3a", 32) and n == 3:
            faults.fire(label, MemoryError())
        if label == ("cdvft", 16):
            def oom_in_backward(grad):
                if faults.calls[label, "backward"] == 2:
                    faults.fire(label, torch.OutOfMemoryError(CUDA_OOM))
                faults.calls[label, "backward"] += 1
                return grad

            y.register_hook(oom_in_backward)
        if label == ("cdvft", 32) and n >= 4:  # first step and timed steps fine, NaN in the step after them
            y = y * float("nan")
        return y

    faults = Faults(monkeypatch, "torch", forward=forward)
    space = parse_space({"methods": ["c3a", "cdvft"], "block_sizes": [16, 32], "factors": [2],
                         "transforms": ["rfft"], "backends": ["torch", "dense"]}, "test")
    model = resolve_model("tiny_models:two_shapes", ["square"])
    plans = plan_shapes(model, space, "cpu", peft=False)
    settings = ProfileSettings(tokens=16, dtypes=("fp32",), device=torch.device("cpu"), timing=FAST)
    result = run_profile(plans, settings, MeasurementStore(tmp_path / "m.db"), describe_device("cpu"),
                         progress=False)

    status = {m.key.candidate.label: m.status for m in result.measurements}
    failed = {k: v for k, v in status.items() if v != "ok"}
    # torch's CPU allocator raises a plain RuntimeError ("[enforce fail at alloc_cpu.cpp:N] ... DefaultCPUAllocator:
    # can't allocate memory: you tried to allocate N bytes ..."): recognised as out of memory.
    cpu_oom = failed.pop("c3a p=16 rfft/torch")
    assert cpu_oom.startswith("out of memory: ") and f"{TOO_BIG} bytes" in cpu_oom, cpu_oom
    assert failed == {
        "c3a p=32 rfft/torch": "out of memory: MemoryError",
        "cdvft p=16 m=2 rfft/torch": f"out of memory: {CUDA_OOM}",
        "cdvft p=32 m=2 rfft/torch": "non-finite: forward output has NaN/Inf",
    }
    assert len(status) == len(jobs_for(plans, settings.dtypes)) == result.measured
    assert {"time_step", "backward"} <= faults.fired[("cdvft", 16)]  # raised inside autograd, mid-timing
    assert "time_step" in faults.fired[("c3a", 16)] and "time_step" in faults.fired[("c3a", 32)]
    assert scratch and scratch[0]() is None  # the failing frame's 256 MiB went with it
    assert faults.alive() == []  # not one layer is referenced after the run (by the run itself: see no_automatic_gc)


# ------------------------------------------------------------------------------------------ --isolate
@pytest.mark.slow
def test_search_isolate_records_a_crashed_child_and_never_picks_it(tmp_path, monkeypatch, capsys):
    """``circtune search --isolate``: the child measuring c3a p=16 dense dies (os._exit, as a segfault or a poisoned
    CUDA context would end it); it is recorded as crashed, a fresh child measures the rest, the study never offers
    it, and validation and the report run as usual. The budget window [810, 900] on four 64 x 64 layers needs p=16
    on three of them, so the pick must take p=16 from the torch backend."""
    monkeypatch.setattr(profiler, "run_profile", functools.partial(profiler.run_profile, build=crashing_build))
    folder = tiny_roberta(tmp_path / "tiny", hidden=64, layers=2)
    space = tmp_path / "space.toml"
    space.write_text('methods = ["c3a"]\nblock_sizes = [16, 32, 64]\ntransforms = ["rfft"]\n'
                     'backends = ["torch", "dense"]\n')
    out = tmp_path / "out"
    code = main(["search", "--model", str(folder), "--budget", "900", "--space", str(space), "--device", "cpu",
                 "--batch-size", "1", "--seq-len", "8", "--warmup", "0", "--min-reps", "2", "--max-reps", "2",
                 "--min-time", "0", "--trials", "12", "--top", "2", "--isolate", "--no-peft", "--quiet",
                 "--validate-min-time", "0", "--out", str(out)])  # (4 s per validated model otherwise)
    assert code == 0, capsys.readouterr().err

    frame, status = measured_statuses(out)
    assert status.pop("c3a p=16 dense") == "crashed: the measuring child process died"
    assert status and set(status.values()) == {"ok"}  # measured by a fresh child after the crash

    config = json.loads((out / "adapter_config.json").read_text())
    chosen = [(lc["block_size"], lc["backend"]) for lc in config["layers"].values()]
    assert len(chosen) == 4 and 810 <= config["total_params"] <= 900
    assert sorted(b for p, b in chosen if p == 16) == ["torch"] * 3
    import optuna

    study = optuna.load_study(study_name=config["study"]["name"], storage=f"sqlite:///{out / 'circtune.db'}")
    offered = {v for t in study.trials for v in t.params.values()}
    assert offered and "c3a p=16 dense" not in offered and "c3a p=16 rfft/torch" in offered
    validation = pd.read_csv(out / "validation.csv")
    assert set(validation.status) == {"ok"} and validation.picked.sum() == 1
    shapes = {s["key"]: s for s in report_data(out)["landscape"]}
    assert shapes["64x64"]["failed"] == [{"label": "c3a p=16 dense",
                                          "status": "crashed: the measuring child process died"}]
    assert "crashed: the measuring child process died" in (out / "report.html").read_text()


@pytest.mark.slow
def test_isolate_replaces_a_child_that_a_failure_left_broken(tmp_path):
    """A failure that does not end the child but breaks it for every later job (a sticky CUDA error poisons the
    context; here a flag set in the child makes every later build raise): that job is recorded with its error and
    the next jobs are measured in a fresh child."""
    model = resolve_model("tiny_models:two_shapes", ["square"])
    space = parse_space({"methods": ["c3a"], "block_sizes": [16, 32], "transforms": ["rfft"],
                         "backends": ["torch", "dense"]}, "test")
    plans = plan_shapes(model, space, "cpu", peft=False)
    settings = ProfileSettings(tokens=16, dtypes=("fp32",), device=torch.device("cpu"), timing=FAST)
    result = run_profile(plans, settings, MeasurementStore(tmp_path / "m.db"), describe_device("cpu"),
                         progress=False, build=poisoning_build, isolate=True)
    status = {m.key.candidate.label: m.status for m in result.measurements}
    assert status.pop("c3a p=16 dense") == "error: RuntimeError: CUDA error: an illegal memory access was encountered"
    labels = [m.key.candidate.label for m in result.measurements]
    assert labels.index("c3a p=16 dense") < labels.index("c3a p=32 dense")  # jobs after it, in the same run
    assert status and set(status.values()) == {"ok"}
    assert not tiny_models._POISONED  # (the flag was set in a child only)


# ------------------------------------------------------------------------------------------ validation
def test_whole_model_validation_records_failed_plans_and_goes_on(tmp_path, monkeypatch, no_automatic_gc):
    """One plan per fault, each between healthy ones: GPU and CPU out of memory, a Triton launch error (not a
    RuntimeError), NaN in the output, NaN in the input gradient. Each is recorded with its reason, its layers are
    taken off the model and freed, and the plans after it are measured."""
    try:
        from triton.runtime.errors import OutOfResources

        def launch_error():
            return OutOfResources(262144, 232448, "shared memory")
    except ImportError:  # a backend's own exception type, not a RuntimeError, as Triton's are
        def launch_error():
            return type("OutOfResources", (Exception,), {})("out of resource: shared memory")

    def forward(faults, layer, x):
        p, n = layer.block_size, faults.calls[faults.current, "forward"]
        y = faults.real.forward(layer, x)
        if p == 2 and n == 3 and y.requires_grad:  # in the backward of the second timed step (two layers a step)
            label = faults.current
            y.register_hook(lambda g: faults.fire(label, torch.OutOfMemoryError(CUDA_OOM)))
        if p == 4 and n == 3:
            torch.empty(TOO_BIG, dtype=torch.uint8)  # a real allocation failure
        if p == 8 and n == 3:
            faults.fire(faults.current, launch_error())
        if p == 16:
            y = y * float("nan")
        if p == 32 and x.requires_grad:  # finite output and adapter gradients, an infinite input gradient
            x.register_hook(lambda g: g * float("inf"))
        return y

    faults = Faults(monkeypatch, "torch", forward=forward)
    net = build_model(str(tiny_roberta(tmp_path / "tiny", hidden=32, layers=1)), device="cpu")
    targets = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]
    originals = [net.get_submodule(t) for t in targets]

    def plan(p, label=None):
        config = AdapterConfig("tiny", {t: Candidate("c3a", p, None, "rfft", "torch").layer_config() for t in targets})
        return candidate_plan(label or f"c3a p={p}", config, 2 * 32 * 32 // p, 0.0, 0.0)

    plans = [baseline_plan("no adapter", {}, 0, 0.0, 0.0), plan(2), plan(1), plan(4), plan(8), plan(16), plan(32),
             plan(1, "c3a p=1 again")]
    results = validate(net, targets, plans, batch=1, seq_len=4, dtype=torch.float32, timing=FAST, progress=False)
    status = {v.label: v.status for v in results}
    cpu_oom = status.pop("c3a p=4")
    assert cpu_oom.startswith("failed: out of memory: ") and f"{TOO_BIG} bytes" in cpu_oom, cpu_oom
    assert status == {
        "no adapter": "ok",
        "c3a p=2": f"failed: out of memory: {CUDA_OOM}",
        "c3a p=1": "ok",
        "c3a p=8": f"failed: OutOfResources: {launch_error()}",
        "c3a p=16": "failed: non-finite: the model's output has NaN/Inf",
        "c3a p=32": "failed: non-finite: the input gradient has NaN/Inf",
        "c3a p=1 again": "ok",
    }
    assert all((v.step is None) == (v.status != "ok") for v in results)
    assert [net.get_submodule(t) for t in targets] == originals  # every plan's layers taken off again
    assert not any(p.requires_grad for p in net.parameters())
    assert faults.alive() == []  # and freed (by the run itself: see no_automatic_gc)
