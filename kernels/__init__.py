"""Triton kernels of drople_fast.

This package must import without Triton: nothing here imports ``triton``.
The kernel modules (e.g. :mod:`drople_fast.kernels.iwtd_triton`) are loaded
lazily by :mod:`drople_fast.ops.backends` only once it has checked that Triton and
a device it can run on (CUDA, or the CPU interpreter via ``TRITON_INTERPRET=1``,
which must be set before Triton is first imported) are available.
"""
