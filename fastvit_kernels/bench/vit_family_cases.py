"""Benchmark entries for the ViT family (vit-pytorch's classes against ours) and head-mixing attention.

Registered into :data:`fastvit_kernels.bench.cases.REGISTRY` on import (cases.py imports this module
last). Model configurations are the small (DeiT-Tiny-like, or vit-pytorch README) sizes that a CPU
benchmark can afford at 224 px; a model class missing from either package is left out.
"""

from __future__ import annotations

import importlib
from typing import Callable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import fastvit_kernels
from .cases import Benchmark, Case, _batches, model_flops, register

# name -> (vit-pytorch module, class, constructor kwargs, input [C, H, W])
_TINY = dict(image_size=224, patch_size=16, num_classes=1000, dim=192, depth=12, heads=3, mlp_dim=768)
VIT_FAMILY_BENCHMARKS = {
    "vitp_vit": ("vit", "ViT", _TINY, (3, 224, 224)),
    "vitp_deepvit": ("deepvit", "DeepViT", _TINY, (3, 224, 224)),
    "vitp_distillable_vit": ("distill", "DistillableViT", _TINY, (3, 224, 224)),
    "vitp_cait": ("cait", "CaiT", dict(_TINY, depth=12, cls_depth=2, heads=4, dim_head=48), (3, 224, 224)),
    "vitp_t2t": ("t2t", "T2TViT", dict(image_size=224, num_classes=1000, dim=192, depth=12, heads=3, mlp_dim=768),
                 (3, 224, 224)),
    "vitp_crossvit": ("cross_vit", "CrossViT", dict(image_size=256, num_classes=1000, depth=4, sm_dim=192,
                                                    sm_patch_size=16, sm_enc_depth=1, sm_enc_heads=8,
                                                    sm_enc_mlp_dim=2048, lg_dim=384, lg_patch_size=64,
                                                    lg_enc_depth=4, lg_enc_heads=8, lg_enc_mlp_dim=2048,
                                                    cross_attn_depth=2, cross_attn_heads=8), (3, 256, 256)),
    "vitp_pit": ("pit", "PiT", dict(image_size=224, patch_size=14, dim=256, num_classes=1000, depth=(3, 3, 3),
                                    heads=16, mlp_dim=2048), (3, 224, 224)),
    "vitp_cvt": ("cvt", "CvT", dict(num_classes=1000), (3, 224, 224)),
    "vitp_levit": ("levit", "LeViT", dict(image_size=224, num_classes=1000, stages=3, dim=(256, 384, 512),
                                          depth=4, heads=(4, 6, 8), mlp_mult=2), (3, 224, 224)),
    "vitp_mobilevit": ("mobile_vit", "MobileViT", dict(image_size=(256, 256), dims=[96, 120, 144],
                                                       channels=[16, 32, 48, 48, 64, 64, 80, 80, 96, 96, 384],
                                                       num_classes=1000), (3, 256, 256)),
}
MODEL_BATCHES = {"cpu": (8,), "cuda": (8, 64)}
MODEL_WARMUP, MODEL_REPEATS = 1, 5


def _classes(module: str, name: str):
    """(vit-pytorch's class, ours), or None when either is missing."""
    try:
        theirs = getattr(importlib.import_module(f"vit_pytorch.{module}"), name)
    except (ImportError, AttributeError):
        theirs = None  # vit-pytorch is a test/bench dependency: without it the entry still lists
    ours = getattr(importlib.import_module("fastvit_kernels.models.vit_family"), name, None)
    return (theirs, ours) if ours is not None else None


