"""Triton kernels and their launchers, one file per op (see DESIGN.md).

Nothing is imported here on purpose: importing this package must not require triton, so the
dispatch layer can report "triton missing" instead of failing at import time.
"""
