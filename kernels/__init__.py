"""Triton kernels for the circulant adapters, installed as ``circtune.kernels`` (one file per operation).

Import as ``circtune.kernels``; this folder is mapped there by pyproject.toml, so no top-level ``kernels``
module is ever installed.

* ``block_circulant_matmul``: ``a · (scale·C(w) + W0)ᵀ + b`` as one implicit GEMM (forward and input gradient);
* ``block_circulant_kernel_grad``: ``∂w`` as one implicit Hankel GEMM, split over tokens;
* ``block_circulant_linear``: torch custom ops over both, with autograd and FLOP formulas (what the ``triton``
  backend calls);
* ``triton_backend``: registers ``backend="triton"`` (imported by circtune.adapters; imports no Triton itself);
* ``_tuning``: tile configurations, argument checks and the autotune cache.
* ``_aot``: the ahead-of-time compile check for sm_90 and sm_80 (``python -m circtune.kernels._aot``); ``_aot_compile``
  holds one check and what runs in each of its worker processes.

Nothing here is imported by ``import circtune`` except ``triton_backend``: Triton stays optional.
"""
