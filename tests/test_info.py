"""The install and `python -m fastvit_kernels.info`: what loaded, and why the rest did not."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from fastvit_kernels import backends


def _nvcc_available() -> bool:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return os.path.exists(os.path.join(home, "bin", "nvcc")) or shutil.which("nvcc") is not None


def test_info_lists_versions_and_every_backend():
    out = subprocess.run([sys.executable, "-m", "fastvit_kernels.info"], capture_output=True, text=True,
                         check=True).stdout
    assert re.search(rf"torch: {re.escape(torch.__version__)}", out)
    for name in backends.BACKENDS:
        assert re.search(rf"^\s*{name}: (available|.+)$", out, re.M), out
    assert re.search(r"^\s*reference: available$", out, re.M)
    assert re.search(r"^\s*dwconv_bn_act: triton, cuda, cpu, reference$", out, re.M), out
    assert re.search(r"^\s*patch_attention: triton, cuda, cpu, reference$", out, re.M), out
    assert re.search(r"^\s*bias_attention: triton, cuda, cpu, reference$", out, re.M), out
    ext = backends.extension()
    avx512 = ext is not None and ext.cpu_has_avx512()
    assert re.search(rf"^\s*cpu kernels use AVX-512: {avx512 if ext is not None else None}$", out, re.M), out
    assert re.search(r"^\s*cpu Linears on oneDNN: (True|False)$", out, re.M), out


def test_cpu_extension_is_built_by_the_install():
    assert backends.load_error("cpu") is None


@pytest.mark.skipif(not (torch.version.cuda and _nvcc_available())
                    or os.environ.get("FASTVIT_KERNELS_BUILD_CUDA") == "0",
                    reason="needs nvcc and a CUDA build of torch at install time")
def test_extension_was_built_with_cuda_kernels():
    # The CUDA kernels cannot run here, but they must have compiled (and linked) with nvcc.
    assert backends.extension().has_cuda()


def test_cuda_backend_reason_on_a_machine_without_gpu():
    if torch.cuda.is_available():
        assert backends.load_error("cuda") is None
    else:
        assert "no CUDA device" in backends.load_error("cuda") or "without CUDA" in backends.load_error("cuda")
