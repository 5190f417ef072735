"""T2TViT, CrossViT, PiT, CvT and LeViT on the fused ops against vit-pytorch's classes with the same weights."""

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import fastvit_kernels as fk
from fastvit_kernels.backends import BackendUnavailable, load_error
from fastvit_kernels.models import vit_family
from fastvit_kernels.ops import implementations
from helpers import BACKENDS, DEVICE, INTERPRETED, assert_close

vit_pytorch = pytest.importorskip("vit_pytorch")
from vit_pytorch import cross_vit, cvt, levit, pit, t2t  # noqa: E402


@dataclass
class Case:
    ours: type
    ref: type
    kwargs: dict
    image_size: int
    ops: tuple  # the fused ops the model calls: a backend lacking one cannot run it
    batch: int = 2
    channels: int = 3
    tiny: bool = False  # small enough for the Triton interpreter
    train_backends: tuple = ()  # when set, the training test runs on these only (slow cases)
    only_reference_serves: bool = False  # head dims past every kernel (T2T): named kernel backends refuse


CASES = {
    # vit-pytorch's default t2t_layers: the T2T stages attend with head dims 147 and 1323.
    "T2TViT": Case(vit_family.T2TViT, t2t.T2TViT,
                   dict(image_size=32, num_classes=5, dim=32, depth=1, heads=2, mlp_dim=48, dim_head=16),
                   32, ("patch_attention",), batch=1, train_backends=("auto",), only_reference_serves=True),
    # One channel and 3 x 3 kernels: head dims 9 and 81, which the Triton kernel serves.
    "T2TViT-small": Case(vit_family.T2TViT, t2t.T2TViT,
                         dict(image_size=16, num_classes=3, dim=16, depth=1, heads=2, mlp_dim=16, dim_head=8,
                              channels=1, t2t_layers=((3, 2), (3, 2))),
                         16, ("patch_attention",), batch=1, channels=1, tiny=True),
    "CrossViT": Case(vit_family.CrossViT, cross_vit.CrossViT,
                     dict(image_size=32, num_classes=5, sm_dim=24, lg_dim=32, sm_patch_size=4, lg_patch_size=8,
                          sm_enc_depth=1, sm_enc_heads=2, sm_enc_mlp_dim=32, sm_enc_dim_head=8, lg_enc_depth=1,
                          lg_enc_heads=2, lg_enc_mlp_dim=32, lg_enc_dim_head=8, cross_attn_depth=1,
                          cross_attn_heads=2, cross_attn_dim_head=8, depth=1, dropout=0.0, emb_dropout=0.0),
                     32, ("patch_attention", "attention")),
    "PiT": Case(vit_family.PiT, pit.PiT,
                dict(image_size=16, patch_size=4, num_classes=5, dim=16, depth=(1, 1), heads=(2, 1), mlp_dim=16,
                     dim_head=8),
                16, ("patch_attention", "dwconv_bn_act"), batch=1, tiny=True),
    "CvT": Case(vit_family.CvT, cvt.CvT,
                dict(num_classes=5, s1_emb_dim=16, s1_depth=1, s2_emb_dim=24, s2_heads=2, s2_depth=1,
                     s3_emb_dim=32, s3_heads=2, s3_depth=1),
                48, ("dwconv_bn_act", "attention")),
    # 64 x 64 images: feature maps 4x4 -> 2x2 -> 1x1, two downsampling attentions (stride-2 queries).
    "LeViT": Case(vit_family.LeViT, levit.LeViT,
                  dict(image_size=64, num_classes=5, dim=(16, 24, 32), depth=1, heads=(2, 2, 2), mlp_mult=2,
                       dim_key=8, dim_value=16),
                  64, ("bias_attention",), tiny=True),
}
# "auto": no backend asked for, each op takes the first one that serves it (what users get).
MODEL_BACKENDS = ["auto"] + BACKENDS


def skip_unless_runs(case: Case, backend: str) -> None:
    if backend == "auto":
        return
    if backend == "triton" and not case.tiny:
        pytest.skip("whole models through the Triton interpreter are slow: the tiny cases cover Triton")
    reason = load_error(backend)
    if reason:
        pytest.skip(f"backend {backend} did not load: {reason}")
    if case.only_reference_serves and backend != "reference":
        pytest.skip(f"head dims 147/1323 are served by the reference only: {backend} asked for by name refuses "
                    f"them (test_t2t_large_head_dims_by_name_say_why)")
    missing = [op for op in case.ops if backend not in implementations()[op]]
    if missing:
        pytest.skip(f"op {', '.join(missing)} has no {backend} implementation yet")


