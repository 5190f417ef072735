"""Ahead-of-time compile of every Triton kernel variant the launchers can use, for sm_80 and sm_90.

No GPU needed. Each variant must compile, must not spill registers, and must fit the architecture's
shared memory. The variants come from the launcher's own enumeration (``all_kernel_configs``), and the
launch arguments from its own ``kernel_args``. Each is compiled twice: as ``triton.jit`` specializes
for a dense tensor whose sizes are multiples of 16 (unit strides become constants, everything is
16-divisible: the widest vector loads), and with no specialization at all (arbitrary strided views).
Real inputs get a mix of the two: some strides constant or 16-divisible, others not. Kernels that opt
out of JIT specialization (patch_attention, xca_attention, bias_attention: their launchers state alignment through a
constexpr) are compiled once per config.

Select with ``pytest -k triton_aot``. dwconv_bn_act: 280 compiles, about 70 CPU-seconds with a cold
Triton cache (45-50 s on an otherwise idle 2-core machine); patch_attention: 64 compiles, about
45 CPU-seconds (25-30 s); xca_attention: 140 compiles, about 120 CPU-seconds (100-110 s on a
loaded 2-core machine); bias_attention: 192 compiles, about 220 CPU-seconds; dwconv_layernorm (the
dwconv kernel with LAYERNORM=True): 420 compiles, 6 minutes on a heavily loaded 2-core machine. A few seconds with a
warm cache.
"""
import pytest
import torch

pytest.importorskip("triton")

from fastvit_kernels.triton import aot  # noqa: E402
from fastvit_kernels.triton import bias_attention as ba  # noqa: E402
from fastvit_kernels.triton import dwconv_bn_act as dw  # noqa: E402
from fastvit_kernels.triton import patch_attention as pa  # noqa: E402
from fastvit_kernels.triton import xca_attention as xa  # noqa: E402


