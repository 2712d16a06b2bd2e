"""Validation: apply the best assignments and the baselines to the real model and time whole training steps,
each one paired with the frozen model in the same window.

The model is built with random weights on the device (:func:`circtune.models.build_model`), frozen, and fed
``inputs_embeds`` of ``[batch, seq_len, hidden]`` that require grad (every layer then passes its input gradient
on, as in the per-layer profile), with a fixed upstream gradient on the last hidden state. A step is forward,
backward and the AdamW update of the adapter parameters, memory-measured as the profiler measures one layer
(:mod:`circtune.measure.memory`).

**Paired timing.** The profiler times each layer right after its frozen base layer, on the same input, in one
window (:func:`circtune.measure.timing.paired_step_samples`); validation does the same for the whole model. A
plan is applied once; its adapter modules and the original ``nn.Linear`` s are then swapped in and out of the same
model instance, so that every repetition is one frozen step followed by one adapted step (A/B, A/B, ...), after
warm-up, until the timing settings' repetitions and minimum time are met. What the plan adds is the median of the
per-pair differences (adapted minus frozen), with their 25th and 75th percentiles as its spread: clock, thermal or
load drift between plans cancels in each pair instead of leaking into the comparison. Both arms swap the same
number of modules before their forward, so that cost cancels too. The ``no adapter`` plan pairs the frozen model
with itself: its added time is the noise floor of the measurement.

Candidates are applied with :func:`circtune.apply_adapter` (what a training script does); baselines replace the
target ``nn.Linear`` s with LoRA / PEFT C3A layers (:mod:`circtune.measure.modules`). After each plan the
original ``nn.Linear`` s are put back, so every assignment runs on the same weights.

Everything runs under ``torch.cuda.device`` of the model's device (see :mod:`circtune.measure.profiler`). A plan
that breaks the CUDA context (a sticky CUDA error, raised again by every later kernel) is recorded with its error,
and the plans after it with ``failed: not run: ...`` naming it: nothing more can run in this process.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .adapters.config import AdapterConfig
from .adapters.inject import _set_submodule, apply_adapter
from .candidate import Candidate
from .measure import profiler
from .measure.memory import peak_step_memory
from .measure.modules import build_module
from .measure.profiler import NonFiniteError, device_scope, failure_status, is_sticky_cuda_error
from .measure.timing import Spread, TimingSettings, paired_step_samples


class ModelStep(nn.Module):
    """``x -> last hidden state`` for a transformers model fed embeddings (ViT: its encoder on patch embeddings)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        params = inspect.signature(model.forward).parameters
        if "inputs_embeds" in params:
            self._call = lambda x: model(inputs_embeds=x).last_hidden_state
        elif hasattr(model, "encoder") and hasattr(model, "embeddings"):
            self._call = lambda x: model.encoder(x).last_hidden_state
        else:
            raise ValueError(f"cannot feed embeddings to {type(model).__name__}: whole-model validation needs a "
                             "transformers model that accepts inputs_embeds (or has an encoder)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(x)


def hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None)
    if size is None:
        raise ValueError(f"{type(model).__name__} has no config.hidden_size: whole-model validation needs it")
    return int(size)


@dataclass(frozen=True)
class Validation:
    label: str
    kind: str  # "candidate" or "baseline"
    total_params: int
    predicted_overhead_ms: float | None
    predicted_mem_mb: float | None
    step: Spread | None = None  # the adapted model's whole step
    mem_mb: float | None = None
    status: str = "ok"
    base_step: Spread | None = None  # the frozen model's step, timed in the same pairs
    overhead: Spread | None = None  # per-pair differences: what the plan adds to the frozen model's step
    baseline: str | None = None  # a baseline's id (circtune.baselines), None for a candidate

    @property
    def overhead_pct(self) -> float | None:
        """The median added time as a percentage of the frozen model's median step in the same window."""
        if self.overhead is None or self.base_step is None or self.base_step.median <= 0:
            return None
        return 100 * self.overhead.median / self.base_step.median


