"""The CPU fused MLP (csrc/cpu/fused_mlp.cpp, fastvit_kernels.memory.fused_mlp) against a float64
reference, where the EdgeNeXt blocks take it, and where they must not."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.edgenext import ConvBlock, SplitTransposeBlock

from fastvit_kernels import backends, memory
from fastvit_kernels.modules.edgenext import FusedConvBlock, FusedSDTABlock
from fastvit_kernels.modules.patch_transformer import Mlp
from helpers import assert_close

pytestmark = pytest.mark.skipif(backends.extension() is None, reason="the compiled extension is not built")

ACTS = {0: lambda t: t, 1: F.gelu, 2: lambda t: t * (t + 3).clamp(0, 6) / 6, 3: F.silu}


def reference(x, w1, b1, w2, b2, gamma, residual, act):
    """float64: residual + gamma * (act(x w1^T + b1) w2^T + b2)."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    y = F.linear(ACTS[act](F.linear(d(x), d(w1), d(b1))), d(w2), d(b2))
    y = y if gamma is None else y * d(gamma)
    return y if residual is None else y + d(residual)


def eager(x, w1, b1, w2, b2, gamma, residual, act):
    """The same in float32 eager PyTorch: the tolerance's yardstick."""
    hidden = F.linear(x, w1, b1)
    hidden = {0: lambda t: t, 1: F.gelu, 2: F.hardswish, 3: F.silu}[act](hidden)
    y = F.linear(hidden, w2, b2)
    y = y if gamma is None else y * gamma
    return y if residual is None else y + residual


