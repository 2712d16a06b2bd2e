"""The profiler on tiny shapes: every candidate measured, the store's keying, failures recorded, memory tracking."""

import pytest
import torch
from torch import nn

from circtune.measure.device import describe_device
from circtune.measure.memory import LiveTensorTracker, peak_step_memory
from circtune.measure.modules import build_module
from circtune.measure.profiler import ProfileSettings, jobs_for, plan_shapes, run_profile
from circtune.measure.store import MeasurementStore, to_frame
from circtune.measure.timing import Spread, TimingSettings, time_step
from circtune.models import resolve_model
from circtune.space import parse_space

FAST = TimingSettings(warmup=1, min_reps=3, max_reps=3, min_time_s=0.0)
SPACE = parse_space({"methods": ["c3a", "cdvft"], "block_sizes": [16, 24, 32], "factors": [2],
                     "transforms": ["rfft", "fft"], "backends": ["torch", "dense"]}, "test")


@pytest.fixture
def setup(tmp_path, one_thread):  # one thread: tiny layers (the fingerprint below records it, as every run here)
    model = resolve_model("tiny_models:two_shapes", ["up", "square"])
    settings = ProfileSettings(tokens=20, dtypes=("fp32",), device=torch.device("cpu"), timing=FAST)
    plans = plan_shapes(model, SPACE, "cpu", peft=True)
    return model, plans, settings, MeasurementStore(tmp_path / "m.db"), describe_device("cpu")


def counting(build=build_module):
    calls = []

    def wrapped(candidate, base):
        calls.append(candidate)
        return build(candidate, base)

    wrapped.calls = calls
    return wrapped


def test_every_candidate_and_baseline_is_measured_then_reused(setup):
    model, plans, settings, store, info = setup
    assert [p.shape for p in plans] == [(48, 96), (64, 64)] and [p.layers for p in plans] == [2, 1]
    jobs = jobs_for(plans, settings.dtypes)
    build = counting()
    first = run_profile(plans, settings, store, info, progress=False, build=build)
    assert first.measured == len(jobs) == len(build.calls) and first.reused == 0
    assert all(m.ok for m in first.measurements), [m.status for m in first.measurements if not m.ok]
    for m in first.measurements:
        assert m.step.p25 <= m.step.median <= m.step.p75 and m.reps == 3
        assert m.flops_fwd > 0 and m.flops_fwd_bwd > m.flops_fwd and m.peak_mem_mb > 0
        if m.key.candidate.method != "none":
            assert m.ref_step_ms > 0  # the base layer was timed beside it
    # 48x96: p in {16, 24} (32 does not divide 48); 64x64: p in {16, 32}.
    by_shape = {p.shape: p for p in plans}
    assert sorted({c.block_size for c in by_shape[(48, 96)].candidates}) == [16, 24]
    assert any(e.block_size == 32 for e in by_shape[(48, 96)].excluded)

    again = counting()
    second = run_profile(plans, settings, store, info, progress=False, build=again)
    assert second.measured == 0 and again.calls == [] and second.reused == len(jobs)
    assert [m.key for m in second.measurements] == [m.key for m in first.measurements]

    frame = to_frame(second.measurements, model.name, model.shapes)
    assert len(frame) == len(jobs) and set(frame.status) == {"ok"}
    assert set(frame[frame.d_in == 48].layers) == {2}


def test_oom_nan_and_errors_are_recorded_and_the_run_goes_on(setup):
    model, plans, settings, store, info = setup

    def faulty(candidate, base):
        layer = build_module(candidate, base)
        if candidate.method == "c3a" and candidate.block_size == 16 and candidate.backend == "dense":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if candidate.method == "c3a" and candidate.block_size == 24:
            with torch.no_grad():
                layer.kernel.fill_(float("nan"))  # a poisoned kernel
        if candidate.method == "lora" and candidate.factors == 1:
            raise RuntimeError("something else broke")
        return layer

    result = run_profile(plans, settings, store, info, progress=False, build=faulty)
    status = {(m.key.d_in, m.key.candidate.label): m.status for m in result.measurements}
    assert status[(48, "c3a p=16 dense")] == "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert status[(48, "c3a p=24 rfft/torch")] == "non-finite: forward output has NaN/Inf"
    assert status[(48, "lora r=1")] == "error: RuntimeError: something else broke"
    assert status[(48, "c3a p=16 rfft/torch")] == "ok" and status[(64, "cdvft p=32 m=2 dense")] == "ok"
    n_failed = len(result.failed)
    assert n_failed >= 4 and result.measured == len(jobs_for(plans, settings.dtypes))

    # Failed rows are kept (a re-run does not retry them) unless asked to retry.
    assert run_profile(plans, settings, store, info, progress=False).measured == 0
    retried = run_profile(plans, settings, store, info, progress=False, retry_failed=True)
    assert retried.measured == n_failed and not retried.failed


def test_time_step_pairs_the_reference():
    base = nn.Linear(32, 32).requires_grad_(False)
    layer = build_module(SPACE_CANDIDATE, base)
    x = torch.randn(8, 32, requires_grad=True)
    g = torch.randn(8, 32)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad])
    timing, ref = time_step(layer, x, g, opt, TimingSettings(warmup=0, min_reps=4, max_reps=4, min_time_s=0),
                            reference=base)
    assert timing.reps == ref.reps == 4
    alone, none = time_step(layer, x, g, opt, TimingSettings(warmup=0, min_reps=2, max_reps=2, min_time_s=0))
    assert none is None and alone.reps == 2


