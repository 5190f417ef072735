"""FusedConvBNAct / FusedConvBNActSequential against the eager modules they replace."""

import copy

import pytest
import torch
import torch.nn as nn
from timm.layers import ConvNormAct

import fastvit_kernels as fk
from fastvit_kernels.modules import Unsupported
from helpers import BACKENDS, DEVICE, assert_close, make_input

ACTS = {"silu": nn.SiLU, "relu": nn.ReLU, "none": nn.Identity}


def randomize_bn(bn):
    """Non-trivial BatchNorm statistics and affine parameters, so a wrong fold shows."""
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn


def eager_sequential(C, K, stride, act="silu", bias=False):
    seq = nn.Sequential(nn.Conv2d(C, C, K, stride, K // 2, groups=C, bias=bias), randomize_bn(nn.BatchNorm2d(C)),
                        ACTS[act]())
    return seq.to(DEVICE)


def run(module, x, backend=None):
    with fk.use_backend(backend):
        return module(x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["silu", "relu", "none"])
@pytest.mark.parametrize("K,stride,layout", [(3, 1, "nchw"), (5, 2, "channels_last"), (7, 1, "strided")])
def test_sequential_eval_matches_eager(backend, act, K, stride, layout):
    seq = eager_sequential(6, K, stride, act, bias=True).eval()
    fused = fk.FusedConvBNAct.from_module(copy.deepcopy(seq))
    assert isinstance(fused, fk.FusedConvBNActSequential)
    assert list(fused.state_dict()) == list(seq.state_dict())
    x = make_input((2, 6, 9, 11), torch.float32, layout)
    with torch.no_grad():
        ref64 = copy.deepcopy(seq).double()(x.double())
        assert_close(run(fused, x, backend), ref64, seq(x), f"{backend} {act} k{K}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_timm_conv_norm_act_train_and_eval_match(backend):
    """Training: batch statistics, running-stat updates and gradients as eager; then eval."""
    timm_module = ConvNormAct(8, 8, 3, stride=2, groups=8, act_layer="silu").to(DEVICE)
    randomize_bn(timm_module.bn)
    fused = fk.FusedConvBNAct(8, 8, 3, stride=2, groups=8, act_layer=nn.SiLU).to(DEVICE)
    fused.load_state_dict(timm_module.state_dict())
    assert list(fused.state_dict()) == list(timm_module.state_dict())

    x = make_input((3, 8, 10, 7), torch.float32, "channels_last")
    x_ref = x.detach().double().requires_grad_()
    x_ours = x.detach().clone().requires_grad_()
    timm64 = copy.deepcopy(timm_module).double().train()
    grad = torch.randn(3, 8, 5, 4, device=DEVICE)
    for step in range(2):  # two steps: running stats accumulate the same way
        timm64(x_ref).backward(grad.double())
        run(fused.train(), x_ours, backend).backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad.float(), rtol=1e-4, atol=1e-5)
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, timm64.get_parameter(name).grad.float(), rtol=1e-4, atol=1e-4)
    for name, buf in fused.named_buffers():
        torch.testing.assert_close(buf, timm64.get_buffer(name).to(buf.dtype), rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        eval_ref = timm64.eval()(x.double())
        timm_module.load_state_dict(fused.state_dict())
        assert_close(run(fused.eval(), x, backend), eval_ref, timm_module.eval()(x), backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_module_matches_eager(dtype):
    seq = eager_sequential(16, 3, 1).eval()
    fused = fk.FusedConvBNAct.from_module(copy.deepcopy(seq)).to(dtype)
    x = make_input((2, 16, 8, 8), dtype, "channels_last")
    with torch.no_grad():
        ref64 = copy.deepcopy(seq).double()(x.double())
        # Eager in x's dtype; on the CPU half conv may be missing, and float32 rounded is the same rounding.
        same = copy.deepcopy(seq).to(dtype if DEVICE.type == "cuda" else torch.float32)(x.to(
            dtype if DEVICE.type == "cuda" else torch.float32)).to(dtype)
        assert_close(fused(x), ref64, same, str(dtype))


def test_fold_is_cached_and_refreshed_whenever_weights_change():
    seq = eager_sequential(4, 3, 1).eval()
    fused = fk.FusedConvBNAct.from_module(copy.deepcopy(seq))
    x = make_input((1, 4, 6, 6), torch.float32)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(fused(x), fused_reference(x), rtol=1e-5, atol=1e-5)

    def fused_reference(t):
        ref = nn.Sequential(copy.deepcopy(fused[0]), copy.deepcopy(fused[1]), nn.SiLU()).eval()
        return ref.to(t.dtype)(t)

    with torch.no_grad():
        first = fused(x)
        assert fused._fold._value is not None
        cached = fused._fold._value[0]
        fused(x)
        assert fused._fold._value[0] is cached  # no recomputation when nothing changed

    # load_state_dict (in-place copy into the same tensors)
    other = eager_sequential(4, 3, 1)
    fused.load_state_dict(other.state_dict())
    check()
    # an optimizer step
    fused.train()
    opt = torch.optim.SGD(fused.parameters(), lr=0.5)
    fused(x).sum().backward()
    opt.step()
    fused.eval()
    check()
    # running statistics changed in place (as training does)
    with torch.no_grad():
        fused[1].running_var.mul_(3)
    check()
    # a parameter and a buffer replaced by new tensors (the fold reads them from the modules' dicts)
    fused[0].weight = nn.Parameter(torch.randn_like(fused[0].weight))
    check()
    fused[1].running_mean = torch.randn_like(fused[1].running_mean)
    check()
    # .double() / .half() / .float(): new tensors, possibly at reused addresses
    fused.double()
    x = x.double()
    check()
    fused.float()
    x = x.float()
    check()
    assert not torch.equal(first, fused(x).detach())


def test_eval_with_grad_enabled_gives_parameter_gradients():
    """Fine-tuning with frozen BN statistics: the fold must carry gradients, not a cached constant."""
    seq = eager_sequential(4, 3, 2).eval()
    fused = fk.FusedConvBNAct.from_module(copy.deepcopy(seq)).eval()
    x = make_input((2, 4, 7, 7), torch.float32)
    fused(x).sum().backward()
    seq(x).sum().backward()
    for (name, p), q in zip(fused.named_parameters(), seq.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_batchnorm_without_running_stats_uses_batch_statistics():
    seq = nn.Sequential(nn.Conv2d(4, 4, 3, 1, 1, groups=4, bias=False),
                        nn.BatchNorm2d(4, track_running_stats=False), nn.SiLU()).to(DEVICE).eval()
    fused = fk.FusedConvBNAct.from_module(copy.deepcopy(seq))
    x = make_input((3, 4, 5, 5), torch.float32)
    torch.testing.assert_close(fused(x), seq(x), rtol=1e-5, atol=1e-5)


def test_from_module_shares_parameters():
    timm_module = ConvNormAct(8, 8, 5, groups=8, act_layer="relu").to(DEVICE)
    fused = fk.FusedConvBNAct.from_module(timm_module)
    assert fused.conv.weight is timm_module.conv.weight and fused.bn is timm_module.bn
    assert fused.act == "relu"


def test_compile_fullgraph_module_matches_eager():
    torch._dynamo.reset()
    seq = eager_sequential(8, 3, 2).eval()
    fused = fk.FusedConvBNAct.from_module(copy.deepcopy(seq))
    compiled = torch.compile(fused, fullgraph=True)
    x = make_input((2, 8, 12, 12), torch.float32, "channels_last")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), seq(x), rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_training_step():
    torch._dynamo.reset()
    seq = eager_sequential(4, 3, 1).train()
    fused = fk.FusedConvBNAct.from_module(copy.deepcopy(seq)).train()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = make_input((2, 4, 6, 6), torch.float32)
    compiled(x).sum().backward()
    seq(x).sum().backward()
    torch.testing.assert_close(fused[0].weight.grad, seq[0].weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused[1].running_mean, seq[1].running_mean)


@pytest.mark.parametrize("kwargs, message", [
    (dict(groups=8, act_layer=nn.GELU), "activation GELU is not supported"),
    (dict(groups=8, norm_layer=nn.InstanceNorm2d), "norm InstanceNorm2d is not nn.BatchNorm2d"),
])
def test_unsupported_configuration_is_a_clear_error(kwargs, message):
    kwargs = {"kernel_size": 3, "act_layer": nn.SiLU, **kwargs}
    with pytest.raises(Unsupported, match=message):
        fk.FusedConvBNAct(8, 8, **kwargs)


def test_module_rejects_mismatched_channels():
    fused = fk.FusedConvBNAct(8, 8, 3, groups=8).to(DEVICE).eval()
    with pytest.raises(ValueError, match="C=7"):
        fused(make_input((1, 7, 5, 5), torch.float32))


def test_module_built_under_inference_mode():
    """Inference tensors have no version counter: the fold must still be right (and not crash)."""
    with torch.inference_mode():
        seq = eager_sequential(4, 3, 1).eval()
        fused = fk.FusedConvBNAct.from_module(copy.deepcopy(seq))
        x = make_input((1, 4, 6, 6), torch.float32)
        torch.testing.assert_close(fused(x), seq(x), rtol=1e-5, atol=1e-5)
        seq[1].running_var.mul_(2)  # in place, invisible to a version counter
        fused[1].running_var.mul_(2)
        torch.testing.assert_close(fused(x), seq(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv_kwargs", [
    dict(in_channels=6, out_channels=10, kernel_size=1),                            # pointwise
    dict(in_channels=6, out_channels=8, kernel_size=3, stride=2),                   # full conv
    dict(in_channels=6, out_channels=6, kernel_size=3, groups=2),                   # grouped
    dict(in_channels=6, out_channels=6, kernel_size=3, groups=6, dilation=2),       # dilated depthwise
    dict(in_channels=6, out_channels=6, kernel_size=3, groups=6, stride=3),         # stride the kernel lacks
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_conv_path_matches_eager(conv_kwargs, dtype):
    """Convs the depthwise kernel does not take run as an eager conv with BatchNorm folded in."""
    timm_module = ConvNormAct(**conv_kwargs, act_layer="silu").to(DEVICE).eval()
    randomize_bn(timm_module.bn)
    fused = fk.FusedConvBNAct.from_module(copy.deepcopy(timm_module))
    assert fk.modules.conv_bn_act.dwconv_kernel_mismatch(fused.conv) is not None
    x = make_input((2, 6, 11, 9), dtype, "channels_last")
    with torch.no_grad():
        ref64 = copy.deepcopy(timm_module).double()(x.double())
        assert_close(fused(x), ref64, copy.deepcopy(timm_module).to(dtype)(x), str(conv_kwargs))
    # Training: batch statistics and gradients exactly as the eager module.
    timm_module.train(), fused.train()
    x = x.float().requires_grad_()
    fused(x).square().sum().backward()
    grad_ours = fused.conv.weight.grad.clone()
    fused.conv.weight.grad = None
    timm_module(x).square().sum().backward()
    torch.testing.assert_close(grad_ours, timm_module.conv.weight.grad)


def test_folded_conv_path_keeps_autograd_through_the_activation():
    """Eval with grads flowing (e.g. input attribution): the activation must not run in place."""
    timm_module = ConvNormAct(4, 6, 1, act_layer="silu").to(DEVICE).eval()
    randomize_bn(timm_module.bn)
    fused = fk.FusedConvBNAct.from_module(copy.deepcopy(timm_module))
    x = make_input((1, 4, 5, 5), torch.float32).requires_grad_()
    (g_ours,) = torch.autograd.grad(fused(x).sum(), x)
    (g_ref,) = torch.autograd.grad(timm_module(x).sum(), x)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-5)


def test_dwconv_kernel_mismatch_names_the_reason():
    mismatch = fk.modules.conv_bn_act.dwconv_kernel_mismatch
    assert mismatch(nn.Conv2d(8, 8, 3, padding=1, groups=8)) is None
    assert "conv is not depthwise: in_channels=8, out_channels=8, groups=1" in mismatch(nn.Conv2d(8, 8, 3))
    assert "dilation=(2, 2)" in mismatch(nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8))
    assert "padding=(0, 0)" in mismatch(nn.Conv2d(8, 8, 3, groups=8))
    assert "kernel_size=(4, 4)" in mismatch(nn.Conv2d(8, 8, 4, padding=2, groups=8))
    assert "stride=(3, 3)" in mismatch(nn.Conv2d(8, 8, 3, 3, 1, groups=8))
