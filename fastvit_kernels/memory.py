"""CPU tensors from a caching allocator, and the inference-time Linear / LayerNorm / 1x1 conv / layout
copy that write into them.

glibc serves every block above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh pages
and unmaps it on free, so a large activation may pay a page fault per 4 KiB page when it is first
written. On the 2-core VM this package is developed on that is ~2 us per page (in a profile of
EdgeNeXt-XXS at batch 8, filling a fresh 9.6 MB MLP activation took 4.6 ms; the GEMM that computes it,
~2 ms). The extension keeps freed blocks and hands them out again (csrc/cpu_cache.h), as PyTorch's
CUDA caching allocator does on the GPU; the fused ops allocate their CPU outputs there, and the
modules' inference path runs Linear, LayerNorm and 1x1 convs into such buffers (``out=``). README,
"CPU memory".

Equivalent PyTorch: ``torch.empty``; ``F.linear``; ``F.layer_norm``; ``F.conv2d``; ``residual + gamma *
fc2(act(fc1(x)))`` (:func:`fused_mlp`). Idle blocks are kept
up to a limit (1 GiB, ``set_cpu_cache_limit``) and returned to the OS by ``empty_cpu_cache()``;
``FASTVIT_KERNELS_CPU_CACHE=0`` turns the cache off (plain ``torch.empty`` everywhere).
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import backends

ENV_VAR = "FASTVIT_KERNELS_CPU_CACHE"
# "onednn" or "mkl" (torch's own addmm) for float32 / bfloat16 Linears in CPU inference; unset or "auto":
# see onednn_gemm.
GEMM_ENV_VAR = "FASTVIT_KERNELS_CPU_GEMM"
# "0": never take fused_mlp, "1": wherever it applies; unset or "auto": where it applies and the
# Linears are not on oneDNN (on the AVX-512 EPYC, EdgeNeXt-XXS / -S at batch 8 ran 22.4 / 70.3 ms with
# oneDNN's Linears against 28.6 / 98.1 with the kernel's AVX2 tiles, README "CPU GEMMs: oneDNN").
FUSED_MLP_ENV_VAR = "FASTVIT_KERNELS_FUSED_MLP"

# Activations the fused MLP kernel computes, by activation_name, and its code for them (csrc/cpu/fused_mlp.cpp).
FUSED_MLP_ACTIVATIONS = {"none": 0, "gelu": 1, "hardswish": 2, "silu": 3}
# Where fused_mlp is taken: on the 2-core EPYC (2026-11-30, README "CPU inference: the fused
# transformer MLP") it ran 1.09-1.71x as fast as addmm + GELU + addmm + scale + add at 2048-32768 rows
# of 48-288 channels (EdgeNeXt stages 1-3 at batch 8); about even at ~1550 rows (0.83-1.13x, widths
# 128-320); 0.74-0.98x at 392-512 rows (widths 256-584), where each task's pass over the weights costs
# more than the cache-resident hidden layer saves.
FUSED_MLP_MIN_ROWS = 2048
FUSED_MLP_MAX_WIDTH = 320


class CpuCacheStats(NamedTuple):
    live_bytes: int  # held by tensors that came from the cache and are alive
    idle_bytes: int  # freed blocks kept for reuse
    limit_bytes: int  # idle blocks beyond this are returned to the OS


def _cache():
    """The extension when the cache is on, else None."""
    if os.environ.get(ENV_VAR, "1") == "0":
        return None
    return backends.extension()


def _plain_memory_wanted() -> bool:
    # torch.empty fills fresh memory with NaN in this mode, so reads of unwritten memory show up;
    # keep that debugging aid.
    return torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
          memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """``torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)``; real CPU tensors
    come from the cache (not while torch.compile traces or a fake/dispatch mode is active: those make
    their own tensors)."""
    # is_compiling first: _cache() may import the extension, which dynamo cannot trace.
    ext = _cache() if device.type == "cpu" and not torch.compiler.is_compiling() else None
    if ext is None or torch._C._len_torch_dispatch_stack() > 0 or not all(type(s) is int for s in shape):
        return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return _cached_empty(ext, shape, dtype, memory_format)


def cpu_cache_stats() -> CpuCacheStats:
    """Bytes in live tensors from the cache, bytes idle in it, and its idle limit (zeros without the
    extension)."""
    ext = backends.extension()
    return CpuCacheStats(*ext.cpu_cache_stats()) if ext is not None else CpuCacheStats(0, 0, 0)


def empty_cpu_cache() -> None:
    """Returns the idle blocks to the OS (tensors still alive keep theirs)."""
    ext = backends.extension()
    if ext is not None:
        ext.cpu_cache_release()


def set_cpu_cache_limit(limit_bytes: int) -> None:
    """Keep at most ``limit_bytes`` of idle blocks; 0 frees every block when its tensor dies."""
    if not isinstance(limit_bytes, int) or limit_bytes < 0:
        raise ValueError(f"set_cpu_cache_limit: limit_bytes must be an int >= 0, got {limit_bytes!r}")
    ext = backends.extension()
    if ext is not None:
        ext.cpu_cache_set_limit(limit_bytes)


# --------------------------------------------------------------------------------------------------
# Modules' inference path: Linear, LayerNorm, 1x1 convs and layout copies into cached buffers.
# --------------------------------------------------------------------------------------------------


def into_cache(x: Tensor, *params: Optional[Tensor]):
    """The extension (truthy) when a module may write its output into a cached buffer, else None:
    eager inference on plain CPU tensors of one dtype, no autocast (which would change the output
    dtype). Pass it to :func:`_cached_empty` for the buffer."""
    # is_compiling first: _cache() may import the extension, which dynamo cannot trace (a graph break
    # when the first call of a model is a compiled one).
    if x.device.type != "cpu" or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return None
    ext = _cache()
    if ext is None or any(p is not None and p.dtype != x.dtype for p in params):
        return None
    return ext if backends.direct_call(x, *params) else None


def _cached_empty(ext, shape: Sequence[int], dtype: torch.dtype,
                  memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """:func:`empty` for a CPU tensor after :func:`into_cache` returned ``ext``, without repeating its
    checks (they cost as much as the small GEMMs of a LeViT layer at batch 1)."""
    if _plain_memory_wanted():
        return torch.empty(shape, dtype=dtype, memory_format=memory_format)
    return ext.cpu_cached_empty(list(shape), dtype, memory_format)


def plain(module: nn.Module, kind: type) -> bool:
    """``module`` is exactly ``kind`` with no hooks: its forward is the functional call we run."""
    m = nn.modules.module
    return (type(module) is kind and not (module._forward_hooks or module._forward_pre_hooks)
            and not (m._global_forward_hooks or m._global_forward_pre_hooks))


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.lru_cache(maxsize=None)
def _onednn_gemm_auto() -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    # MKL's sgemm (torch's addmm) takes its AVX-512 kernels on Intel CPUs only; elsewhere it runs AVX2.
    # On an AVX-512 AMD EPYC (Zen 5, 2 threads; README "CPU GEMMs: oneDNN") oneDNN's float32 inner
    # product ran LeViT's and EdgeNeXt's shapes 1.3-2.0x as fast as addmm; limited to AVX2
    # (ONEDNN_MAX_CPU_ISA=AVX2) it was 0.82-1.07x, so AVX2 machines keep addmm. Intel is unmeasured.
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and _cpu_vendor() != "GenuineIntel"


# oneDNN's outputs come from malloc, not the CPU cache. glibc serves blocks of its largest mmap
# threshold (32 MiB on 64-bit) and more with fresh pages every time, and the page faults cost more than
# oneDNN saves: a 32768 x 64 -> 256 float32 Linear (32 MiB out) took 11.7 ms on oneDNN and 5.3 on addmm
# into a cached buffer (the AVX-512 EPYC, median of 30 calls), 8-13 MB outputs 1.85-2.27x faster on
# oneDNN. MobileViT-S at batch 8, in one process, alternating the limit: 201 ms with no oneDNN, 172 ms
# up to 8 MiB, 151 ms up to 31 MiB, 182 ms up to 32 MiB inclusive. Larger outputs stay on addmm; 31 MiB
# leaves room for the allocator's header and alignment under the 32.
ONEDNN_MAX_OUTPUT_BYTES = 31 << 20


@functools.lru_cache(maxsize=None)
def _onednn_dtypes() -> tuple:
    """Dtypes whose Linears take oneDNN where :func:`onednn_gemm` says so: float32, and bfloat16 where
    oneDNN has bfloat16 kernels for this CPU (LeViT-128S in bfloat16 at batch 8 on the AVX-512 EPYC:
    13.5 ms a forward against 15.5 with addmm, in one process, alternating)."""
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return (torch.float32, torch.bfloat16)
    return (torch.float32,)


def onednn_gemm() -> bool:
    """Whether float32 (and bfloat16) Linears in CPU inference run on oneDNN
    (``torch.ops.mkldnn._linear_pointwise``) instead of ``addmm``: where ``FASTVIT_KERNELS_CPU_GEMM``
    says so (``onednn`` / ``mkl``), else on AVX-512 CPUs that are not Intel's. False while
    torch.compile traces (the graph has F.linear; the checks below cannot be traced)."""
    if torch.compiler.is_compiling():
        return False
    choice = os.environ.get(GEMM_ENV_VAR, "auto")
    if choice == "auto":
        return _onednn_gemm_auto()
    if choice not in ("onednn", "mkl"):
        raise ValueError(f"{GEMM_ENV_VAR}={choice!r}; supported: auto, onednn, mkl")
    return choice == "onednn" and torch.backends.mkldnn.is_available()


# Activations linear() applies, by name: the functional form, the in-place one for a fresh buffer, and
# oneDNN's epilogue (attr, algorithm of torch.ops.mkldnn._linear_pointwise), which saves a pass over the
# output: EdgeNeXt-S stage 1's fc1 (32768 x 48 -> 192, the AVX-512 EPYC) 2.13 ms with GELU fused against
# 2.99 then gelu_, hardswish 1.55 against 1.88; 1-4% at 1568-8192 rows.
LINEAR_ACTIVATIONS = {
    "none": (lambda t: t, lambda t: t, ("none", "")),
    "gelu": (F.gelu, torch.ops.aten.gelu_, ("gelu", "none")),  # exact (erf) GELU
    "hardswish": (F.hardswish, lambda t: F.hardswish(t, inplace=True), ("hardswish", "")),
    "silu": (F.silu, lambda t: F.silu(t, inplace=True), ("swish", "")),
    "relu": (F.relu, torch.relu_, ("relu", "")),
}


def activation_name(act: nn.Module) -> Optional[str]:
    """The :data:`LINEAR_ACTIVATIONS` name of a plain activation module (exact GELU, Hardswish, SiLU,
    ReLU, Identity), else None."""
    kind = type(act)
    names = {nn.GELU: "gelu", nn.Hardswish: "hardswish", nn.SiLU: "silu", nn.ReLU: "relu", nn.Identity: "none"}
    if kind not in names or not plain(act, kind) or getattr(act, "approximate", "none") != "none":
        return None
    return names[kind]


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: str = "none") -> Tensor:
    """``act(F.linear(x, weight, bias))``, ``act`` named in :data:`LINEAR_ACTIVATIONS`; in CPU
    inference into a cached buffer (the activation in place), or for float32 and bfloat16 on oneDNN
    (:func:`onednn_gemm`; the activation in its epilogue), whose output is a plain new tensor (it has no
    ``out=``)."""
    function, in_place, (attr, algorithm) = LINEAR_ACTIVATIONS[activation]
    ext = into_cache(x, weight, bias)
    if not ext:
        return function(F.linear(x, weight, bias))
    rows, in_features, out_features = math.prod(x.shape[:-1]), x.shape[-1], weight.shape[0]
    out_bytes = rows * out_features * x.element_size()
    # oneDNN refuses 0 input features (addmm gives the bias then)
    if in_features and out_bytes <= ONEDNN_MAX_OUTPUT_BYTES and x.dtype in _onednn_dtypes() and onednn_gemm():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)
    out = _cached_empty(ext, x.shape[:-1] + weight.shape[:1], x.dtype)
    x2d, out2d = x.reshape(rows, in_features), out.view(rows, out_features)
    if bias is None:
        torch.mm(x2d, weight.t(), out=out2d)
    else:
        torch.addmm(bias, x2d, weight.t(), out=out2d)
    return in_place(out)


def layer_norm(x: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)``; in CPU inference, into a cached buffer."""
    ext = into_cache(x, weight, bias) if x.dtype in (torch.float32, torch.float64) else None
    if not ext:
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    out = _cached_empty(ext, x.shape, x.dtype)
    stats_shape = x.shape[:x.dim() - len(normalized_shape)] + (1,) * len(normalized_shape)
    mean, rstd = (torch.empty(stats_shape, dtype=x.dtype) for _ in range(2))
    torch.ops.aten.native_layer_norm.out(x, normalized_shape, weight, bias, eps, out0=out, out1=mean, out2=rstd)
    return out