SPACE_CANDIDATE = next(c for c in plan_shapes(resolve_model("tiny_models:two_shapes", ["square"]), SPACE, "cpu",
                                               peft=False)[0].candidates if c.method == "cdvft")


def test_spread_quartiles():
    s = Spread.of([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s.p25, s.median, s.p75) == (2.0, 3.0, 4.0)
    assert Spread.of([7.0]) == Spread(7.0, 7.0, 7.0)


def test_cpu_peak_memory_of_a_linear_step_is_exact():
    # Frozen base, x requiring grad: the step allocates y [T, d_out] and x.grad [T, d_in], both live at the end.
    base = nn.Linear(40, 24).requires_grad_(False)
    x = torch.randn(10, 40, requires_grad=True)
    g = torch.randn(10, 24)
    assert peak_step_memory(base, x, g, None) == (10 * 24 + 10 * 40) * 4


def test_cpu_peak_memory_counts_trainable_state_and_frees():
    base = nn.Linear(40, 24)
    x = torch.randn(10, 40, requires_grad=True)
    g = torch.randn(10, 24)
    opt = torch.optim.SGD(base.parameters(), lr=0.1, momentum=0.9)
    base(x).backward(g)
    opt.step()  # momentum buffers exist now
    peak = peak_step_memory(base, x, g, opt)
    params = (40 * 24 + 24) * 4
    # parameters + momentum (persistent) + during the step: y, x.grad, weight and bias grads.
    assert peak == 2 * params + (10 * 24 + 10 * 40) * 4 + params
    with LiveTensorTracker() as tracker:
        t = torch.empty(1000)
        del t
        u = torch.empty(10)
    assert tracker.peak == 4000 and tracker.live == 40
    del u


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_baselines_train_with_float32_adapters(setup, dtype):
    # A half-precision LoRA or PEFT kernel under AdamW turns NaN on the first step (eps underflows); PEFT models
    # keep adapters in float32, and so do the baselines.
    model, plans, settings, store, info = setup
    settings = ProfileSettings(tokens=20, dtypes=(dtype,), device=torch.device("cpu"), timing=FAST)
    plan = [p for p in plans if p.shape == (64, 64)]
    result = run_profile(plan, settings, store, info, progress=False)
    assert not result.failed, [(m.key.candidate.label, m.status) for m in result.failed]
    base = nn.Linear(64, 64, dtype=torch.float16)
    for candidate in plan[0].references[1:]:
        layer = build_module(candidate, base)
        assert {p.dtype for p in layer.parameters() if p.requires_grad} == {torch.float32}, candidate


@pytest.mark.gpu
def test_profile_on_cuda_in_bf16(tmp_path):
    model = resolve_model("tiny_models:two_shapes", ["up", "square"])
    settings = ProfileSettings(tokens=256, dtypes=("bf16",), device=torch.device("cuda"), timing=FAST)
    plans = plan_shapes(model, SPACE, "cuda")
    result = run_profile(plans, settings, MeasurementStore(tmp_path / "m.db"), describe_device("cuda"),
                         progress=False)
    assert not result.failed, [(m.key.candidate.label, m.status) for m in result.failed]
    assert all(m.peak_mem_mb > 0 and m.step.median > 0 and m.flops_fwd_bwd > 0 for m in result.measurements)


@pytest.mark.slow  # a profile of hundreds of candidates end to end
def test_memory_stays_flat_over_hundreds_of_candidates(tmp_path):
    import gc
    import os

    def rss_mb() -> float:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    space = parse_space({"block_sizes": {"min": 1, "max": 64}, "factors": [2, 3, 4], "backends": ["torch", "dense"]})
    model = resolve_model("tiny_models:two_shapes", ["up", "square"])
    plans = plan_shapes(model, space, "cpu", peft=True)
    store, info = MeasurementStore(tmp_path / "m.db"), describe_device("cpu")
    marks = []
    for tokens in (8, 9, 10):  # each a new key set: every candidate is built, timed, traced and counted again
        settings = ProfileSettings(tokens=tokens, dtypes=("fp32",), device=torch.device("cpu"),
                                   timing=TimingSettings(warmup=0, min_reps=1, max_reps=1, min_time_s=0.0))
        result = run_profile(plans, settings, store, info, progress=False)
        assert result.measured > 250 and not result.failed
        gc.collect()
        marks.append(rss_mb())
    # The first round fills one-off caches (imports, FFT plans, allocator pools); after it, no growth.
    assert marks[2] - marks[0] < 25, marks


@pytest.mark.slow
def test_isolated_measurement_survives_a_crashing_candidate(setup):
    from tiny_models import crashing_build

    model, plans, settings, store, info = setup
    plan = [p for p in plans if p.shape == (64, 64)]
    result = run_profile(plan, settings, store, info, progress=False, build=crashing_build, isolate=True)
    status = {m.key.candidate.label: m.status for m in result.measurements}
    assert status["c3a p=16 dense"] == "crashed: the measuring child process died"
    others = [s for label, s in status.items() if label != "c3a p=16 dense"]
    assert others and set(others) == {"ok"}  # a fresh child measured everything after the crash
