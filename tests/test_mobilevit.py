"""FusedMobileViTBlock and the MobileViT models against timm with the same weights."""

import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.models.byobnet import LayerFn
from timm.models.mobilevit import MobileVitBlock

import fastvit_kernels as fk
from fastvit_kernels.models.cvnets import convert_cvnets_mobilevit
from helpers import BACKENDS, DEVICE, INTERPRETED, assert_close, make_input
from test_cvnets_convert import cvnets_shapes, random_state_dict

MODELS = ["mobilevit_xxs", "mobilevit_xs", "mobilevit_s"]
# The whole model through the Triton interpreter takes minutes: the block covers Triton there.
MODEL_BACKENDS = [b for b in BACKENDS if not (INTERPRETED and b == "triton")]


def randomize_batchnorms(model):
    """Non-trivial BatchNorm statistics and affine parameters, so a wrong fold shows."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
    return model


def timm_block(in_chs=24, dim=32, depth=2, heads=4, patch=2, act=nn.SiLU):
    torch.manual_seed(0)
    layers = LayerFn(conv_norm_act=LayerFn.conv_norm_act, act=act)
    block = MobileVitBlock(in_chs, in_chs, transformer_dim=dim, transformer_depth=depth, num_heads=heads,
                           patch_size=patch, layers=layers)
    return randomize_batchnorms(block).to(DEVICE)


def run(module, x, backend):
    with fk.use_backend(backend):
        return module(x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hw", [(8, 8), (7, 9), (1, 1)], ids=["8x8", "7x9-resized", "1x1-resized"])
def test_block_eval_matches_timm(backend, hw):
    """Same output as timm's unfold/attention/fold, including its bilinear resize when H or W is
    not a multiple of the patch."""
    block = timm_block().eval()
    fused = fk.FusedMobileViTBlock.from_module(copy.deepcopy(block))
    assert list(fused.state_dict()) == list(block.state_dict())
    x = make_input((2, 24, *hw), torch.float32)
    with torch.no_grad():
        ref64 = copy.deepcopy(block).double()(x.double())
        assert_close(run(fused, x, backend), ref64, block(x), f"{backend} {hw}")


def test_block_constructor_matches_timm_constructor():
    """Same arguments build the same parameters; timm's defaults (ReLU convs from LayerFn) are kept."""
    for layers in (None, LayerFn(act=nn.SiLU)):
        torch.manual_seed(0)
        kwargs = dict(transformer_dim=40, transformer_depth=1, patch_size=(2, 1), num_heads=2, layers=layers)
        block = randomize_batchnorms(MobileVitBlock(16, 24, **kwargs)).to(DEVICE).eval()
        fused = fk.FusedMobileViTBlock(16, 24, **kwargs).to(DEVICE).eval()
        assert {k: v.shape for k, v in fused.state_dict().items()} == {
            k: v.shape for k, v in block.state_dict().items()}
        fused.load_state_dict(block.state_dict())
        x = make_input((2, 16, 6, 5), torch.float32, "channels_last")
        with torch.no_grad():
            assert_close(fused(x), copy.deepcopy(block).double()(x.double()), block(x), str(layers))


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_block_training_matches_timm(backend):
    """Training: same output, input and parameter gradients, and BatchNorm running statistics."""
    block = timm_block().train()
    fused = fk.FusedMobileViTBlock.from_module(copy.deepcopy(block)).train()
    x = make_input((2, 24, 6, 8), torch.float32)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(2, 24, 6, 8, device=DEVICE)
    out = run(fused, x_ours, backend)
    ref = block(x_ref)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    with fk.use_backend(backend):
        out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, block.get_parameter(name).grad, rtol=1e-3, atol=1e-4, msg=name)
    for name, buf in fused.named_buffers():
        torch.testing.assert_close(buf, block.get_buffer(name), msg=name)


def test_block_compiles_without_graph_breaks():
    torch._dynamo.reset()
    block = timm_block().eval()
    fused = fk.FusedMobileViTBlock.from_module(copy.deepcopy(block))
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = make_input((2, 24, 8, 6), torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x), rtol=1e-4, atol=1e-4)


