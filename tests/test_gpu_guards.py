"""What protects measurements on a GPU, tested on the CPU by injection: a broken CUDA context (a sticky error that
every later kernel, even ``empty_cache``, raises again), the chosen device made current, a backend that is wrong
but finite, a dtype the GPU cannot run. Where only a GPU can show it, a ``gpu`` test does too."""

import dataclasses
import os

import pytest
import torch
from gpu_fault_builds import ILLEGAL_ADDRESS, sticky_build

from circtune.adapters import C3ALinear, CDVFTLinear, _backends
from circtune.adapters.config import AdapterConfig
from circtune.measure import profiler
from circtune.measure.device import describe_device
from circtune.measure.profiler import ContextBroken, ProfileSettings, measure_job, plan_shapes, run_profile
from circtune.measure.store import MeasurementStore
from circtune.measure.timing import TimingSettings
from circtune.measure.verify import check_against_reference
from circtune.models import build_model, resolve_model
from circtune.space import Candidate, parse_space
from circtune.validate import baseline_plan, candidate_plan, validate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FAST = TimingSettings(warmup=0, min_reps=2, max_reps=2, min_time_s=0.0)
STICKY = f"error: RuntimeError: {ILLEGAL_ADDRESS}"


@pytest.fixture
def fresh_context(monkeypatch):
    """The process's context starts healthy and is healthy again after the test (the real one never is)."""
    monkeypatch.setattr(profiler, "_broken", None)
    monkeypatch.setattr(profiler, "release_memory", profiler.release_memory)  # sticky_build replaces it


def _profile(tmp_path, **kw):
    model = resolve_model("tiny_models:two_shapes", ["square"])
    space = parse_space({"methods": ["c3a"], "block_sizes": [16, 32], "transforms": ["rfft"],
                         "backends": ["torch", "dense"]}, "test")
    plans = plan_shapes(model, space, "cpu", peft=False)
    settings = ProfileSettings(tokens=16, dtypes=("fp32",), device=torch.device("cpu"), timing=FAST, flops=False)
    store = MeasurementStore(tmp_path / "m.db")
    return plans, settings, store, lambda **more: run_profile(plans, settings, store, describe_device("cpu"),
                                                               progress=False, **{**kw, **more})


# ------------------------------------------------------------------------------------------ bug 1: broken context
@pytest.mark.slow  # --isolate: child processes
def test_a_broken_context_stops_the_run_with_one_line_and_isolate_carries_on(tmp_path, fresh_context):
    """Without --isolate: the candidate that broke the context is stored with its error, nothing after it runs on
    the broken context, and the run stops with one line saying to re-run with --isolate. The re-run with isolate
    reuses what is stored and measures the rest in fresh children."""
    plans, settings, store, run = _profile(tmp_path)
    with pytest.raises(ContextBroken) as stopped:
        run(build=sticky_build)
    message = str(stopped.value)
    assert "\n" not in message and "c3a p=16 dense (64x64, fp32)" in message and "--isolate" in message
    rows = store.query()
    statuses = {m.key.candidate.label: m.status for m in rows}
    assert statuses["c3a p=16 dense"] == STICKY
    assert all(s == "ok" for label, s in statuses.items() if label != "c3a p=16 dense")
    assert len(rows) < sum(len(p.candidates) + len(p.references) for p in plans)  # stopped: the rest not run

    with pytest.raises(ContextBroken):  # this process stays broken: a later run refuses at once
        run()
    assert len(store.query()) == len(rows)

    result = run(build=sticky_build, isolate=True)  # fresh children: the broken parent runs no kernel
    status = {m.key.candidate.label: m.status for m in result.measurements}
    assert status.pop("c3a p=16 dense") == STICKY and result.reused == len(rows)
    assert status and set(status.values()) == {"ok"}
    assert result.measured == len(result.measurements) - len(rows)


