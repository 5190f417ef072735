"""The CPU caching allocator (csrc/cpu_cache.h) and the inference Linear / LayerNorm / copies that write
into it (fastvit_kernels/memory.py): same values as the PyTorch calls they replace, buffers reused,
and the plain PyTorch path wherever autograd, autocast, hooks or compile need it."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvit_kernels import backends, memory
from helpers import assert_close
from fastvit_kernels.ops import dwconv_layernorm, xca_attention

pytestmark = pytest.mark.skipif(backends.extension() is None, reason="the compiled extension is not built")

BIG = (64, 1024)  # 256 KiB of float32: above the 128 KiB below which blocks are not cached


def _live() -> int:
    return memory.cpu_cache_stats().live_bytes


def test_cached_empty_shape_dtype_layout():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64):
        t = memory.empty((2, 48, 33, 31), dtype, torch.device("cpu"), torch.channels_last)
        ref = torch.empty((2, 48, 33, 31), dtype=dtype, memory_format=torch.channels_last)
        assert (t.shape, t.stride(), t.dtype, t.device) == (ref.shape, ref.stride(), ref.dtype, ref.device)
        assert t.data_ptr() % 64 == 0
    assert memory.empty((0, 5), torch.float32, torch.device("cpu")).numel() == 0


def test_freed_block_is_reused_and_accounted():
    before = memory.cpu_cache_stats()
    t = memory.empty(BIG, torch.float32, torch.device("cpu"))
    ptr = t.data_ptr()
    assert _live() == before.live_bytes + 256 * 1024
    del t
    after = memory.cpu_cache_stats()
    assert after.live_bytes == before.live_bytes and after.idle_bytes >= 256 * 1024
    # Same size class (sizes within 1/8 of a power of two share one): the same block comes back.
    u = memory.empty((64, 1000), torch.float32, torch.device("cpu"))
    assert u.data_ptr() == ptr
    u.fill_(1.0)
    assert u.sum().item() == 64 * 1000


def test_small_blocks_bypass_the_cache():
    before = _live()
    t = memory.empty((16, 16), torch.float32, torch.device("cpu"))
    assert _live() == before
    t.fill_(2.0)
    assert t.sum().item() == 512.0


def test_limit_and_release():
    limit = memory.cpu_cache_stats().limit_bytes
    try:
        memory.set_cpu_cache_limit(0)
        assert memory.cpu_cache_stats().idle_bytes == 0
        t = memory.empty(BIG, torch.float32, torch.device("cpu"))
        del t
        assert memory.cpu_cache_stats().idle_bytes == 0  # freed, not kept
        memory.set_cpu_cache_limit(1 << 30)
        t = memory.empty(BIG, torch.float32, torch.device("cpu"))
        del t
        assert memory.cpu_cache_stats().idle_bytes > 0
        memory.empty_cpu_cache()
        assert memory.cpu_cache_stats().idle_bytes == 0
    finally:
        memory.set_cpu_cache_limit(limit)
    with pytest.raises(ValueError, match="limit_bytes must be an int >= 0, got -1"):
        memory.set_cpu_cache_limit(-1)


def test_threads_share_the_cache_safely():
    before = _live()
    errors = []

    def work(seed):
        try:
            for i in range(200):
                t = memory.empty((64 + (seed + i) % 7, 1024), torch.float32, torch.device("cpu"))
                t.fill_(seed)
                assert t.min().item() == t.max().item() == seed
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and _live() == before


def test_switched_off_by_env_and_deterministic_fill(monkeypatch):
    before = _live()
    monkeypatch.setenv(memory.ENV_VAR, "0")
    t = memory.empty(BIG, torch.float32, torch.device("cpu"))
    assert _live() == before
    monkeypatch.delenv(memory.ENV_VAR)
    torch.use_deterministic_algorithms(True)
    try:
        t = memory.empty(BIG, torch.float32, torch.device("cpu"))
        assert torch.isnan(t).all()  # torch.empty's NaN fill, kept as a debugging aid
    finally:
        torch.use_deterministic_algorithms(False)


def test_op_outputs_come_from_the_cache():
    x = torch.randn(2, 64, 32, 32).to(memory_format=torch.channels_last)
    w, b, nw, nb = torch.randn(64, 1, 3, 3), torch.randn(64), torch.randn(64), torch.randn(64)
    before = _live()
    out = dwconv_layernorm(x, w, b, nw, nb, 1e-6)
    assert _live() >= before + out.numel() * 4
    qkv = torch.randn(2, 1024, 3 * 64)
    att = xca_attention(qkv, 4, torch.ones(4, 1, 1))
    assert _live() >= before + (out.numel() + att.numel()) * 4
    del out, att
    assert _live() == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 24), (2, 9, 24), (2, 5, 6, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear(dtype, shape, bias):
    lin = nn.Linear(24, 40, bias=bias).to(dtype)
    x = torch.randn(shape, dtype=dtype)
    strided = torch.randn(shape[:-1] + (48,), dtype=dtype)[..., ::2]  # not viewable as 2-D
    for inp in (x, strided):
        with torch.no_grad():
            out = memory.run_linear(lin, inp)
            torch.testing.assert_close(out, F.linear(inp, lin.weight, lin.bias))  # GEMM paths may differ
    with torch.inference_mode():
        out = memory.linear(x, lin.weight, lin.bias)
    torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias).detach())


@pytest.mark.parametrize("gemm", ["mkl", "onednn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 24), (2, 9, 24), (0, 24), (1, 24)])
def test_linear_on_each_cpu_gemm_matches_float64(monkeypatch, gemm, dtype, shape):
    if gemm == "onednn" and dtype not in memory._onednn_dtypes():
        pytest.skip(f"oneDNN has no {dtype} Linear for this CPU (or torch was built without oneDNN)")
    monkeypatch.setenv(memory.GEMM_ENV_VAR, gemm)
    assert memory.onednn_gemm() == (gemm == "onednn")
    w, b = torch.randn(40, 24).to(dtype), torch.randn(40).to(dtype)
    x = torch.randn(shape).to(dtype)
    strided = torch.randn(shape[:-1] + (48,)).to(dtype)[..., ::2]
    for inp, bias in ((x, b), (strided, b), (x, None)):
        with torch.inference_mode():
            out = memory.linear(inp, w, bias)
            same = F.linear(inp, w, bias)  # PyTorch in the same dtype
        ref = F.linear(inp.double(), w.double(), None if bias is None else bias.double())
        assert out.dtype == dtype and out.shape == ref.shape
        if out.numel():
            assert_close(out, ref, same, f"{gemm} {dtype}")


@pytest.mark.parametrize("gemm", ["mkl", "onednn"])
def test_linear_of_zero_features_is_the_bias(monkeypatch, gemm):
    monkeypatch.setenv(memory.GEMM_ENV_VAR, gemm)
    x, w, b = torch.randn(3, 0), torch.randn(4, 0), torch.randn(4)
    with torch.inference_mode():
        torch.testing.assert_close(memory.linear(x, w, b), b.expand(3, 4))


def test_large_outputs_stay_on_the_cache(monkeypatch):
    """oneDNN's outputs come from malloc; those over ONEDNN_MAX_OUTPUT_BYTES (where glibc would map fresh
    pages for every call) are written by addmm into a cached buffer instead."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setenv(memory.GEMM_ENV_VAR, "onednn")
    x, w, b = torch.randn(BIG[0], 64), torch.randn(BIG[1], 64), torch.randn(BIG[1])  # a 256 KiB output
    for limit, cached in ((1 << 20, False), (128 << 10, True)):
        monkeypatch.setattr(memory, "ONEDNN_MAX_OUTPUT_BYTES", limit)
        before = _live()
        with torch.inference_mode():
            out = memory.linear(x, w, b)
            assert (_live() > before) == cached, limit
            torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-4)
        del out


