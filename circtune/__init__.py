"""circtune: hardware-aware profiler and autotuner for circulant-family adapters (C3A, CDVFT)."""

from importlib.metadata import PackageNotFoundError, version

from .adapters import (
    C3ALinear,
    CDVFTLinear,
    CirculantLinear,
    available_backends,
    c3a_num_params,
    cdvft_num_params,
)
from .adapters.inject import (
    adapter_state_dict,
    apply_adapter,
    config_from_model,
    load_adapter,
    merge_adapter,
    save_adapter,
)
from .config import FORMAT, AdapterConfig, AdapterConfigError, LayerConfig, load_config
from .peft_interop import export_peft, import_peft, to_peft_config

try:
    __version__ = version("circtune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "FORMAT",
    "AdapterConfig",
    "AdapterConfigError",
    "C3ALinear",
    "CDVFTLinear",
    "CirculantLinear",
    "LayerConfig",
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
    "save_adapter",
    "to_peft_config",
]