def channels_last(x: Tensor) -> Tensor:
    """``x.contiguous(memory_format=torch.channels_last)``; in CPU inference the copy, when one is
    needed, goes into a cached buffer."""
    ext = None if x.is_contiguous(memory_format=torch.channels_last) else into_cache(x)
    if not ext:
        return x.contiguous(memory_format=torch.channels_last)
    return _cached_empty(ext, x.shape, x.dtype, torch.channels_last).copy_(x)


def pointwise_conv(conv: nn.Conv2d, x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   activation: str = "none") -> Tensor:
    """``act(conv._conv_forward(x, weight, bias))`` (the module's own weight and bias by default;
    ``act`` named in :data:`LINEAR_ACTIVATIONS`). A 1x1 conv (no padding, one group) of a channels_last
    CPU map in inference runs as a Linear over the pixels (:func:`linear`), the result channels_last;
    oneDNN's conv would return fresh memory. Elsewhere the activation runs in place on the conv's output
    unless autograd needs that."""
    weight = conv.weight if weight is None else weight
    bias = conv.bias if bias is None and weight is conv.weight else bias
    unpadded = isinstance(conv.padding, str) or not any(conv.padding)  # "same" pads a 1x1 conv by 0
    if (tuple(conv.kernel_size) != (1, 1) or conv.groups != 1 or not unpadded or x.dim() != 4
            or not x.is_contiguous(memory_format=torch.channels_last) or not into_cache(x, weight, bias)):
        y = conv._conv_forward(x, weight, bias)
        function, in_place, _ = LINEAR_ACTIVATIONS[activation]
        return function(y) if torch.is_grad_enabled() and y.requires_grad else in_place(y)
    sy, sx = conv.stride
    pixels = x[:, :, ::sy, ::sx].permute(0, 2, 3, 1)  # [B, H, W, C]
    return linear(pixels, weight.flatten(1), bias, activation).permute(0, 3, 1, 2)


