"""Validation: apply the best assignments and the baselines to the real model and time whole training steps.

The model is built with random weights on the device (:func:`circtune.models.build_model`), frozen, and fed
``inputs_embeds`` of ``[batch, seq_len, hidden]`` that require grad (every layer then passes its input gradient
on, as in the per-layer profile), with a fixed upstream gradient on the last hidden state. A step is forward,
backward and the AdamW update of the adapter parameters, timed and memory-measured exactly as the profiler times
one layer (:mod:`circtune.measure.timing`, :mod:`circtune.measure.memory`).

Candidates are applied with :func:`circtune.apply_adapter` (what a training script does); baselines replace the
target ``nn.Linear`` s with LoRA / PEFT C3A layers (:mod:`circtune.measure.baselines`). After each measurement
the original ``nn.Linear`` s are put back, so every assignment runs on the same weights.

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

from .adapters.inject import _set_submodule, apply_adapter
from .config import AdapterConfig
from .measure import profiler
from .measure.baselines import build_module
from .measure.memory import peak_step_memory
from .measure.profiler import NonFiniteError, device_scope, failure_status, is_sticky_cuda_error
from .measure.timing import Spread, TimingSettings, time_step
from .space import Candidate


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
    step: Spread | None = None
    mem_mb: float | None = None
    status: str = "ok"


@dataclass(frozen=True)
class Plan:
    """What to validate: a label, its kind, how to put it on the model, its parameters and predictions."""

    label: str
    kind: str
    apply: Callable[[nn.Module], None]
    total_params: int
    predicted_overhead_ms: float | None = None
    predicted_mem_mb: float | None = None


def candidate_plan(label: str, config: AdapterConfig, total_params: int, predicted_ms: float,
                   predicted_mem: float, kind: str = "candidate") -> Plan:
    """Apply ``config`` with :func:`circtune.apply_adapter`, as a training script does."""
    return Plan(label, kind, lambda model: apply_adapter(model, config), total_params, predicted_ms, predicted_mem)


def baseline_plan(label: str, layers: Mapping[str, Candidate], total_params: int,
                  predicted_ms: float | None = None, predicted_mem: float | None = None) -> Plan:
    """Replace each named ``nn.Linear`` with the baseline module of its candidate (LoRA, PEFT C3A, none)."""

    def apply(model: nn.Module) -> None:
        for name, candidate in layers.items():
            if candidate.method != "none":
                _set_submodule(model, name, build_module(candidate, model.get_submodule(name)))

    return Plan(label, "baseline", apply, total_params, predicted_ms, predicted_mem)


def _restore(model: nn.Module, originals: Mapping[str, nn.Linear]) -> None:
    for name, linear in originals.items():
        _set_submodule(model, name, linear)
    model.requires_grad_(False)


def validate(model: nn.Module, targets: Sequence[str], plans: Sequence[Plan], *, batch: int, seq_len: int,
             dtype: torch.dtype, timing: TimingSettings, progress: bool = True) -> list[Validation]:
    """Measure one whole-model training step per plan (the base model's own step is the ``no adapter`` plan's).
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
                results.append(Validation(plan.label, plan.kind, plan.total_params, plan.predicted_overhead_ms,
                                          plan.predicted_mem_mb, status=f"failed: not run: the CUDA context broke "
                                                                        f"during {broken}"))
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
        result = _measure_plan(model, step_module, plan, x, grad, timing)
    except Exception as e:  # out of memory, NaN/Inf, a backend that fails to compile or launch, ...
        reason = failure_status(e).removeprefix("error: ")
        result = Validation(plan.label, plan.kind, plan.total_params, plan.predicted_overhead_ms,
                            plan.predicted_mem_mb, status=f"failed: {reason}")
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
            result = Validation(plan.label, plan.kind, plan.total_params, plan.predicted_overhead_ms,
                                plan.predicted_mem_mb, status=f"failed: {reason}")
    return result


def _measure_plan(model: nn.Module, step_module: ModelStep, plan: Plan, x: torch.Tensor, grad: torch.Tensor,
                  timing: TimingSettings) -> Validation:
    plan.apply(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    timing_result, _ = time_step(step_module, x, grad, optimizer, timing)
    mem = peak_step_memory(step_module, x, grad, optimizer) / 2**20
    gradient_finite = x.grad is None or bool(torch.isfinite(x.grad).all())  # of the last step
    with torch.no_grad():
        if not torch.isfinite(step_module(x)).all():
            raise NonFiniteError("the model's output has NaN/Inf")
    if not gradient_finite:
        raise NonFiniteError("the input gradient has NaN/Inf")
    return Validation(plan.label, plan.kind, plan.total_params, plan.predicted_overhead_ms, plan.predicted_mem_mb,
                      timing_result.step, mem)
