"""vit-pytorch's DeepViT, CaiT, DistillableViT + DistillWrapper and MobileViT on the fused ops, against
vit_pytorch's classes with the same weights (and ViT under torch.compile).

Each model: same state_dict keys in the same order, vit_pytorch's weights load strictly, same output in
eval and in train (dropout 0) per backend, same input and parameter gradients, clear errors for bad
images. Gradients and train outputs follow DESIGN.md's rule against vit_pytorch's float64 copy. A
backend is skipped for a model only while an op the model runs has no implementation on it (the skip
names the op); in the Triton interpreter MobileViT is tested block by block (the whole model takes
minutes there).
"""

import collections
import copy
import random

import pytest
import torch
import torch.nn as nn
import vit_pytorch.cait
import vit_pytorch.deepvit
import vit_pytorch.distill
import vit_pytorch.mobile_vit
import vit_pytorch.vit
from torch.utils._python_dispatch import TorchDispatchMode

import fastvit_kernels as fk
from fastvit_kernels.models import vit_family
from fastvit_kernels.ops import implementations
from helpers import BACKENDS, INTERPRETED, assert_close

RTOL, ATOL = 1e-5, 1e-5  # fp32 comparisons with no float64 copy (seeded dropout, compile, losses)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is faster than several fighting over busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def require(backend, *ops):
    """Skip while one of ``ops`` has no ``backend`` implementation (the reason names the op)."""
    impls = implementations()
    missing = [op for op in ops if backend not in impls[op]]
    if missing:
        pytest.skip(f"{', '.join(missing)} has no {backend} implementation yet")


def build(ref_cls, ours_cls, *args, seed=0, **kwargs):
    """vit_pytorch's model with seeded weights, and ours loaded from its state_dict (strict)."""
    torch.manual_seed(seed)
    ref = ref_cls(*args, **kwargs)
    ours = ours_cls(*args, **kwargs)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in ref.state_dict().items()]
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run(module, x, backend, **kwargs):
    with fk.use_backend(backend):
        return module(x, **kwargs)


def check_eval(ref, ours, x, backend, what):
    ref.eval(), ours.eval()
    with torch.no_grad():
        ref64 = copy.deepcopy(ref).double()(x.double())
        assert_close(run(ours, x, backend), ref64, ref(x), f"{what} {backend} eval")


def check_train(ref, ours, x, backend, what):
    """Train mode: same output, input gradient and every parameter's gradient as vit_pytorch's model
    (DESIGN.md's rule against its float64 copy), and the same BatchNorm statistics."""
    ref64 = copy.deepcopy(ref).double()
    for m in (ref, ours, ref64):
        m.train()
    x_ref, x_ours, x64 = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    out_ref, out, out64 = ref(x_ref), run(ours, x_ours, backend), ref64(x64)
    assert_close(out.detach(), out64.detach(), out_ref.detach(), f"{what} {backend} train output")
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out64.backward(grad.double())
    with fk.use_backend(backend):
        out.backward(grad)
    assert_close(x_ours.grad, x64.grad, x_ref.grad, f"{what} {backend} input grad")
    ref_params, params64 = dict(ref.named_parameters()), dict(ref64.named_parameters())
    for name, p in ours.named_parameters():
        if p.numel() == 0:  # ViT's cls_token with pool="mean" is [0, dim]
            continue
        assert_close(p.grad, params64[name].grad, ref_params[name].grad, f"{what} {backend} {name}.grad")
    ref_buffers = dict(ref.named_buffers())
    for name, b in ours.named_buffers():
        torch.testing.assert_close(b, ref_buffers[name], rtol=RTOL, atol=ATOL, msg=f"{what} {name}")


def image(batch=2, channels=3, size=32):
    return torch.randn(batch, channels, *(size if isinstance(size, tuple) else (size, size)))


def check_bad_images(model, channels, size, bad_size, divisible_msg):
    with pytest.raises(ValueError, match=rf"expected images \[B, {channels}, H, W\]"):
        model(image(2, channels + 1, size))
    with pytest.raises(ValueError, match=divisible_msg):
        model(image(2, channels, bad_size))


def compiles_without_graph_breaks(ours, ref, x):
    """fullgraph=True: any graph break is an error."""
    torch._dynamo.reset()
    ours.eval(), ref.eval()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref(x), rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------------
