"""Peak memory of one training step, the same quantity on the GPU and on the CPU.

    peak = (persistent trainable state: parameters + optimizer state)
         + (highest amount of tensor memory allocated during one step above what was allocated before it)

The step is the one of :mod:`circtune.measure.timing` (grads set to None first, so gradients count as allocated
during the step). Inputs, the upstream gradient and the frozen base weight exist before the step and are not
counted; subtracting the base layer's own peak (the profiler's ``none`` row) leaves what the adapter adds.

* GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus ``memory_allocated`` before.
* CPU: torch has no allocator statistics there, so :class:`LiveTensorTracker` counts them: a
  ``TorchDispatchMode`` sees every aten op of the step (forward, autograd backward and optimizer), adds the bytes
  of each freshly allocated output storage (outputs that alias an input — views, in-place ops — are not new) and
  subtracts them when the storage is freed. Its peak is the highest sum of live bytes. It sees what torch
  allocates for tensors, not the private scratch of a library underneath (pocketfft/MKL work buffers), which the
  CUDA caching allocator would see for cuFFT only when cuFFT's workspace comes from it.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .timing import run_step


def trainable_state_bytes(layer: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the trainable parameters and of the optimizer's state for them."""
    total = sum(p.numel() * p.element_size() for p in layer.parameters() if p.requires_grad)
    if optimizer is not None:
        for state in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values()
                         if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total


class LiveTensorTracker(TorchDispatchMode):
    """Tracks the bytes of tensor storages allocated while active and still alive; ``peak`` is the maximum."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._tracked.pop(key, 0)

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._tracked or storage.nbytes() == 0:
            return
        self._tracked[key] = storage.nbytes()
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        # torch keeps one Python object per live storage, so this fires when the storage itself is freed.
        weakref.finalize(storage, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outputs = out if isinstance(out, tuple | list) and len(returns) == len(out) else (out,)
        for ret, value in zip(returns, outputs, strict=False):
            if ret.alias_info is not None:  # a view of an input or the input itself (in-place, out=)
                continue
            for t in tree_leaves(value):
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    self._track(t)
        return out


def peak_step_memory(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor,
                     optimizer: torch.optim.Optimizer | None) -> int:
    """Peak bytes of one training step as defined above. Run it after a warm-up step (optimizer state exists)."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        layer.zero_grad(set_to_none=True)
        x.grad = None
        before = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        run_step(layer, x, grad, optimizer)
        torch.cuda.synchronize(x.device)
        transient = torch.cuda.max_memory_allocated(x.device) - before
    else:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with LiveTensorTracker() as tracker:
            run_step(layer, x, grad, optimizer)
        transient = tracker.peak
    return trainable_state_bytes(layer, optimizer) + transient
