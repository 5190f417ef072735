"""The correctness rule every benchmarked row is held to (DESIGN.md, "Correctness rule").

A result passes when its max abs error against the float64 reference is at most twice the error of
eager PyTorch run in the same dtype, plus a small absolute floor scaled by the output's magnitude::

    err(out) <= 2 * err(eager in out.dtype) + FLOOR[dtype] * max(1, max|ref64|)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# About a few ulps of each dtype at magnitude 1; the unit tests (tests/helpers.py) use these too.
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}

RULE = "max|out - ref64| <= 2 * max|eager_same_dtype - ref64| + floor[dtype] * max(1, max|ref64|)"


def max_abs_error(out: Tensor, reference64: Tensor) -> float:
    """Max abs difference to the float64 reference; ``inf`` for a wrong shape or non-finite output
    (an unwritten or overflowed element must fail, not be skipped by ``max``)."""
    if tuple(out.shape) != tuple(reference64.shape):
        return math.inf
    diff = (out.detach().to(torch.float64) - reference64).abs()
    if not torch.isfinite(diff).all():
        return math.inf
    return diff.max().item()


def tolerance(eager_error: float, reference64: Tensor, dtype: torch.dtype) -> float:
    """The largest error a row in ``dtype`` may have and still pass."""
    magnitude = max(1.0, reference64.abs().max().item())
    return 2.0 * eager_error + FLOOR[dtype] * magnitude
