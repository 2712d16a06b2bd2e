"""circtune: hardware-aware profiler and autotuner for circulant-family adapters (C3A, CDVFT)."""

from importlib.metadata import PackageNotFoundError, version

from .adapters import C3ALinear, CDVFTLinear, CirculantLinear, available_backends

try:
    __version__ = version("circtune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "C3ALinear",
    "CDVFTLinear",
    "CirculantLinear",
    "__version__",
    "available_backends",
]
