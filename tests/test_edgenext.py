"""EdgeNeXt blocks and models (and XCiT's XCA through patch()) against timm with the same weights."""

import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.models.edgenext import ConvBlock, CrossCovarianceAttn, SplitTransposeBlock

import fastvit_kernels as fk
import fastvit_kernels.modules.edgenext as edgenext_modules
from fastvit_kernels.models.edgenext import convert_official_edgenext
from fastvit_kernels.modules.edgenext import FusedConvBlock, FusedSDTABlock, FusedXCA
from helpers import BACKENDS, DEVICE, INTERPRETED, assert_close, make_input

MODELS = ["edgenext_xx_small", "edgenext_x_small", "edgenext_small", "edgenext_base"]
MODEL_BACKENDS = [b for b in BACKENDS if not (INTERPRETED and b == "triton")]


def perturb(module, std=0.05, seed=0):
    """timm initialises biases to 0 and layer scales to 1e-6: perturb every parameter so that each
    path (biases, layer scale, temperature, positional encoding) shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "gamma" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=gen) * std)
    return module.to(DEVICE)


def run(module, x, backend):
    with fk.use_backend(backend):
        return module(x)


def check_eval(timm_module, fused, x, backend, what):
    assert list(fused.state_dict()) == list(timm_module.state_dict())
    with torch.no_grad():
        ref64 = copy.deepcopy(timm_module).double()(x.double())
        assert_close(run(fused, x, backend), ref64, timm_module(x), f"{what} {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_xca_module_matches_timm(backend):
    attn = perturb(CrossCovarianceAttn(40, num_heads=4, qkv_bias=True)).eval()
    check_eval(attn, FusedXCA.from_module(copy.deepcopy(attn)), make_input((2, 7, 40, 1), torch.float32)[..., 0],
               backend, "xca")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scales,pos", [(2, True), (3, False), (4, False)])
def test_sdta_block_matches_timm(backend, scales, pos):
    block = perturb(SplitTransposeBlock(24, num_scales=scales, num_heads=4, use_pos_emb=pos)).eval()
    fused = FusedSDTABlock.from_module(copy.deepcopy(block))
    check_eval(block, fused, make_input((2, 24, 5, 7), torch.float32), backend, f"sdta s{scales}")
    built = FusedSDTABlock(24, num_scales=scales, num_heads=4, use_pos_emb=pos).to(DEVICE).eval()
    built.load_state_dict(block.state_dict())
    check_eval(block, built, make_input((1, 24, 6, 6), torch.float32, "channels_last"), backend, "built")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel_size", [3, 5, 7, 9])
def test_conv_block_matches_timm(backend, kernel_size):
    block = perturb(ConvBlock(16, kernel_size=kernel_size)).eval()
    check_eval(block, FusedConvBlock.from_module(copy.deepcopy(block)), make_input((2, 16, 9, 8), torch.float32),
               backend, f"conv k{kernel_size}")


def _spy_dwconv_layernorm(monkeypatch):
    """Record each call of dwconv_layernorm from the EdgeNeXt modules (and still run it)."""
    calls = []
    real = edgenext_modules.dwconv_layernorm

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(edgenext_modules, "dwconv_layernorm", spy)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel_size,conv_bias", [(3, True), (7, True), (9, False)])
def test_conv_block_fuses_conv_and_norm(monkeypatch, backend, kernel_size, conv_bias):
    """The block's dwconv + LayerNorm run as one dwconv_layernorm call and still match timm."""
    calls = _spy_dwconv_layernorm(monkeypatch)
    block = perturb(ConvBlock(24, kernel_size=kernel_size, conv_bias=conv_bias)).eval()
    fused = FusedConvBlock.from_module(copy.deepcopy(block))
    check_eval(block, fused, make_input((2, 24, 7, 5), torch.float32, "channels_last"), backend, "fused conv+norm")
    assert calls == [(2, 24, 7, 5)]


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_conv_block_fused_training_matches_timm(monkeypatch, backend):
    calls = _spy_dwconv_layernorm(monkeypatch)
    block = perturb(ConvBlock(24, kernel_size=7)).train()
    fused = FusedConvBlock.from_module(copy.deepcopy(block)).train()
    x = make_input((2, 24, 6, 5), torch.float32)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(2, 24, 6, 5, device=DEVICE)
    with fk.use_backend(backend):
        out = fused(x_ours)
        out.backward(grad)
    ref = block(x_ref)
    ref.backward(grad)
    assert len(calls) == 1
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, block.get_parameter(name).grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_block_with_shortcut_after_conv_keeps_separate_norm(monkeypatch, backend):
    """A stride-2 block needs the conv output itself (it is the residual): no fusion, same result."""
    calls = _spy_dwconv_layernorm(monkeypatch)
    block = perturb(ConvBlock(16, kernel_size=5, stride=2)).eval()
    check_eval(block, FusedConvBlock.from_module(copy.deepcopy(block)), make_input((2, 16, 6, 7), torch.float32),
               backend, "conv stride 2")
    assert calls == []