def make(M, C, H, seed=0, bias=True, gamma=True, residual=True, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return (r(M, C) * scale, r(H, C) / C ** 0.5, r(H) if bias else None, r(C, H) / H ** 0.5, r(C) if bias else None,
            torch.rand(C, generator=gen) + 0.5 if gamma else None, r(M, C) if residual else None)


def run_kernel(x, w1, b1, w2, b2, gamma, residual, act):
    out = torch.empty(x.shape[0], w2.shape[0])
    backends.extension().fused_mlp(x, w1, b1, w2, b2, gamma, residual, act, out)
    return out


# Rows: 1, fewer than a register tile (6), not a multiple of a task's 24, many tasks. Widths: EdgeNeXt's
# 24/48/88/100, odd ones, under one vector (8). Hidden widths not multiples of 8 or 16, and longer
# than a partial sum's 32 channels.
@pytest.mark.parametrize("M,C,H", [(1, 24, 96), (5, 7, 13), (24, 8, 16), (25, 48, 192), (77, 100, 400),
                                   (300, 3, 37), (130, 88, 352), (49, 17, 200)])
@pytest.mark.parametrize("act", [0, 1, 2, 3])
def test_kernel_matches_float64(M, C, H, act):
    args = make(M, C, H, seed=M + C)
    assert_close(run_kernel(*args, act), reference(*args, act), eager(*args, act), f"fused_mlp {M}x{C}x{H} act {act}")


@pytest.mark.parametrize("bias,gamma,residual", [(False, False, False), (True, False, False), (False, True, True),
                                                 (True, True, False), (False, False, True)])
def test_kernel_optional_terms(bias, gamma, residual):
    args = make(31, 40, 160, bias=bias, gamma=gamma, residual=residual)
    assert_close(run_kernel(*args, 1), reference(*args, 1), eager(*args, 1), f"terms {bias} {gamma} {residual}")


def test_kernel_strided_rows_and_parameters():
    """Rows with a stride past their width (a slice of a wider buffer), a column-major weight, a strided
    layer scale."""
    x, w1, b1, w2, b2, gamma, residual = make(50, 24, 96)
    wide_x = torch.randn(50, 40)
    wide_x[:, 3:27] = x
    wide_r = torch.randn(50, 30)
    wide_r[:, 2:26] = residual
    w1_t = w1.t().contiguous().t()  # same values, column-major storage
    out = run_kernel(wide_x[:, 3:27], w1_t, b1, w2, b2, torch.stack([gamma, gamma], 1)[:, 0], wide_r[:, 2:26], 1)
    args = (x, w1, b1, w2, b2, gamma, residual)
    assert_close(out, reference(*args, 1), eager(*args, 1), "strided")


def test_kernel_large_and_extreme_inputs():
    """GELU far into both tails (its erfc is capped there, no denormals), NaN and inf propagate."""
    args = make(40, 16, 64, scale=30.0)
    assert_close(run_kernel(*args, 1), reference(*args, 1), eager(*args, 1), "large inputs")
    x, *rest = make(12, 16, 64)
    x[3, 5], x[7, 0] = float("nan"), float("inf")
    out = run_kernel(x, *rest, 1)
    assert out[3].isnan().all() and not torch.isfinite(out[7]).all()
    assert torch.isfinite(out[[0, 1, 2, 4, 5, 6, 8, 9, 10, 11]]).all()


def test_kernel_output_may_be_the_residual():
    """out may alias residual (each element is read before it is written)."""
    x, w1, b1, w2, b2, gamma, residual = make(60, 24, 96)
    expected = reference(x, w1, b1, w2, b2, gamma, residual, 1)
    out = residual.clone()
    backends.extension().fused_mlp(x, w1, b1, w2, b2, gamma, out, 1, out)
    assert_close(out, expected, eager(x, w1, b1, w2, b2, gamma, residual, 1), "aliased")


def test_kernel_checks_its_arguments():
    x, w1, b1, w2, b2, gamma, residual = make(8, 16, 64)
    ext = backends.extension()
    out = torch.empty(8, 16)
    with pytest.raises(RuntimeError, match="x must be a float32 CPU tensor, got Double"):
        ext.fused_mlp(x.double(), w1, b1, w2, b2, gamma, residual, 1, out)
    with pytest.raises(RuntimeError, match=r"w1 must be \[H, C=16\]"):
        ext.fused_mlp(x, w1[:, :8], b1, w2, b2, gamma, residual, 1, out)
    with pytest.raises(RuntimeError, match=r"w2 must be \[C=16, H=64\]"):
        ext.fused_mlp(x, w1, b1, w2[:, :32], b2, gamma, residual, 1, out)
    with pytest.raises(RuntimeError, match=r"gamma must be \[16\]"):
        ext.fused_mlp(x, w1, b1, w2, b2, gamma[:4], residual, 1, out)
    with pytest.raises(RuntimeError, match="x must be \\[M, C\\] with contiguous rows"):
        ext.fused_mlp(x.t(), w1, b1, w2, b2, gamma, residual, 1, out)
    with pytest.raises(RuntimeError, match="act must be 0 \\(none\\), 1 \\(gelu\\), 2 \\(hardswish\\) or 3 \\(silu\\), got 7"):
        ext.fused_mlp(x, w1, b1, w2, b2, gamma, residual, 7, out)


# ---- memory.fused_mlp: when it is taken ------------------------------------------------------------


@pytest.fixture(autouse=True)
def _wanted(monkeypatch):
    """The kernel asked for (by default it stands aside where the Linears run on oneDNN)."""
    monkeypatch.setenv(memory.FUSED_MLP_ENV_VAR, "1")


def test_by_default_it_stands_aside_for_onednn_linears(monkeypatch):
    mlp = _mlp()
    big = torch.randn(memory.FUSED_MLP_MIN_ROWS, 24)
    monkeypatch.delenv(memory.FUSED_MLP_ENV_VAR)
    with torch.inference_mode():
        monkeypatch.setenv(memory.GEMM_ENV_VAR, "mkl")
        assert mlp.residual_forward(big) is not None
        monkeypatch.setenv(memory.GEMM_ENV_VAR, "onednn")
        assert (mlp.residual_forward(big) is None) == memory.onednn_gemm()
        monkeypatch.setenv(memory.FUSED_MLP_ENV_VAR, "yes")
        with pytest.raises(ValueError, match="FASTVIT_KERNELS_FUSED_MLP='yes'; supported: auto, 0, 1"):
            mlp.residual_forward(big)


def _mlp(C=24, act=nn.GELU):
    torch.manual_seed(0)
    mlp = Mlp(C, 4 * C, act).eval()
    with torch.no_grad():
        for p in mlp.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    return mlp


def test_taken_at_edgenext_stage_one_size():
    """A batch-8 EdgeNeXt-XXS stage-1 MLP (32768 rows of 24) is fused and matches float64."""
    mlp = _mlp()
    x, residual, gamma = torch.randn(8, 64, 64, 24), torch.randn(8, 64, 64, 24), torch.rand(24) + 0.5
    with torch.inference_mode():
        out = mlp.residual_forward(x, gamma, residual)
        assert out is not None and out.shape == x.shape
        same = residual + gamma * mlp(x)
        ref64 = residual.double() + gamma.double() * copy.deepcopy(mlp).double()(x.double())
    assert_close(out, ref64, same, "stage-1 MLP")


def test_not_taken_where_it_does_not_pay_or_apply(monkeypatch):
    mlp = _mlp()
    big = torch.randn(memory.FUSED_MLP_MIN_ROWS, 24)
    with torch.inference_mode():
        assert mlp.residual_forward(big) is not None
        assert mlp.residual_forward(big[:-1]) is None  # too few rows: MKL's GEMMs do as well
        assert mlp.residual_forward(big.double()) is None
        assert mlp.residual_forward(big.half()) is None
        wide = memory.FUSED_MLP_MAX_WIDTH + 8
        assert _mlp(C=wide).residual_forward(torch.randn(memory.FUSED_MLP_MIN_ROWS, wide)) is None  # unmeasured
        assert _mlp(act=nn.ReLU).residual_forward(big) is None
        strided = torch.randn(memory.FUSED_MLP_MIN_ROWS, 48)[:, ::2]
        assert mlp.residual_forward(big, residual=strided) is None  # channels not contiguous
        monkeypatch.setenv(memory.FUSED_MLP_ENV_VAR, "0")
        assert mlp.residual_forward(big) is None
    approximate = _mlp()
    approximate.act = nn.GELU(approximate="tanh")
    with torch.inference_mode():
        assert approximate.residual_forward(big) is None
    with torch.no_grad():
        assert mlp.train().residual_forward(big) is None  # dropout / drop path are live
    mlp.eval()
    assert mlp.residual_forward(big.requires_grad_()) is None  # autograd must see the layers


def _spy_kernel(monkeypatch):
    calls = []
    real = memory.fused_mlp

    def spy(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(memory, "fused_mlp", spy)
    return calls


@pytest.mark.parametrize("kind", ["conv", "sdta"])
def test_edgenext_blocks_take_it_and_match_timm(monkeypatch, kind):
    """With the row threshold lowered to this test's size, each EdgeNeXt block runs its MLP, layer scale
    and residual in the kernel and still matches timm (float64 reference)."""
    monkeypatch.setattr(memory, "FUSED_MLP_MIN_ROWS", 1)
    calls = _spy_kernel(monkeypatch)
    torch.manual_seed(0)
    block = ConvBlock(24, kernel_size=7) if kind == "conv" else SplitTransposeBlock(24, num_scales=2, num_heads=4)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.rand(p.shape) + 0.5) if "gamma" in name else p.add_(torch.randn(p.shape) * 0.05)
    block.eval()
    fused = (FusedConvBlock if kind == "conv" else FusedSDTABlock).from_module(copy.deepcopy(block)).eval()
    x = torch.randn(2, 24, 9, 7).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = fused(x)
        ref64 = copy.deepcopy(block).double()(x.double())
        assert_close(out, ref64, block(x), f"{kind} block, fused MLP")
    assert calls == [True]
    # An NCHW input has no [M, C] view of its shortcut: the layers run one by one, same result.
    calls.clear()
    with torch.inference_mode():
        assert_close(fused(x.contiguous()), ref64, block(x), f"{kind} block, NCHW")
    assert calls == [False]


def test_eval_block_compiles_without_graph_breaks(monkeypatch):
    """Under torch.compile the block runs its layers one by one (the kernel is eager-only), with no
    graph break from the checks that decide it."""
    monkeypatch.setattr(memory, "FUSED_MLP_MIN_ROWS", 1)
    torch._dynamo.reset()
    block = ConvBlock(24, kernel_size=7).eval()
    fused = FusedConvBlock.from_module(copy.deepcopy(block)).eval()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 24, 9, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x), rtol=1e-4, atol=1e-5)


def test_vit_family_feed_forward_takes_it_and_matches_vit_pytorch(monkeypatch):
    """The ViT family's FeedForward (LayerNorm, Linear, GELU, Dropout, Linear, Dropout) with its
    residual runs as LayerNorm + the kernel and still matches vit-pytorch's ViT (float64 reference)."""
    from vit_pytorch.vit import ViT as TheirViT

    from fastvit_kernels.models.vit_family import ViT

    monkeypatch.setattr(memory, "FUSED_MLP_MIN_ROWS", 1)
    calls = _spy_kernel(monkeypatch)
    kwargs = dict(image_size=32, patch_size=8, num_classes=10, dim=48, depth=2, heads=3, mlp_dim=96)
    torch.manual_seed(0)
    theirs = TheirViT(**kwargs).eval()
    ours = ViT(**kwargs).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = ours(x)
        ref64 = copy.deepcopy(theirs).double()(x.double())
        assert_close(out, ref64, theirs(x), "ViT, fused feed-forward")
    assert calls == [True, True]