# ViT (the model is in vit.py): torch.compile
# --------------------------------------------------------------------------------------------------

VIT = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=2, mlp_dim=64, dim_head=16)


def test_vit_compiles_without_graph_breaks():
    ref, ours = build(vit_pytorch.vit.ViT, vit_family.ViT, **{**VIT, "depth": 1})
    compiles_without_graph_breaks(ours, ref, image())


# --------------------------------------------------------------------------------------------------
# DeepViT: re-attention on head_mixing_attention
# --------------------------------------------------------------------------------------------------

DEEPVIT = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64, dim_head=16)


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_deepvit_matches_vit_pytorch(backend, pool):
    require(backend, "head_mixing_attention")
    ref, ours = build(vit_pytorch.deepvit.DeepViT, vit_family.DeepViT, **DEEPVIT, pool=pool)
    x = image()
    check_eval(ref, ours, x, backend, "DeepViT")
    check_train(ref, ours, x, backend, "DeepViT")


def test_deepvit_attention_dropout_matches_vit_pytorch():
    """With attention dropout active the map is written out: same random draws, same output."""
    ref, ours = build(vit_pytorch.deepvit.DeepViT, vit_family.DeepViT, **DEEPVIT, dropout=0.2, emb_dropout=0.1)
    ref.train(), ours.train()
    x = image()
    torch.manual_seed(1)
    out_ref = ref(x)
    torch.manual_seed(1)
    torch.testing.assert_close(ours(x), out_ref, rtol=RTOL, atol=ATOL)


def test_deepvit_bad_input():
    ours = vit_family.DeepViT(**DEEPVIT).eval()
    check_bad_images(ours, 3, 32, 30, "image size 30x30 is not divisible by the patch size 8x8")
    with pytest.raises(ValueError, match="image_size 30x30 must be divisible by patch_size 8x8"):
        vit_family.DeepViT(**{**DEEPVIT, "image_size": 30})


# --------------------------------------------------------------------------------------------------
# CaiT: talking heads (self and class attention) on head_mixing_attention
# --------------------------------------------------------------------------------------------------

CAIT = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, cls_depth=2, heads=4, mlp_dim=64,
            dim_head=16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cait_matches_vit_pytorch(backend):
    require(backend, "head_mixing_attention")
    ref, ours = build(vit_pytorch.cait.CaiT, vit_family.CaiT, **CAIT)
    x = image()
    check_eval(ref, ours, x, backend, "CaiT")
    check_train(ref, ours, x, backend, "CaiT")


def test_cait_dropouts_match_vit_pytorch():
    """Training with attention dropout and layer dropout: the same seeds drop the same elements and
    layers (vit-pytorch's draws: torch's generator, and Python's random when every layer dropped)."""
    ref, ours = build(vit_pytorch.cait.CaiT, vit_family.CaiT, **{**CAIT, "depth": 3}, dropout=0.2,
                      emb_dropout=0.1, layer_dropout=0.5)
    ref.train(), ours.train()
    x = image()
    for seed in range(4):
        torch.manual_seed(seed), random.seed(seed)
        out_ref = ref(x)
        torch.manual_seed(seed), random.seed(seed)
        torch.testing.assert_close(ours(x), out_ref, rtol=RTOL, atol=ATOL, msg=f"seed {seed}")


def test_cait_layer_dropout_is_off_in_eval():
    """Unlike vit-pytorch, which drops layers in eval too, eval runs every layer (deterministic)."""
    ref, ours = build(vit_pytorch.cait.CaiT, vit_family.CaiT, **CAIT, layer_dropout=0.5)
    ref.layer_dropout = 0.0
    ref.patch_transformer.layer_dropout = ref.cls_transformer.layer_dropout = 0.0
    x = image()
    check_eval(ref, ours, x, "reference", "CaiT layer_dropout=0.5")


def test_cait_compiles_without_graph_breaks():
    ref, ours = build(vit_pytorch.cait.CaiT, vit_family.CaiT, **{**CAIT, "depth": 1, "cls_depth": 1})
    compiles_without_graph_breaks(ours, ref, image())