def test_positional_encoding_follows_weight_changes_and_resolution():
    block = perturb(SplitTransposeBlock(16, num_scales=2, num_heads=2, use_pos_emb=True)).eval()
    fused = FusedSDTABlock.from_module(copy.deepcopy(block))
    for hw in ((4, 4), (6, 3), (4, 4)):
        x = make_input((1, 16, *hw), torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), block(x), rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # an in-place weight update must be seen (only the features are cached)
        block.pos_embd.token_projection.weight.mul_(3)
        fused.pos_embd.token_projection.weight.mul_(3)
        torch.testing.assert_close(fused(x), block(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_sdta_block_training_matches_timm(backend):
    block = perturb(SplitTransposeBlock(24, num_scales=2, num_heads=4, use_pos_emb=True)).train()
    fused = FusedSDTABlock.from_module(copy.deepcopy(block)).train()
    x = make_input((2, 24, 5, 6), torch.float32)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(2, 24, 5, 6, device=DEVICE)
    with fk.use_backend(backend):
        out = fused(x_ours)
        out.backward(grad)
    ref = block(x_ref)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, block.get_parameter(name).grad, rtol=1e-3, atol=1e-5, msg=name)


def test_sdta_block_compiles_without_graph_breaks():
    torch._dynamo.reset()
    block = perturb(SplitTransposeBlock(24, num_scales=2, num_heads=4, use_pos_emb=True)).eval()
    compiled = torch.compile(FusedSDTABlock.from_module(copy.deepcopy(block)), fullgraph=True, backend="aot_eager")
    x = make_input((2, 24, 4, 6), torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_model_keys_and_eval_match_timm(name):
    timm_model = perturb(timm.create_model(name), std=0.01).eval()
    ours = fk.create_model(name).to(DEVICE).eval()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in timm_model.state_dict().items()]
    ours.load_state_dict(timm_model.state_dict())
    x = make_input((2, 3, 64, 64), torch.float32)
    with torch.no_grad():
        ref64 = copy.deepcopy(timm_model).double()(x.double())
        assert_close(ours(x), ref64, timm_model(x), name)


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_model_per_backend_and_odd_size(backend):
    timm_model = perturb(timm.create_model("edgenext_xx_small"), std=0.01).eval()
    ours = fk.create_model("edgenext_xx_small").to(DEVICE).eval()
    ours.load_state_dict(timm_model.state_dict())
    x = make_input((1, 3, 96, 80), torch.float32, "channels_last")
    with torch.no_grad():
        ref64 = copy.deepcopy(timm_model).double()(x.double())
        assert_close(run(ours, x, backend), ref64, timm_model(x), backend)


def test_model_training_step_matches_timm():
    timm_model = perturb(timm.create_model("edgenext_xx_small", num_classes=10), std=0.01).train()
    ours = fk.create_model("edgenext_xx_small", num_classes=10).to(DEVICE).train()
    ours.load_state_dict(timm_model.state_dict())
    x = make_input((2, 3, 64, 64), torch.float32)
    target = torch.tensor([3, 8], device=DEVICE)
    logits = ours(x)
    nn.functional.cross_entropy(logits, target).backward()
    ref = timm_model(x)
    nn.functional.cross_entropy(ref, target).backward()
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, timm_model.get_parameter(name).grad, rtol=1e-3, atol=1e-6, msg=name)


def test_patch_swaps_timm_edgenext_and_xcit():
    model = perturb(timm.create_model("edgenext_xx_small"), std=0.01).eval()
    original = copy.deepcopy(model)
    replaced = fk.patch(model)
    assert "stages.1.blocks.1" in replaced and isinstance(model.stages[1].blocks[1], FusedSDTABlock)
    assert isinstance(model.stages[0].blocks[0], FusedConvBlock)
    x = make_input((1, 3, 64, 64), torch.float32)
    with torch.no_grad():
        assert_close(model(x), copy.deepcopy(original).double()(x.double()), original(x), "edgenext")

    xcit = perturb(timm.create_model("xcit_nano_12_p16_224", img_size=64), std=0.01).eval()
    original = copy.deepcopy(xcit)
    replaced = fk.patch(xcit)
    assert sum(isinstance(m, FusedXCA) for m in xcit.modules()) == 12
    with torch.no_grad():
        assert_close(xcit(x), copy.deepcopy(original).double()(x.double()), original(x), "xcit")


def test_official_checkpoint_keys_convert(tmp_path):
    """The official release's names (downsample_layers, stages.i.j, dwconv, pwconv1/2, head, norm)
    load into ours; written out from timm's keys by the inverse renaming of timm's filter."""
    timm_model = perturb(timm.create_model("edgenext_xx_small"), std=0.01).eval()
    official = {}
    for key, value in timm_model.state_dict().items():
        k = key.replace("stem.", "downsample_layers.0.").replace(".downsample.", ".D.")
        k = k.replace(".blocks.", ".").replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        if k.startswith("stages.") and ".D." in k:  # stages.i.D.j -> downsample_layers.i.j
            stage, rest = k[len("stages."):].split(".D.")
            k = f"downsample_layers.{stage}.{rest}"
        k = k.replace("head.fc.", "head.").replace("head.norm.", "norm.")
        official[k] = value
    assert "downsample_layers.1.1.weight" in official and "stages.2.5.pwconv1.weight" in official
    torch.save({"model": official}, tmp_path / "official.pth")
    ours = fk.create_model("edgenext_xx_small", checkpoint_path=str(tmp_path / "official.pth"))
    for key, value in timm_model.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)
    with pytest.raises(KeyError, match="no counterpart for key 'stages.0.blocks.0.extra'"):
        convert_official_edgenext({"stages.0.0.extra": torch.zeros(1)}, ours)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"x must be \[B, 3, H, W\], got shape \(1, 1, 64, 64\)"):
        fk.create_model("edgenext_xx_small")(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="attn_drop=0.1 is not supported"):
        FusedXCA(16, 4, attn_drop=0.1)
