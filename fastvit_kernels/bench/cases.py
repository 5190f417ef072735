"""What is benchmarked: a registry of ops and whole models, each with its cases.

An entry says how to build the eager module a user has today, its inputs, its fused replacement and
the minimum work (bytes, FLOPs) of one case. The runner does the rest the same way for every entry
(eager, ``torch.compile`` of eager, the fused module per backend, errors against float64), so a new
op or model is one more ``register(Benchmark(...))``, not a new code path.
"""

from __future__ import annotations

import copy
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
    in_quick_run: False leaves the entry out of a ``--quick`` run that names no ``--op`` (whole
        models: seconds per call and minutes of ``torch.compile``); naming it still runs it.
    warmup, repeats: at most this many untimed / timed calls per variant unless the command line
        says otherwise (None: the runner's default); for entries whose calls take seconds.

    kind: "op" (one fused op against its eager module) or "model" (a whole network); the pytest
        suite and the GPU runbook pick entries by it.

    A case whose params have ``batch`` also gets images/s (batch / median time) in its rows.
    """

    name: str
    summary: str
    cases: Callable[[bool, torch.device], List[Case]]  # (quick, device) -> cases
    build_module: Callable[[Case], nn.Module]
    make_input: Callable[[Case, torch.dtype, torch.device], Tensor]
    fuse: Callable[[nn.Module], nn.Module]
    min_bytes: Callable[[Case, int], Optional[int]]
    flops: Callable[[Case], Optional[int]]
    baselines: Mapping[str, Callable[[nn.Module], Callable[[Tensor], Tensor]]] = field(default_factory=dict)
    in_quick_run: bool = True
    warmup: Optional[int] = None
    repeats: Optional[int] = None
    kind: str = "op"


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


def _dwconv_cases(quick: bool, device: Optional[torch.device] = None) -> List[Case]:
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


# --------------------------------------------------------------------------------------------------
# patch_attention: MobileViT's attention over patch-offset sequences. Eager is what timm's
# MobileVitBlock does around its Attention: unfold the tokens into [B*P, N, C] sequences, attention
# (timm's non-fused path: matmul, softmax, matmul), fold back to image order.
# --------------------------------------------------------------------------------------------------

PATCH = (2, 2)
ATTENTION_HEADS = 4
# MobileViT at 256x256 input: (map side, transformer dim) of the blocks ending stages 3, 4 and 5.
PATCH_ATTENTION_SHAPES = {
    "S": ((32, 144), (16, 192), (8, 240)),
    "XS": ((32, 96), (16, 120), (8, 144)),
    "XXS": ((32, 64), (16, 80), (8, 96)),
}
PATCH_ATTENTION_BATCHES = {"cpu": (1, 8), "cuda": (1, 8, 64, 256)}


def _batches(table: Mapping[str, tuple], device: Optional[torch.device]) -> tuple:
    return table["cuda" if device is not None and torch.device(device).type == "cuda" else "cpu"]


def _patch_attention_cases(quick: bool, device: Optional[torch.device] = None) -> List[Case]:
    cases = []
    for batch in _batches(PATCH_ATTENTION_BATCHES, device):
        for variant, shapes in PATCH_ATTENTION_SHAPES.items():
            for side, channels in shapes:
                params = {"model": f"mobilevit_{variant.lower()}", "batch": batch, "height": side,
                          "width": side, "channels": channels, "num_heads": ATTENTION_HEADS,
                          "patch_size": list(PATCH)}
                label = f"{variant} {batch}x{side}x{side}x{channels} h{ATTENTION_HEADS} p{PATCH[0]}x{PATCH[1]}"
                cases.append(Case("patch_attention", label, params))
    # Quick: MobileViT-S's first (largest) attention at batch 1.
    return cases[:1] if quick else cases


def timm_unfold(t: Tensor, patch_size) -> Tensor:
    """Tokens in image order ``[B, H, W, X]`` -> ``[B * ph * pw, N, X]`` in the order of timm's
    ``MobileVitBlock`` unfold (sequence ``b * P + py * pw + px``, token ``(y // ph) * (W // pw) +
    x // pw``). timm does it on NCHW in two copies; from channels-last it takes one."""
    B, H, W, X = t.shape
    ph, pw = patch_size
    t = t.reshape(B, H // ph, ph, W // pw, pw, X).permute(0, 2, 4, 1, 3, 5)
    return t.reshape(B * ph * pw, (H // ph) * (W // pw), X)


def timm_fold(s: Tensor, image_shape, patch_size) -> Tensor:
    """The inverse of :func:`timm_unfold` (timm's fold, into image order): ``[B*P, N, X]`` ->
    ``[B, H, W, X]``, one copy."""
    B, H, W = image_shape
    ph, pw = patch_size
    s = s.reshape(B, ph, pw, H // ph, W // pw, s.shape[-1]).permute(0, 3, 1, 4, 2, 5)
    return s.reshape(B, H, W, s.shape[-1])


class UnfoldAttentionFold(nn.Module):
    """Eager: timm's unfold, the core of timm's ``Attention`` (its non-fused path, or
    ``F.scaled_dot_product_attention`` with ``sdpa=True``), timm's fold. ``qkv [B, H, W, 3*C]`` ->
    ``[B, H, W, C]``."""

    def __init__(self, num_heads: int, patch_size=PATCH, scale: Optional[float] = None, sdpa: bool = False):
        super().__init__()
        self.num_heads, self.patch_size, self.scale, self.sdpa = num_heads, tuple(patch_size), scale, sdpa

    def forward(self, qkv: Tensor) -> Tensor:
        B, H, W, C3 = qkv.shape
        x = timm_unfold(qkv, self.patch_size)  # [B*P, N, 3*C]
        S, N, _ = x.shape
        head_dim = C3 // (3 * self.num_heads)
        scale = head_dim ** -0.5 if self.scale is None else self.scale
        q, k, v = x.reshape(S, N, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v, scale=scale)
        else:  # timm Attention.forward with fused_attn False
            attn = (q * scale) @ k.transpose(-2, -1)
            o = attn.softmax(dim=-1) @ v
        o = o.transpose(1, 2).reshape(S, N, C3 // 3)  # timm's head merge, before proj
        return timm_fold(o, (B, H, W), self.patch_size)


class FusedPatchAttention(nn.Module):
    """Ours: ``fastvit_kernels.patch_attention`` on the image-ordered qkv, no unfold or fold copy."""

    def __init__(self, num_heads: int, patch_size=PATCH, scale: Optional[float] = None):
        super().__init__()
        self.num_heads, self.patch_size, self.scale = num_heads, tuple(patch_size), scale

    @classmethod
    def from_module(cls, module: UnfoldAttentionFold) -> "FusedPatchAttention":
        return cls(module.num_heads, module.patch_size, module.scale)

    def forward(self, qkv: Tensor) -> Tensor:
        return fastvit_kernels.patch_attention(qkv, self.num_heads, self.patch_size, self.scale)


def _patch_attention_module(case: Case) -> nn.Module:
    p = case.params
    head_dim = p["channels"] // p["num_heads"]
    return UnfoldAttentionFold(p["num_heads"], p["patch_size"], head_dim ** -0.5).eval()


def _patch_attention_input(case: Case, dtype: torch.dtype, device: torch.device) -> Tensor:
    p = case.params
    return torch.randn(p["batch"], p["height"], p["width"], 3 * p["channels"], device=device).to(dtype)


def _patch_attention_min_bytes(case: Case, itemsize: int) -> int:
    p = case.params
    tokens = p["batch"] * p["height"] * p["width"]
    return (tokens * 3 * p["channels"] + tokens * p["channels"]) * itemsize  # qkv read, out written


def _patch_attention_flops(case: Case) -> int:
    p = case.params
    ph, pw = p["patch_size"]
    sequences, tokens = ph * pw, p["height"] * p["width"] // (ph * pw)
    head_dim = p["channels"] // p["num_heads"]
    # QK^T and PV: N * N * head_dim multiply-adds each, per sequence and head; softmax not counted.
    return 4 * p["batch"] * sequences * p["num_heads"] * tokens * tokens * head_dim


def _sdpa_unfold(module: UnfoldAttentionFold) -> Callable[[Tensor], Tensor]:
    """The same unfold and fold around ``F.scaled_dot_product_attention`` (timm's default path)."""
    return UnfoldAttentionFold(module.num_heads, module.patch_size, module.scale, sdpa=True)


register(Benchmark(
    name="patch_attention",
    summary="MobileViT patch-grouped attention: qkv [B, H, W, 3C] image order -> [B, H, W, C], patch 2x2, "
            "4 heads; eager = timm's unfold -> attention -> fold",
    cases=_patch_attention_cases,
    build_module=_patch_attention_module,
    make_input=_patch_attention_input,
    fuse=FusedPatchAttention.from_module,
    min_bytes=_patch_attention_min_bytes,
    flops=_patch_attention_flops,
    baselines={"sdpa+unfold": _sdpa_unfold},
))


# --------------------------------------------------------------------------------------------------
# xca_attention: XCiT / EdgeNeXt cross-covariance attention on the packed qkv. Eager is the core of
# timm's CrossCovarianceAttn (normalize, q k^T * temperature, softmax, @ v, head merge).
# --------------------------------------------------------------------------------------------------

# (name, tokens, channels, heads): EdgeNeXt-S's SDTA blocks at 256x256 and XCiT-T12 at 224x224 (p16).
XCA_SHAPES = (("EdgeNeXt-S s2", 1024, 96, 8), ("EdgeNeXt-S s3", 256, 160, 8), ("EdgeNeXt-S s4", 64, 304, 8),
              ("XCiT-T12", 196, 192, 4))
XCA_BATCHES = {"cpu": (1, 8), "cuda": (1, 8, 64, 256)}


def _xca_cases(quick: bool, device: Optional[torch.device] = None) -> List[Case]:
    cases = [Case("xca_attention", f"{name} {batch}x{tokens}x{channels} h{heads}",
                  {"batch": batch, "tokens": tokens, "channels": channels, "num_heads": heads})
             for batch in _batches(XCA_BATCHES, device) for name, tokens, channels, heads in XCA_SHAPES]
    return cases[:1] if quick else cases


class EagerXCA(nn.Module):
    """The core of timm's ``CrossCovarianceAttn.forward`` on ``qkv [B, N, 3*C]`` -> ``[B, N, C]``."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.empty(num_heads, 1, 1).uniform_(0.5, 2.0))

    def forward(self, qkv: Tensor) -> Tensor:
        B, N, C3 = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 4, 1).unbind(0)
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
        return (attn.softmax(dim=-1) @ v).permute(0, 3, 1, 2).reshape(B, N, C3 // 3)


class FusedXCACore(nn.Module):
    """Ours: ``fastvit_kernels.xca_attention`` with the eager module's temperature."""

    def __init__(self, module: EagerXCA):
        super().__init__()
        self.num_heads, self.temperature = module.num_heads, module.temperature

    def forward(self, qkv: Tensor) -> Tensor:
        return fastvit_kernels.xca_attention(qkv, self.num_heads, self.temperature)


def _xca_flops(case: Case) -> int:
    p = case.params
    d = p["channels"] // p["num_heads"]
    return 4 * p["batch"] * p["num_heads"] * p["tokens"] * d * d  # q k^T and attn v multiply-adds


register(Benchmark(
    name="xca_attention",
    summary="XCA channel attention (EdgeNeXt SDTA, XCiT): qkv [B, N, 3C] -> [B, N, C]; eager = timm's "
            "CrossCovarianceAttn core",
    cases=_xca_cases,
    build_module=lambda case: EagerXCA(case.params["num_heads"]).eval(),
    make_input=lambda case, dtype, device: torch.randn(
        case.params["batch"], case.params["tokens"], 3 * case.params["channels"], device=device).to(dtype),
    fuse=FusedXCACore,
    min_bytes=lambda case, itemsize: 4 * case.params["batch"] * case.params["tokens"] * case.params["channels"]
    * itemsize,  # qkv read (3C), out written (C)
    flops=_xca_flops,
    in_quick_run=False,
))


# --------------------------------------------------------------------------------------------------
# bias_attention: LeViT attention with the learned relative-position bias. Eager is the core of
# timm's levit.Attention in eval (the bias gathered once and cached), Hardswish before proj.
# --------------------------------------------------------------------------------------------------

# (name, resolution, heads, key_dim, val_dim): stage-1 attention of LeViT-128S and LeViT-256 at 224.
BIAS_ATTENTION_SHAPES = (("LeViT-128S s1", 14, 4, 16, 32), ("LeViT-256 s1", 14, 4, 32, 64),
                         ("LeViT-256 s2", 7, 6, 32, 64))
BIAS_ATTENTION_BATCHES = {"cpu": (1, 8), "cuda": (1, 8, 64, 256)}


def _bias_attention_cases(quick: bool, device: Optional[torch.device] = None) -> List[Case]:
    cases = [Case("bias_attention", f"{name} {batch}x{res * res} h{heads} dk{dk} dv{dv}",
                  {"batch": batch, "resolution": res, "num_heads": heads, "key_dim": dk, "val_dim": dv})
             for batch in _batches(BIAS_ATTENTION_BATCHES, device) for name, res, heads, dk, dv in BIAS_ATTENTION_SHAPES]
    return cases[:1] if quick else cases


class EagerLevitAttention(nn.Module):
    """timm ``levit.Attention`` core on its packed projection ``[B, N, heads * (2 dk + dv)]``:
    scores + the cached gathered bias, softmax, @ v, head merge, Hardswish."""

    def __init__(self, resolution: int, num_heads: int, key_dim: int, val_dim: int, sdpa: bool = False):
        super().__init__()
        self.resolution, self.num_heads, self.key_dim, self.val_dim, self.sdpa = (
            resolution, num_heads, key_dim, val_dim, sdpa)
        self.table = nn.Parameter(torch.randn(num_heads, resolution * resolution) * 0.5)
        y, x = torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij")
        y, x = y.flatten(), x.flatten()
        index = (y[:, None] - y[None, :]).abs() * resolution + (x[:, None] - x[None, :]).abs()
        self.register_buffer("bias", self.table.detach()[:, index].clone(), persistent=False)  # timm's cache

    def forward(self, qkv: Tensor) -> Tensor:
        B, N, _ = qkv.shape
        q, k, v = qkv.view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        bias = self.bias.to(qkv.dtype)
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.key_dim ** -0.5)
        else:
            o = ((q @ k.transpose(-2, -1)) * self.key_dim ** -0.5 + bias).softmax(dim=-1) @ v
        return F.hardswish(o.transpose(1, 2).reshape(B, N, -1))


class FusedLevitAttentionCore(nn.Module):
    """Ours: ``fastvit_kernels.bias_attention`` on views of the packed projection, bias by index."""

    def __init__(self, module: EagerLevitAttention):
        super().__init__()
        self.m = module

    def forward(self, qkv: Tensor) -> Tensor:
        m = self.m
        B, N, _ = qkv.shape
        q, k, v = qkv.view(B, N, m.num_heads, -1).split([m.key_dim, m.key_dim, m.val_dim], dim=3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return fastvit_kernels.bias_attention(q, k, v, m.table, (m.resolution, m.resolution), 1,
                                              m.key_dim ** -0.5, "hardswish")


def _bias_attention_input(case: Case, dtype: torch.dtype, device: torch.device) -> Tensor:
    p = case.params
    width = p["num_heads"] * (2 * p["key_dim"] + p["val_dim"])
    return torch.randn(p["batch"], p["resolution"] ** 2, width, device=device).to(dtype)


def _bias_attention_min_bytes(case: Case, itemsize: int) -> int:
    p = case.params
    tokens = p["batch"] * p["resolution"] ** 2
    return tokens * p["num_heads"] * (2 * p["key_dim"] + 2 * p["val_dim"]) * itemsize  # qkv read, out written


def _bias_attention_flops(case: Case) -> int:
    p = case.params
    n = p["resolution"] ** 2
    return 2 * p["batch"] * p["num_heads"] * n * n * (p["key_dim"] + p["val_dim"])


def _sdpa_bias(module: EagerLevitAttention) -> Callable[[Tensor], Tensor]:
    """SDPA with the materialised float bias as attn_mask."""
    sdpa = copy.deepcopy(module)
    sdpa.sdpa = True
    return sdpa


register(Benchmark(
    name="bias_attention",
    summary="LeViT attention + relative-position bias + Hardswish on the packed qkv projection; eager = "
            "timm's levit.Attention core with its cached bias",
    cases=_bias_attention_cases,
    build_module=lambda case: EagerLevitAttention(case.params["resolution"], case.params["num_heads"],
                                                  case.params["key_dim"], case.params["val_dim"]).eval(),
    make_input=_bias_attention_input,
    fuse=FusedLevitAttentionCore,
    min_bytes=_bias_attention_min_bytes,
    flops=_bias_attention_flops,
    baselines={"sdpa+bias": _sdpa_bias},
    in_quick_run=False,
))


# --------------------------------------------------------------------------------------------------
# fused_mlp: the end of an EdgeNeXt block, x + gamma * fc2(GELU(fc1(x))), on [B, H, W, C] tokens. Eager
# is timm's Mlp with the block's layer scale and residual; ours, the blocks' CPU inference path
# (Mlp.residual_forward: one kernel where memory.fused_mlp takes it, the layers one by one elsewhere).
# --------------------------------------------------------------------------------------------------

# (name, H, W, C): EdgeNeXt's stages at 256x256, the last under the kernel's row threshold at batch 8.
FUSED_MLP_SHAPES = (("EdgeNeXt-S s3", 16, 16, 160), ("EdgeNeXt-XXS s1", 64, 64, 24), ("EdgeNeXt-S s1", 64, 64, 48),
                    ("EdgeNeXt-S s2", 32, 32, 96), ("EdgeNeXt-B s3", 16, 16, 288), ("EdgeNeXt-S s4", 8, 8, 304))
FUSED_MLP_BATCHES = {"cpu": (8,), "cuda": (8,)}


def _fused_mlp_cases(quick: bool, device: Optional[torch.device] = None) -> List[Case]:
    cases = [Case("fused_mlp", f"{name} {batch}x{h}x{w}x{c}", {"batch": batch, "height": h, "width": w, "channels": c})
             for batch in _batches(FUSED_MLP_BATCHES, device) for name, h, w, c in FUSED_MLP_SHAPES]
    return cases[:1] if quick else cases


class EagerMlpBlock(nn.Module):
    """How timm's EdgeNeXt blocks end: ``x + gamma * Mlp(x)`` (GELU, hidden 4x), on ``[B, H, W, C]``."""

    def __init__(self, dim: int):
        super().__init__()
        from timm.layers import Mlp

        self.mlp = Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gamma * self.mlp(x)


class FusedMlpBlock(nn.Module):
    """Ours, sharing the eager block's parameters: the EdgeNeXt blocks' inference path."""

    def __init__(self, module: EagerMlpBlock):
        super().__init__()
        from fastvit_kernels.modules.edgenext import _share_mlp

        self.mlp, self.gamma = _share_mlp(module.mlp), module.gamma

    def forward(self, x: Tensor) -> Tensor:
        from fastvit_kernels.modules.patch_transformer import add_residual, scale_

        fused = self.mlp.residual_forward(x, self.gamma, x)
        return fused if fused is not None else add_residual(x, scale_(self.gamma, self.mlp(x)), 0.0, self.training)


def _fused_mlp_elements(case: Case) -> int:
    p = case.params
    return p["batch"] * p["height"] * p["width"] * p["channels"]


register(Benchmark(
    name="fused_mlp",
    summary="EdgeNeXt block MLP + layer scale + residual on [B, H, W, C] tokens (hidden 4C, GELU); eager = "
            "timm's Mlp, gamma and the add",
    cases=_fused_mlp_cases,
    build_module=lambda case: EagerMlpBlock(case.params["channels"]).eval(),
    make_input=lambda case, dtype, device: torch.randn(
        case.params["batch"], case.params["height"], case.params["width"], case.params["channels"],
        device=device).to(dtype),
    fuse=lambda module: FusedMlpBlock(module).eval(),
    # x read once, out written once, both weights read once
    min_bytes=lambda case, itemsize: (2 * _fused_mlp_elements(case) + 8 * case.params["channels"] ** 2) * itemsize,
    flops=lambda case: 16 * _fused_mlp_elements(case) * case.params["channels"],  # 2 GEMMs, C x 4C each
    in_quick_run=False,
))


# --------------------------------------------------------------------------------------------------
# linear: a float32 inference Linear on tokens. Eager is nn.Linear (addmm: MKL's sgemm on x86); ours,
# memory.run_linear, the path every module's Linear takes (oneDNN's inner product where
# memory.onednn_gemm() picks it, addmm into a cached buffer elsewhere).
# --------------------------------------------------------------------------------------------------

# (name, rows at batch 1, in, out): LeViT's and EdgeNeXt's layer shapes.
LINEAR_SHAPES = (("LeViT-128S s1 qkv", 196, 128, 256), ("LeViT-128S s1 mlp.ln2", 196, 256, 128),
                 ("LeViT-128S s2 mlp.ln1", 49, 256, 512), ("LeViT-128S s3 mlp.ln1", 16, 384, 768),
                 ("LeViT-256 s1 mlp.ln1", 196, 256, 512), ("EdgeNeXt-S s1 fc1", 4096, 48, 192))
LINEAR_BATCHES = {"cpu": (8,), "cuda": (8,)}


def _linear_cases(quick: bool, device: Optional[torch.device] = None) -> List[Case]:
    cases = [Case("linear", f"{name} {batch * rows}x{k}->{n}", {"rows": batch * rows, "in": k, "out": n})
             for batch in _batches(LINEAR_BATCHES, device) for name, rows, k, n in LINEAR_SHAPES]
    return cases[:1] if quick else cases


class InferenceLinear(nn.Module):
    """Ours, sharing the eager Linear's parameters: ``memory.run_linear``."""

    def __init__(self, module: nn.Linear):
        super().__init__()
        self.linear = module

    def forward(self, x: Tensor) -> Tensor:
        from fastvit_kernels import memory

        return memory.run_linear(self.linear, x)


def _random_linear(case: Case) -> nn.Linear:
    linear = nn.Linear(case.params["in"], case.params["out"]).eval()
    with torch.no_grad():
        linear.bias.normal_(0.0, 0.1)
    return linear


register(Benchmark(
    name="linear",
    summary="float32 inference Linear on [rows, in] tokens (LeViT / EdgeNeXt shapes); eager = nn.Linear",
    cases=_linear_cases,
    build_module=_random_linear,
    make_input=lambda case, dtype, device: torch.randn(case.params["rows"], case.params["in"], device=device).to(dtype),
    fuse=lambda module: InferenceLinear(module).eval(),
    min_bytes=lambda case, itemsize: (case.params["rows"] * (case.params["in"] + case.params["out"])
                                      + case.params["out"] * (case.params["in"] + 1)) * itemsize,
    flops=lambda case: 2 * case.params["rows"] * case.params["in"] * case.params["out"],
    in_quick_run=False,
))


# --------------------------------------------------------------------------------------------------
# Whole models: timm's model (eager) against ``fastvit_kernels.models.create_model`` of the same name
# with the same weights. A new model is one more row of MODEL_BENCHMARKS.
# --------------------------------------------------------------------------------------------------

# name -> (input [C, H, W], summary)
MODEL_BENCHMARKS = {
    "mobilevit_xxs": ((3, 256, 256), "MobileViT-XXS classifier, timm vs fastvit_kernels.models"),
    "mobilevit_xs": ((3, 256, 256), "MobileViT-XS classifier, timm vs fastvit_kernels.models"),
    "mobilevit_s": ((3, 256, 256), "MobileViT-S classifier, timm vs fastvit_kernels.models"),
    "edgenext_xx_small": ((3, 256, 256), "EdgeNeXt-XXS classifier, timm vs fastvit_kernels.models"),
    "edgenext_x_small": ((3, 256, 256), "EdgeNeXt-XS classifier, timm vs fastvit_kernels.models"),
    "edgenext_small": ((3, 256, 256), "EdgeNeXt-S classifier, timm vs fastvit_kernels.models"),
    "edgenext_base": ((3, 256, 256), "EdgeNeXt-B classifier, timm vs fastvit_kernels.models"),
    "levit_128s": ((3, 224, 224), "LeViT-128S classifier (distilled), timm vs fastvit_kernels.models"),
    "levit_128": ((3, 224, 224), "LeViT-128 classifier (distilled), timm vs fastvit_kernels.models"),
    "levit_192": ((3, 224, 224), "LeViT-192 classifier (distilled), timm vs fastvit_kernels.models"),
    "levit_256": ((3, 224, 224), "LeViT-256 classifier (distilled), timm vs fastvit_kernels.models"),
    "levit_384": ((3, 224, 224), "LeViT-384 classifier (distilled), timm vs fastvit_kernels.models"),
}
# The README's CPU goal is measured at batch 8 (2 threads).
MODEL_BATCHES = {"cpu": (8,), "cuda": (8, 64, 256)}
# A CPU call of a whole model takes up to a second: few calls per variant.
MODEL_WARMUP, MODEL_REPEATS = 1, 5


def model_case(name: str, batch: int, input_size) -> Case:
    C, H, W = input_size
    return Case(name, f"{batch}x{C}x{H}x{W}", {"model": name, "batch": batch, "input_size": list(input_size)})


def randomize_batchnorm_stats(model: nn.Module) -> nn.Module:
    """Random BatchNorm running statistics, so that folding them is not an identity (the init's 0/1
    would hide a wrong fold)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


def randomize_parameters(model: nn.Module) -> nn.Module:
    """Non-zero biases, attention biases and trained-like layer scales: timm's init zeroes biases
    (LeViT's attention biases too) and sets layer scales to 1e-6 (EdgeNeXt), which would leave whole
    branches out of the error check."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name:
                p.copy_(torch.rand(p.shape, generator=gen) * 0.15 + 0.05)
            elif name.endswith("bias") or name.endswith("attention_biases"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def model_flops(build_module: Callable[[Case], nn.Module]) -> Callable[[Case], int]:
    """``flops(case)`` for a model benchmark: the floating-point operations of the baseline model on
    the case's batch, as ``torch.utils.flop_counter`` counts them: the matrix products (convolutions,
    linears, attention's two products) at 2 per multiply-add; elementwise work is not counted.
    Counted once per model on one image on the CPU (the count is linear in the batch). LeViT-128S:
    609 M an image, the 305 M multiply-adds the LeViT paper lists as its FLOPs."""
    per_image: Dict[tuple, int] = {}

    def flops(case: Case) -> int:
        key = (case.params["model"], tuple(case.params["input_size"]))
        if key not in per_image:
            from torch.utils.flop_counter import FlopCounterMode

            module = build_module(case)
            with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                module(torch.zeros(1, *case.params["input_size"]))
            per_image[key] = counter.get_total_flops()
        return case.params["batch"] * per_image[key]

    return flops


def _model_benchmark(name: str, input_size, summary: str) -> Benchmark:
    def cases(quick: bool, device: Optional[torch.device] = None) -> List[Case]:
        batches = _batches(MODEL_BATCHES, device)
        return [model_case(name, batch, input_size) for batch in (batches[:1] if quick else batches)]

    def build_module(case: Case) -> nn.Module:
        import timm  # the baseline users run; only needed for the model benchmarks

        return randomize_parameters(randomize_batchnorm_stats(timm.create_model(name))).eval()

    def make_input(case: Case, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.randn(case.params["batch"], *case.params["input_size"], device=device).to(dtype)

    def fuse(module: nn.Module) -> nn.Module:
        from fastvit_kernels.models import create_model

        model = create_model(name)
        model.load_state_dict(module.state_dict())
        reference = next(module.parameters())
        return model.to(device=reference.device, dtype=reference.dtype).eval()

    return Benchmark(name=name, summary=summary, cases=cases, build_module=build_module, make_input=make_input,
                     fuse=fuse, min_bytes=lambda case, itemsize: None, flops=model_flops(build_module),
                     in_quick_run=False, warmup=MODEL_WARMUP, repeats=MODEL_REPEATS, kind="model")


for _name, (_input_size, _summary) in MODEL_BENCHMARKS.items():
    register(_model_benchmark(_name, _input_size, _summary))


# The ViT family (vit-pytorch) and head-mixing attention live in their own file; importing it registers them.
from . import vit_family_cases  # noqa: E402,F401
