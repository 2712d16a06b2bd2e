"""The profiler: measure every candidate of a model's target shapes on one device, and keep the numbers.

For each unique target shape, the plan holds the space's valid candidates and the references (base layer, LoRA at
the closest rank, PEFT's C3A). Each one is measured on a fresh layer of that shape (random weights, the base
frozen, x of ``[tokens, d_in]`` requiring grad, a fixed upstream gradient, AdamW over the trainable parameters):

1. one step, whose output and gradients must be finite (else the row records ``non-finite ...``); a candidate
   of another backend than ``torch`` must also match the torch backend (:mod:`.verify`; else ``wrong result ...``);
2. timing (:mod:`.timing`): forward, backward and whole step, quartiles over many repetitions, each repetition
   beside one of the frozen base layer alone (what the layer adds is the difference of the two);
3. peak memory of one step (:mod:`.memory`);
4. FLOPs (:mod:`.flops`): forward with fvcore, forward + backward with FlopCounterMode.

A candidate that runs out of memory, produces NaN/Inf or raises is recorded with the reason and the run goes on;
every result is committed to the store at once, and keys the store already holds are not measured again.

Everything runs under ``torch.cuda.device(settings.device)``: CUDA events record on that device's stream and Triton
launches there (without it, ``cuda:1`` would be timed on GPU 0's stream).

A sticky CUDA error (an illegal address, a launch failure, a device-side assert) breaks the process's CUDA context
for good: every later kernel, even ``torch.cuda.empty_cache()``, raises it again. The candidate that caused it is
recorded with its error. With ``isolate`` the measuring child is replaced and the run goes on; without it,
:func:`run_profile` stops right after storing that row with :class:`ContextBroken`, whose one-line message says to
re-run with ``--isolate`` (what is stored is reused), rather than record every later candidate as failed.

A failure's wording in its row and the test for a sticky CUDA error are in :mod:`._failures` (its names stay
importable from here); this module keeps the state a sticky error leaves.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .._signals import check_interrupted, deferred_interrupts, note_kept
from ..candidate import Candidate
from ..models import ModelInfo
from ..space import DTYPES, Exclusion, SearchSpace, expand, references
from ._failures import NonFiniteError as NonFiniteError  # not used here: kept importable from this module
from ._failures import _check_finite, _message, failure_status, is_sticky_cuda_error
from .flops import count_flops
from .memory import peak_step_memory
from .modules import build_module, peft_available
from .store import Measurement, MeasurementKey, MeasurementStore, this_worker
from .timing import TimingSettings, run_step, time_step
from .verify import check_against_reference


@dataclass(frozen=True)
class ShapePlan:
    d_in: int
    d_out: int
    layers: int  # target layers with this shape
    candidates: tuple[Candidate, ...]
    references: tuple[Candidate, ...]
    excluded: tuple[Exclusion, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return self.d_in, self.d_out


@dataclass(frozen=True)
class ProfileSettings:
    tokens: int
    dtypes: tuple[str, ...]  # resolved: fp32 / bf16 / fp16
    device: torch.device
    timing: TimingSettings = TimingSettings()
    flops: bool = True
    memory: bool = True
    seed: int = 0


@dataclass(frozen=True)
class Job:
    d_in: int
    d_out: int
    dtype: str
    candidate: Candidate


@dataclass
class ProfileResult:
    measurements: list[Measurement] = field(default_factory=list)  # every row of the plan, new and stored
    measured: int = 0  # taken in this run
    reused: int = 0  # found in the store

    @property
    def failed(self) -> list[Measurement]:
        return [m for m in self.measurements if not m.ok]


def plan_shapes(model: ModelInfo, space: SearchSpace, device: torch.device | str, *, peft: bool | None = None,
                lora_ranks: Sequence[int] = ()) -> list[ShapePlan]:
    """Candidates, references and exclusions for every unique target shape of ``model``."""
    peft = peft_available() if peft is None else peft
    plans = []
    for (d_in, d_out), count in model.shapes.items():
        candidates, excluded = expand(space, d_in, d_out, device)
        extra = references(candidates, d_in, d_out, peft=peft, lora_ranks=lora_ranks)
        plans.append(ShapePlan(d_in, d_out, count, tuple(candidates), tuple(extra), tuple(excluded)))
    return plans


def jobs_for(plans: Iterable[ShapePlan], dtypes: Iterable[str]) -> list[Job]:
    """Every measurement of the plan; each shape's base layer first (the reference of its other rows)."""
    return [Job(p.d_in, p.d_out, dtype, c) for dtype in dtypes for p in plans for c in (*p.references, *p.candidates)]


class ContextBroken(RuntimeError):
    """This process's CUDA context is broken (a sticky CUDA error): nothing more can run on it."""


# Why this process's CUDA context is broken (None while it is not): set by the first sticky error, kept for the
# process's life, as the broken context is.
_broken: str | None = None


def context_broken() -> str | None:
    """Why this process's CUDA context is broken, or None."""
    return _broken