@pytest.mark.parametrize("gemm", ["mkl", "onednn"])
@pytest.mark.parametrize("activation", sorted(memory.LINEAR_ACTIVATIONS))
def test_linear_activation_epilogue_matches_float64(monkeypatch, gemm, activation):
    """The activation in oneDNN's epilogue or in place on the cached buffer, and the functional one
    where autograd runs; a 1x1 conv through pointwise_conv likewise."""
    if gemm == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setenv(memory.GEMM_ENV_VAR, gemm)
    function = memory.LINEAR_ACTIVATIONS[activation][0]
    x, w, b = torch.randn(2, 9, 24), torch.randn(40, 24) * 0.3, torch.randn(40)
    ref64 = function(F.linear(x.double(), w.double(), b.double()))
    with torch.inference_mode():
        out = memory.linear(x, w, b, activation)
    assert_close(out, ref64, function(F.linear(x, w, b)), f"{gemm} {activation}")
    w_grad = w.clone().requires_grad_()
    out = memory.linear(x, w_grad, b, activation)  # autograd: F.linear and the functional activation
    assert out.grad_fn is not None
    assert_close(out.detach(), ref64, function(F.linear(x, w, b)), f"{gemm} {activation} autograd")
    conv = nn.Conv2d(24, 40, 1).eval()
    padded_conv = nn.Conv2d(24, 40, 1, padding=1).eval()  # the conv path, the activation after it
    image = torch.randn(2, 24, 5, 6).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got = memory.pointwise_conv(conv, image, activation=activation)
        got_padded = memory.pointwise_conv(padded_conv, image, activation=activation)
    with torch.no_grad():
        for module, result in ((conv, got), (padded_conv, got_padded)):
            ref = function(copy.deepcopy(module).double()(image.double()))
            assert_close(result, ref, function(module(image)), f"{gemm} {activation} conv")
    assert memory.activation_name(nn.GELU(approximate="tanh")) is None
    assert memory.activation_name(nn.Hardswish()) == "hardswish"


