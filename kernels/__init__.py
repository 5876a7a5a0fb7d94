"""Triton-language kernels for pagedserve.

Each kernel has a typed Python wrapper; the public wrappers are re-exported from
``pagedserve.kernels.ops`` (what the layers and attention backends call) and each has a pure-torch
reference (see ``pagedserve.kernels.reference``) that the tests compare against.

Importing this package does not import Triton; ``pagedserve.kernels.ops`` does.
"""
