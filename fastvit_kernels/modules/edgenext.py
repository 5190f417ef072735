"""Drop-in fused EdgeNeXt blocks: timm's ``CrossCovarianceAttn``, ``SplitTransposeBlock`` (SDTA) and
``ConvBlock``, same constructor arguments and state_dict keys.

EdgeNeXt (Maaz et al., arXiv:2206.10589) alternates convolution blocks (depthwise k x k -> LayerNorm
-> MLP -> layer scale) with SDTA blocks (res2net-style depthwise convs over channel groups, a Fourier
positional encoding, XCA channel attention, MLP). timm runs both on NCHW maps, permuting to tokens
and back in every block; here maps are channels_last, so ``[B, H, W, C]`` tokens are a free view.
The depthwise convs run on ``dwconv_bn_act`` (bias, no activation), or, in ConvBlocks whose
residual is taken before the conv, on ``dwconv_layernorm`` together with the LayerNorm after them;
attention runs on ``xca_attention``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn
from torch import Tensor

from .. import memory
from ..memory import run_layer_norm, run_linear
from ..ops.dwconv_bn_act import dwconv_bn_act
from ..ops.dwconv_layernorm import dwconv_layernorm
from ..ops.xca_attention import xca_attention
from .conv_bn_act import Unsupported, dwconv_kernel_mismatch
from .patch_transformer import Mlp, add_residual, can_overwrite, scale_
from .sharing import take_mode


def depthwise_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(x)`` on the fused kernel when it can take the conv, else the conv itself."""
    if dwconv_kernel_mismatch(conv) is not None:
        return conv(x)
    return dwconv_bn_act(x, conv.weight, conv.bias, conv.stride[0], "none")


def _depthwise(dim: int, dim_out: int, kernel_size: int, stride: int, bias: bool, **dd) -> nn.Conv2d:
    # timm create_conv2d(depthwise=True): groups = in channels, symmetric padding
    return nn.Conv2d(dim, dim_out, kernel_size, stride, ((stride - 1) + (kernel_size - 1)) // 2, groups=dim,
                     bias=bias, **dd)


def _cat_channels_last(maps: List[Tensor]) -> Tensor:
    """``torch.cat(maps, 1)`` as a channels_last map (in inference, into a cached buffer)."""
    if not memory.into_cache(*maps):
        return torch.cat(maps, 1)
    B, _, H, W = maps[0].shape
    out = memory.empty((B, sum(m.shape[1] for m in maps), H, W), maps[0].dtype, maps[0].device, torch.channels_last)
    return torch.cat(maps, 1, out=out)