def test_cpu_gemm_choice(monkeypatch):
    monkeypatch.setenv(memory.GEMM_ENV_VAR, "mkl")
    assert not memory.onednn_gemm()
    monkeypatch.setenv(memory.GEMM_ENV_VAR, "blas")
    with pytest.raises(ValueError, match="FASTVIT_KERNELS_CPU_GEMM='blas'; supported: auto, onednn, mkl"):
        memory.onednn_gemm()
    monkeypatch.delenv(memory.GEMM_ENV_VAR)
    for capability, vendor, expected in (("AVX512", "AuthenticAMD", True), ("AVX2", "AuthenticAMD", False),
                                         ("AVX512", "GenuineIntel", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(memory, "_cpu_vendor", lambda: vendor)
        memory._onednn_gemm_auto.cache_clear()
        try:
            assert memory.onednn_gemm() == (expected and torch.backends.mkldnn.is_available())
        finally:
            memory._onednn_gemm_auto.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_layer_norm_and_channels_last_match_pytorch(dtype):
    norm = nn.LayerNorm(40, eps=1e-6).to(dtype)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 40, 7, 9, dtype=dtype)
    tokens = x.permute(0, 2, 3, 1)  # not contiguous
    with torch.no_grad():
        torch.testing.assert_close(memory.run_layer_norm(norm, tokens), norm(tokens), rtol=0, atol=0)
        cl = memory.channels_last(x)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, x)
    already = x.contiguous(memory_format=torch.channels_last)
    assert memory.channels_last(already) is already


def test_autograd_autocast_and_hooks_take_the_module_path():
    lin = nn.Linear(24, 40)
    x = torch.randn(4, 24)
    before = _live()
    y = memory.run_linear(lin, x)  # grad enabled, weight requires grad: plain F.linear
    assert y.grad_fn is not None
    y.sum().backward()
    assert lin.weight.grad is not None and _live() == before
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert memory.run_linear(lin, x).dtype == torch.bfloat16
    calls = []
    lin.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        memory.run_linear(lin, x)
    assert calls == [1]


def test_compiled_linear_has_no_graph_break():
    lin = nn.Linear(24, 40)
    norm = nn.LayerNorm(40)
    fn = torch.compile(lambda t: memory.run_layer_norm(norm, memory.run_linear(lin, t)), backend="aot_eager",
                       fullgraph=True)
    x = torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(fn(x), norm(lin(x)))


