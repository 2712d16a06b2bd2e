"""Where the numbers come from: a description and a fingerprint of the device a measurement ran on.

The fingerprint hashes only what makes two devices interchangeable for timing (model, memory, SM count,
compute capability, maximum clocks, power limit; on the CPU the model, cores and threads). Current clocks
change from second to second and the software versions are keyed separately by the measurement store, so
neither is part of it; nor is the CUDA index, which depends on CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DeviceInfo", "bf16_supported", "cuda_capability", "default_device", "describe_device",
           "software_versions", "unseen_gpu_warning"]

# The properties that identify a device, per kind; everything else in `properties` is context.
_IDENTITY = {
    "cuda": ("total_memory_mb", "sm_count", "compute_capability", "max_sm_clock_mhz", "max_mem_clock_mhz",
             "power_limit_w"),
    "cpu": ("cpu_model", "physical_cores", "threads"),
}
_CPUINFO = "/proc/cpuinfo"
_MEMINFO = "/proc/meminfo"


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda" or "cpu"
    name: str  # the GPU's name as torch reports it, or the CPU model name
    index: int | None  # CUDA device index as this process sees it; None on the CPU
    properties: dict  # everything measured (see describe_device)
    software: dict  # software_versions() at the time of the description
    fingerprint: str  # 16 hex digits of sha256 over `identity`

    def __post_init__(self) -> None:
        if self.kind not in _IDENTITY:
            raise ValueError(f"DeviceInfo.kind must be one of {sorted(_IDENTITY)}, got {self.kind!r}")

    def __hash__(self) -> int:  # the dicts are unhashable; equal infos share these three fields
        return hash((self.kind, self.fingerprint, self.index))

    @property
    def identity(self) -> dict[str, Any]:
        """The fields the fingerprint is computed from."""
        return _identity(self.kind, self.name, self.properties)

    @property
    def label(self) -> str:
        """A short slug for folder names ("h100", "a100-80gb", "cpu-amd-epyc-2t"); not unique, unlike the
        fingerprint."""
        if self.kind == "cuda":
            return _gpu_label(self.name)
        return f"cpu-{_cpu_slug(self.name)}-{self.properties.get('threads')}t"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "index": self.index, "properties": copy.deepcopy(self.properties),
                "software": dict(self.software), "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: dict) -> DeviceInfo:
        """Rebuild from to_dict(); a stored fingerprint is kept as stored (it is the key measurements were filed
        under), a missing one is computed."""
        missing = [k for k in ("kind", "name", "properties") if k not in d]
        if missing:
            raise ValueError(f"DeviceInfo.from_dict: missing keys {missing} in {sorted(d)}")
        kind, name, properties = d["kind"], d["name"], copy.deepcopy(d["properties"])
        fingerprint = d.get("fingerprint") or _fingerprint(kind, name, properties)
        return cls(kind=kind, name=name, index=d.get("index"), properties=properties,
                   software=dict(d.get("software") or {}), fingerprint=fingerprint)


def _identity(kind: str, name: str, properties: dict) -> dict[str, Any]:
    return {"kind": kind, "name": name, **{k: properties.get(k) for k in _IDENTITY[kind]}}


def _fingerprint(kind: str, name: str, properties: dict) -> str:
    return hashlib.sha256(json.dumps(_identity(kind, name, properties), sort_keys=True).encode()).hexdigest()[:16]


def _make(kind: str, name: str, index: int | None, properties: dict) -> DeviceInfo:
    return DeviceInfo(kind=kind, name=name, index=index, properties=properties, software=software_versions(),
                      fingerprint=_fingerprint(kind, name, properties))


# --- software -------------------------------------------------------------------------------------------------


def _triton_version() -> str | None:
    # Nightly and ROCm builds ship the `triton` module under other distribution names.
    for dist in ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return getattr(triton, "__version__", None)


def software_versions() -> dict[str, str | None]:
    """torch, triton, circtune, python and CUDA (torch's build) versions; None for what is not installed."""
    import circtune

    return {"torch": str(torch.__version__), "triton": _triton_version(), "circtune": circtune.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda}


# --- choosing a device ----------------------------------------------------------------------------------------


# The default device, when set: what a command without --device measures on (the test suite sets it to cpu for
# every test not marked gpu, so that a plain pytest run on a GPU machine tests what it tests on the CPU).
DEVICE_ENV = "CIRCTUNE_DEVICE"


def default_device() -> torch.device:
    """``$CIRCTUNE_DEVICE`` when set (cpu, cuda or cuda:N), else the current CUDA device when there is one, else
    the CPU."""
    chosen = os.environ.get(DEVICE_ENV, "").strip()
    if chosen:
        try:
            return torch.device(chosen)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"{DEVICE_ENV}={chosen!r} is not a device torch knows; accepted: cpu, cuda, "
                             "cuda:N") from e
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def cuda_capability(device: str | torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of the CUDA ``device`` itself (not of the current device)."""
    dev = torch.device(device)
    index = torch.cuda.current_device() if dev.index is None else dev.index
    major, minor = torch.cuda.get_device_capability(index)
    return int(major), int(minor)


# bf16 tensor-core MMA (cuBLAS's bf16 GEMMs, Triton's bf16 tl.dot) starts with Ampere.
BF16_CAPABILITY = (8, 0)


def bf16_supported(device: str | torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively: a CUDA device of compute capability 8.0 or newer.
    ``torch.cuda.is_bf16_supported()`` is not the test: by default it also counts emulation (a V100 or T4 says
    yes, and runs bf16 far slower than fp16) and it asks about the current device, not ``device``."""
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.is_available() and cuda_capability(dev) >= BF16_CAPABILITY


def _nvidia_smi_gpus(timeout_s: float = 5.0) -> list[str]:
    """The GPUs ``nvidia-smi`` lists (names), or [] when it is not installed, fails or takes too long."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        done = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    if done.returncode != 0:
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def unseen_gpu_warning() -> str | None:
    """One line when torch sees no CUDA device but ``nvidia-smi`` lists GPUs (a CPU build of torch on a GPU
    machine, or a driver torch cannot use): the default device would then silently be the CPU. None otherwise."""
    if torch.cuda.is_available():
        return None
    gpus = _nvidia_smi_gpus()
    if not gpus:
        return None
    listed = ", ".join(gpus[:2]) + (f" and {len(gpus) - 2} more" if len(gpus) > 2 else "")
    build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"warning: torch {torch.__version__} ({build}) cannot see the GPU that nvidia-smi lists ({listed}): "
            "install a CUDA build of torch that matches the driver, or pass --device cpu to profile the CPU on "
            "purpose")


def _available() -> list[str]:
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return [*cuda, "cpu"]


def describe_device(device: str | torch.device | None = None, *, threads: int | None = None) -> DeviceInfo:
    """Describe `device` (default: default_device(), with :func:`unseen_gpu_warning` printed to stderr when that is
    the CPU on a machine whose GPU torch cannot see). `threads` is the CPU thread count to record (default:
    torch.get_num_threads()); it is ignored for a CUDA device. An unavailable device is a ValueError."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    if device is None:
        dev = default_device()
        # The one place the default device is chosen: say once, on stderr, when that is the CPU by accident.
        warning = unseen_gpu_warning() if dev.type == "cpu" and not os.environ.get(DEVICE_ENV) else None
        if warning:
            print(warning, file=sys.stderr)
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device {device!r} is not a device torch knows; available: "
                             f"{', '.join(_available())}") from e
    if dev.type == "cpu":
        return _describe_cpu(threads if threads is not None else torch.get_num_threads())
    if dev.type != "cuda":
        raise ValueError(f"device {str(dev)!r} is not supported: circtune measures on CUDA and the CPU; "
                         f"available: {', '.join(_available())}")
    if not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"device {str(dev)!r} is not available: torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}, {build}); available: {', '.join(_available())}")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(f"device {str(dev)!r} is not available: {torch.cuda.device_count()} CUDA device(s) "
                         f"visible; available: {', '.join(_available())}")
    return _describe_cuda(index)


