"""Rename Apple ml-cvnets MobileViT (v1) checkpoint keys to timm's ``mobilevit_xxs/xs/s`` keys.

The official checkpoints (``mobilevit_xxs.pt``, ``mobilevit_xs.pt``, ``mobilevit_s.pt``) are plain
state_dicts of ml-cvnets' ``MobileViT`` model. timm's ``mobilevit_*`` weights were converted from
them, so every tensor already has timm's layout and only the names change; no tensor is copied,
sliced or permuted. timm ships no filter for these files, hence this module.

Names as built in apple/ml-cvnets; the original tree the v1 weights came from (commit d38a116) and
the current one (0c0f798) agree on every name used here:

* ``cvnets/models/classification/mobilevit.py``: ``conv_1``, ``layer_1`` .. ``layer_5``,
  ``conv_1x1_exp``, ``classifier.fc``. ``layer_1``/``layer_2`` are ``InvertedResidual`` blocks;
  ``layer_3`` .. ``layer_5`` are ``[InvertedResidual (stride 2), MobileViTBlock]``.
* ``cvnets/modules/mobilenetv2.py``: ``InvertedResidual.block`` = ``exp_1x1``, ``conv_3x3``,
  ``red_1x1``.
* ``cvnets/modules/mobilevit_block.py``: ``local_rep.conv_3x3``, ``local_rep.conv_1x1`` (no norm),
  ``global_rep.0 .. depth-1`` (transformer encoders), ``global_rep.<depth>`` (LayerNorm),
  ``conv_proj``, ``fusion``.
* ``cvnets/modules/transformer.py``: ``pre_norm_mha = (LayerNorm, MultiHeadAttention, Dropout)``,
  ``pre_norm_ffn = (LayerNorm, Linear, act, Dropout, Linear, Dropout)``.
* ``cvnets/layers/multi_head_attention.py``: one fused ``qkv_proj`` Linear (``3 * dim`` outputs,
  reshaped to ``(3, heads, head_dim)`` exactly like timm's ``attn.qkv``) and ``out_proj``.
* ``cvnets/layers/conv_layer.py``: ``ConvLayer.block`` = ``conv``, ``norm``, ``act``.

The activations (swish), dropouts and global pool hold no tensors, so the official checkpoints have
no key without a timm counterpart and nothing is dropped.

Usage::

    model = timm.create_model("mobilevit_s")
    model.load_state_dict(convert_cvnets_mobilevit(torch.load("mobilevit_s.pt", map_location="cpu")))
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Pattern, Tuple

from torch import Tensor

__all__ = ["convert_cvnets_mobilevit"]

_BN = r"(?P<p>weight|bias|running_mean|running_var|num_batches_tracked)"
_WB = r"(?P<p>weight|bias)"
# layer_1 .. layer_5 are timm's stages.0 .. 4; block indices inside a stage are the same in both.
_L = r"layer_(?P<layer>[1-5])\.(?P<i>\d+)\."
_S = "stages.{stage}.{i}."
_T = _L + r"global_rep\.(?P<d>\d+)\."
_ST = _S + "transformer.{d}."


def _conv_layer(src: str, dst: str) -> List[Tuple[str, str]]:
    # ml-cvnets ConvLayer is Sequential(conv, norm, act) under `.block`; timm's ConvNormAct is (conv, bn).
    return [(src + r"\.block\.conv\.weight", dst + ".conv.weight"),
            (src + r"\.block\.norm\." + _BN, dst + ".bn.{p}")]


# (ml-cvnets key regex, timm key template). Each regex must match a whole key; the first match wins,
# so the encoder rules come before the catch-all `global_rep.<n>` of the trailing LayerNorm.
_RULES: List[Tuple[str, str]] = [
    *_conv_layer(r"conv_1", "stem"),
    *_conv_layer(_L + r"block\.exp_1x1", _S + "conv1_1x1"),
    *_conv_layer(_L + r"block\.conv_3x3", _S + "conv2_kxk"),
    *_conv_layer(_L + r"block\.red_1x1", _S + "conv3_1x1"),
    *_conv_layer(_L + r"local_rep\.conv_3x3", _S + "conv_kxk"),
    (_L + r"local_rep\.conv_1x1\.block\.conv\.weight", _S + "conv_1x1.weight"),
    (_T + r"pre_norm_mha\.0\." + _WB, _ST + "norm1.{p}"),
    (_T + r"pre_norm_mha\.1\.qkv_proj\." + _WB, _ST + "attn.qkv.{p}"),
    (_T + r"pre_norm_mha\.1\.out_proj\." + _WB, _ST + "attn.proj.{p}"),
    (_T + r"pre_norm_ffn\.0\." + _WB, _ST + "norm2.{p}"),
    (_T + r"pre_norm_ffn\.1\." + _WB, _ST + "mlp.fc1.{p}"),
    (_T + r"pre_norm_ffn\.4\." + _WB, _ST + "mlp.fc2.{p}"),
    (_T + _WB, _S + "norm.{p}"),
    *_conv_layer(_L + r"conv_proj", _S + "conv_proj"),
    *_conv_layer(_L + r"fusion", _S + "conv_fusion"),
    *_conv_layer(r"conv_1x1_exp", "final_conv"),
    (r"classifier\.fc\." + _WB, "head.fc.{p}"),
]
_COMPILED: List[Tuple[Pattern[str], str]] = [(re.compile(p), t) for p, t in _RULES]


def _rename(key: str) -> str:
    for pattern, template in _COMPILED:
        m = pattern.fullmatch(key)
        if m is not None:
            groups = m.groupdict()
            stage = int(groups["layer"]) - 1 if groups.get("layer") else None
            return template.format(stage=stage, **groups)
    raise KeyError(f"no timm MobileViT counterpart for ml-cvnets key {key!r}")


def _unwrap(checkpoint: Mapping[str, Any]) -> Mapping[str, Tensor]:
    # Released files are bare state_dicts; training checkpoints (ml-cvnets utils/checkpoint_utils.py)
    # and other trainers nest them.
    for name in ("state_dict", "model", "model_state_dict"):
        inner = checkpoint.get(name)
        if isinstance(inner, Mapping):
            return inner
    return checkpoint


def convert_cvnets_mobilevit(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Return a new dict with ``state_dict``'s tensors (the same objects) under timm's key names.

    Accepts a bare ml-cvnets state_dict, one wrapped as ``{"state_dict": ...}``, ``{"model": ...}``
    or ``{"model_state_dict": ...}``, and keys with DataParallel's ``module.`` prefix. Raises
    ``KeyError`` naming the first key that has no timm counterpart (e.g. a MobileViT v2 or
    segmentation checkpoint, or a model trained with PReLU activations).
    """
    out: Dict[str, Tensor] = {}
    for key, value in _unwrap(state_dict).items():
        out[_rename(key[len("module."):] if key.startswith("module.") else key)] = value
    return out