def test_compile_before_the_extension_is_imported_has_no_graph_break():
    """A model whose first call is a compiled one: the cache's check must not import the extension
    while dynamo traces (an import is untraceable: fullgraph=True failed on EdgeNeXt)."""
    import subprocess
    import sys

    code = ("import sys, torch, torch.nn as nn\n"
            "from fastvit_kernels import memory\n"
            "assert 'fastvit_kernels._C' not in sys.modules\n"
            "lin = nn.Linear(24, 40)\n"
            "fn = torch.compile(lambda t: memory.channels_last(memory.run_linear(lin, t)), backend='aot_eager',"
            " fullgraph=True)\n"
            "x = torch.randn(2, 5, 3, 24)\n"
            "with torch.inference_mode():\n"
            "    torch.testing.assert_close(fn(x), lin(x).contiguous(memory_format=torch.channels_last))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_run_module_matches_the_sequential_and_keeps_its_input():
    from fastvit_kernels.modules.patch_transformer import run_module

    torch.manual_seed(0)
    feed_forward = nn.Sequential(nn.LayerNorm(24), nn.Linear(24, 64), nn.GELU(), nn.Dropout(0.0), nn.Linear(64, 24),
                                 nn.Dropout(0.0)).eval()
    act_first = nn.Sequential(nn.GELU(), nn.Linear(24, 24), nn.SiLU(), nn.Identity()).eval()
    x = torch.randn(2, 9, 24)
    for seq in (feed_forward, act_first):
        kept = x.clone()
        with torch.no_grad():
            out = run_module(seq, x)
            torch.testing.assert_close(out, seq(x))
        assert torch.equal(x, kept), "the caller's input was overwritten"


def test_crossvit_packed_qkv_weight_follows_weight_updates():
    from fastvit_kernels.models.vit_family.cross_vit import Attention

    torch.manual_seed(0)
    attn = Attention(32, heads=2, dim_head=16).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        first = attn(x)
        attn.to_kv.weight.mul_(2.0)  # an in-place update: the packed copy must be rebuilt
        second = attn(x)
        attn.to_q.weight.mul_(0.5)
        third = attn(x)
    ref = Attention(32, heads=2, dim_head=16).eval()
    ref.load_state_dict(attn.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(third, ref(x))
    assert not torch.allclose(first, second) and not torch.allclose(second, third)


@pytest.mark.parametrize("gemm", ["mkl", "onednn"])
@pytest.mark.parametrize("stride,bias,padding", [(1, True, 0), (2, False, 0), (1, True, "same"), (1, True, 1)])
def test_pointwise_conv_matches_the_conv(monkeypatch, gemm, stride, bias, padding):
    if gemm == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setenv(memory.GEMM_ENV_VAR, gemm)
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 40, 1, stride=stride, bias=bias, padding=padding).eval()
    x = torch.randn(4, 24, 40, 32)  # outputs over the 128 KiB below which blocks are not cached
    before = _live()
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        with torch.no_grad():
            out = memory.pointwise_conv(conv, inp)
            torch.testing.assert_close(out, conv(inp))
            if inp.is_contiguous(memory_format=torch.channels_last) and padding != 1:
                assert out.is_contiguous(memory_format=torch.channels_last)
                assert (_live() > before) == (gemm == "mkl")  # oneDNN has no out=: a plain new tensor
        del out
    w, b = torch.randn(40, 24, 1, 1), torch.randn(40)  # explicit (e.g. folded) weight and bias
    with torch.no_grad():
        torch.testing.assert_close(memory.pointwise_conv(conv, x.contiguous(memory_format=torch.channels_last), w, b),
                                   F.conv2d(x, w, b, stride, conv.padding))


def test_run_module_convs_and_frozen_batchnorm():
    from fastvit_kernels.modules.patch_transformer import run_module

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(16)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    seq = nn.Sequential(nn.GELU(), nn.Conv2d(8, 16, 1), bn, nn.Hardswish(), nn.Conv2d(16, 8, 3, padding=1),
                        nn.Dropout(0.0)).eval()
    x = torch.randn(2, 8, 6, 5).contiguous(memory_format=torch.channels_last)
    kept = x.clone()
    with torch.no_grad():
        torch.testing.assert_close(run_module(seq, x), seq(x))
    assert torch.equal(x, kept)


def test_crossvit_built_in_inference_mode_runs():
    """Parameters made under inference_mode have no version counter: the packed weight is not cached."""
    from fastvit_kernels.models.vit_family.cross_vit import Attention

    with torch.inference_mode():
        attn = Attention(32, heads=2, dim_head=16).eval()
        x = torch.randn(2, 5, 32)
        packed = F.linear(attn.norm(x), torch.cat((attn.to_q.weight, attn.to_kv.weight)))
        assert attn(x).shape == (2, 5, 32) and packed.shape == (2, 5, 96)