def build(case: Case):
    """vit-pytorch's model with seeded weights (BatchNorms randomized: LeViT zero-inits some weights)
    and ours with those weights loaded (strict)."""
    torch.manual_seed(0)
    ref = randomize_batchnorms(case.ref(**case.kwargs).to(DEVICE))
    ours = case.ours(**case.kwargs).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def randomize_batchnorms(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
    return model


def assert_parameter_grads_close(ours, ref64, refs, what):
    """DESIGN.md's rule per parameter gradient, with the floor scaled by the model's largest gradient:
    gradients that cancel to ~0 (a LayerNorm bias before a single-key attention) are float32 noise.
    ``refs``: float32 reference models (one per memory layout); the baseline is the worst of them."""
    scale = max(p.grad.abs().max().item() for p in ref64.parameters())
    for pname, p in ours.named_parameters():
        g64 = ref64.get_parameter(pname).grad
        err = (p.grad.double() - g64).abs().max().item()
        base = max((ref.get_parameter(pname).grad.double() - g64).abs().max().item() for ref in refs)
        assert err <= 2 * base + 1e-5 * max(1.0, scale), f"{what} {pname}.grad: max error {err:.3g}, PyTorch {base:.3g}"


def images(case: Case, size=None, channels=None) -> torch.Tensor:
    size = size or case.image_size
    return torch.randn(case.batch, channels or case.channels, size, size, device=DEVICE)


def run(model, x, backend):
    with fk.use_backend(None if backend == "auto" else backend):
        return model(x)


@pytest.mark.parametrize("name", CASES)
def test_same_state_dict_keys_and_order(name):
    case = CASES[name]
    torch.manual_seed(0)
    ref, ours = case.ref(**case.kwargs), case.ours(**case.kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict())  # strict


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_eval_matches_vit_pytorch(name, backend):
    case = CASES[name]
    skip_unless_runs(case, backend)
    ours, ref = build(case)
    ours.eval(), ref.eval()
    x = images(case)
    with torch.no_grad():
        ref64 = copy.deepcopy(ref).double()(x.double())
        assert_close(run(ours, x, backend), ref64, ref(x), f"{name} {backend} eval")


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_training_matches_vit_pytorch(name, backend):
    """Training (dropout 0): same output, input gradient and BatchNorm running statistics."""
    case = CASES[name]
    if case.train_backends and backend not in case.train_backends:
        pytest.skip(f"{name} is slow to train: {case.train_backends} here, the small cases cover each backend")
    skip_unless_runs(case, backend)
    ours, ref = build(case)
    ours.train(), ref.train()
    ref64, ref_cl = copy.deepcopy(ref).double(), copy.deepcopy(ref)
    x = images(case)
    x_ours, x_ref, x64 = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    out, out_ref, out64 = run(ours, x_ours, backend), ref(x_ref), ref64(x64)
    assert_close(out, out64.detach(), out_ref.detach(), f"{name} {backend} train output")
    grad = torch.randn_like(out)
    with fk.use_backend(None if backend == "auto" else backend):
        out.backward(grad)
    out_ref.backward(grad)
    out64.backward(grad.double())
    # Ours runs its convs channels_last; PyTorch's own float32 gradients are less exact in that layout
    # (vit-pytorch's LeViT on an AVX-512 EPYC: input gradient 2-8x the NCHW error over six seeds), so
    # the baseline is the worse of the reference's two layouts.
    x_cl = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    ref_cl(x_cl).backward(grad)
    worse = max((x_ref.grad, x_cl.grad), key=lambda g: (g.double() - x64.grad).abs().max().item())
    assert_close(x_ours.grad, x64.grad, worse, f"{name} {backend} input gradient")
    assert_parameter_grads_close(ours, ref64, (ref, ref_cl), f"{name} {backend}")
    for bname, buf in ours.named_buffers():  # BatchNorm running statistics (CvT)
        torch.testing.assert_close(buf, ref.get_buffer(bname), msg=bname)


def test_cvt_eval_after_training_step_uses_new_statistics():
    """The BatchNorm fold is refreshed after running statistics and weights move (an optimizer step)."""
    case = CASES["CvT"]
    ours, ref = build(case)
    ref64 = copy.deepcopy(ref).double()
    x = images(case)
    ours.eval()
    with torch.no_grad():
        ours(x)  # fills the fold cache
    for model, inp in ((ours, x), (ref, x), (ref64, x.double())):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()(inp).square().mean().backward()
        opt.step()
        model.eval()
    for bname, buf in ours.named_buffers():
        if buf.is_floating_point():
            assert_close(buf, ref64.get_buffer(bname), ref.get_buffer(bname), bname)
        else:  # num_batches_tracked
            assert torch.equal(buf, ref.get_buffer(bname)), bname
    with torch.no_grad():
        assert_close(ours(x), ref64(x.double()), ref(x), "eval after a step")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_t2t_large_head_dims_by_name_say_why(backend):
    """Head dims 147/1323 are past the kernels' limit (128): a kernel backend asked for by name gives a
    clear error (no silent fallback); with no backend asked for, the reference serves them
    (test_eval_matches_vit_pytorch[T2TViT-auto])."""
    case = CASES["T2TViT"]
    ours, _ = build(case)
    with pytest.raises(BackendUnavailable, match=r"head.dim.{0,4}147") as error:
        run(ours.eval(), images(case), backend)
    assert "reference serves" in str(error.value) and "cuda or reference" not in str(error.value)


def test_t2t_custom_transformer_passes_through():
    """As in vit-pytorch, a transformer passed in replaces the backbone and runs as it is."""
    kwargs = dict(CASES["T2TViT"].kwargs, depth=None, heads=None, mlp_dim=None)
    backbone = vit_family.vit.Transformer(32, 1, 2, 8, 16)
    torch.manual_seed(0)
    ref = t2t.T2TViT(**kwargs, transformer=copy.deepcopy(backbone)).to(DEVICE).eval()
    ours = vit_family.T2TViT(**kwargs, transformer=backbone).to(DEVICE).eval()
    assert ours.transformer is backbone
    ours.load_state_dict(ref.state_dict())
    x = images(CASES["T2TViT"])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="depth, heads and mlp_dim must be given"):
        vit_family.T2TViT(**kwargs)


