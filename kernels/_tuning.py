"""What the launchers share: tile configurations, their argument checks, the autotune cache, dtype rules.

Every launcher takes its tunable values (tile sizes, warps, stages, token splits) as a :class:`TileConfig` so that
the profiler can set them; ``None`` means "the autotuned default": on a CUDA device each candidate configuration is
timed once per problem key (``triton.testing.do_bench``; a candidate that fails to compile or launch is skipped
and logged) and the fastest is cached for the process; under the interpreter (``TRITON_INTERPRET=1``, CPU
tensors) a fixed small configuration is used, since timing the interpreter would measure numpy.

Kernel-writing rule: inside ``@triton.jit`` code use only ``triton.language`` *builtins* (``tl.full``, not
``tl.zeros``; integer arithmetic, not ``tl.cdiv``). Triton's own library functions are ``@jit`` functions decorated
when Triton is first imported, and ``torch.utils.flop_counter`` imports Triton before a test can set
``TRITON_INTERPRET=1``: those library functions are then compiled-mode and cannot be called by an interpreted
kernel (tests/test_kernels.py checks that order).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Inputs the kernels accept, and the accumulator each one uses. float64 exists for gradcheck.
_ACC = {torch.float32: tl.float32, torch.bfloat16: tl.float32, torch.float16: tl.float32, torch.float64: tl.float64}


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration. ``split`` is the kernel gradient's split over tokens (None: chosen from the grid
    size); the forward ignores it."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split: int | None = None

    def check(self, op: str) -> TileConfig:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            # tl.dot needs every tile dimension >= 16; tl.arange needs powers of two.
            if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"{op}: {name} must be a power of two >= 16, got {v!r}")
        if isinstance(self.num_warps, bool) or not isinstance(self.num_warps, int) or self.num_warps < 1 \
                or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"{op}: num_warps must be a power of two >= 1, got {self.num_warps!r}")
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"{op}: num_stages must be an int >= 1, got {self.num_stages!r}")
        if self.split is not None and (isinstance(self.split, bool) or not isinstance(self.split, int)
                                       or self.split < 1):
            raise ValueError(f"{op}: split must be None or an int >= 1, got {self.split!r}")
        return self


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_device(op: str, *tensors: torch.Tensor | None) -> torch.device:
    present = [t for t in tensors if t is not None]
    device = present[0].device
    for t in present[1:]:
        if t.device != device:
            raise ValueError(f"{op}: all tensors must be on one device, got {device} and {t.device}")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"{op}: Triton kernels need CUDA tensors, got tensors on {device}; TRITON_INTERPRET=1 "
                         "(set before the kernels are imported) runs them on the CPU for tests only")
    return device


def check_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in _ACC:
        raise ValueError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def acc_dtype(dtype: torch.dtype):
    return _ACC[dtype]


def input_precision(dtype: torch.dtype) -> str:
    """fp32 operands go through TF32 exactly when torch's own matmuls would (``allow_tf32``), so that the
    triton backend and the torch and dense backends compute fp32 layers to the same precision."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


_CACHE: dict[tuple, TileConfig] = {}
_LOGGED: set[tuple] = set()
log = logging.getLogger(__name__)


class NoTileWorks(RuntimeError):
    """Every candidate tile failed for one problem key; the message names the key and each tile's reason."""


def autotune(key: tuple, candidates: Sequence[TileConfig], bench: Callable[[TileConfig], object],
             device: torch.device) -> TileConfig:
    """The fastest of ``candidates`` for ``key`` on ``device`` (timed once, then cached); the first candidate on
    the interpreter or when there is only one.

    ``key`` must name everything that changes the compiled kernel (operand dtypes, dot precision, layouts, the
    flags of the call site) besides the shape: two problems with one key share one tile. The device's name and
    compute capability are added here.
    """
    if device.type != "cuda" or len(candidates) == 1:
        return candidates[0]
    key = (torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device), *key)
    if key not in _CACHE:
        _CACHE[key] = select_tile(key, candidates,
                                  lambda config: triton.testing.do_bench(lambda: bench(config), warmup=5, rep=25))
    return _CACHE[key]


