"""Diagnostics for what the first GPU run (H200, 2026-11-29) left unexplained, printed for the runbook
(probes.txt). Each probe prints one line per finding; none of them fails the run.

1. Toolchain: the compiler that built the extension against the one that built torch, and which C++
   runtime the extension loads (an exception thrown across two runtimes can crash instead of raise).
2. Errors from the extension: its argument checks (TORCH_CHECK) called with a bad ``out``, on CPU and
   CUDA tensors, each in its own process: on that H200 every such call on CUDA tensors crashed the
   process (SIGSEGV) where a RuntimeError was expected; a bad aten call on CUDA is the control.
3. bias_attention in float64 on CUDA was ~4e-8 off the float64 reference (float32-sized), while the
   same math on the CPU is exact. With one key the output must be v itself: which side is off?

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
        print("extension links:", [line.strip() for line in ldd.splitlines() if "stdc++" in line or "gcc_s" in line])
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


def bias_attention_float64() -> None:
    import fastvit_kernels as fk

    torch.manual_seed(0)
    for resolution in ((1, 1), (7, 7)):
        Nk = resolution[0] * resolution[1]
        q, k, v = (torch.randn(2, 2, Nk, d, device="cuda", dtype=torch.float64) for d in (16, 16, 32))
        table = torch.randn(2, Nk, device="cuda", dtype=torch.float64)
        outs = {}
        for device in ("cuda", "cpu"):
            args = [t.to(device) for t in (q, k, v, table)]
            for backend in ("cuda", "reference") if device == "cuda" else ("cpu",):
                with fk.use_backend(backend):
                    outs[f"{backend} on {device}"] = fk.bias_attention(*args, resolution, 1).cpu()
        qc, kc, vc, tc = (t.cpu() for t in (q, k, v, table))
        scores = (qc @ kc.transpose(-1, -2)) * 16 ** -0.5 + tc[:, fk.ops.bias_attention.bias_index(resolution)]
        outs["eager on cpu"] = (scores.softmax(-1) @ vc).transpose(1, 2).reshape(2, Nk, -1)
        scores = (q @ k.transpose(-1, -2)) * 16 ** -0.5 + table[:, fk.ops.bias_attention.bias_index(resolution, 1, "cuda")]
        outs["eager on cuda"] = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, Nk, -1).cpu()
        base = outs["eager on cpu"]
        line = ", ".join(f"{name} {(out - base).abs().max().item():.3g}" for name, out in outs.items())
        print(f"bias_attention float64 {resolution}: max |x - eager on cpu|: {line}")
        if Nk == 1:
            v_merged = v.transpose(1, 2).reshape(2, 1, -1).cpu()
            print("  one key, so the output is v:", ", ".join(
                f"{name} {(out - v_merged).abs().max().item():.3g}" for name, out in outs.items()))
    a = torch.randn(64, 64, device="cuda", dtype=torch.float64)
    print("float64 matmul on cuda, a @ I - a:", (a @ torch.eye(64, device="cuda", dtype=torch.float64) - a).abs().max().item())


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu probes: no CUDA GPU", file=sys.stderr)
        return 2
    for probe in (toolchain, errors, bias_attention_float64):
        print(f"== {probe.__name__}", flush=True)
        try:
            probe()
        except Exception as e:  # noqa: BLE001 - one broken probe must not hide the others
            print(f"{probe.__name__} failed: {type(e).__name__}: {e}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
