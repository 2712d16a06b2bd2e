"""Circulant-family adapter layers, their backends and the shared math."""

from ._backends import Backend, available_backends, get_backend, register_backend
from ._circulant import TRANSFORMS, block_circulant_matrix, block_circulant_product, compute_dtype
from ._layer import CirculantLinear, check_block_size, valid_block_sizes
from .c3a import C3A_INITS, C3ALinear, c3a_num_params
from .cdvft import CDVFTLinear, cdvft_num_params


def _register_triton() -> None:
    """The "triton" backend, registered here when Triton is installed: its module imports neither Triton nor the
    kernels themselves, so that `import circtune` works without Triton."""
    from ..kernels.triton_backend import backend

    triton = backend()
    if triton is not None:
        register_backend(triton)


_register_triton()

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