def _dwconv_example_args(dtype, channels_last: bool, kernel_size: int, layernorm: bool) -> tuple:
    """Launch arguments for a dense NCHW or channels_last input whose sizes are multiples of 16."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    n, c, h, w, stride = 2, 64, 32, 32, 2
    oh = ow = dw.output_size(h, kernel_size, stride)
    x = torch.empty(n, c, h, w, dtype=dtype).contiguous(memory_format=fmt)
    out = torch.empty(n, c, oh, ow, dtype=dtype).contiguous(memory_format=fmt)
    weight = torch.empty(c, kernel_size * kernel_size)
    bias = torch.empty(c)
    if layernorm:
        return dw.kernel_args(x, weight, bias, stride, dw.ACT_NONE, out, torch.empty(c), torch.empty(c), 1e-6)
    return dw.kernel_args(x, weight, bias, stride, dw.ACT_SILU, out)


def _dwconv_jobs(layernorm: bool):
    """dwconv_bn_act's variants (LAYERNORM=False), or dwconv_layernorm's (the same kernel, True)."""
    kernel = dw._dwconv_bn_act_kernel
    for cfg in dw.all_kernel_configs():
        if cfg.constexprs["LAYERNORM"] != layernorm:
            continue
        example = _dwconv_example_args(cfg.dtype, cfg.constexprs["CHANNELS_LAST"], cfg.constexprs["K"], layernorm)
        for specialized in (False, True):
            signature, constexprs, attrs = aot.specialize(kernel, example, cfg.constexprs, specialized)
            for arch in aot.ARCHS:
                yield aot.AotJob(aot.kernel_name(kernel), signature, constexprs, attrs,
                                 num_warps=cfg.num_warps, arch=arch)


def assert_compile_without_spills(jobs, columns, pointer):
    """Compile every job; fail listing each one that did not compile, spilled or overflowed shared
    memory (identified by arch, the dtype of argument ``pointer``, constexprs, attrs and warps)."""
    results = aot.compile_many(list(jobs))
    table = aot.format_table(results, columns)
    print(table)
    bad = [f"{r.job.arch} {r.job.signature[pointer]} {dict(r.job.constexprs)} attrs={dict(r.job.attrs)} "
           f"warps={r.job.num_warps}: {problem}" for r in results for problem in r.problems()]
    assert not bad, "\n".join(bad) + "\n\n" + table


def test_triton_aot_dwconv_bn_act_every_config_compiles_without_spills():
    assert_compile_without_spills(_dwconv_jobs(False), ["K", "CHANNELS_LAST", "BLOCK_P", "BLOCK_C"], "x_ptr")


def test_triton_aot_dwconv_layernorm_every_config_compiles_without_spills():
    assert_compile_without_spills(_dwconv_jobs(True), ["K", "BLOCK_P", "BLOCK_C"], "x_ptr")


@pytest.mark.parametrize("dtype", dw.DTYPES)
def test_triton_aot_dwconv_bn_act_enumeration_covers_launches(dtype):
    """Whatever launch_config picks is in all_kernel_configs, so the AOT test above compiled it."""
    known = [(c.dtype, c.constexprs, c.num_warps) for c in dw.all_kernel_configs()]
    shapes = [(1, 3, 7, 9), (2, 16, 7, 7), (1, 24, 14, 14), (4, 88, 28, 28), (1, 96, 56, 56),
              (2, 144, 112, 112), (1, 960, 7, 7), (3, 17, 1, 1)]
    for n, c, h, w in shapes:
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.empty(n, c, h, w, dtype=dtype, device="meta").contiguous(memory_format=fmt)
            for k in dw.KERNEL_SIZES:
                for stride in dw.STRIDES:
                    cfg = dw.launch_config(x, k, stride, dw.ACT_RELU)
                    assert (dtype, cfg.constexprs, cfg.num_warps) in known, (x.shape, fmt, k, stride)


@pytest.mark.parametrize("dtype", dw.DTYPES)
def test_triton_aot_dwconv_layernorm_enumeration_covers_launches(dtype):
    """Whatever launch_config picks with the LayerNorm epilogue is in all_kernel_configs."""
    known = [(c.dtype, c.constexprs, c.num_warps) for c in dw.all_kernel_configs()]
    shapes = [(1, 3, 7, 9), (8, 24, 56, 56), (8, 48, 28, 28), (8, 88, 14, 14), (8, 168, 7, 7), (2, 304, 7, 7),
              (1, 584, 7, 7), (1, 1024, 3, 3), (3, 17, 1, 1)]
    for n, c, h, w in shapes:
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.empty(n, c, h, w, dtype=dtype, device="meta").contiguous(memory_format=fmt)
            for k in dw.KERNEL_SIZES:
                cfg = dw.launch_config(x, k, 1, dw.ACT_NONE, layernorm=True)
                assert cfg.constexprs["BLOCK_C"] >= c and cfg.constexprs["CHANNELS_LAST"]
                assert (dtype, cfg.constexprs, cfg.num_warps) in known, (x.shape, fmt, k)


def _patch_attention_example_args(dtype, d_pad: int) -> tuple:
    """Launch arguments for q, k, v views of a dense qkv, head_dim = the padded width (with no JIT
    specialization, the values only fix the integer types)."""
    b, h, w, heads = 2, 32, 32, 4
    qkv = torch.empty(b, h, w, 3, heads, d_pad, dtype=dtype)
    q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)
    out = torch.empty(b, h, w, heads, d_pad, dtype=dtype).permute(0, 3, 1, 2, 4)
    return pa.kernel_args(q, k, v, (2, 2), d_pad ** -0.5, out)


def _patch_attention_jobs():
    # The kernel opts out of all JIT specialization (the launcher's VEC constexpr states alignment
    # instead), so each config is exactly one compiled kernel whatever the arguments: no second variant.
    kernel = pa._patch_attention_fwd_kernel
    for cfg in pa.all_kernel_configs():
        example = _patch_attention_example_args(cfg.dtype, cfg.constexprs["D_PAD"])
        signature, constexprs, attrs = aot.specialize(kernel, example, cfg.constexprs)
        assert not attrs and constexprs == cfg.constexprs, "the kernel must not be specialized by the JIT"
        for arch in aot.ARCHS:
            yield aot.AotJob(aot.kernel_name(kernel), signature, constexprs, attrs, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages, arch=arch)


def test_triton_aot_patch_attention_every_config_compiles_without_spills():
    assert_compile_without_spills(_patch_attention_jobs(), ["D_PAD", "BLOCK_M", "BLOCK_N", "VEC"], "q_ptr")


@pytest.mark.parametrize("dtype", pa.DTYPES)
def test_triton_aot_patch_attention_enumeration_covers_launches(dtype):
    """Whatever launch_config picks is in all_kernel_configs, so the AOT test above compiled it."""
    known = [(c.dtype, c.constexprs, c.num_warps, c.num_stages) for c in pa.all_kernel_configs()]
    for h, w, patch in [(8, 8, (2, 2)), (32, 32, (2, 2)), (16, 16, (2, 2)), (1, 197, (1, 1)), (7, 7, (1, 1)),
                        (6, 6, (3, 3)), (64, 64, (2, 2)), (4, 2, (2, 1)), (1, 1, (1, 1))]:
        for heads, head_dim, v_dim in [(4, 16, 16), (4, 20, 20), (4, 36, 36), (4, 60, 60), (2, 64, 64),
                                       (3, 30, 30), (1, 128, 128), (6, 1, 1), (4, 16, 64), (2, 100, 8)]:
            q = torch.empty(2, heads, h, w, head_dim, dtype=dtype, device="meta")
            v = torch.empty(2, heads, 7, 14, v_dim, dtype=dtype, device="meta")  # cross attention: other keys
            for vec in pa.VECS:
                cfg = pa.launch_config(q, v, patch, vec)
                assert (dtype, cfg.constexprs, cfg.num_warps, cfg.num_stages) in known, (q.shape, v.shape, vec)


def _xca_attention_example_args(dtype, d_pad: int) -> tuple:
    """Launch arguments for a dense qkv, head_dim = the padded width (with no JIT specialization, the
    values only fix the integer types)."""
    b, n, heads = 2, 1024, 4
    qkv = torch.empty(b, n, 3 * heads * d_pad, dtype=dtype)
    out = torch.empty(b, n, heads * d_pad, dtype=dtype)
    temperature = torch.empty(heads)
    ws = torch.empty(b * heads * 4 * (d_pad * d_pad + 2 * d_pad))
    return xa.kernel_args(qkv, heads, temperature, 1e-12, out, ws, 256, 4)


def _xca_attention_jobs():
    # Like patch_attention, the kernel opts out of all JIT specialization: one compile per config.
    kernel = xa._xca_attention_kernel
    for cfg in xa.all_kernel_configs():
        example = _xca_attention_example_args(cfg.dtype, cfg.constexprs["D_PAD"])
        signature, constexprs, attrs = aot.specialize(kernel, example, cfg.constexprs)
        assert not attrs and constexprs == cfg.constexprs, "the kernel must not be specialized by the JIT"
        for arch in aot.ARCHS:
            yield aot.AotJob(aot.kernel_name(kernel), signature, constexprs, attrs, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages, arch=arch)


def test_triton_aot_xca_attention_every_config_compiles_without_spills():
    assert_compile_without_spills(_xca_attention_jobs(), ["D_PAD", "BLOCK_N", "VEC", "STATS", "APPLY"], "qkv_ptr")


@pytest.mark.parametrize("dtype", xa.DTYPES)
def test_triton_aot_xca_attention_enumeration_covers_launches(dtype):
    """Whatever launch_config picks is in all_kernel_configs, so the AOT test above compiled it."""
    known = [(c.dtype, c.constexprs, c.num_warps, c.num_stages) for c in xa.all_kernel_configs()]
    for batch, n_tokens in [(1, 1), (1, 64), (8, 1024), (1, 576), (64, 4096), (2, 4096), (1, 2304)]:
        for heads, head_dim in [(8, 12), (4, 20), (8, 38), (8, 48), (4, 6), (8, 64), (8, 73), (1, 128)]:
            qkv = torch.empty(batch, n_tokens, 3 * heads * head_dim, dtype=dtype, device="meta")
            for vec in xa.VECS:
                for n_sms in (1, 132):
                    cfg = xa.launch_config(qkv, heads, vec, n_sms)
                    for constexprs in cfg.constexprs:
                        assert (dtype, constexprs, cfg.num_warps, cfg.num_stages) in known, (qkv.shape, heads, vec)


def _bias_attention_example_args(dtype, dk_pad: int, dv_pad: int) -> tuple:
    """Launch arguments for LeViT-like views (14x14 keys, stride 2) with head dims = the padded widths
    (with no JIT specialization, the values only fix the integer types)."""
    b, heads, res, stride = 2, 4, (14, 14), 2
    kv = torch.empty(b, 196, heads, dk_pad + dv_pad, dtype=dtype)
    k, v = (t.permute(0, 2, 1, 3) for t in kv.split([dk_pad, dv_pad], dim=3))
    q = torch.empty(b, 49, heads, dk_pad, dtype=dtype).permute(0, 2, 1, 3)
    out = torch.empty(b, 49, heads * dv_pad, dtype=dtype)
    return ba.kernel_args(q, k, v, torch.empty(heads, 196), res, stride, dk_pad ** -0.5, out)


def _bias_attention_jobs():
    # As patch_attention: no JIT specialization (VEC states alignment), one compiled kernel per config.
    kernel = ba._bias_attention_fwd_kernel
    for cfg in ba.all_kernel_configs():
        example = _bias_attention_example_args(cfg.dtype, cfg.constexprs["DK_PAD"], cfg.constexprs["DV_PAD"])
        signature, constexprs, attrs = aot.specialize(kernel, example, cfg.constexprs)
        assert not attrs and constexprs == cfg.constexprs, "the kernel must not be specialized by the JIT"
        for arch in aot.ARCHS:
            yield aot.AotJob(aot.kernel_name(kernel), signature, constexprs, attrs, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages, arch=arch)


def test_triton_aot_bias_attention_every_config_compiles_without_spills():
    assert_compile_without_spills(_bias_attention_jobs(),
                                  ["DK_PAD", "DV_PAD", "BLOCK_M", "BLOCK_N", "VEC", "HARDSWISH"], "q_ptr")


@pytest.mark.parametrize("dtype", ba.DTYPES)
def test_triton_aot_bias_attention_enumeration_covers_launches(dtype):
    """Whatever launch_config picks is in all_kernel_configs, so the AOT test above compiled it."""
    known = [(c.dtype, c.constexprs, c.num_warps, c.num_stages) for c in ba.all_kernel_configs()]
    for heads, n_q in [(4, 196), (8, 49), (16, 16), (1, 1), (12, 784)]:
        for dk, dv in [(16, 32), (16, 64), (32, 64), (32, 128), (64, 128), (64, 64), (16, 16), (8, 8), (12, 20),
                       (64, 32), (1, 1), (40, 100)]:
            q = torch.empty(2, heads, n_q, dk, dtype=dtype, device="meta")
            v = torch.empty(2, heads, 196, dv, dtype=dtype, device="meta")
            for vec in ba.VECS:
                for act in (ba.ACT_NONE, ba.ACT_HARDSWISH):
                    cfg = ba.launch_config(q, v, act, vec)
                    assert (dtype, cfg.constexprs, cfg.num_warps, cfg.num_stages) in known, (q.shape, dv, vec, act)


# ---- head_mixing_attention ---------------------------------------------------------------------------

from fastvit_kernels.triton import head_mixing_attention as hma  # noqa: E402


def _head_mixing_attention_example_args(dtype, heads: int, n_k: int) -> tuple:
    """Launch arguments for packed q, k, v views (one Linear output) with every optional step on and
    float32 parameters (with no JIT specialization, the values only fix the types)."""
    b, d = 2, 64
    q, k, v = torch.empty(b, n_k, 3, heads, d, dtype=dtype).permute(2, 0, 3, 1, 4)
    out = torch.empty(b, n_k, heads * d, dtype=dtype)
    mix, vec = torch.empty(heads, heads), torch.empty(heads)
    return hma.kernel_args(q, k, v, d ** -0.5, mix, mix, vec, vec, 1e-5, out)


def _head_mixing_attention_jobs():
    # As patch_attention: no JIT specialization, one compiled kernel per config.
    kernel = hma._head_mixing_attention_fwd_kernel
    for cfg in hma.all_kernel_configs():
        example = _head_mixing_attention_example_args(cfg.dtype, cfg.constexprs["HEADS_P2"], cfg.constexprs["BLOCK_N"])
        signature, constexprs, attrs = aot.specialize(kernel, example, cfg.constexprs)
        assert not attrs and constexprs == cfg.constexprs, "the kernel must not be specialized by the JIT"
        for arch in aot.ARCHS:
            yield aot.AotJob(aot.kernel_name(kernel), signature, constexprs, attrs, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages, arch=arch)


def test_triton_aot_head_mixing_attention_every_config_compiles_without_spills():
    # 90 compiles (45 configs x 2 archs), about 20 minutes on a loaded 2-core machine with a cold cache.
    assert_compile_without_spills(_head_mixing_attention_jobs(), ["HEADS_P2", "BLOCK_M", "BLOCK_N"], "q_ptr")


@pytest.mark.parametrize("dtype", hma.DTYPES)
def test_triton_aot_head_mixing_attention_enumeration_covers_launches(dtype):
    """Whatever launch_config picks (for inputs the kernel accepts) is in all_kernel_configs."""
    known = [(c.dtype, c.constexprs, c.num_warps, c.num_stages) for c in hma.all_kernel_configs()]
    for heads in (1, 3, 4, 6, 8, 12, 16):
        for n_k in (1, 17, 50, 65, 197, 256, 300, 512):
            q = torch.empty(2, heads, 5, 64, dtype=dtype, device="meta")
            k = torch.empty(2, heads, n_k, 64, dtype=dtype, device="meta")
            if hma.unsupported(q, k, k) is None:
                cfg = hma.launch_config(q, k)
                assert (dtype, cfg.constexprs, cfg.num_warps, cfg.num_stages) in known, (heads, n_k)
            else:
                assert n_k > hma.max_keys(heads), (heads, n_k)