@pytest.mark.parametrize("name", CASES)
def test_wrong_channel_count_is_a_clear_error(name):
    case = CASES[name]
    ours, _ = build(case)
    with pytest.raises(ValueError, match=rf"expected images \[B, {case.channels}, H, W\], got shape"):
        ours(images(case, channels=case.channels + 1))


@pytest.mark.parametrize("name,size,message", [
    ("CrossViT", 30, r"image size 30x30 is not divisible by the patch size 4x4"),
    ("CrossViT", 28, r"image size 28x28 is not divisible by the patch size 8x8"),
    ("CrossViT", 64, r"more patches than the positional embedding"),
    ("PiT", 18, r"image size 18x18 is not divisible by the patch size 4x4"),
    ("PiT", 32, r"more patches than the positional embedding"),
    ("T2TViT", 64, r"more than the positional embedding"),
    ("LeViT", 72, r"image size 72x72 gives a 5x5 feature map; the positional bias is made for 4x4"),
])
def test_bad_image_size_is_a_clear_error(name, size, message):
    case = CASES[name]
    ours, _ = build(case)
    with pytest.raises(ValueError, match=message):
        ours(images(case, size=size))


def test_non_square_images_and_bad_constructor_arguments_are_clear_errors():
    for name in ("T2TViT", "PiT"):
        ours, _ = build(CASES[name])
        with pytest.raises(ValueError, match="must be square"):
            ours(torch.randn(1, 3, 16, 8, device=DEVICE))
    with pytest.raises(ValueError, match="image_size 30 must be divisible by patch_size 4"):
        vit_family.CrossViT(**dict(CASES["CrossViT"].kwargs, image_size=30))
    with pytest.raises(ValueError, match="image_size 18 must be divisible by patch_size 4"):
        vit_family.PiT(**dict(CASES["PiT"].kwargs, image_size=18))
    with pytest.raises(ValueError, match="depth must be a tuple"):
        vit_family.PiT(**dict(CASES["PiT"].kwargs, depth=2))
    with pytest.raises(ValueError, match="pool must be 'cls' or 'mean'"):
        vit_family.T2TViT(**dict(CASES["T2TViT"].kwargs, pool="max"))


def test_levit_distill_head_and_train_mode_dropout_path():
    """With num_distill_classes LeViT returns (logits, distill logits); attention dropout in training takes
    the written-out path (vit-pytorch's numbers under the same random state)."""
    kwargs = dict(CASES["LeViT"].kwargs, num_distill_classes=3)
    torch.manual_seed(0)
    ref = randomize_batchnorms(levit.LeViT(**kwargs).to(DEVICE)).eval()
    ours = vit_family.LeViT(**kwargs).to(DEVICE).eval()
    ours.load_state_dict(ref.state_dict())
    x = images(CASES["LeViT"])
    with torch.no_grad():
        for a, b in zip(ours(x), ref(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    kwargs["dropout"] = 0.5
    torch.manual_seed(0)
    ref = levit.LeViT(**kwargs).to(DEVICE).train()
    ours = vit_family.LeViT(**kwargs).to(DEVICE).train()
    ours.load_state_dict(ref.state_dict())
    torch.manual_seed(1)
    out = ours(x)
    torch.manual_seed(1)
    for a, b in zip(out, ref(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,module,op", [("LeViT", "levit", "bias_attention"), ("CvT", "cvt", "attend")])
def test_attention_gets_unit_stride_head_dims(name, module, op, monkeypatch):
    """The conv models run channels_last, so the q/k/v heads handed to the attention kernels have
    unit-stride head dims (NCHW maps would give them stride H * W, the kernels' slow path)."""
    target = getattr(vit_family, module)
    seen = []
    original = getattr(target, op)

    def recording(q, k, v, *args, **kwargs):
        seen.append((q.stride(-1), k.stride(-1), v.stride(-1)))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(target, op, recording)
    case = CASES[name]
    ours, _ = build(case)
    with torch.no_grad():
        ours.eval()(images(case))
    assert seen and all(s == (1, 1, 1) for s in seen), seen
