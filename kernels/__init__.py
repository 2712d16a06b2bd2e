"""Triton kernels for the circulant adapters, installed as ``circtune.kernels`` (one file per operation).

Import as ``circtune.kernels``; this folder is mapped there by pyproject.toml, so no top-level ``kernels``
module is ever installed.
"""