def candidate_label(rank: int) -> str:
    """The name of the ``rank``-th (from 0) best predicted assignment: ``predicted #1``, ``predicted #2``, ...
    Which of them is the pick is said apart (validation.csv's ``picked``), since measurement may choose another."""
    return f"predicted #{rank + 1}"


def paired_overhead(base_ms: Sequence[float], adapted_ms: Sequence[float]) -> tuple[Spread, Spread, Spread]:
    """(frozen step, adapted step, added time) from aligned samples: element i of both is repetition i's pair.
    The added time is the spread of the per-pair differences (not the difference of the two medians)."""
    if len(base_ms) != len(adapted_ms) or not base_ms:
        raise ValueError(f"paired samples must be non-empty and aligned, got {len(base_ms)} and {len(adapted_ms)}")
    diffs = [a - b for a, b in zip(adapted_ms, base_ms, strict=True)]
    return Spread.of(base_ms), Spread.of(adapted_ms), Spread.of(diffs)


def within_noise(a: Spread | None, b: Spread | None) -> bool | None:
    """Whether two paired added times cannot be told apart: their 25th–75th percentile intervals of the per-pair
    differences overlap (``a.p25 <= b.p75 and b.p25 <= a.p75``). None when either is unmeasured.

    Why this rule: the interquartile range is what the report and validation.csv print, so a reader can check the
    verdict by eye; it ignores the occasional slow step (a scheduler hiccup) that a min/max or mean rule would
    follow; and it is conservative: with tens of pairs the median's own uncertainty is narrower than the IQR,
    but two plans are timed in different windows, and drift between windows is not in either plan's spread, so a
    tighter rule would call differences real that a re-run can reverse."""
    if a is None or b is None:
        return None
    return a.p25 <= b.p75 and b.p25 <= a.p75


