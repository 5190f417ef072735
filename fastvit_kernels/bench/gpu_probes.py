"""Diagnostics for what the first GPU run (H200, 2026-11-29) left unexplained, printed for the runbook
(probes.txt). Each probe prints one line per finding; none of them fails the run.

1. Toolchain: the compiler that built the extension against the one that built torch, and which C++
   runtime the extension loads (an exception thrown across two runtimes can crash instead of raise).
2. Errors from the extension: its argument checks (TORCH_CHECK) called with a bad ``out``, on CPU and
   CUDA tensors, each in its own process: on that H200 every such call on CUDA tensors crashed the
   process (SIGSEGV) where a RuntimeError was expected; a bad aten call on CUDA is the control.
3. bias_attention in float64 on CUDA was ~4e-8 off its float64 reference, in the cases with
   Hardswish only: PyTorch's CUDA hardswish multiplies by float32(1/6) (ActivationHardswishKernel.cu),
   also for float64. The tests now use the exact formula; this confirms the cause on the GPU.

    python -m fastvit_kernels.bench.gpu_probes
"""

from __future__ import annotations

import re
import subprocess
import sys

import torch

ERROR_PROBES = {
    "aten on cuda (control)": "torch.ones(2, device='cuda') @ torch.ones(3, device='cuda')",
    "extension on cpu": ("torch.ops.fastvit_kernels_C.xca_attention_out(torch.randn(1, 6, 120), 2, torch.ones(2), "
                         "1e-12, torch.empty(1, 6, 20))"),
    "extension on cuda": ("torch.ops.fastvit_kernels_C.xca_attention_out(torch.randn(1, 6, 120, device='cuda'), 2, "
                          "torch.ones(2, device='cuda'), 1e-12, torch.empty(1, 6, 20, device='cuda'))"),
    "extension on cpu after cuda init": ("torch.zeros(1, device='cuda'); torch.ops.fastvit_kernels_C.xca_attention_out("
                                         "torch.randn(1, 6, 120), 2, torch.ones(2), 1e-12, torch.empty(1, 6, 20))"),
}


def toolchain() -> None:
    config = torch.__config__.show()
    compiler = re.search(r"CXX_COMPILER=([^,]+)", config)
    print("torch built with:", "; ".join(line.strip(" -") for line in config.splitlines() if "GCC" in line),
          compiler.group(1) if compiler else "")
    print("torch._C._GLIBCXX_USE_CXX11_ABI:", torch._C._GLIBCXX_USE_CXX11_ABI)
    for cmd in (["g++", "--version"], ["/opt/gcc/bin/g++", "--version"]):
        try:
            first = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.splitlines()[:1]
            print(" ".join(cmd), "->", first)
        except (OSError, subprocess.TimeoutExpired) as e:
            print(" ".join(cmd), "->", e)
    try:
        import fastvit_kernels._C as ext

        ldd = subprocess.run(["ldd", ext.__file__], capture_output=True, text=True, timeout=20).stdout
        print("extension links:", [line.strip() for line in ldd.splitlines()
                                   if any(lib in line for lib in ("stdc++", "gcc_s", "gomp", "torch", "c10"))])
    except Exception as e:  # noqa: BLE001 - a diagnostic: report whatever went wrong
        print("extension:", type(e).__name__, e)


def errors() -> None:
    for name, statement in ERROR_PROBES.items():
        code = f"import torch, fastvit_kernels._C\ntry:\n    {statement}\nexcept RuntimeError as e:\n    " \
               f"print('RuntimeError:', str(e).splitlines()[0][:160])\nelse:\n    print('no error')"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        result = done.stdout.strip() or done.stderr.strip().splitlines()[-1:] or ""
        status = f"exit {done.returncode}" if done.returncode >= 0 else f"killed by signal {-done.returncode}"
        print(f"{name}: {status}: {result}")


def hardswish_float64() -> None:
    """The float64 bias_attention failures were PyTorch's, not ours: its CUDA hardswish multiplies by
    float32(1/6). Confirms it on this GPU: F.hardswish against the exact formula, float64, CUDA and CPU."""
    import torch.nn.functional as F

    x = torch.randn(1 << 20, dtype=torch.float64, device="cuda") * 4
    for device in ("cuda", "cpu"):
        t = x.to(device)
        exact = t * (t + 3).clamp(0, 6) / 6
        rel = ((F.hardswish(t) - exact).abs() / exact.abs().clamp_min(1e-300)).max().item()
        print(f"F.hardswish float64 on {device}: max relative difference from x*relu6(x+3)/6 = {rel:.3g}")


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu probes: no CUDA GPU", file=sys.stderr)
        return 2
    for probe in (toolchain, errors, hardswish_float64):
        print(f"== {probe.__name__}", flush=True)
        try:
            probe()
        except Exception as e:  # noqa: BLE001 - one broken probe must not hide the others
            print(f"{probe.__name__} failed: {type(e).__name__}: {e}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
