"""``python -m fastvit_kernels.info``: versions, and which backends loaded (and why the others did not)."""

from __future__ import annotations

import os
import platform

import torch

from . import __version__, backends
from .ops import implementations


def collect() -> dict:
    ext = backends.extension()
    triton_version = None
    if backends.load_error("triton") is None:
        import triton

        triton_version = triton.__version__
    cuda_device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "fastvit_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch.version.cuda": torch.version.cuda,
        "triton": triton_version,
        "TRITON_INTERPRET": backends.triton_interpreting(),
        "cuda device": cuda_device,
        "extension built with CUDA": bool(ext and ext.has_cuda()),
        # bias_attention's and patch_attention's CPU kernels in 64-byte vectors (csrc/cpu/simd.h); None
        # without the extension
        "cpu kernels use AVX-512": bool(ext.cpu_has_avx512()) if ext is not None else None,
        # float32 inference Linears on oneDNN instead of addmm (memory.onednn_gemm)
        "cpu Linears on oneDNN": _onednn_gemm(),
        "requested backend": os.environ.get(backends.ENV_VAR) or "automatic",
        "backends": {name: backends.load_error(name) or "available" for name in backends.BACKENDS},
        "ops": implementations(),
        "head-dim limits": head_dim_limits(),
    }


def _onednn_gemm():
    from . import memory

    try:
        return memory.onednn_gemm()
    except ValueError as error:  # a bad FASTVIT_KERNELS_CPU_GEMM: say so instead of failing the report
        return str(error)


def head_dim_limits() -> dict:
    """``{op: {backend: limit}}`` for the ops whose kernels refuse some head dims."""
    import importlib

    limits = importlib.import_module(f"{__package__}.ops.patch_attention").HEAD_DIM_LIMITS
    return {op: dict(limits) for op in ("patch_attention", "attention")}


def main() -> None:
    info = collect()
    for key, value in info.items():
        if key not in ("backends", "ops", "head-dim limits"):
            print(f"{key:>26}: {value}")
    print("backends (default order: cuda tensors", " > ".join(backends.DEFAULT_ORDER["cuda"]),
          "| cpu tensors", " > ".join(backends.DEFAULT_ORDER["cpu"]) + ")")
    for name, status in info["backends"].items():
        print(f"{name:>26}: {status}")
    print("ops (backends implemented; a backend serves an op when it loaded and supports the input)")
    for op, names in info["ops"].items():
        print(f"{op:>26}: {', '.join(names)}")
    print("head-dim limits (larger head dims run on the next backend that serves them)")
    for op, limits in info["head-dim limits"].items():
        print(f"{op:>26}: " + "; ".join(f"{b} {limit}" for b, limit in limits.items()))


if __name__ == "__main__":
    main()