def test_cli_stops_with_one_line_and_exit_status_1(tmp_path, fresh_context, monkeypatch, capsys):
    import functools

    from circtune.cli.main import main

    monkeypatch.setattr(profiler, "run_profile", functools.partial(profiler.run_profile, build=sticky_build))
    (tmp_path / "space.toml").write_text('methods = ["c3a"]\nblock_sizes = [16]\nbackends = ["dense"]\n'
                                         'transforms = ["rfft"]\n')
    code = main(["profile", "--model", "tiny_models:two_shapes", "--targets", "square", "--space",
                 str(tmp_path / "space.toml"), "--device", "cpu", "--tokens", "4", "--warmup", "0", "--min-reps",
                 "1", "--max-reps", "1", "--min-time", "0", "--no-peft", "--quiet", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("circtune profile: error: the CUDA context of this process broke while measuring "
                              "c3a p=16 dense (64x64, fp32)") and "re-run the same command with --isolate" in err[-1]


@pytest.mark.slow  # --isolate: child processes
def test_isolate_records_the_broken_context_and_a_fresh_child_carries_on(tmp_path, fresh_context):
    _, _, _, run = _profile(tmp_path)
    result = run(build=sticky_build, isolate=True)
    status = {m.key.candidate.label: m.status for m in result.measurements}
    labels = [m.key.candidate.label for m in result.measurements]
    assert status.pop("c3a p=16 dense") == STICKY
    assert labels.index("c3a p=16 dense") < labels.index("c3a p=32 dense")
    assert status and set(status.values()) == {"ok"}
    assert profiler.context_broken() is None  # broken in the child only


def test_a_kernel_failing_only_at_release_fails_its_row(tmp_path, fresh_context, monkeypatch):
    """An asynchronous error can surface first at empty_cache, after a measurement that looked fine: its numbers
    cannot be trusted, so the row fails with that error (and the context counts as broken)."""
    calls = []

    def release(device, failed):
        calls.append(failed)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: unspecified launch failure")

    monkeypatch.setattr(profiler, "release_memory", release)
    _, _, store, run = _profile(tmp_path)
    with pytest.raises(ContextBroken, match="unspecified launch failure"):
        run()
    rows = store.query()
    assert [m.status for m in rows] == ["ok", "error: RuntimeError: CUDA error: unspecified launch failure"]
    assert rows[1].step is None


@pytest.mark.gpu
def test_isolate_survives_a_real_device_side_assert_on_the_gpu(tmp_path, fresh_context):
    """A real sticky error on the GPU (an out-of-bounds gather: device-side assert) in the child measuring
    c3a p=16 dense: recorded with its error, a fresh child measures the rest, the parent's context is untouched."""
    from gpu_fault_builds import device_assert_build

    model = resolve_model("tiny_models:two_shapes", ["square"])
    space = parse_space({"methods": ["c3a"], "block_sizes": [16, 32], "transforms": ["rfft"],
                         "backends": ["torch", "dense"]}, "test")
    plans = plan_shapes(model, space, "cuda", peft=False)
    settings = ProfileSettings(tokens=64, dtypes=("fp32",), device=torch.device("cuda"), timing=FAST, flops=False)
    result = run_profile(plans, settings, MeasurementStore(tmp_path / "m.db"), describe_device("cuda"),
                         progress=False, build=device_assert_build, isolate=True)
    status = {m.key.candidate.label: m.status for m in result.measurements}
    failed = status.pop("c3a p=16 dense")
    assert failed.startswith("error: ") and "device-side assert" in failed, failed
    assert status and set(status.values()) == {"ok"}, status
    assert profiler.context_broken() is None
    torch.zeros(1, device="cuda").add_(1).item()  # this process's context still works


def test_sticky_errors_are_recognised():
    for text in (ILLEGAL_ADDRESS, "CUDA error: unspecified launch failure",
                 "Triton Error [CUDA]: an illegal instruction was encountered",
                 "CUDA error: device-side assert triggered", "CUDA_ERROR_ILLEGAL_ADDRESS",
                 "Triton Error [CUDA]: misaligned address"):
        assert profiler.is_sticky_cuda_error(RuntimeError(text)), text
    for text in ("CUDA out of memory. Tried to allocate 2.00 GiB", "out of resource: shared memory", "boom"):
        assert not profiler.is_sticky_cuda_error(RuntimeError(text)), text


def test_validation_after_a_broken_context_records_the_rest_as_not_run(tmp_path, fresh_context, monkeypatch):
    import tiny_models

    calls = []

    def release(device, failed):
        calls.append(failed)
        if len(calls) == 2:  # after the second plan
            raise RuntimeError(ILLEGAL_ADDRESS)

    monkeypatch.setattr(profiler, "release_memory", release)
    net = build_model(str(tiny_models.tiny_roberta(tmp_path / "tiny", hidden=32, layers=1)), device="cpu")
    targets = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]

    def plan(p):
        config = AdapterConfig("tiny", {t: Candidate("c3a", p, None, "rfft", "torch").layer_config() for t in targets})
        return candidate_plan(f"c3a p={p}", config, 2 * 32 * 32 // p, 0.0, 0.0)

    plans = [baseline_plan("no adapter", {}, 0, 0.0, 0.0), plan(8), plan(16), plan(32)]
    results = validate(net, targets, plans, batch=1, seq_len=4, dtype=torch.float32, timing=FAST, progress=False)
    assert [(v.label, v.status) for v in results] == [
        ("no adapter", "ok"),
        ("c3a p=8", f"failed: RuntimeError: {ILLEGAL_ADDRESS}"),
        ("c3a p=16", f"failed: not run: the CUDA context broke during c3a p=8: RuntimeError: {ILLEGAL_ADDRESS}"),
        ("c3a p=32", f"failed: not run: the CUDA context broke during c3a p=8: RuntimeError: {ILLEGAL_ADDRESS}"),
    ]
    assert len(calls) == 2  # nothing ran on the broken context


# ------------------------------------------------------------------------------------------ bug 2: the device
def test_measuring_and_validation_run_under_the_chosen_device(tmp_path, monkeypatch):
    """Every kernel of a measurement (build, steps, timing) and of a validation runs inside device_scope(device),
    which makes a CUDA device current. (The CPU has no current device: the scope is recorded instead.)"""
    import contextlib

    import tiny_models

    active = []

    @contextlib.contextmanager
    def scope(device):
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    monkeypatch.setattr(profiler, "device_scope", scope)
    monkeypatch.setattr("circtune.validate.device_scope", scope)
    seen = []

    def build(candidate, base):
        seen.append(list(active))
        return profiler.build_module(candidate, base)

    plans, settings, _, _ = _profile(tmp_path)
    job = profiler.Job(64, 64, "fp32", plans[0].candidates[0])
    assert measure_job(job, settings, None, "cpu", build).ok
    assert seen == [[torch.device("cpu")]] and active == []

    net = build_model(str(tiny_models.tiny_roberta(tmp_path / "tiny", hidden=32, layers=1)), device="cpu")
    plan = baseline_plan("lora", {"encoder.layer.0.attention.self.query": Candidate("lora", None, 2)}, 0)
    applied = []
    plan = dataclasses.replace(plan, apply=lambda model, real=plan.apply: (applied.append(list(active)), real(model)))
    [v] = validate(net, ["encoder.layer.0.attention.self.query"], [plan], batch=1, seq_len=4, dtype=torch.float32,
                   timing=FAST, progress=False)
    assert v.status == "ok" and applied == [[torch.device("cpu")]]


def test_device_scope_makes_the_cuda_device_current():
    scope = profiler.device_scope(torch.device("cuda", 1))
    assert isinstance(scope, torch.cuda.device) and scope.idx == 1  # (not entered: no GPU needed)
    assert not isinstance(profiler.device_scope(torch.device("cpu")), torch.cuda.device)


@pytest.mark.gpu
def test_measurement_on_the_second_gpu_runs_there(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    seen = []

    def build(candidate, base):
        seen.append(torch.cuda.current_device())
        return profiler.build_module(candidate, base)

    plans, _, _, _ = _profile(tmp_path)
    settings = ProfileSettings(tokens=64, dtypes=("fp32",), device=torch.device("cuda", 1), timing=FAST)
    m = measure_job(profiler.Job(64, 64, "fp32", plans[0].candidates[0]), settings, None, "gpu 1", build)
    assert m.ok, m.status
    assert seen == [1] and torch.cuda.current_device() == 0


# ------------------------------------------------------------------------------------------ bug 5: wrong results
def _wrong(monkeypatch, backend, where):
    """``backend``'s forward made wrong but finite: its output (by 5 % of ΔW x) or its input gradient (by 10 %)."""
    real = _backends.get_backend(backend)

    class ScaleGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g * 1.1

    def forward(layer, x):
        if where == "input gradient":
            return real.forward(layer, ScaleGrad.apply(x))
        y = real.forward(layer, x)
        return y + 0.05 * (y - layer.base_layer(x)).detach()

    monkeypatch.setitem(_backends._REGISTRY, backend, dataclasses.replace(real, forward=forward))


@pytest.mark.parametrize("where", ["forward output", "input gradient"])
def test_a_wrong_but_finite_backend_is_recorded_and_never_timed(tmp_path, monkeypatch, where):
    _wrong(monkeypatch, "dense", where)
    _, _, _, run = _profile(tmp_path)
    result = run()
    failed = {m.key.candidate.label: m.status for m in result.measurements if not m.ok}
    assert set(failed) == {"c3a p=16 dense", "c3a p=32 dense"}
    for status in failed.values():
        assert status.startswith(f"wrong result: dense: {where} differs from the torch backend's by "), status
        assert status.endswith("(tolerance 0.002 in float32)")
    assert all(m.step is None for m in result.measurements if not m.ok)
    assert len(result.measurements) > len(failed)  # the torch candidates and the baselines measured


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("make", [lambda b: C3ALinear(b, 8, backend="dense"),
                                  lambda b: CDVFTLinear(b, 8, factors=3, backend="dense")], ids=["c3a", "cdvft"])
def test_correct_backends_pass_the_check_in_every_dtype(make, dtype):
    base = torch.nn.Linear(24, 16).to(dtype)
    layer = make(base)
    x = torch.randn(12, 24, dtype=dtype)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    check_against_reference(layer, x, torch.randn(12, 16, dtype=dtype))
    assert layer.backend == "dense"  # the layer itself untouched (a copy was checked)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in layer.named_parameters())


@pytest.mark.parametrize("method", ["c3a", "cdvft"])
def test_triton_passes_the_check(method):
    pytest.importorskip("triton")
    base = torch.nn.Linear(48, 32)
    layer = C3ALinear(base, 16, backend="triton") if method == "c3a" else CDVFTLinear(base, 16, backend="triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layer.to(device)
    check_against_reference(layer, torch.randn(20, 48, device=device), torch.randn(20, 32, device=device))


# ------------------------------------------------------------------------------------------ bug 8: triton, bf16
def test_triton_refuses_bf16_below_sm80_with_the_reason(monkeypatch):
    pytest.importorskip("triton")
    import types

    from circtune.kernels import triton_backend

    caps = {0: (9, 0), 1: (7, 5)}
    names = {0: "NVIDIA H200", 1: "Tesla T4"}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: caps[i])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(name=names[i]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reason = triton_backend.dtype_reason(torch.device("cuda", 1), torch.bfloat16)
    assert reason == ("bf16 needs compute capability 8.0 (sm_80) or newer for tl.dot; cuda:1 (Tesla T4) has 7.5: "
                      "use fp16 or fp32 there")
    assert triton_backend.dtype_reason(torch.device("cuda", 1), torch.float16) is None
    assert triton_backend.dtype_reason(torch.device("cuda", 0), torch.bfloat16) is None
    assert triton_backend.dtype_reason(torch.device("cuda"), torch.bfloat16) is None  # current: cuda:0
    assert triton_backend.dtype_reason(torch.device("cpu"), torch.bfloat16) is None

    # The forward asks before it launches anything, and the profiler records the reason as the row's status.
    monkeypatch.setattr(triton_backend, "dtype_reason", lambda device, dtype: f"{dtype} is not for {device.type}")
    layer = C3ALinear(torch.nn.Linear(32, 32), 16, backend="triton")
    with pytest.raises(ValueError, match=r"^triton backend: torch.float32 is not for cpu$"):
        layer(torch.randn(4, 32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["dense", "triton"])
@pytest.mark.parametrize("method", ["c3a", "cdvft"])
def test_correct_backends_pass_the_check_on_the_gpu_at_real_sizes(method, backend, dtype):
    """The tolerances hold on the device at the profiler's sizes (TF32, bf16 tensor cores, cuFFT): a correct
    backend is never recorded as a wrong result."""
    if backend == "triton":
        pytest.importorskip("triton")
    base = torch.nn.Linear(1024, 512, device="cuda", dtype=dtype)
    layer = (C3ALinear(base, 64, backend=backend) if method == "c3a"
             else CDVFTLinear(base, 64, factors=3, backend=backend)).cuda()
    check_against_reference(layer, torch.randn(4096, 1024, device="cuda", dtype=dtype),
                            torch.randn(4096, 512, device="cuda", dtype=dtype))


@pytest.mark.gpu
def test_auto_dtype_and_triton_follow_this_gpus_capability():
    from circtune.kernels import triton_backend

    from circtune.space import resolve_dtype

    native = torch.cuda.get_device_capability() >= (8, 0)
    assert resolve_dtype("auto", torch.device("cuda")) == ("bf16" if native else "fp32")
    assert (triton_backend.dtype_reason(torch.device("cuda"), torch.bfloat16) is None) == native