class _Arm(nn.Module):
    """One arm of the pairing: calling it installs its modules at the target names of the shared model (only
    those not already there) and runs the model's step. Its parameters are its modules' (the adapters' when
    trainable), so the timer's zeroing of gradients touches only them."""

    def __init__(self, step: ModelStep, modules: Mapping[str, nn.Module]):
        super().__init__()
        self.installed = nn.ModuleList(modules.values())
        self._names = list(modules)
        self._step = (step,)  # a tuple: not registered, so the frozen model's parameters are not this arm's

    def install(self) -> None:
        model = self._step[0].model
        for name, module in zip(self._names, self.installed, strict=True):
            if model.get_submodule(name) is not module:
                _set_submodule(model, name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.install()
        return self._step[0](x)


@dataclass(frozen=True)
class Plan:
    """What to validate: a label, its kind, how to put it on the model, its parameters and predictions."""

    label: str
    kind: str
    apply: Callable[[nn.Module], None]
    total_params: int
    predicted_overhead_ms: float | None = None
    predicted_mem_mb: float | None = None
    baseline: str | None = None  # a baseline's id (circtune.baselines), None for a candidate

    def result(self, **measured) -> Validation:
        """This plan's :class:`Validation` with what was measured (or its failed ``status``)."""
        return Validation(self.label, self.kind, self.total_params, self.predicted_overhead_ms,
                          self.predicted_mem_mb, baseline=self.baseline, **measured)


def candidate_plan(label: str, config: AdapterConfig, total_params: int, predicted_ms: float,
                   predicted_mem: float, kind: str = "candidate", baseline: str | None = None) -> Plan:
    """Apply ``config`` with :func:`circtune.apply_adapter`, as a training script does."""
    return Plan(label, kind, lambda model: apply_adapter(model, config), total_params, predicted_ms, predicted_mem,
                baseline)


def baseline_plan(label: str, layers: Mapping[str, Candidate], total_params: int,
                  predicted_ms: float | None = None, predicted_mem: float | None = None,
                  baseline: str | None = None) -> Plan:
    """Replace each named ``nn.Linear`` with the reference module of its candidate (LoRA, PEFT C3A, none)."""

    def apply(model: nn.Module) -> None:
        for name, candidate in layers.items():
            if candidate.method != "none":
                _set_submodule(model, name, build_module(candidate, model.get_submodule(name)))

    return Plan(label, "baseline", apply, total_params, predicted_ms, predicted_mem, baseline)


def _restore(model: nn.Module, originals: Mapping[str, nn.Linear]) -> None:
    for name, linear in originals.items():
        _set_submodule(model, name, linear)
    model.requires_grad_(False)


def validate(model: nn.Module, targets: Sequence[str], plans: Sequence[Plan], *, batch: int, seq_len: int,
             dtype: torch.dtype, timing: TimingSettings, progress: bool = True) -> list[Validation]:
    """Time each plan's whole-model training step paired with the frozen model's (see the module docstring) and
    measure its peak memory (the frozen model's own memory is the ``no adapter`` plan's).
    A plan that fails (out of memory, NaN/Inf in the output or the input gradient, a backend that fails to compile
    or launch, any other error) is recorded as ``failed: <reason>`` (the profiler's wording: ``out of memory: ...``,
    ``non-finite: ...``, ``<exception type>: ...``), its layers are taken off again and the others go on."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    model.requires_grad_(False)
    originals = {name: model.get_submodule(name) for name in targets}
    results = []
    bar = tqdm(plans, desc="validating", unit="model", disable=not progress, dynamic_ncols=True)
    with device_scope(device):
        step_module = ModelStep(model)
        x = grad = None
        for plan in bar:
            broken = profiler.context_broken()
            if broken is not None:  # every kernel would raise the sticky error again
                results.append(plan.result(status=f"failed: not run: the CUDA context broke during {broken}"))
                continue
            if x is None:
                x = torch.randn(batch, seq_len, hidden_size(model), device=device, dtype=dtype, requires_grad=True)
                with torch.no_grad():
                    grad = torch.randn_like(step_module(x))
            results.append(_validate_one(model, step_module, plan, x, grad, timing, originals, device))
    return results


def _validate_one(model: nn.Module, step_module: ModelStep, plan: Plan, x: torch.Tensor, grad: torch.Tensor,
                  timing: TimingSettings, originals: Mapping[str, nn.Linear], device: torch.device) -> Validation:
    torch.manual_seed(0)
    try:
        result = _measure_plan(model, step_module, plan, x, grad, timing, originals)
    except Exception as e:  # out of memory, NaN/Inf, a backend that fails to compile or launch, ...
        reason = failure_status(e).removeprefix("error: ")
        result = plan.result(status=f"failed: {reason}")
        if device.type == "cuda" and is_sticky_cuda_error(e):
            profiler._mark_broken(f"{plan.label}: {reason}")
    x.grad = None
    _restore(model, originals)
    try:  # the traceback held the failed plan's layers and activations in cycles
        profiler.release_memory(device, failed=result.status != "ok")
    except Exception as e:  # a sticky CUDA error raised again (or seen for the first time)
        reason = failure_status(e).removeprefix("error: ")
        profiler._mark_broken(f"{plan.label}: {reason}")
        if result.status == "ok":
            result = plan.result(status=f"failed: {reason}")
    return result


def _measure_plan(model: nn.Module, step_module: ModelStep, plan: Plan, x: torch.Tensor, grad: torch.Tensor,
                  timing: TimingSettings, originals: Mapping[str, nn.Linear]) -> Validation:
    plan.apply(model)
    adapted = {name: model.get_submodule(name) for name in originals}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    base_arm, adapted_arm = _Arm(step_module, originals), _Arm(step_module, adapted)
    base_ms, adapted_ms = paired_step_samples(base_arm, adapted_arm, x, grad, optimizer, timing)
    base, step, added = paired_overhead(base_ms, adapted_ms)
    adapted_arm.install()
    mem = peak_step_memory(step_module, x, grad, optimizer) / 2**20  # one more step, whose x.grad is checked
    gradient_finite = x.grad is None or bool(torch.isfinite(x.grad).all())  # of the last step
    with torch.no_grad():
        if not torch.isfinite(step_module(x)).all():
            raise NonFiniteError("the model's output has NaN/Inf")
    if not gradient_finite:
        raise NonFiniteError("the input gradient has NaN/Inf")
    return plan.result(step=step, mem_mb=mem, base_step=base, overhead=added)
