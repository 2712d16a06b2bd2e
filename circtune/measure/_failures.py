"""What a failed measurement is recorded as, and which failures break the process's CUDA context.

The status of a configuration whose measurement raised (``out of memory: ...``, ``non-finite: ...``, ``wrong result:
...``, ``error: <type>: ...``), keeping one line of the exception's message; the finiteness check that raises
:class:`NonFiniteError`; and the test for a sticky CUDA error, after which every later kernel of the process fails.

A module of its own because this is classification without state: the profiler keeps what a sticky error leaves
behind (:func:`.profiler.context_broken`), and the validation (:mod:`circtune.validate`) words its own failures by the
same rules (it imports these names from the profiler, which re-exports them).
"""

from __future__ import annotations

import torch
from torch import nn

from .verify import WrongResultError


class NonFiniteError(RuntimeError):
    pass


# How CUDA words the errors that break a context for good (cudaErrorIllegalAddress, cudaErrorLaunchFailure,
# cudaErrorAssert, ...), through torch ("CUDA error: ...") and through Triton's driver calls ("CUDA_ERROR_...").
_STICKY_WORDS = ("illegal memory access", "illegal address", "illegal instruction", "unspecified launch failure",
                 "launch failed", "device-side assert", "misaligned address", "invalid program counter",
                 "hardware stack error", "uncorrectable ecc", "cuda_error_illegal_address", "cuda_error_launch_failed",
                 "cuda_error_assert", "cuda_error_misaligned_address", "cuda_error_illegal_instruction")


def is_sticky_cuda_error(e: BaseException) -> bool:
    """Whether ``e`` is a CUDA error that leaves the context broken for every later kernel of the process."""
    text = str(e).lower()
    return any(words in text for words in _STICKY_WORDS)


# How allocators word running out: CUDA ("CUDA out of memory"), torch's CPU allocator ("DefaultCPUAllocator: can't
# allocate memory: you tried to allocate N bytes", a plain RuntimeError; older versions "not enough memory"), the OS.
_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(e).lower()
    return any(words in text for words in _OOM_WORDS)


def _message(e: BaseException) -> str:
    """The first line of ``e``'s message, at most 300 characters. A Triton ``CompilationError`` starts with a
    source excerpt (``at 12:4:`` then the kernel's lines) and states the error last: its ``error_message`` is
    appended, so that the status says what failed."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    detail = getattr(e, "error_message", None)
    if isinstance(detail, str) and detail.strip():
        detail = detail.strip().splitlines()[0].strip()
        if detail not in text:
            text = f"{text} {detail}" if text else detail
    return (text or type(e).__name__)[:300]


def failure_status(e: BaseException) -> str:
    """The status of a configuration whose measurement raised ``e``: ``out of memory: ...`` (GPU or CPU),
    ``non-finite: ...``, ``wrong result: ...`` (a backend that disagrees with the torch backend), or
    ``error: <exception type>: ...`` (a backend that fails to compile or launch, a sticky CUDA error, ...)."""
    if isinstance(e, NonFiniteError):
        return f"non-finite: {_message(e)}"
    if isinstance(e, WrongResultError):
        return f"wrong result: {_message(e)}"
    if _is_oom(e):
        return f"out of memory: {_message(e)}"
    return f"error: {type(e).__name__}: {_message(e)}"


def _check_finite(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    if not torch.isfinite(y).all():
        raise NonFiniteError("forward output has NaN/Inf")
    if x.grad is not None and not torch.isfinite(x.grad).all():
        raise NonFiniteError("input gradient has NaN/Inf")
    for name, p in layer.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise NonFiniteError(f"gradient of {name} has NaN/Inf")