def _tokens(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` (any layout) -> ``[B, H, W, C]``; a free view of a channels_last map."""
    return memory.channels_last(x).permute(0, 2, 3, 1)


class FusedXCA(nn.Module):
    """timm's ``CrossCovarianceAttn`` (keys ``temperature``, ``qkv``, ``proj``) on ``xca_attention``.

    Equivalent PyTorch (timm's forward, x ``[B, N, C]``)::

        q, k, v = qkv(x).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 4, 1)
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * temperature
        out = proj((attn.softmax(-1) @ v).permute(0, 3, 1, 2).reshape(B, N, C))

    ``x`` may also be ``[B, H, W, C]`` (any leading dims): the tokens are flattened.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if attn_drop:
            raise ValueError(f"FusedXCA: attn_drop={attn_drop} is not supported (the fused attention has no "
                             f"dropout on the attention map); supported: 0")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1, **dd))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_module(cls, module: nn.Module) -> "FusedXCA":
        """Shares the parameters of a timm ``CrossCovarianceAttn`` (EdgeNeXt) or XCiT ``XCA``."""
        if getattr(module, "attn_drop", nn.Dropout(0.0)).p:
            raise Unsupported(f"attention dropout p={module.attn_drop.p} is not supported")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.num_heads = module.num_heads
        fused.temperature, fused.qkv, fused.proj = module.temperature, module.qkv, module.proj
        fused.proj_drop = module.proj_drop
        return take_mode(fused, module)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        qkv = run_linear(self.qkv, x).reshape(shape[0], -1, 3 * shape[-1])
        out = xca_attention(qkv, self.num_heads, self.temperature)
        return self.proj_drop(run_linear(self.proj, out.reshape(shape)))


class FourierPositionalEncoding(nn.Module):
    """timm's ``PositionalEncodingFourier`` (key ``token_projection``), as ``[1, H, W, dim]`` tokens.

    The sine/cosine features depend only on (H, W): they are computed once per resolution and
    device and kept (not in the state_dict); the 1x1 projection runs on each call, once for the
    batch (timm projects a copy per image), so weight updates are always seen.
    """

    def __init__(self, hidden_dim: int = 32, dim: int = 768, temperature: float = 10000.0, device=None, dtype=None):
        super().__init__()
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, kernel_size=1, device=device, dtype=dtype)
        self.hidden_dim, self.dim, self.temperature = hidden_dim, dim, temperature
        self._features: Dict[Tuple[int, int, torch.device], Tensor] = {}

    def features(self, H: int, W: int, device: torch.device) -> Tensor:
        """``[H, W, 2 * hidden_dim]`` float32: (sin, cos) interleaved of y, then of x."""
        key = (H, W, device)
        if key in self._features and not torch.compiler.is_compiling():
            return self._features[key]
        eps, scale = 1e-6, 2 * math.pi
        y = torch.arange(1, H + 1, dtype=torch.float32, device=device) / (H + eps) * scale
        x = torch.arange(1, W + 1, dtype=torch.float32, device=device) / (W + eps) * scale
        dim_t = torch.arange(self.hidden_dim, device=device).div(2, rounding_mode="floor").float()
        dim_t = self.temperature ** (2 * dim_t / self.hidden_dim)

        def embed(pos: Tensor) -> Tensor:  # [L] -> [L, hidden_dim]
            p = pos[:, None] / dim_t
            return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

        feats = torch.cat((embed(y)[:, None, :].expand(H, W, -1), embed(x)[None, :, :].expand(H, W, -1)), dim=2)
        if not torch.compiler.is_compiling():
            self._features[key] = feats
        return feats

    def forward(self, H: int, W: int) -> Tensor:
        weight = self.token_projection.weight
        feats = self.features(H, W, weight.device).to(weight.dtype)
        return memory.linear(feats, weight.flatten(1), self.token_projection.bias)[None]

    def _apply(self, fn, recurse=True):
        self._features.clear()
        return super()._apply(fn, recurse)


class FusedSDTABlock(nn.Module):
    """timm's ``SplitTransposeBlock`` (EdgeNeXt's SDTA encoder): same arguments and keys.

    Equivalent PyTorch: timm's forward (chunked depthwise convs, + positional encoding, XCA with
    layer scale, LayerNorm -> MLP with layer scale, residual), on a channels_last map.
    """

    def __init__(self, dim: int, num_scales: int = 1, num_heads: int = 8, expand_ratio: float = 4,
                 use_pos_emb: bool = True, conv_bias: bool = True, qkv_bias: bool = True,
                 ls_init_value: float = 1e-6, norm_layer: Type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
                 act_layer: Type[nn.Module] = nn.GELU, drop_path: float = 0.0, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        width = max(int(math.ceil(dim / num_scales)), int(math.floor(dim // num_scales)))
        self.width = width
        self.num_scales = max(1, num_scales - 1)
        self.convs = nn.ModuleList([_depthwise(width, width, 3, 1, conv_bias, **dd) for _ in range(self.num_scales)])
        self.pos_embd = FourierPositionalEncoding(dim=dim, **dd) if use_pos_emb else None
        self.norm_xca = norm_layer(dim, **dd)
        self.gamma_xca = nn.Parameter(ls_init_value * torch.ones(dim, **dd)) if ls_init_value > 0 else None
        self.xca = FusedXCA(dim, num_heads, qkv_bias, attn_drop, proj_drop, **dd)
        self.norm = norm_layer(dim, eps=1e-6, **dd)
        self.mlp = Mlp(dim, int(expand_ratio * dim), act_layer, **dd)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim, **dd)) if ls_init_value > 0 else None
        self.drop_path = drop_path

    @classmethod
    def from_module(cls, block: nn.Module) -> "FusedSDTABlock":
        """Shares the parameters of a timm ``SplitTransposeBlock``."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.width, fused.num_scales = block.width, block.num_scales
        fused.convs = block.convs
        fused.pos_embd = None
        if block.pos_embd is not None:
            src = block.pos_embd
            fused.pos_embd = FourierPositionalEncoding.__new__(FourierPositionalEncoding)
            nn.Module.__init__(fused.pos_embd)
            fused.pos_embd.token_projection = src.token_projection
            fused.pos_embd.hidden_dim, fused.pos_embd.dim = src.hidden_dim, src.dim
            fused.pos_embd.temperature, fused.pos_embd._features = src.temperature, {}
        fused.norm_xca, fused.gamma_xca = block.norm_xca, block.gamma_xca
        fused.xca = FusedXCA.from_module(block.xca)
        fused.norm, fused.mlp, fused.gamma = block.norm, _share_mlp(block.mlp), block.gamma
        fused.drop_path = float(getattr(block.drop_path, "drop_prob", 0.0))
        return take_mode(fused, block)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        chunks = x.chunk(len(self.convs) + 1, dim=1)
        outs, sp = [], chunks[0]
        for i, conv in enumerate(self.convs):
            sp = depthwise_conv(sp if i == 0 else sp + chunks[i], conv)
            outs.append(sp)
        outs.append(chunks[-1])
        t = _tokens(_cat_channels_last(outs))  # [B, H, W, C], a fresh tensor: in inference it is updated in place
        if self.pos_embd is not None:
            pos = self.pos_embd(t.shape[1], t.shape[2])
            t = t.add_(pos) if can_overwrite(t) else t + pos
        t = add_residual(t, scale_(self.gamma_xca, self.xca(run_layer_norm(self.norm_xca, t))), self.drop_path,
                         self.training)
        return _mlp_branch(self, run_layer_norm(self.norm, t), shortcut)


class FusedConvBlock(nn.Module):
    """timm EdgeNeXt ``ConvBlock``: depthwise k x k -> LayerNorm -> MLP -> layer scale -> residual, on a
    channels_last map. Same arguments and keys.

    The conv and the LayerNorm are one ``dwconv_layernorm`` call when the residual is the block's
    input (stride 1, dim == dim_out: every block but a stage's first in timm's configs), the conv is
    one the kernel takes and the norm is a ``nn.LayerNorm`` over the channels with weight and bias.
    Otherwise the conv output is needed on its own (it is the residual) and runs on
    ``dwconv_bn_act``, followed by the norm module.
    """

    def __init__(self, dim: int, dim_out: Optional[int] = None, kernel_size: int = 7, stride: int = 1,
                 conv_bias: bool = True, expand_ratio: float = 4, ls_init_value: float = 1e-6,
                 norm_layer: Type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
                 act_layer: Type[nn.Module] = nn.GELU, drop_path: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        self.shortcut_after_dw = stride > 1 or dim != dim_out
        self.conv_dw = _depthwise(dim, dim_out, kernel_size, stride, conv_bias, **dd)
        self.norm = norm_layer(dim_out, **dd)
        self.mlp = Mlp(dim_out, int(expand_ratio * dim_out), act_layer, **dd)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim_out, **dd)) if ls_init_value > 0 else None
        self.drop_path = drop_path

    @classmethod
    def from_module(cls, block: nn.Module) -> "FusedConvBlock":
        """Shares the parameters of a timm EdgeNeXt ``ConvBlock``."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.shortcut_after_dw = block.shortcut_after_dw
        fused.conv_dw, fused.norm, fused.mlp = block.conv_dw, block.norm, _share_mlp(block.mlp)
        fused.gamma = block.gamma
        fused.drop_path = float(getattr(block.drop_path, "drop_prob", 0.0))
        return take_mode(fused, block)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = memory.channels_last(x)
        if self._fuses_norm():
            conv, norm = self.conv_dw, self.norm
            t = dwconv_layernorm(x, conv.weight, conv.bias, norm.weight, norm.bias, norm.eps, conv.stride[0])
            t = t.permute(0, 2, 3, 1)  # [B, H, W, C], a free view of the channels_last output
        else:
            x = depthwise_conv(x, self.conv_dw)
            if self.shortcut_after_dw:
                shortcut = x
            t = run_layer_norm(self.norm, _tokens(x))
        return _mlp_branch(self, t, shortcut)

    def _fuses_norm(self) -> bool:
        """Whether forward runs the conv and the norm as one ``dwconv_layernorm`` (see the class)."""
        norm = self.norm
        return (not self.shortcut_after_dw and dwconv_kernel_mismatch(self.conv_dw) is None
                and type(norm) is nn.LayerNorm and tuple(norm.normalized_shape) == (self.conv_dw.out_channels,)
                and norm.weight is not None and norm.bias is not None)


def _mlp_branch(block: nn.Module, t: Tensor, shortcut: Tensor) -> Tensor:
    """``shortcut + drop_path(gamma * mlp(t))`` for a block's ``[B, H, W, C]`` tokens ``t``, returned as
    ``[B, C, H, W]``; one fused kernel in CPU float32 inference where that pays (Mlp.residual_forward)."""
    if not block.training:
        fused = block.mlp.residual_forward(t, block.gamma, shortcut.permute(0, 2, 3, 1))
        if fused is not None:
            return fused.permute(0, 3, 1, 2)
    t = scale_(block.gamma, block.mlp(t))
    return add_residual(shortcut, t.permute(0, 3, 1, 2), block.drop_path, block.training)


def _share_mlp(mlp: nn.Module) -> Mlp:
    """Our Mlp holding a timm ``Mlp``'s submodules (keys ``fc1``, ``fc2``)."""
    fused = Mlp.__new__(Mlp)
    nn.Module.__init__(fused)
    for name in ("fc1", "act", "drop1", "fc2", "drop2"):
        setattr(fused, name, getattr(mlp, name))
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise Unsupported("Mlp.norm is not supported")
    return fused
