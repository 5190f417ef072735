"""Builds the C++/CUDA extension fastvit_kernels._C (the package metadata is in pyproject.toml).

    pip install --no-build-isolation -e .        # the extension must match the installed torch

FASTVIT_KERNELS_BUILD_CUDA selects the CUDA kernels:
    auto (default)  build them when torch is a CUDA build and nvcc is found, else CPU only
    1               build them, and fail if that is impossible
    0               CPU kernels only
The C++ CPU kernels are always built. TORCH_CUDA_ARCH_LIST (default "8.0;9.0") picks the GPU
architectures; MAX_JOBS caps ninja's parallel jobs.
"""
import glob
import os
import sys

from setuptools import setup

# torch.utils.cpp_extension reads CUDA_HOME when it is imported; without it, it guesses from `which
# nvcc` and then /usr/local, where -lcudart does not resolve.
if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
# No GPU to detect at build time; two architectures keep the build short (one cubin each).
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    # setuptools wants paths relative to setup.py; sorted for reproducible builds.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_unavailable_reason():
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME)"
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return f"nvcc not found at {nvcc} (CUDA_HOME={cpp_extension.CUDA_HOME})"
    return None


def _build_cuda():
    mode = os.environ.get("FASTVIT_KERNELS_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "1", "0"):
        raise RuntimeError(f"FASTVIT_KERNELS_BUILD_CUDA must be auto, 1 or 0, got {mode!r}")
    if mode == "0":
        return False
    reason = _cuda_unavailable_reason()
    if reason is None:
        return True
    if mode == "1":
        raise RuntimeError(f"FASTVIT_KERNELS_BUILD_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    print(f"fastvit_kernels: building the CPU kernels only: {reason}", file=sys.stderr)
    return False


def _extension():
    with_cuda = _build_cuda()
    # -fopenmp: at::parallel_for is a header template whose OpenMP pragmas need it (without it, it
    # runs on one thread). The resulting libgomp.so.1 is the one torch already loaded.
    # -ffp-contract=fast: fuse multiply-adds where the target has FMA (the CUDA compiler does too).
    # -fno-trapping-math: we never read FP exception flags; without it g++ does not vectorize the
    # SiLU epilogue (see fast_exp in csrc/common.h). Neither flag reorders sums (no -ffast-math).
    # No -march=native: the wheel must run on any x86-64 CPU (csrc/cpu/ picks AVX2 at run time).
    # -g0 overrides Python's -g: debug info for torch's headers is a quarter of the C++ build time.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-trapping-math", "-g0"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    kwargs = dict(
        name="fastvit_kernels._C",
        sources=sources,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    if not with_cuda:
        return cpp_extension.CppExtension(**kwargs)
    kwargs["sources"] = sources + _sources("csrc/cuda/*.cu")
    kwargs["define_macros"] = [("WITH_CUDA", None)]
    # --threads: compile the architectures in parallel.
    kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo", "--threads=2"]
    return cpp_extension.CUDAExtension(**kwargs)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
