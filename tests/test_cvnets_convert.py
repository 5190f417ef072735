"""convert_cvnets_mobilevit: ml-cvnets MobileViT v1 names -> timm mobilevit_* names, tensors untouched.

The ml-cvnets state_dict is generated here from ml-cvnets' own architecture description
(cvnets/models/classification/config/mobilevit.py and the module constructors), not from timm and
not from the converter's table, so a wrong rule shows up as a key or shape mismatch against timm.
"""

from typing import Dict, List, Tuple

import pytest
import timm
import torch

from fastvit_kernels.models.cvnets import convert_cvnets_mobilevit

# ml-cvnets get_configuration(): per layer (out_channels, expand_ratio, num_blocks) for the MV2
# layers and (out_channels, transformer_channels, ffn_dim, transformer_blocks) for the MobileViT
# layers, whose first block is a stride-2 InvertedResidual with the same expand ratio.
CVNETS_CONFIGS = {
    "mobilevit_xxs": dict(exp=2, mv2=[(16, 1), (24, 3)],
                          mvit=[(48, 64, 128, 2), (64, 80, 160, 4), (80, 96, 192, 3)]),
    "mobilevit_xs": dict(exp=4, mv2=[(32, 1), (48, 3)],
                         mvit=[(64, 96, 192, 2), (80, 120, 240, 4), (96, 144, 288, 3)]),
    "mobilevit_s": dict(exp=4, mv2=[(32, 1), (64, 3)],
                        mvit=[(96, 144, 288, 2), (128, 192, 384, 4), (160, 240, 480, 3)]),
}

Shapes = List[Tuple[str, Tuple[int, ...]]]


def make_divisible(v: float, divisor: int = 8) -> int:
    # ml-cvnets utils/math_utils.py
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def conv_layer(name: str, c_out: int, c_in: int, k: int, groups: int = 1, norm: bool = True) -> Shapes:
    # cvnets/layers/conv_layer.py: ConvLayer.block = (conv [bias=False], norm, act [swish: no params])
    out = [(f"{name}.block.conv.weight", (c_out, c_in // groups, k, k))]
    if norm:
        out += [(f"{name}.block.norm.{p}", (c_out,)) for p in ("weight", "bias", "running_mean", "running_var")]
        out.append((f"{name}.block.norm.num_batches_tracked", ()))
    return out


def linear(name: str, c_out: int, c_in: int) -> Shapes:
    return [(f"{name}.weight", (c_out, c_in)), (f"{name}.bias", (c_out,))]


def layer_norm(name: str, c: int) -> Shapes:
    return [(f"{name}.weight", (c,)), (f"{name}.bias", (c,))]


def inverted_residual(name: str, c_in: int, c_out: int, exp: int) -> Shapes:
    # cvnets/modules/mobilenetv2.py InvertedResidual (expand_ratio != 1, so exp_1x1 is present)
    hidden = make_divisible(int(round(c_in * exp)), 8)
    return (conv_layer(f"{name}.block.exp_1x1", hidden, c_in, 1)
            + conv_layer(f"{name}.block.conv_3x3", hidden, hidden, 3, groups=hidden)
            + conv_layer(f"{name}.block.red_1x1", c_out, hidden, 1))


def mobilevit_block(name: str, c: int, dim: int, ffn: int, depth: int) -> Shapes:
    # cvnets/modules/mobilevit_block.py + cvnets/modules/transformer.py + multi_head_attention.py
    out = conv_layer(f"{name}.local_rep.conv_3x3", c, c, 3)
    out += conv_layer(f"{name}.local_rep.conv_1x1", dim, c, 1, norm=False)
    for d in range(depth):
        enc = f"{name}.global_rep.{d}"
        out += layer_norm(f"{enc}.pre_norm_mha.0", dim)
        out += linear(f"{enc}.pre_norm_mha.1.qkv_proj", 3 * dim, dim)
        out += linear(f"{enc}.pre_norm_mha.1.out_proj", dim, dim)
        out += layer_norm(f"{enc}.pre_norm_ffn.0", dim)
        out += linear(f"{enc}.pre_norm_ffn.1", ffn, dim)
        out += linear(f"{enc}.pre_norm_ffn.4", dim, ffn)
    out += layer_norm(f"{name}.global_rep.{depth}", dim)
    out += conv_layer(f"{name}.conv_proj", c, dim, 1)
    out += conv_layer(f"{name}.fusion", c, 2 * c, 3)
    return out


def cvnets_shapes(variant: str) -> Shapes:
    # cvnets/models/classification/mobilevit.py MobileViT.__init__
    cfg = CVNETS_CONFIGS[variant]
    out = conv_layer("conv_1", 16, 3, 3)
    c_in, layer = 16, 1
    for c_out, blocks in cfg["mv2"]:
        for i in range(blocks):
            out += inverted_residual(f"layer_{layer}.{i}", c_in, c_out, cfg["exp"])
            c_in = c_out
        layer += 1
    for c_out, dim, ffn, depth in cfg["mvit"]:
        out += inverted_residual(f"layer_{layer}.0", c_in, c_out, cfg["exp"])
        out += mobilevit_block(f"layer_{layer}.1", c_out, dim, ffn, depth)
        c_in, layer = c_out, layer + 1
    exp_channels = min(4 * c_in, 960)  # last_layer_exp_factor = 4
    out += conv_layer("conv_1x1_exp", exp_channels, c_in, 1)
    out += linear("classifier.fc", 1000, exp_channels)
    return out


def random_state_dict(shapes: Shapes) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: (torch.randint(0, 1000, (), generator=g) if name.endswith("num_batches_tracked")
                   else torch.randn(shape, generator=g))
            for name, shape in shapes}


@pytest.fixture(scope="module", params=list(CVNETS_CONFIGS))
def case(request):
    variant = request.param
    return timm.create_model(variant), random_state_dict(cvnets_shapes(variant))


def test_keys_and_shapes_match_timm(case):
    model, src = case
    converted = convert_cvnets_mobilevit(src)
    expected = model.state_dict()
    assert len(converted) == len(src)
    assert set(converted) == set(expected)
    bad = {k: (tuple(v.shape), tuple(expected[k].shape))
           for k, v in converted.items() if v.shape != expected[k].shape}
    assert not bad


def test_strict_load_keeps_values(case):
    model, src = case
    converted = convert_cvnets_mobilevit(src)
    assert {id(v) for v in converted.values()} == {id(v) for v in src.values()}  # same tensors, no copies
    model.load_state_dict(converted, strict=True)
    loaded = model.state_dict()
    for key, value in converted.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("wrap", [
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
    lambda sd: {"state_dict": sd},
    lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
], ids=["module_prefix", "state_dict_wrapper", "model_wrapper_and_prefix"])
def test_wrappers_and_prefix(case, wrap):
    _, src = case
    assert convert_cvnets_mobilevit(wrap(src)) == convert_cvnets_mobilevit(src)


@pytest.mark.parametrize("bad_key", [
    "layer_3.1.local_rep.conv_3x3.block.act.weight",  # PReLU-trained model: timm has no such parameter
    "layer_3.1.global_rep.0.pre_norm_attn.1.qkv_proj.block.conv.weight",  # MobileViT v2
    "layer_6.0.block.exp_1x1.block.conv.weight",
    "seg_head.classifier.weight",
])
def test_unknown_key_raises(case, bad_key):
    _, src = case
    with pytest.raises(KeyError, match=bad_key.replace(".", r"\.")):
        convert_cvnets_mobilevit({**src, bad_key: torch.zeros(1)})
