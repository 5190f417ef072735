"""What is benchmarked: a registry of ops (later: models), each with its cases.

An entry says how to build the eager module a user has today, its inputs, its fused replacement and
the minimum work (bytes, FLOPs) of one case. The runner does the rest the same way for every entry
(eager, ``torch.compile`` of eager, the fused module per backend, errors against float64), so a new
op or model is one more ``register(Benchmark(...))``, not a new code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import fastvit_kernels
from fastvit_kernels.modules.conv_bn_act import fold_batchnorm
from fastvit_kernels.ops.dwconv_bn_act import output_size


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration. ``label`` is unique within its op; ``params`` goes to the JSON."""

    op: str
    label: str
    params: Mapping[str, object] = field(compare=False, hash=False)


@dataclass(frozen=True)
class Benchmark:
    """How to benchmark one op or model.

    build_module(case): the eager ``nn.Module`` users run today, float32 on the CPU, in eval mode, with
        random non-trivial parameters and buffers (the runner moves and casts copies of it).
    make_input(case, dtype, device): one random input in the case's memory layout.
    fuse(module): our fused module built from (and sharing parameters with) ``module``.
    min_bytes(case, itemsize): bytes that must move at least (inputs read once, outputs written
        once, weights), for GB/s; None when not meaningful (whole models).
    flops(case): useful floating-point operations of one call, for GFLOP/s; None when unknown.
    baselines: extra eager variants worth comparing, name -> (module -> callable), built once per
        case outside the timed region.
    """

    name: str
    summary: str
    cases: Callable[[bool], List[Case]]  # quick -> cases
    build_module: Callable[[Case], nn.Module]
    make_input: Callable[[Case, torch.dtype, torch.device], Tensor]
    fuse: Callable[[nn.Module], nn.Module]
    min_bytes: Callable[[Case, int], Optional[int]]
    flops: Callable[[Case], Optional[int]]
    baselines: Mapping[str, Callable[[nn.Module], Callable[[Tensor], Tensor]]] = field(default_factory=dict)


REGISTRY: Dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    if benchmark.name in REGISTRY:
        raise ValueError(f"register: a benchmark named {benchmark.name!r} is already registered")
    REGISTRY[benchmark.name] = benchmark
    return benchmark


# --------------------------------------------------------------------------------------------------
# dwconv_bn_act: depthwise Conv2d -> BatchNorm2d -> SiLU, as in MobileNetV2 inverted residuals and
# MobileViT's MV2 blocks.
# --------------------------------------------------------------------------------------------------

# (N, C, H, W): an early expanded MV2 block at 256x256 input, and a late one (MobileNetV2's 96*6=576
# expansion at 14x14).
DWCONV_SHAPES = ((8, 128, 64, 64), (8, 576, 14, 14))
DWCONV_STRIDES = (1, 2)
DWCONV_LAYOUTS = ("channels_last", "nchw")


def _dwconv_cases(quick: bool) -> List[Case]:
    # Quick keeps every shape and stride but one layout: channels_last, the layout the fused kernel
    # is meant for (MobileViT keeps tokens channels-last).
    layouts = DWCONV_LAYOUTS[:1] if quick else DWCONV_LAYOUTS
    cases = []
    for layout in layouts:
        for shape in DWCONV_SHAPES:
            for stride in DWCONV_STRIDES:
                params = {"shape": list(shape), "kernel_size": 3, "stride": stride, "layout": layout,
                          "act": "silu"}
                label = f"{'x'.join(map(str, shape))} k3 s{stride} {layout}"
                cases.append(Case("dwconv_bn_act", label, params))
    return cases


def _dwconv_module(case: Case) -> nn.Module:
    C, K, stride = case.params["shape"][1], case.params["kernel_size"], case.params["stride"]
    module = nn.Sequential(nn.Conv2d(C, C, K, stride, K // 2, groups=C, bias=False), nn.BatchNorm2d(C),
                           nn.SiLU())
    bn = module[1]
    with torch.no_grad():
        # Non-trivial statistics and affine (the defaults 0/1 would make folding a no-op).
        bn.running_mean.normal_(0.0, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.2)
    return module.eval()


def _dwconv_input(case: Case, dtype: torch.dtype, device: torch.device) -> Tensor:
    x = torch.randn(case.params["shape"], device=device).to(dtype)
    return x.to(memory_format=torch.channels_last) if case.params["layout"] == "channels_last" else x


def _dwconv_output_hw(case: Case):
    _, _, H, W = case.params["shape"]
    K, stride = case.params["kernel_size"], case.params["stride"]
    return output_size(H, K, stride), output_size(W, K, stride)


def _dwconv_min_bytes(case: Case, itemsize: int) -> int:
    N, C, H, W = case.params["shape"]
    OH, OW = _dwconv_output_hw(case)
    K = case.params["kernel_size"]
    # input once + output once + folded weight [C, K, K] and bias [C]
    return (N * C * H * W + N * C * OH * OW + C * K * K + C) * itemsize


def _dwconv_flops(case: Case) -> int:
    N, C, _, _ = case.params["shape"]
    OH, OW = _dwconv_output_hw(case)
    K = case.params["kernel_size"]
    return 2 * K * K * N * C * OH * OW  # one multiply-add per tap; BN and SiLU epilogue not counted


def _folded_eager(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """Eager with BatchNorm folded into the conv: one ``F.conv2d`` with folded weight and bias, then
    the activation; what a careful user can do without our kernels."""
    conv, bn, act = module
    with torch.no_grad():
        weight, bias = fold_batchnorm(conv, bn)
    weight, bias = weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)

    def eager_folded(x: Tensor) -> Tensor:
        return act(F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups))

    return eager_folded


register(Benchmark(
    name="dwconv_bn_act",
    summary="depthwise Conv2d -> BatchNorm2d -> SiLU (eval), MobileNetV2/MobileViT shapes",
    cases=_dwconv_cases,
    build_module=_dwconv_module,
    make_input=_dwconv_input,
    fuse=fastvit_kernels.FusedConvBNAct.from_module,
    min_bytes=_dwconv_min_bytes,
    flops=_dwconv_flops,
    baselines={"eager-folded": _folded_eager},
))
