"""One check of the ahead-of-time compile check (:mod:`._aot`): what a check and its result are, the targets, and
how one check is done: the launch that ``block_circulant_linear`` really makes is recorded on CPU tensors, then
compiled for the check's target under a stand-in driver, with ptxas's register and spill figures read from its log.

Apart from :mod:`._aot`, which samples the checks, runs them in worker processes and reports, because this is what
runs inside each worker: it patches the launchers' modules while recording and sets process-wide Triton state (the
active driver, a fresh cache, the ptxas log), none of which the sampling and the report touch.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ._tuning import TileConfig

# name -> (compute capability, shared memory a block may use, in bytes: 227 KiB on Hopper, 163 KiB on the A100).
TARGETS: dict[str, tuple[tuple[int, int], int]] = {"sm_90": ((9, 0), 232448), "sm_80": ((8, 0), 166912)}
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                                  "fp64": torch.float64}


@dataclass(frozen=True)
class Check:
    """One compile: a tile at one call site of ``block_circulant_linear``, for one target, dtype and shape."""

    target: str
    dtype: str  # "fp32" (TF32 off: ieee), "fp32-tf32" (TF32 on), "bf16", "fp16", "fp64"
    site: str  # "c3a forward", "c3a input gradient", "cdvft forward", "cdvft input gradient", "kernel gradient"
    p: int
    d_in: int
    d_out: int
    tokens: int
    forward: TileConfig | None = None  # the tile under test (forward and input gradient)
    kernel_grad: TileConfig | None = None  # the tile under test (kernel gradient), split set

    @property
    def tile(self) -> TileConfig:
        return self.forward or self.kernel_grad


@dataclass
class Result:
    check: Check
    ok: bool
    error: str = ""
    shared: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    seconds: float = 0.0
    launch: dict = field(default_factory=dict)  # what the launch specialised on: constexprs and options


def _torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name.split("-")[0]]


class _TargetDriver:
    """Stands in for Triton's CUDA driver: reports a fixed target. Each target gets its own device number, since
    the JIT caches its binder (and so the target) per device."""

    def __init__(self, capability: tuple[int, int]):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
        self.device = self.target.arch

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0


class _Recorder:
    """Takes the place of a ``@triton.jit`` kernel in its launcher's module: ``kernel[grid](*args, **kwargs)``
    records the launch instead of running it."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, grid, args, kwargs))


@contextlib.contextmanager
def _recording() -> Iterator[list]:
    from . import block_circulant_kernel_grad as kgrad
    from . import block_circulant_matmul as matmul

    launches: list = []
    patches = [(matmul, "_block_circulant_matmul_kernel"), (kgrad, "_block_circulant_kernel_grad_kernel")]
    saved = [(module, name, getattr(module, name)) for module, name in patches]
    saved += [(module, "check_device", module.check_device) for module in (matmul, kgrad)]
    try:
        for module, name in patches:
            setattr(module, name, _Recorder(getattr(module, name), launches))
        for module in (matmul, kgrad):
            # The tensors are on the CPU; the launchers accept them (the launch itself is recorded, never run).
            module.check_device = lambda op, *tensors: next(t for t in tensors if t is not None).device
        yield launches
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _record(check: Check) -> list:
    """The launches of ``block_circulant_linear`` forward and backward for ``check``, labelled by call site."""
    from .block_circulant_linear import block_circulant_linear

    dtype = _torch_dtype(check.dtype)
    p, q_in, q_out = check.p, check.d_in // check.p, check.d_out // check.p
    c3a = check.site.startswith("c3a") or check.site == "kernel gradient"
    x = torch.randn(check.tokens, check.d_in, dtype=dtype, requires_grad=True)
    w = torch.randn(q_out, q_in, p, requires_grad=True)
    weight = torch.randn(check.d_out, check.d_in, dtype=dtype) if c3a else None
    bias = torch.randn(check.d_out, dtype=dtype) if c3a else None
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = check.dtype == "fp32-tf32"
    try:
        with _recording() as launches:
            # The GEMM kernel-gradient route, always: the spectral routes are torch ops with no kernel to compile.
            y = block_circulant_linear(x, w, scale=0.5, weight=weight, bias=bias, forward_config=check.forward,
                                       input_grad_config=check.forward, kernel_grad_config=check.kernel_grad,
                                       kernel_grad_route="gemm")
            y.backward(torch.ones_like(y))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    labelled = []
    matmuls = 0
    for launch in launches:
        name = getattr(launch[0], "fn", launch[0]).__name__
        if name == "_block_circulant_matmul_kernel":
            site = ("forward", "input gradient")[min(matmuls, 1)]
            matmuls += 1
            labelled.append((("c3a " if c3a else "cdvft ") + site, launch))
        else:
            labelled.append(("kernel gradient", launch))
    if matmuls != 2 or len(labelled) != 3:
        # The launchers changed: this check would no longer see what a real call compiles.
        raise RuntimeError(f"expected a forward, an input-gradient and a kernel-gradient launch, recorded "
                           f"{[site for site, _ in labelled]}")
    return labelled


_SEEN: dict[str, tuple[int, int, int]] = {}  # kernel hash -> ptxas figures, for kernels this process compiled


def _ptxas_figures(log: str) -> tuple[int, int, int] | None:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spills:
        return None
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def _worker_setup() -> None:
    """Once per process: a fresh Triton cache (so ptxas runs and logs), the ptxas log on, no CUDA driver needed."""
    import triton

    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        raise RuntimeError("the AOT check compiles kernels: run it without TRITON_INTERPRET=1")
    cache = tempfile.mkdtemp(prefix="circtune-aot-")
    import atexit

    atexit.register(shutil.rmtree, cache, True)
    triton.knobs.cache.dir = cache
    triton.knobs.nvidia.dump_ptxas_log = True
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


_READY = False


def run_check(check: Check) -> Result:
    """Compile the launch of ``check`` for its target (nothing runs); never raises for a compile error.

    Meant for a process of its own (``run``'s workers, or this module's command line): it points the process's
    Triton at a stand-in driver and a temporary cache."""
    global _READY
    if not _READY:
        _worker_setup()
        _READY = True
    from triton.runtime.driver import driver

    try:
        launches = [launch for site, launch in _record(check) if site == check.site]
        if len(launches) != 1:
            raise RuntimeError(f"expected one launch at {check.site}, recorded {len(launches)}")
    except Exception as e:  # noqa: BLE001 - the table reports it
        return Result(check, False, f"recording failed: {type(e).__name__}: {str(e).strip()[:300]}")
    kernel, grid, args, kwargs = launches[0]
    launch = {k: (str(v) if not isinstance(v, (int, float, bool, str)) else v) for k, v in kwargs.items()}
    driver.set_active(_TargetDriver(TARGETS[check.target][0]))
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = kernel.warmup(*args, grid=grid, **kwargs)
    except Exception as e:  # noqa: BLE001 - a compile error is a result
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        return Result(check, False, f"{type(e).__name__}: {lines[0] if lines else ''}"[:300],
                      seconds=time.perf_counter() - start, launch=launch)
    seconds = time.perf_counter() - start
    key = compiled.metadata.hash
    figures = _ptxas_figures(log.getvalue()) or _SEEN.get(key)
    if figures is None:
        return Result(check, False, "compiled, but ptxas -v printed no register or spill figures",
                      shared=compiled.metadata.shared, seconds=seconds, launch=launch)
    _SEEN[key] = figures
    return Result(check, True, shared=compiled.metadata.shared, registers=figures[0], spill_stores=figures[1],
                  spill_loads=figures[2], seconds=seconds, launch=launch)