def test_cait_bad_input():
    ours = vit_family.CaiT(**CAIT).eval()
    check_bad_images(ours, 3, 32, (32, 36), "image size 32x36 is not divisible by the patch size 8x8")
    with pytest.raises(ValueError, match="image_size 36x36 must be divisible by patch_size 8x8"):
        vit_family.CaiT(**{**CAIT, "image_size": 36})


# --------------------------------------------------------------------------------------------------
# DistillableViT + DistillWrapper (DeiT): the student's attention on patch_attention
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_distillable_vit_matches_vit_pytorch(backend, pool):
    require(backend, "patch_attention")
    ref, ours = build(vit_pytorch.distill.DistillableViT, vit_family.DistillableViT, **VIT, pool=pool)
    x = image()
    check_eval(ref, ours, x, backend, "DistillableViT")
    check_train(ref, ours, x, backend, "DistillableViT")
    token = torch.randn(1, VIT["dim"])
    with torch.no_grad():
        for a, b in zip(run(ours, x, backend, distill_token=token), ref(x, distill_token=token)):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    vit = ours.to_vit()
    assert type(vit) is vit_family.ViT
    with torch.no_grad():
        torch.testing.assert_close(vit(x), ref(x), rtol=RTOL, atol=ATOL)


def distill_pair(hard, mlp_layernorm, **kwargs):
    torch.manual_seed(1)
    teacher = vit_pytorch.vit.ViT(**{**VIT, "dim": 48, "heads": 3})
    ref_student, student = build(vit_pytorch.distill.DistillableViT, vit_family.DistillableViT, **VIT)
    torch.manual_seed(2)
    ref = vit_pytorch.distill.DistillWrapper(teacher=teacher, student=ref_student, hard=hard,
                                             mlp_layernorm=mlp_layernorm, **kwargs)
    ours = vit_family.DistillWrapper(teacher=copy.deepcopy(teacher), student=student, hard=hard,
                                     mlp_layernorm=mlp_layernorm, **kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("hard,mlp_layernorm", [(False, False), (True, False), (False, True)],
                         ids=["soft", "hard", "soft-layernorm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_wrapper_same_loss_and_gradients(backend, hard, mlp_layernorm):
    require(backend, "patch_attention")
    ref, ours = distill_pair(hard, mlp_layernorm, temperature=2.0, alpha=0.3)
    x, labels = image(), torch.tensor([3, 7])
    loss_ref = ref(x, labels)
    loss = run(ours, x, backend, labels=labels)
    torch.testing.assert_close(loss, loss_ref, rtol=RTOL, atol=ATOL)
    loss_ref.backward()
    with fk.use_backend(backend):
        loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if name.startswith("teacher."):
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    # The call-time temperature and alpha override the constructor's.
    with torch.no_grad():
        torch.testing.assert_close(run(ours, x, backend, labels=labels, temperature=0.5, alpha=0.9),
                                   ref(x, labels, temperature=0.5, alpha=0.9), rtol=RTOL, atol=ATOL)


def test_distill_bad_input():
    ours = vit_family.DistillableViT(**VIT).eval()
    check_bad_images(ours, 3, 32, 20, "image size 20x20 is not divisible by the patch size 8x8")
    with pytest.raises(TypeError, match="student must be a fastvit_kernels DistillableViT, got ViT"):
        vit_family.DistillWrapper(teacher=nn.Identity(), student=vit_family.ViT(**VIT))


# --------------------------------------------------------------------------------------------------
# MobileViT (vit-pytorch's): patch-grouped attention on patch_attention, convs on conv_bn_act
# --------------------------------------------------------------------------------------------------

MOBILEVIT = dict(image_size=(64, 64), dims=(16, 24, 32), channels=(8, 8, 16, 16, 24, 24, 32, 32, 48, 48, 64),
                 num_classes=10, depths=(2, 2, 2))
MOBILEVIT_VARIANTS = {"default": {}, "expansion1-patch2x1": dict(expansion=1, patch_size=(2, 1))}


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


def mobilevit_pair(**kwargs):
    torch.manual_seed(0)
    ref = randomize_batchnorms(vit_pytorch.mobile_vit.MobileViT(**{**MOBILEVIT, **kwargs}))
    ours = vit_family.MobileViT(**{**MOBILEVIT, **kwargs})
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in ref.state_dict().items()]
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("variant", list(MOBILEVIT_VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_mobilevit_matches_vit_pytorch(backend, variant):
    require(backend, "patch_attention", "dwconv_bn_act")
    if backend == "triton" and INTERPRETED:
        pytest.skip("the whole model in the Triton interpreter takes minutes: "
                    "test_mobilevit_blocks_match_vit_pytorch covers triton")
    ref, ours = mobilevit_pair(**MOBILEVIT_VARIANTS[variant])
    x = image(2, 3, 64)
    check_eval(ref, ours, x, backend, f"MobileViT {variant}")
    check_train(ref, ours, x, backend, f"MobileViT {variant}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mobilevit_blocks_match_vit_pytorch(backend):
    """The two blocks alone, tiny (the Triton interpreter is slow): MV2Block (depthwise conv on
    dwconv_bn_act, stride 2) and MobileViTBlock (patch_attention)."""
    require(backend, "patch_attention", "dwconv_bn_act")
    cases = [(vit_pytorch.mobile_vit.MV2Block, vit_family.mobile_vit.MV2Block, (4, 8, 2, 2), (1, 4, 6, 6)),
             (vit_pytorch.mobile_vit.MobileViTBlock, vit_family.mobile_vit.MobileViTBlock, (16, 1, 4, 3, (2, 2), 16),
              (1, 4, 4, 6))]
    for ref_cls, ours_cls, args, shape in cases:
        torch.manual_seed(0)
        ref = randomize_batchnorms(ref_cls(*args))
        ours = ours_cls(*args)
        assert list(ours.state_dict()) == list(ref.state_dict())
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(shape)
        check_eval(ref, ours, x, backend, ours_cls.__name__)
        check_train(ref, ours, x, backend, ours_cls.__name__)


def test_mobilevit_attention_dropout_matches_vit_pytorch():
    """MobileViTBlock with attention dropout: the written-out path draws as vit-pytorch's (same
    [B, P, heads, N, N] map). Only the attention dropout is on: the token-wise dropouts draw over
    tokens in image order here, in unfolded order there (same distribution, other masks per seed)."""
    torch.manual_seed(0)
    args = (16, 2, 8, 3, (2, 2), 32)
    ref = vit_pytorch.mobile_vit.MobileViTBlock(*args).train()
    ours = vit_family.mobile_vit.MobileViTBlock(*args).train()
    ours.load_state_dict(ref.state_dict())
    for model in (ref, ours):
        for attn, _ in model.transformer.layers:
            attn.dropout.p = 0.2
    x = image(2, 8, (8, 6))
    torch.manual_seed(1)
    out_ref = ref(x)
    torch.manual_seed(1)
    torch.testing.assert_close(ours(x), out_ref, rtol=RTOL, atol=ATOL)


def test_mobilevit_bad_input():
    ours = vit_family.MobileViT(**MOBILEVIT).eval()
    check_bad_images(ours, 3, 64, 96, r"image size 96x96 gives feature maps 12x12, 6x6, 3x3 at the MobileViT "
                                      r"blocks, not all divisible by the patch size 2x2")
    with pytest.raises(ValueError, match="image_size 63x64 must be divisible by patch_size 2x2"):
        vit_family.MobileViT(**{**MOBILEVIT, "image_size": (63, 64)})


# --------------------------------------------------------------------------------------------------
# Which fused ops each model runs (eval, dropout 0): attention never falls back to eager
# --------------------------------------------------------------------------------------------------


class CountOps(TorchDispatchMode):
    """Counts the calls of our custom ops (``torch.ops.fastvit_kernels.*``)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastvit_kernels":
            self.counts[func._opname] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name,make,size,expected", [
    ("DeepViT", lambda: vit_family.DeepViT(**DEEPVIT), 32, {"head_mixing_attention": 2}),
    ("CaiT", lambda: vit_family.CaiT(**CAIT), 32, {"head_mixing_attention": 4}),
    ("DistillableViT", lambda: vit_family.DistillableViT(**VIT), 32, {"patch_attention": 2}),
    ("MobileViT", lambda: vit_family.MobileViT(**MOBILEVIT), 64, {"patch_attention": 6, "dwconv_bn_act": 7}),
])
def test_models_run_attention_on_fused_ops(name, make, size, expected):
    model = make().eval()
    with torch.no_grad(), CountOps() as counter:
        model(image(1, 3, size))
    assert dict(counter.counts) == expected, name