def test_block_bad_input_is_a_clear_error():
    fused = fk.FusedMobileViTBlock.from_module(timm_block().eval())
    with pytest.raises(ValueError, match=r"x must be \[B, 24, H, W\], got shape \(2, 23, 8, 8\)"):
        fused(make_input((2, 23, 8, 8), torch.float32))
    with pytest.raises(TypeError, match="x.dtype torch.int64 is not supported"):
        fused(torch.ones(2, 24, 8, 8, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="attn_drop=0.1 is not supported"):
        fk.FusedMobileViTBlock(24, transformer_dim=32, attn_drop=0.1)


def test_patch_swaps_timm_mobilevit_and_keeps_output():
    model = randomize_batchnorms(timm.create_model("mobilevit_xxs")).to(DEVICE).eval()
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    replaced = fk.patch(model)
    blocks = [n for n, m in model.named_modules() if isinstance(m, fk.FusedMobileViTBlock)]
    assert blocks == ["stages.2.1", "stages.3.1", "stages.4.1"]
    assert set(blocks) <= set(replaced) and "stem" in replaced and "stages.1.0.conv2_kxk" in replaced
    assert list(model.state_dict()) == keys
    x = make_input((2, 3, 64, 64), torch.float32)
    with torch.no_grad():
        assert_close(model(x), copy.deepcopy(original).double()(x.double()), original(x), "patched")


@pytest.mark.parametrize("name", MODELS)
def test_model_has_timm_keys_and_loads_timm_weights(name):
    timm_model = timm.create_model(name)
    ours = fk.create_model(name)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in timm_model.state_dict().items()]
    ours.load_state_dict(timm_model.state_dict())  # strict


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_model_eval_matches_timm(name, backend):
    timm_model = randomize_batchnorms(timm.create_model(name)).to(DEVICE).eval()
    ours = fk.create_model(name).to(DEVICE).eval()
    ours.load_state_dict(timm_model.state_dict())
    x = make_input((2, 3, 64, 64), torch.float32)
    with torch.no_grad():
        ref64 = copy.deepcopy(timm_model).double()(x.double())
        assert_close(run(ours, x, backend), ref64, timm_model(x), f"{name} {backend}")


def test_model_at_full_resolution_and_odd_size():
    """256x256 (the models' training size) and 200x168, where the 25x21 / 13x11 / 7x6 maps are
    resized around the transformer as in timm."""
    timm_model = randomize_batchnorms(timm.create_model("mobilevit_xxs")).to(DEVICE).eval()
    ours = fk.create_model("mobilevit_xxs").to(DEVICE).eval()
    ours.load_state_dict(timm_model.state_dict())
    for shape in ((1, 3, 256, 256), (1, 3, 200, 168)):
        x = make_input(shape, torch.float32)
        with torch.no_grad():
            ref64 = copy.deepcopy(timm_model).double()(x.double())
            assert_close(ours(x), ref64, timm_model(x), str(shape))


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_model_training_step_matches_timm(backend):
    """One training step: same logits, loss gradients for every parameter, updated running stats."""
    torch.manual_seed(0)
    timm_model = randomize_batchnorms(timm.create_model("mobilevit_xxs", num_classes=10)).to(DEVICE).train()
    ours = fk.create_model("mobilevit_xxs", num_classes=10).to(DEVICE).train()
    ours.load_state_dict(timm_model.state_dict())
    x = make_input((2, 3, 64, 64), torch.float32)
    target = torch.tensor([1, 7], device=DEVICE)
    with fk.use_backend(backend):
        logits = ours(x)
        nn.functional.cross_entropy(logits, target).backward()
    ref = timm_model(x)
    nn.functional.cross_entropy(ref, target).backward()
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, timm_model.get_parameter(name).grad, rtol=1e-3, atol=1e-5, msg=name)
    for name, buf in ours.named_buffers():
        torch.testing.assert_close(buf, timm_model.get_buffer(name), rtol=1e-5, atol=1e-6, msg=name)


def test_create_model_loads_timm_and_cvnets_checkpoints(tmp_path):
    timm_model = randomize_batchnorms(timm.create_model("mobilevit_xs")).eval()
    torch.save(timm_model.state_dict(), tmp_path / "timm.pt")
    ours = fk.create_model("mobilevit_xs", checkpoint_path=str(tmp_path / "timm.pt")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), timm_model(x), rtol=1e-4, atol=1e-5)

    cvnets = random_state_dict(cvnets_shapes("mobilevit_xs"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in cvnets.items()}}, tmp_path / "cvnets.pt")
    ours = fk.create_model("mobilevit_xs", checkpoint_path=str(tmp_path / "cvnets.pt"))
    for key, value in convert_cvnets_mobilevit(cvnets).items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)


def test_create_model_bad_arguments():
    with pytest.raises(ValueError, match="unknown model .mobilevit_m.; available: .*mobilevit_s, mobilevit_xs"):
        fk.create_model("mobilevit_m")
    with pytest.raises(ValueError, match=r"x must be \[B, 3, H, W\], got shape \(1, 4, 32, 32\)"):
        fk.create_model("mobilevit_xxs").eval()(torch.randn(1, 4, 32, 32))