_ROUTE_CACHE: dict[tuple, str] = {}


def autotune_route(key: tuple, routes: Sequence[str], bench: Callable[[str], object], device: torch.device) -> str:
    """The fastest of ``routes`` (different algorithms for one op, e.g. the kernel gradient as a GEMM or spectral)
    for ``key`` on a CUDA ``device``, timed once and cached as :func:`autotune` does with tiles; a route that fails
    is skipped. ``key`` must name what changes any route's speed besides the device (added here)."""
    key = (torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device), *key)
    if key not in _ROUTE_CACHE:
        _ROUTE_CACHE[key] = select_tile(
            key, routes, lambda route: triton.testing.do_bench(lambda: bench(route), warmup=5, rep=25), name=str)
    return _ROUTE_CACHE[key]


def select_tile(key: tuple, candidates: Sequence, time: Callable[[object], float],
                name: Callable[[object], str] | None = None):
    """The candidate with the smallest ``time(candidate)``, skipping those that fail.

    A tile that fails to compile or launch for any reason (too much shared memory on this GPU, a compiler error,
    ...) is skipped and logged once per tile and kind of failure; ``torch.cuda.OutOfMemoryError`` propagates (the
    problem, not the tile, is too big), and so do KeyboardInterrupt and SystemExit. When no tile works,
    :class:`NoTileWorks` names the key and every tile's reason. ``name`` says how a candidate is named in the logs
    and errors (tiles by their sizes; routes by ``str``).
    """
    name = name or _tile_name
    times: dict[TileConfig, float] = {}
    reasons: dict[TileConfig, str] = {}
    for config in candidates:
        try:
            elapsed = float(time(config))
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of one tile only removes that tile
            reason = _reason(e)
            reasons[config] = reason
            _log_skip(key, config, e, reason, name)
            continue
        if not math.isfinite(elapsed):
            reasons[config] = f"timing returned {elapsed}"
            continue
        times[config] = elapsed
    if not times:
        detail = "; ".join(f"{name(c)}: {r}" for c, r in reasons.items())
        raise NoTileWorks(f"no tile configuration works for {key}: {detail}")
    return min(times, key=times.get)


def _reason(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else '(no message)'}"[:300]


def _tile_name(c: TileConfig) -> str:
    split = "" if c.split is None else f" split={c.split}"
    return f"{c.block_m}x{c.block_n}x{c.block_k} warps={c.num_warps} stages={c.num_stages}{split}"


def _log_skip(key: tuple, config, e: BaseException, reason: str, name: Callable[[object], str]) -> None:
    # Once per (device, tile, kind of failure): a tile too big for a GPU's shared memory fails for every shape.
    once = (key[:2], config, type(e).__name__)
    if once in _LOGGED:
        return
    _LOGGED.add(once)
    # Too little shared memory is expected on GPUs below the A100's 163 KiB (the lists are checked for sm_80 and
    # sm_90): informational. Anything else is a defect worth seeing.
    level = logging.INFO if isinstance(e, triton.runtime.errors.OutOfResources) else logging.WARNING
    log.log(level, "tile %s skipped for %s: %s (logged once per tile and kind of failure)", name(config),
            key, reason)


def layout(t: torch.Tensor | None) -> tuple | None:
    """How Triton specialises a launch on ``t`` (None without a tensor): each stride as 1, a multiple of 16 or
    neither, and whether the data pointer is 16-byte aligned. Each combination is its own compiled kernel, and the
    access pattern, so the fastest tile, follows the strides (the forward's ``W0`` against the input gradient's
    ``W0ᵀ``)."""
    if t is None:
        return None
    return tuple(1 if s == 1 else 16 if s % 16 == 0 else 0 for s in t.stride()), t.data_ptr() % 16 == 0


def size_bucket(n: int) -> int:
    """Token counts vary every step: tune per power-of-two bucket, not per exact count."""
    return 1 << max(0, (n - 1).bit_length())