def run_linear(module: nn.Module, x: Tensor, activation: str = "none") -> Tensor:
    """``act(module(x))``, ``act`` named in :data:`LINEAR_ACTIVATIONS`; a plain ``nn.Linear`` runs as
    :func:`linear`, the activation in it."""
    if not plain(module, nn.Linear):
        return LINEAR_ACTIVATIONS[activation][0](module(x))
    return linear(x, module.weight, module.bias, activation)


def run_layer_norm(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)``; a plain ``nn.LayerNorm`` runs as :func:`layer_norm`."""
    if not plain(module, nn.LayerNorm):
        return module(x)
    return layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def _fused_mlp_wanted() -> bool:
    choice = os.environ.get(FUSED_MLP_ENV_VAR, "auto")
    if choice not in ("auto", "0", "1"):
        raise ValueError(f"{FUSED_MLP_ENV_VAR}={choice!r}; supported: auto, 0, 1")
    return choice == "1" or (choice == "auto" and not onednn_gemm())


def fused_mlp(x: Tensor, fc1: nn.Module, act: nn.Module, fc2: nn.Module, gamma: Optional[Tensor] = None,
              residual: Optional[Tensor] = None, norm: Optional[nn.Module] = None) -> Optional[Tensor]:
    """``residual + gamma * fc2(act(fc1(norm(x))))`` (each of ``residual``, ``gamma``, ``norm`` when
    given; ``norm`` a LayerNorm over the channels) in one CPU kernel that keeps the hidden activation in
    cache (csrc/cpu/fused_mlp.cpp) after the LayerNorm, or None where it does not apply (checked before
    anything runs): wanted (``FASTVIT_KERNELS_FUSED_MLP``; by default where the Linears are not on
    oneDNN, whose AVX-512 products beat the kernel's AVX2 tiles), float32 eager inference of plain
    ``nn.Linear`` layers (``fc2`` back to ``x``'s width) with GELU (exact), SiLU, Hardswish or no
    activation, at least ``FUSED_MLP_MIN_ROWS`` rows of at most ``FUSED_MLP_MAX_WIDTH`` channels,
    ``residual`` shaped as the output with contiguous channels. The caller then runs the layers
    itself. Equivalent PyTorch::

        out = residual + gamma * fc2(act(fc1(norm(x))))
    """
    if x.dtype != torch.float32 or not _fused_mlp_wanted():
        return None
    code = FUSED_MLP_ACTIVATIONS.get(activation_name(act))
    if code is None:
        return None
    if not (plain(fc1, nn.Linear) and plain(fc2, nn.Linear)):
        return None
    width = x.shape[-1]
    if fc1.in_features != width or fc2.out_features != width or fc2.in_features != fc1.out_features:
        return None
    if width > FUSED_MLP_MAX_WIDTH or x.numel() < FUSED_MLP_MIN_ROWS * width:
        return None
    if norm is not None and not (plain(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (width,)):
        return None
    norm_params = (norm.weight, norm.bias) if norm is not None else ()
    ext = into_cache(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, gamma, residual, *norm_params)
    if not ext:
        return None
    if gamma is not None and gamma.shape != (width,):
        return None
    residual_rows = None
    if residual is not None:
        if residual.shape != x.shape or residual.stride(-1) != 1:
            return None
        try:
            residual_rows = residual.view(-1, width)
        except RuntimeError:  # rows that no [M, C] view can describe
            return None
    if norm is not None:
        x = run_layer_norm(norm, x)
    out = _cached_empty(ext, x.shape, x.dtype)
    ext.fused_mlp(x.reshape(-1, width), fc1.weight, fc1.bias, fc2.weight, fc2.bias, gamma, residual_rows, code,
                  out.view(-1, width))
    return out
