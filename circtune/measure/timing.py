"""Timing one layer's training step: forward, backward and the whole step (with the optimizer update).

One repetition is ``zero grads -> y = layer(x) -> y.backward(g) -> optimizer.step()``, with ``x`` requiring grad
(a layer inside a network passes its input gradient on) and a fixed upstream gradient ``g``. Each repetition gives
three samples: forward, backward (including the accumulation into x.grad) and the whole step.

* GPU: CUDA events around each phase; before every repetition a buffer twice the L2 size is overwritten so that
  no repetition finds the previous one's operands in cache. One synchronisation at the end; events are read then.
* CPU: ``time.perf_counter`` around each phase at the thread count the caller fixed (``torch.set_num_threads``).

After ``warmup`` repetitions (allocator, cuFFT plans, autotuning), repetitions continue until at least
``min_reps`` were taken and ``min_time_s`` has passed, or ``max_reps`` is reached. Reported: 25th, 50th and 75th
percentiles in milliseconds.

With a ``reference`` layer (the profiler passes the frozen base layer), every repetition times one reference
step right before the layer's step, on the same input: what the layer adds is then the difference of two medians
taken side by side in one window, so clock, thermal or load drift between measurements does not leak into it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Spread:
    """Quartiles of a sample, in milliseconds."""

    p25: float
    median: float
    p75: float

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Spread:
        if len(samples_ms) == 1:
            return cls(samples_ms[0], samples_ms[0], samples_ms[0])
        q = statistics.quantiles(samples_ms, n=4, method="inclusive")
        return cls(q[0], statistics.median(samples_ms), q[2])


@dataclass(frozen=True)
class StepTiming:
    fwd: Spread
    bwd: Spread
    step: Spread
    reps: int


@dataclass(frozen=True)
class TimingSettings:
    warmup: int = 3
    min_reps: int = 10
    max_reps: int = 100
    min_time_s: float = 1.0
    flush_l2: bool = True  # GPU only


def zero_grads(layer: nn.Module, x: torch.Tensor) -> None:
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def run_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor,
             optimizer: torch.optim.Optimizer | None) -> torch.Tensor:
    """One untimed training step; returns the forward output (for finiteness checks)."""
    zero_grads(layer, x)
    y = layer(x)
    y.backward(grad)
    if optimizer is not None:
        optimizer.step()
    return y.detach()


class _L2Flush:
    def __init__(self, device: torch.device):
        size = 2 * getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
        self.buffer = torch.empty(max(size, 8 << 20) // 4, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def time_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, optimizer: torch.optim.Optimizer | None,
              settings: TimingSettings = TimingSettings(),
              reference: nn.Module | None = None) -> tuple[StepTiming, StepTiming | None]:
    """Time ``settings.warmup`` + n repetitions of the training step of ``layer`` on ``x``'s device, each one
    preceded by a step of ``reference`` (no optimizer) when given. Returns (layer's timing, reference's)."""
    pairs = [(layer, optimizer)] if reference is None else [(reference, None), (layer, optimizer)]
    samples = _warm_and_time(pairs, x, grad, settings)
    timings = [StepTiming(Spread.of(f), Spread.of(b), Spread.of(s), len(s)) for f, b, s in samples]
    return timings[-1], (timings[0] if reference is not None else None)


def paired_step_samples(reference: nn.Module, layer: nn.Module, x: torch.Tensor, grad: torch.Tensor,
                        optimizer: torch.optim.Optimizer | None, settings: TimingSettings = TimingSettings(),
                        clock=time.perf_counter) -> tuple[list[float], list[float]]:
    """The same paired loop as :func:`time_step` with a reference, returning the raw whole-step samples (ms) of
    ``reference`` and ``layer``: element i of both lists is repetition i's pair (reference first), so that the
    caller can take statistics of the per-pair differences. ``clock`` (seconds) times the CPU path."""
    samples = _warm_and_time([(reference, None), (layer, optimizer)], x, grad, settings, clock)
    return samples[0][2], samples[1][2]


def _warm_and_time(pairs, x, grad, settings: TimingSettings, clock=time.perf_counter):
    for _ in range(settings.warmup):
        for module, opt in pairs:
            run_step(module, x, grad, opt)
    if x.device.type == "cuda":
        return _time_cuda(pairs, x, grad, settings)
    return _time_cpu(pairs, x, grad, settings, clock)


def _enough(reps: int, elapsed: float, s: TimingSettings) -> bool:
    return reps >= s.max_reps or (reps >= s.min_reps and elapsed >= s.min_time_s)


def _time_cpu(pairs, x, grad, s: TimingSettings,
              clock=time.perf_counter) -> list[tuple[list[float], list[float], list[float]]]:
    samples = [([], [], []) for _ in pairs]
    start = clock()
    while not _enough(len(samples[0][2]), clock() - start, s):
        for (module, optimizer), (fwd, bwd, step) in zip(pairs, samples, strict=True):
            zero_grads(module, x)
            t0 = clock()
            y = module(x)
            t1 = clock()
            y.backward(grad)
            t2 = clock()
            if optimizer is not None:
                optimizer.step()
            t3 = clock()
            del y
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
            step.append((t3 - t0) * 1e3)
    return samples


def _time_cuda(pairs, x, grad, s: TimingSettings) -> list[tuple[list[float], list[float], list[float]]]:
    flush = _L2Flush(x.device) if s.flush_l2 else None
    events: list[list[list[torch.cuda.Event]]] = [[] for _ in pairs]
    torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    while not _enough(len(events[0]), time.perf_counter() - start, s):
        for (module, optimizer), recorded in zip(pairs, events, strict=True):
            if flush is not None:
                flush()
            zero_grads(module, x)
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            ev[0].record()
            y = module(x)
            ev[1].record()
            y.backward(grad)
            ev[2].record()
            if optimizer is not None:
                optimizer.step()
            ev[3].record()
            del y
            recorded.append(ev)
        if len(events[0]) % 10 == 0:
            # Host time alone would run ahead of the device: let the elapsed-time rule see real progress.
            torch.cuda.synchronize(x.device)
    torch.cuda.synchronize(x.device)
    return [([e[0].elapsed_time(e[1]) for e in rec], [e[1].elapsed_time(e[2]) for e in rec],
             [e[0].elapsed_time(e[3]) for e in rec]) for rec in events]