def _mark_broken(reason: str) -> None:
    global _broken
    if _broken is None:
        _broken = reason


def broken_message(reason: str) -> str:
    """The one line a run stops with when the context broke outside ``--isolate``."""
    return (f"the CUDA context of this process broke while measuring {reason}; that configuration is recorded as "
            "failed, and every later kernel in this process would fail too: re-run the same command with --isolate "
            "(each configuration in a fresh child process; what is stored is reused)")


def device_scope(device: torch.device):
    """``torch.cuda.device(device)`` for a CUDA device (the current device for events, streams, Triton launches and
    cuBLAS handles), nothing for the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def release_memory(device: torch.device, failed: bool) -> None:
    """Free what a measurement left: collect reference cycles (a failure's traceback holds tensors in them; slow,
    so only when needed) and hand the CUDA cache back. On a broken context ``empty_cache`` raises the sticky
    error again."""
    if failed or device.type == "cuda":
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_job(job: Job, settings: ProfileSettings, key: MeasurementKey, device_name: str,
                build: Callable[[Candidate, nn.Linear], nn.Module] = build_module) -> Measurement:
    """Measure one job on ``settings.device`` (made the current CUDA device meanwhile); failures become a
    Measurement whose status says why (never raised, except Ctrl-C). A sticky CUDA error also marks this process's
    context as broken (:func:`context_broken`)."""
    device = settings.device
    params = job.candidate.params(job.d_in, job.d_out)
    record = {"key": key, "device_name": device_name, "params": params,
              "settings": {"warmup": settings.timing.warmup, "min_reps": settings.timing.min_reps,
                           "max_reps": settings.timing.max_reps, "min_time_s": settings.timing.min_time_s,
                           "threads": torch.get_num_threads() if device.type == "cpu" else None,
                           "seed": settings.seed}}
    where = f"{job.candidate.label} ({job.d_in}x{job.d_out}, {job.dtype})"
    with device_scope(device):
        try:
            m = _measure(job, settings, record, build)
        except Exception as e:  # out of memory, NaN/Inf, wrong results, a backend that fails to compile or launch...
            m = Measurement(**record, status=failure_status(e))
            if device.type == "cuda" and is_sticky_cuda_error(e):
                _mark_broken(f"{where}: {_message(e)}")
        try:  # (the failure's frames are gone by now: what they held is in cycles at most)
            release_memory(device, failed=not m.ok)
        except Exception as e:  # a sticky error raised again, or an asynchronous one seen for the first time
            _mark_broken(f"{where}: {_message(e)}")
            if m.ok:  # a kernel of this measurement failed after all: its numbers cannot be trusted
                m = Measurement(**record, status=failure_status(e))
    return m


def _measure(job: Job, settings: ProfileSettings, record: dict,
             build: Callable[[Candidate, nn.Linear], nn.Module]) -> Measurement:
    device, dtype = settings.device, DTYPES[job.dtype]
    torch.manual_seed(settings.seed)
    base = nn.Linear(job.d_in, job.d_out, device=device, dtype=dtype)
    layer = build(job.candidate, base)
    reference = None if job.candidate.method == "none" else base
    trainable = [p for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    x = torch.randn(settings.tokens, job.d_in, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(settings.tokens, job.d_out, device=device, dtype=dtype)
    _check_finite(layer, x, run_step(layer, x, grad, optimizer))
    check_against_reference(layer, x, grad, seed=settings.seed)  # a wrong but finite backend is never timed
    timing, ref = time_step(layer, x, grad, optimizer, settings.timing, reference)
    _check_finite(layer, x, run_step(layer, x, grad, optimizer))
    peak = peak_step_memory(layer, x, grad, optimizer) / 2**20 if settings.memory else None
    flops = count_flops(layer, x, grad) if settings.flops else None
    return Measurement(**record, status="ok", fwd=timing.fwd, bwd=timing.bwd, step=timing.step,
                       peak_mem_mb=peak, flops_fwd=flops and flops.fwd, flops_fwd_bwd=flops and flops.fwd_bwd,
                       reps=timing.reps, ref_fwd_ms=ref and ref.fwd.median, ref_bwd_ms=ref and ref.bwd.median,
                       ref_step_ms=ref and ref.step.median)


def _init_child(threads: int) -> None:
    torch.set_num_threads(threads)


class IsolatedMeasurer:
    """Measures each job in a child process, so that a crash (a poisoned CUDA context, a segfault in a kernel)
    takes down only the child: the job is recorded as crashed and a fresh child measures the next one. A job that
    fails without a crash also gets the child replaced: a sticky CUDA error (an illegal address, a launch failure)
    raises once and leaves the context broken for every later kernel of that process."""

    def __init__(self):
        self._pool = None

    def _executor(self):
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"),
                                             initializer=_init_child, initargs=(torch.get_num_threads(),))
        return self._pool

    def __call__(self, job: Job, settings: ProfileSettings, key: MeasurementKey, device_name: str,
                 build: Callable[[Candidate, nn.Linear], nn.Module]) -> Measurement:
        from concurrent.futures.process import BrokenProcessPool

        params = job.candidate.params(job.d_in, job.d_out)
        try:
            m = self._executor().submit(measure_job, job, settings, key, device_name, build).result()
        except BrokenProcessPool:
            self.close()
            return Measurement(key, "crashed: the measuring child process died", device_name, params)
        except Exception as e:  # raised in the child after all, or not picklable: this job failed, the run goes on
            self.close(wait=True)
            return Measurement(key, failure_status(e), device_name, params)
        if not m.ok:
            self.close(wait=True)  # the next job in a fresh child, once this one has exited and freed its memory
        return m

    def close(self, wait: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None


def run_profile(plans: Sequence[ShapePlan], settings: ProfileSettings, store: MeasurementStore, device_info, *,
                retry_failed: bool = False, progress: bool = True,
                build: Callable[[Candidate, nn.Linear], nn.Module] = build_module,
                worker: str | None = None, claim_timeout_s: float = 900.0, poll_s: float = 1.0,
                isolate: bool = False) -> ProfileResult:
    """Measure every job of ``plans`` that ``store`` does not hold yet (and, with ``retry_failed``, the failed
    ones again). ``device_info`` is a :class:`~circtune.measure.device.DeviceInfo` of ``settings.device``.

    Several workers may share one store: each job is claimed atomically before it is measured (see
    :meth:`MeasurementStore.claim`), so no job is measured twice; jobs claimed by another worker are waited for,
    and taken over if their claim is older than ``claim_timeout_s`` (that worker died). With ``isolate``, each job
    is measured in a child process (:class:`IsolatedMeasurer`); ``build`` must then be picklable."""
    from tqdm.auto import tqdm

    if not isolate and _broken is not None:  # an earlier run in this process broke the context
        raise ContextBroken(broken_message(_broken))
    sw = device_info.software
    worker = worker or this_worker()
    store.register_device(device_info.fingerprint, device_info.name, device_info.to_dict())
    result = ProfileResult()
    rows: list[Measurement | None] = []
    todo = []
    for job in jobs_for(plans, settings.dtypes):
        key = MeasurementKey(device_info.fingerprint, sw["torch"], sw.get("triton") or "", sw["circtune"],
                             job.d_in, job.d_out, settings.tokens, job.dtype, job.candidate)
        stored = store.get(key)
        if stored is not None and (stored.ok or not retry_failed):
            result.reused += 1
            rows.append(stored)
        else:
            todo.append((len(rows), job, key, stored is not None))
            rows.append(None)
    bar = tqdm(total=len(todo), desc="profiling", unit="config", disable=not progress or not todo,
               dynamic_ncols=True)
    measure = IsolatedMeasurer() if isolate else measure_job
    try:
        _measure_all(todo, rows, result, store, settings, device_info, build, worker, claim_timeout_s, poll_s,
                     bar, measure)
    finally:
        bar.close()
        if isolate:
            measure.close()
    result.measurements = [m for m in rows if m is not None]
    return result


def _measure_all(todo, rows, result, store, settings, device_info, build, worker, claim_timeout_s, poll_s, bar,
                 measure) -> None:
    while todo:
        waiting = []
        for index, job, key, retry in todo:
            stored = store.get(key)
            if stored is not None and not retry:  # another worker measured it meanwhile
                rows[index] = stored
                result.reused += 1
                bar.update()
                continue
            try:
                claimed = store.claim(key, worker, claim_timeout_s)
            except BaseException:  # interrupted while claiming: do not leave a claim behind
                store.release(key, worker)
                raise
            if not claimed:
                waiting.append((index, job, key, retry))
                continue
            try:
                stored = None if retry else store.get(key)
                if stored is not None:  # stored and released between our look and our claim
                    rows[index] = stored
                    result.reused += 1
                    bar.update()
                    continue
                bar.set_postfix_str(f"{job.d_in}x{job.d_out} {job.dtype} {job.candidate.label}", refresh=False)
                m = measure(job, settings, key, device_info.name, build)
                # A signal during the write is raised after the count, so the interrupt summary includes this row.
                with deferred_interrupts():
                    if retry:
                        store.delete(key)
                    if not store.add(m):  # stored by another worker after all: keep theirs
                        m = store.get(key) or m
                    rows[index] = m
                    result.measured += 1
                    note_kept("profile", f"{result.measured} configurations measured in this run "
                                         f"({result.measured + result.reused} of {len(rows)} in the store)")
            finally:
                store.release(key, worker)
            bar.update()
            if _broken is not None and not isinstance(measure, IsolatedMeasurer):  # (children break only their own)
                raise ContextBroken(broken_message(_broken))
            check_interrupted()
        if waiting and len(waiting) == len(todo):
            time.sleep(poll_s)  # every remaining job is being measured elsewhere
        todo = [(i, j, k, False) for i, j, k, _ in waiting]
