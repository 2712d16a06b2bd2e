"""Circulant-family adapter layers, their backends and the shared math."""

import importlib

from ._backends import Backend, available_backends, get_backend, register_backend
from ._circulant import TRANSFORMS, block_circulant_matrix, block_circulant_product, compute_dtype
from ._layer import CirculantLinear, check_block_size, valid_block_sizes
from .c3a import C3A_INITS, C3ALinear, c3a_num_params
from .cdvft import CDVFTLinear, cdvft_num_params

# Registers the "triton" backend when Triton is installed (after ._backends exists; imports neither Triton nor the
# kernels themselves, so that `import circtune` works without Triton).
importlib.import_module("circtune.kernels.triton_backend")

__all__ = [
    "C3ALinear",
    "C3A_INITS",
    "CDVFTLinear",
    "Backend",
    "CirculantLinear",
    "TRANSFORMS",
    "available_backends",
    "block_circulant_matrix",
    "block_circulant_product",
    "c3a_num_params",
    "cdvft_num_params",
    "check_block_size",
    "compute_dtype",
    "get_backend",
    "register_backend",
    "valid_block_sizes",
]