# --- CUDA -----------------------------------------------------------------------------------------------------


def _describe_cuda(index: int) -> DeviceInfo:
    p = torch.cuda.get_device_properties(index)
    props: dict[str, Any] = {
        "total_memory_mb": int(p.total_memory) // 2**20,  # MiB
        "sm_count": int(p.multi_processor_count),
        "compute_capability": f"{p.major}.{p.minor}",
        "max_sm_clock_mhz": None, "max_mem_clock_mhz": None, "sm_clock_mhz": None, "mem_clock_mhz": None,
        "power_limit_w": None, "driver_version": None, "cuda_version": torch.version.cuda,
    }
    props.update(_nvml_properties(index, p))
    return _make("cuda", str(p.name), index, props)


def _pci_bus_id(p: Any) -> str | None:
    # Newer torch builds expose the PCI location; NVML accepts "domain:bus:device.function" in hex.
    bus, dev, domain = (getattr(p, a, None) for a in ("pci_bus_id", "pci_device_id", "pci_domain_id"))
    if bus is None or dev is None:
        return None
    return f"{int(domain or 0):08X}:{int(bus):02X}:{int(dev):02X}.0"


def _nvml_handle(nvml: Any, index: int, p: Any) -> tuple[Any, str]:
    """The NVML handle of torch's device `index`. Torch numbers devices after CUDA_VISIBLE_DEVICES (and in
    CUDA_DEVICE_ORDER), NVML numbers all of them by PCI bus, so match on the PCI bus id or UUID first."""
    bus = _pci_bus_id(p)
    if bus:
        try:
            return nvml.nvmlDeviceGetHandleByPciBusId(bus), f"pci_bus_id {bus}"
        except nvml.NVMLError:
            pass
    uuid = str(getattr(p, "uuid", "") or "")
    if uuid:
        for candidate in (uuid, f"GPU-{uuid}", f"MIG-{uuid}"):
            try:
                return nvml.nvmlDeviceGetHandleByUUID(candidate), f"uuid {candidate}"
            except nvml.NVMLError:
                pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").replace(" ", "").split(",")
    nvml_index = int(visible[index]) if index < len(visible) and visible[index].isdigit() else index
    return nvml.nvmlDeviceGetHandleByIndex(nvml_index), f"index {nvml_index} (unverified)"


