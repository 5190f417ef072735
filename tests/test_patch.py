"""patch(model): swaps exactly the supported submodules, keeps keys and outputs."""

import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import ConvNormAct, create_conv2d

import fastvit_kernels as fk
from fastvit_kernels.modules.conv_bn_act import Unsupported
from fastvit_kernels.patch import REPLACEMENTS
from helpers import DEVICE, make_input
from test_conv_bn_act_module import randomize_bn


def conv_bn(C, conv=None, act=nn.SiLU, **conv_kwargs):
    conv = conv or nn.Conv2d(C, C, conv_kwargs.pop("k", 3), padding=conv_kwargs.pop("padding", 1), **conv_kwargs)
    return nn.Sequential(conv, randomize_bn(nn.BatchNorm2d(C)), act())


def model_with_every_case():
    C = 8
    model = nn.Module()
    model.stem = ConvNormAct(3, C, 3, stride=2, act_layer="silu")                     # full conv: folded
    model.dw_timm = ConvNormAct(C, C, 5, groups=C, act_layer="silu")                  # fused
    model.dw_timm_s2 = ConvNormAct(C, C, 3, stride=2, groups=C, act_layer=None)       # fused, no act
    model.blocks = nn.Sequential(
        conv_bn(C, groups=C),                                                          # fused
        conv_bn(C, groups=C, act=nn.ReLU, stride=2),                                   # fused
        conv_bn(C, groups=2),                                                          # grouped: folded
        conv_bn(C, groups=C, dilation=2, padding=2),                                   # dilated: folded
        conv_bn(C, groups=C, act=nn.ReLU6),                                            # ReLU6: left alone
        conv_bn(C, conv=create_conv2d(C, C, 3, stride=2, padding="same", groups=C)),  # dynamic pad: alone
        nn.Sequential(nn.Conv2d(C, C, 3, 1, 1, groups=C), nn.BatchNorm2d(C), nn.SiLU(), nn.SiLU()),  # 4 long
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m)
    model.forward = lambda x: model.blocks(model.dw_timm_s2(model.dw_timm(model.stem(x))))
    return model.to(DEVICE).eval()


def test_patch_replaces_exactly_the_supported_modules():
    model = model_with_every_case()
    original = copy.deepcopy(model)
    x = make_input((2, 3, 32, 32), torch.float32)
    keys = list(model.state_dict())
    replaced = fk.patch(model)
    assert sorted(replaced) == ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "dw_timm", "dw_timm_s2", "stem"]
    assert isinstance(model.dw_timm, fk.FusedConvBNAct) and isinstance(model.blocks[0], fk.FusedConvBNActSequential)
    assert isinstance(model.stem, fk.FusedConvBNAct) and type(model.blocks[4]) is nn.Sequential
    assert list(model.state_dict()) == keys
    assert type(replaced["dw_timm"]) is ConvNormAct and replaced["dw_timm"].conv is model.dw_timm.conv
    with torch.no_grad():
        torch.testing.assert_close(model.forward(x), original.forward(x), rtol=1e-4, atol=1e-4)
    # weights loaded after patching reach the fused modules
    fresh = model_with_every_case()
    model.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.forward(x), fresh.forward(x), rtol=1e-4, atol=1e-4)


def test_patched_modules_take_the_models_mode():
    """The replacements of an eval model are in eval mode (their inference paths check it); shared
    submodules keep the mode they had, e.g. a BatchNorm frozen in eval inside a training model."""
    model = model_with_every_case().eval()
    replaced = fk.patch(model)
    assert replaced and not any(m.training for m in model.modules())
    model = model_with_every_case().train()
    frozen = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][0].eval()
    fk.patch(model)
    kept = set(frozen.modules())  # timm's BatchNormAct2d has children (act, drop), eval with it
    assert all(m.training != (m in kept) for m in model.modules())


@pytest.mark.parametrize("name", ["edgenext_xx_small", "levit_128s", "mobilevit_xxs", "xcit_nano_12_p16_224"])
@pytest.mark.parametrize("training", [False, True])
def test_every_builder_gives_its_modules_the_sources_mode(name, training):
    """from_module (and share_norm_layer) called directly, not through patch(): what a builder
    creates is in the source's mode, what it shares keeps its own."""
    model = timm.create_model(name, pretrained=False).train(training)
    built = 0
    for module in model.modules():
        for matches, convert in REPLACEMENTS:
            if matches(module):
                try:
                    fused = convert(module)
                except Unsupported:
                    break
                shared = set(module.modules())
                assert all(m.training == training for m in fused.modules() if m not in shared), type(fused)
                built += 1
                break
    assert built > 0


def test_patch_is_idempotent_and_returns_originals():
    model = model_with_every_case()
    first = fk.patch(model)
    assert fk.patch(model) == {}
    for name, module in first.items():
        model.set_submodule(name, module)
    assert type(model.dw_timm) is ConvNormAct
