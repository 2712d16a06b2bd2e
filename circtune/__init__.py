"""circtune: hardware-aware profiler and autotuner for circulant-family adapters (C3A, CDVFT)."""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("circtune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# The public names are imported on first use (PEP 562): `circtune --help` and the CLI's argument checks then run
# without importing torch, which alone takes over a second.
_LAZY = {
    ".api": ("ProfileResult", "SearchResult", "profile", "search"),
    ".errors": ("OptionError", "UsageError"),
    ".options": ("ProfileOptions", "SearchOptions"),
    ".adapters": ("C3ALinear", "CDVFTLinear", "CirculantLinear", "available_backends", "c3a_num_params",
                  "cdvft_num_params"),
    ".adapters.inject": ("adapter_state_dict", "apply_adapter", "config_from_model", "load_adapter", "merge_adapter",
                         "save_adapter"),
    ".adapters.config": ("FORMAT", "AdapterConfig", "AdapterConfigError", "LayerConfig", "load_config"),
    ".peft_interop": ("export_peft", "import_peft", "to_peft_config"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

if TYPE_CHECKING:
    from .adapters import (
        C3ALinear,
        CDVFTLinear,
        CirculantLinear,
        available_backends,
        c3a_num_params,
        cdvft_num_params,
    )
    from .adapters.config import FORMAT, AdapterConfig, AdapterConfigError, LayerConfig, load_config
    from .adapters.inject import (
        adapter_state_dict,
        apply_adapter,
        config_from_model,
        load_adapter,
        merge_adapter,
        save_adapter,
    )
    from .api import ProfileResult, SearchResult, profile, search
    from .errors import OptionError, UsageError
    from .options import ProfileOptions, SearchOptions
    from .peft_interop import export_peft, import_peft, to_peft_config


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'circtune' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


__all__ = [
    "FORMAT",
    "AdapterConfig",
    "AdapterConfigError",
    "C3ALinear",
    "CDVFTLinear",
    "CirculantLinear",
    "LayerConfig",
    "OptionError",
    "ProfileOptions",
    "ProfileResult",
    "SearchOptions",
    "SearchResult",
    "UsageError",
    "__version__",
    "adapter_state_dict",
    "apply_adapter",
    "available_backends",
    "c3a_num_params",
    "cdvft_num_params",
    "config_from_model",
    "export_peft",
    "import_peft",
    "load_adapter",
    "load_config",
    "merge_adapter",
    "profile",
    "save_adapter",
    "search",
    "to_peft_config",
]