def _nvml_properties(index: int, p: Any) -> dict[str, Any]:
    """Clocks, power limit and driver version from NVML; {"nvml": "unavailable: <reason>"} when it cannot
    answer. Never raises: a description without NVML is still worth having."""
    try:
        import pynvml as nvml
    except ImportError as e:
        return {"nvml": f"unavailable: pynvml not installed ({e})"}
    try:
        nvml.nvmlInit()
    except Exception as e:  # NVMLError, or OSError/AttributeError from a broken library: all mean "no NVML"
        return {"nvml": f"unavailable: nvmlInit failed: {type(e).__name__}: {e}"}
    try:
        handle, match = _nvml_handle(nvml, index, p)
        out: dict[str, Any] = {"nvml": "ok", "nvml_match": match}
        errors = []
        queries = {
            "max_sm_clock_mhz": lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_SM),
            "max_mem_clock_mhz": lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_MEM),
            "sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
            "power_limit_w": lambda: round(nvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000, 1),  # mW -> W
            "driver_version": lambda: _text(nvml.nvmlSystemGetDriverVersion()),
        }
        for key, query in queries.items():
            try:
                out[key] = query()
            except Exception as e:  # one query unsupported (MIG slices, some boards) leaves the others useful
                errors.append(f"{key}: {e}")
        if errors:
            out["nvml_errors"] = errors
        return out
    except Exception as e:
        return {"nvml": f"unavailable: {type(e).__name__}: {e}"}
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_ONLY_MEMORY = {"h100": "80gb", "h200": "141gb"}  # models sold in one memory size (SXM)


def _gpu_label(name: str) -> str:
    # "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA A100-SXM4-80GB" -> "a100-80gb", "NVIDIA H100 PCIe" -> "h100-pcie".
    tokens = [t for t in re.split(r"[^a-z0-9]+", name.lower()) if t]
    tokens = [t for t in tokens if t not in {"nvidia", "geforce", "tesla", "quadro", "gpu", "generation"}
              and not re.fullmatch(r"sxm\d*|hbm\d*e?|gddr\d*x?", t)]
    if tokens and tokens[0] in _ONLY_MEMORY:  # the memory size says nothing when a model comes in one size
        tokens = [t for t in tokens if t != _ONLY_MEMORY[tokens[0]]]
    return "-".join(tokens)[:40].strip("-") or "gpu"


# --- CPU ------------------------------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _parse_cpuinfo(text: str) -> tuple[str | None, int | None]:
    """(model name, physical cores) from /proc/cpuinfo text; None for what it does not say (e.g. on ARM)."""
    model, cores = None, set()
    for block in text.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        model = model or fields.get("model name")
        if "physical id" in fields and "core id" in fields:
            cores.add((fields["physical id"], fields["core id"]))
    return model, (len(cores) or None)


def _total_memory_mb() -> int | None:
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", _read(_MEMINFO), re.MULTILINE)
    if m:
        return int(m.group(1)) // 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (AttributeError, ValueError, OSError):
        return None


def _describe_cpu(threads: int) -> DeviceInfo:
    model, physical = _parse_cpuinfo(_read(_CPUINFO))
    model = model or platform.processor() or platform.machine() or "unknown cpu"
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    props = {"cpu_model": model, "physical_cores": physical or os.cpu_count(), "logical_cpus": logical,
             "threads": threads, "total_memory_mb": _total_memory_mb(), "machine": platform.machine()}
    return _make("cpu", model, None, props)


def _cpu_slug(model: str) -> str:
    # "Intel(R) Xeon(R) Platinum 8480+ @ 2.00GHz" -> "intel-xeon-platinum-8480"; "AMD EPYC" -> "amd-epyc".
    s = model.lower().split("@")[0]
    s = re.sub(r"\((r|tm)\)|\b(processor|cpu|\d+-core)\b", " ", s)
    return re.sub(r"[^a-z0-9]+", "-", s)[:32].strip("-") or "unknown"
