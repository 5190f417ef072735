"""Shared test helpers: the device and backends under test, awkward layouts, and DESIGN.md's rule.

Correctness rule: a result passes when its max error against the float64 reference is at most twice
the error of plain PyTorch run in the same dtype, plus a small floor scaled by the output's magnitude.
"""

from __future__ import annotations

import os

import torch

from fastvit_kernels import backends
from fastvit_kernels.bench.accuracy import tolerance  # the one statement of DESIGN.md's rule

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"

# Every backend that serves this device; Triton on the CPU runs in the interpreter (slow: small cases).
BACKENDS = list(backends.DEFAULT_ORDER[DEVICE.type]) + (["triton"] if INTERPRETED else [])

LOW_PRECISION = (torch.float16, torch.bfloat16)
# bf16 tl.dot is wrong in the interpreter, and the C++ CPU kernels are the only float64 path.
DTYPES = {"triton": [torch.float32, torch.float16] + ([torch.bfloat16] if not INTERPRETED else []),
          "cuda": [torch.float32, torch.float16, torch.bfloat16, torch.float64],
          "cpu": [torch.float32, torch.float16, torch.bfloat16, torch.float64],
          "reference": [torch.float32, torch.float16, torch.bfloat16, torch.float64]}

LAYOUTS = ("nchw", "channels_last", "strided", "strided_cl")
CHANNELS_LAST_LAYOUTS = ("channels_last", "strided_cl")


def make_input(shape, dtype, layout="nchw", device=DEVICE, requires_grad=False):
    """Random N(0, 1) input (never zeros) in one of the memory layouts a model hands us."""
    N, C, H, W = shape
    if layout == "nchw":
        x = torch.randn(shape, device=device)
    elif layout == "channels_last":
        x = torch.randn(shape, device=device).to(memory_format=torch.channels_last)
    elif layout == "strided":  # a non-contiguous NCHW view: every other column
        x = torch.randn(N, C, H, 2 * W, device=device)[..., ::2]
    elif layout == "strided_cl":  # the same of a channels_last tensor: channels innermost, not dense
        x = torch.randn(N, H, 2 * W, C, device=device).permute(0, 3, 1, 2)[..., ::2]
    else:
        raise ValueError(layout)
    x = x.to(dtype)
    return x.requires_grad_() if requires_grad else x


def assert_close(out, ref64, ref_same_dtype, what=""):
    """DESIGN.md: err(out) <= 2 * err(PyTorch in out's dtype) + floor, errors against float64."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or overflowed elements)"
    err = (out.double() - ref64).abs().max().item()
    base = (ref_same_dtype.double() - ref64).abs().max().item()
    limit = tolerance(base, ref64, out.dtype)
    assert err <= limit, f"{what}: max error {err:.3g} > {limit:.3g} (2 * {base:.3g} + floor)"


def cpu_vector_width(monkeypatch, width: str) -> None:
    """Run the cpu kernels that have an AVX-512 variant at ``width`` ("32-byte": AVX2, every x86-64 CPU;
    "64-byte": AVX-512), or skip where this CPU cannot (no extension, or no AVX-512)."""
    import pytest

    ext = backends.extension()
    if ext is None:
        pytest.skip("the cpu backend needs the C++ extension")
    monkeypatch.setenv("FASTVIT_KERNELS_CPU_AVX512", "1" if width == "64-byte" else "0")
    if ext.cpu_has_avx512() != (width == "64-byte"):
        pytest.skip("this CPU has no AVX-512: the cpu kernels run 32-byte vectors only")