def _randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial LayerNorm/BatchNorm affine and statistics, and non-zero biases: the inits' 1/0 would
    hide a wrong fold or a dropped bias from the error check."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def _vit_family_benchmark(name: str, module: str, cls: str, kwargs: dict, input_size) -> Benchmark:
    def cases(quick: bool, device: Optional[torch.device] = None) -> List[Case]:
        batches = _batches(MODEL_BATCHES, device)
        C, H, W = input_size
        return [Case(name, f"{batch}x{C}x{H}x{W}", {"model": name, "batch": batch, "input_size": list(input_size)})
                for batch in (batches[:1] if quick else batches)]

    def build_module(case: Case) -> nn.Module:
        theirs, _ = _classes(module, cls)
        if theirs is None:
            raise RuntimeError(f"{name}: vit-pytorch is not installed (pip install vit-pytorch)")
        torch.manual_seed(0)
        return _randomize_norms(theirs(**kwargs)).eval()

    def make_input(case: Case, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.randn(case.params["batch"], *case.params["input_size"], device=device).to(dtype)

    def fuse(reference: nn.Module) -> nn.Module:
        _, ours = _classes(module, cls)
        model = ours(**kwargs)
        model.load_state_dict(reference.state_dict())
        p = next(reference.parameters())
        return model.to(device=p.device, dtype=p.dtype).eval()

    return Benchmark(name=name, summary=f"vit-pytorch {cls} vs fastvit_kernels.models.vit_family.{cls}",
                     cases=cases, build_module=build_module, make_input=make_input, fuse=fuse,
                     min_bytes=lambda case, itemsize: None, flops=model_flops(build_module), in_quick_run=False,
                     warmup=MODEL_WARMUP, repeats=MODEL_REPEATS, kind="model")


for _name, (_module, _cls, _kwargs, _input_size) in VIT_FAMILY_BENCHMARKS.items():
    if _classes(_module, _cls) is not None:
        register(_vit_family_benchmark(_name, _module, _cls, _kwargs, _input_size))


# --------------------------------------------------------------------------------------------------
# head_mixing_attention: DeepViT's re-attention and CaiT's talking heads, eager = vit-pytorch's
# einsum form on the packed qkv projection (the [B, heads, N, N] map written out three times).
# --------------------------------------------------------------------------------------------------

# (name, heads, tokens, head dim, mode): the ViT-Tiny-sized layers of the model entries above.
HEAD_MIXING_SHAPES = (("DeepViT re-attention", 3, 197, 64, "reattention"),
                      ("CaiT talking heads", 4, 197, 48, "talking_heads"))
HEAD_MIXING_BATCHES = {"cpu": (1, 8), "cuda": (8, 64)}


def _head_mixing_cases(quick: bool, device: Optional[torch.device] = None) -> List[Case]:
    cases = [Case("head_mixing_attention", f"{name} {batch}x{n} h{heads} d{d}",
                  {"batch": batch, "tokens": n, "num_heads": heads, "head_dim": d, "mode": mode})
             for batch in _batches(HEAD_MIXING_BATCHES, device) for name, heads, n, d, mode in HEAD_MIXING_SHAPES]
    return cases[:1] if quick else cases


class EagerHeadMixing(nn.Module):
    """vit-pytorch's re-attention (DeepViT) or talking heads (CaiT) on ``[B, N, 3 * heads * d]``."""

    def __init__(self, heads: int, head_dim: int, mode: str):
        super().__init__()
        self.heads, self.scale, self.mode = heads, head_dim ** -0.5, mode
        self.pre_mix = nn.Parameter(torch.randn(heads, heads)) if mode == "talking_heads" else None
        self.post_mix = nn.Parameter(torch.randn(heads, heads))
        self.norm = nn.LayerNorm(heads) if mode == "reattention" else None
        if self.norm is not None:
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)
                self.norm.bias.normal_(0.0, 0.2)

    def split(self, qkv: Tensor):
        return [t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1)]

    def forward(self, qkv: Tensor) -> Tensor:
        q, k, v = self.split(qkv)
        s = (q @ k.transpose(-1, -2)) * self.scale
        if self.pre_mix is not None:
            s = torch.einsum("bhij,hg->bgij", s, self.pre_mix)
        p = torch.einsum("bhij,hg->bgij", s.softmax(dim=-1), self.post_mix)
        if self.norm is not None:
            p = self.norm(p.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return (p @ v).transpose(1, 2).flatten(2)


class FusedHeadMixing(nn.Module):
    def __init__(self, module: EagerHeadMixing):
        super().__init__()
        self.m = module

    def forward(self, qkv: Tensor) -> Tensor:
        m = self.m
        q, k, v = m.split(qkv)
        norm = m.norm
        return fastvit_kernels.head_mixing_attention(
            q, k, v, m.scale, m.pre_mix, m.post_mix, norm.weight if norm is not None else None,
            norm.bias if norm is not None else None, norm.eps if norm is not None else 1e-5)


def _head_mixing_input(case: Case, dtype: torch.dtype, device: torch.device) -> Tensor:
    p = case.params
    return torch.randn(p["batch"], p["tokens"], 3 * p["num_heads"] * p["head_dim"], device=device).to(dtype)


def _head_mixing_flops(case: Case) -> int:
    p = case.params
    n, h = p["tokens"], p["num_heads"]
    mixes = 2 if p["mode"] == "talking_heads" else 1
    return p["batch"] * (4 * h * n * n * p["head_dim"] + mixes * 2 * h * h * n * n)


register(Benchmark(
    name="head_mixing_attention",
    summary="re-attention (DeepViT) and talking heads (CaiT) on the packed qkv; eager = vit-pytorch's einsums",
    cases=_head_mixing_cases,
    build_module=lambda case: EagerHeadMixing(case.params["num_heads"], case.params["head_dim"],
                                              case.params["mode"]).eval(),
    make_input=_head_mixing_input,
    fuse=FusedHeadMixing,
    min_bytes=lambda case, itemsize: 4 * case.params["batch"] * case.params["tokens"] * case.params["num_heads"]
    * case.params["head_dim"] * itemsize,  # qkv read once, the output written once
    flops=_head_mixing_flops,
    in_quick_run=False,
))
