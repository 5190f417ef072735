"""dwconv_layernorm: every backend against the float64 reference, forward and backward."""

import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F

import fastvit_kernels as fk
from helpers import BACKENDS, DEVICE, DTYPES, INTERPRETED, LAYOUTS, assert_close, make_input

op_module = importlib.import_module("fastvit_kernels.ops.dwconv_layernorm")

EPS = 1e-6
# EdgeNeXt widths (24, 48, 88, 168) with odd sizes and batch 1; 13 and 3 are not multiples of any
# vector width or block; C = 1 normalises to norm_bias exactly.
SHAPES = [(1, 24, 7, 9), (2, 13, 5, 6), (1, 88, 6, 5), (2, 48, 3, 4), (1, 168, 4, 3), (2, 3, 5, 5),
          (1, 1, 3, 4)]


def eager(x, w, b, nw, nb, stride, dtype=None):
    """Plain PyTorch, in ``dtype`` (float64 for the reference)."""
    dtype = dtype or x.dtype
    C, K = x.shape[1], w.shape[-1]
    y = F.conv2d(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), stride, K // 2, 1, C)
    return F.layer_norm(y.permute(0, 2, 3, 1), (C,), nw.to(dtype), nb.to(dtype), EPS).permute(0, 3, 1, 2)


def eager_same_dtype(x, w, b, nw, nb, stride):
    # CPU half conv is not available everywhere: its rounding is that of float32 rounded to x.dtype.
    dtype = x.dtype if DEVICE.type == "cuda" or x.dtype == torch.float64 else torch.float32
    return eager(x, w, b, nw, nb, stride, dtype).to(x.dtype)


def params(C, K, dtype=torch.float32, bias=True, requires_grad=False):
    """Conv weight and bias, LayerNorm weight and bias: random, never zeros or ones."""
    w = torch.randn(C, 1, K, K, device=DEVICE) / K
    b = torch.randn(C, device=DEVICE) if bias else None
    nw, nb = torch.randn(C, device=DEVICE), torch.randn(C, device=DEVICE)
    return tuple(None if t is None else t.to(dtype).requires_grad_(requires_grad) for t in (w, b, nw, nb))


def forward_cases(backend):
    """Full matrix for compiled backends; a smaller one for the (slow) Triton interpreter."""
    if backend == "triton" and INTERPRETED:
        return [c for c in itertools.product(DTYPES[backend], (3, 5), (1, 2), LAYOUTS, SHAPES[:2])] + \
               [(torch.float32, k, 1, "channels_last", (1, 24, 4, 5)) for k in (7, 9)] + \
               [(torch.float16, 3, 2, "channels_last", shape) for shape in SHAPES[2:]] + \
               [(torch.float32, 3, 2, "channels_last", (1, 584, 3, 4))]  # EdgeNeXt's widest: BLOCK_C 1024
    return list(itertools.product(DTYPES[backend], (3, 5, 7, 9), (1, 2), LAYOUTS, SHAPES[:2])) + \
        [(dt, k, s, "channels_last", shape) for dt in DTYPES[backend] for k in (3, 7) for s in (1, 2)
         for shape in SHAPES[2:]] + \
        [(torch.float32, 1, 1, "nchw", SHAPES[0]), (torch.float32, 7, 1, "channels_last", (2, 584, 7, 7))]


CASES = [(b,) + c for b in BACKENDS for c in forward_cases(b)]


def _id(case):
    backend, dtype, K, stride, layout, shape = case
    return f"{backend}-{str(dtype)[6:]}-k{K}-s{stride}-{layout}-{'x'.join(map(str, shape))}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_matches_reference(case):
    backend, dtype, K, stride, layout, shape = case
    x = make_input(shape, dtype, layout)
    w, b, nw, nb = params(shape[1], K)
    with fk.use_backend(backend):
        out = fk.dwconv_layernorm(x, w, b, nw, nb, EPS, stride)
    assert out.dtype == dtype
    assert out.permute(0, 2, 3, 1).is_contiguous()  # channels_last whatever x's layout: free token view
    assert_close(out, eager(x, w, b, nw, nb, stride, torch.float64), eager_same_dtype(x, w, b, nw, nb, stride),
                 _id(case))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_format", [torch.contiguous_format, torch.channels_last])
def test_every_output_element_is_written(backend, out_format):
    """Kernels write into a NaN-poisoned output of either layout; any element left unwritten shows."""
    x = make_input((2, 19, 9, 11), torch.float32, "strided")
    w, b, nw, nb = params(19, 5)
    kernel_params = op_module.kernel_params(x, w, b, nw, nb)
    out = torch.full((2, 19, 5, 6), float("nan"), device=DEVICE).to(memory_format=out_format)
    assert fk.backends.load_error(backend) is None  # also loads the extension that registers its ops
    impl = {i.backend: i for i in op_module.IMPLEMENTATIONS}[backend]
    impl.run(x, *kernel_params, 5, 2, EPS, out)
    assert_close(out, eager(x, w, b, nw, nb, 2, torch.float64), eager(x, w, b, nw, nb, 2), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride,layout,bias", [(1, "nchw", True), (2, "channels_last", True),
                                                (2, "strided_cl", True), (1, "channels_last", False)])
def test_backward_matches_reference(backend, stride, layout, bias):
    shape, K = (2, 13, 9, 7), 5
    x = make_input(shape, torch.float32, layout, requires_grad=True)
    tensors = (x,) + params(shape[1], K, bias=bias, requires_grad=True)
    grad = torch.randn(2, 13, (9 - 1) // stride + 1, (7 - 1) // stride + 1, device=DEVICE)
    with fk.use_backend(backend):
        fk.dwconv_layernorm(*tensors, EPS, stride).backward(grad)

    t64 = tuple(None if t is None else t.detach().double().requires_grad_() for t in tensors)
    eager(*t64, stride).backward(grad.double())
    t32 = tuple(None if t is None else t.detach().clone().requires_grad_() for t in tensors)
    eager(*t32, stride).backward(grad)
    for name, ours, ref64, ref32 in zip(("x", "weight", "bias", "norm_weight", "norm_bias"), tensors, t64, t32):
        if ours is None:
            continue
        assert ours.grad.dtype == ours.dtype
        assert_close(ours.grad, ref64.grad, ref32.grad, f"grad {name} ({backend})")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_gradcheck_float64(backend):
    x = make_input((1, 5, 5, 4), torch.float64, "channels_last", requires_grad=True)
    tensors = params(5, 3, torch.float64, requires_grad=True)
    with fk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *t: fk.dwconv_layernorm(*t, EPS, 2), (x,) + tensors)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients_keep_dtypes(dtype):
    x = make_input((2, 8, 6, 6), dtype, "channels_last", requires_grad=True)
    w, b, nw, nb = params(8, 3, dtype, requires_grad=True)
    fk.dwconv_layernorm(x, w, b, nw, nb).float().sum().backward()
    assert all(t.grad.dtype == dtype for t in (x, w, b, nw, nb))


def test_defaults_are_edgenext_eps_and_stride_1():
    x = make_input((2, 8, 5, 6), torch.float32)
    w, b, nw, nb = params(8, 7)
    assert_close(fk.dwconv_layernorm(x, w, b, nw, nb), eager(x, w, b, nw, nb, 1, torch.float64),
                 eager(x, w, b, nw, nb, 1))


def test_opcheck():
    samples = [
        (make_input((2, 6, 7, 6), torch.float32, "channels_last", requires_grad=True), 3, 2, True),
        (make_input((1, 5, 5, 5), torch.float32, "nchw", requires_grad=True), 5, 1, False),
    ]
    for x, K, stride, bias in samples:
        w, b, nw, nb = params(x.shape[1], K, bias=bias, requires_grad=True)
        torch.library.opcheck(torch.ops.fastvit_kernels.dwconv_layernorm.default, (x, w, b, nw, nb, EPS, stride))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x = make_input((2, 24, 10, 10), torch.float32, "channels_last")
    w, b, nw, nb = params(24, 7)
    with fk.use_backend("cpu" if DEVICE.type == "cpu" else None):
        fn = torch.compile(lambda t: fk.dwconv_layernorm(t, w, b, nw, nb, EPS).permute(0, 2, 3, 1) * 2,
                           fullgraph=True)
        torch.testing.assert_close(fn(x), fk.dwconv_layernorm(x, w, b, nw, nb, EPS).permute(0, 2, 3, 1) * 2)


# ---------------------------------------------------------------------------------------------------
# Dispatch and bad input
# ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(DEVICE.type != "cpu", reason="asks for a CUDA-only backend with CPU tensors")
def test_cuda_backend_on_cpu_tensor_says_why():
    x = make_input((1, 2, 3, 3), torch.float32)
    with pytest.raises(fk.BackendUnavailable, match="backend 'cuda' cannot run dwconv_layernorm"):
        with fk.use_backend("cuda"):
            fk.dwconv_layernorm(x, *params(2, 3))


def test_cuda_kernel_refuses_channels_beyond_its_shared_memory():
    """The CUDA kernel holds a pixel's channels in 48 KiB of shared memory: 12288 float / 6144 double."""
    why = {i.backend: i.unsupported for i in op_module.IMPLEMENTATIONS}["cuda"]
    for dtype, ok, too_many in ((torch.float32, 12288, 12289), (torch.float64, 6144, 6145)):
        w = torch.empty(1, 9, dtype=dtype, device="meta")
        assert why(torch.empty(1, ok, 1, 1, device="meta"), w) is None
        assert "supports C <= " in why(torch.empty(1, too_many, 1, 1, device="meta"), w)


def test_triton_refuses_float64_and_too_many_channels():
    if not INTERPRETED and DEVICE.type == "cpu":
        pytest.skip("Triton cannot take CPU tensors without the interpreter")
    x = make_input((1, 2, 3, 3), torch.float64)
    with pytest.raises(fk.BackendUnavailable, match="float64 is not supported by the Triton kernel"):
        with fk.use_backend("triton"):
            fk.dwconv_layernorm(x, *params(2, 3, torch.float64))
    x = make_input((1, 1025, 1, 1), torch.float32)
    with pytest.raises(fk.BackendUnavailable, match=r"C=1025 channels.*supports C <= 1024"):
        with fk.use_backend("triton"):
            fk.dwconv_layernorm(x, *params(1025, 3))


def test_empty_batch_gives_empty_output_like_eager():
    x = torch.randn(0, 4, 8, 8, device=DEVICE)
    w, b, nw, nb = params(4, 3)
    out = fk.dwconv_layernorm(x, w, b, nw, nb, EPS, 2)
    assert out.shape == eager(x, w, b, nw, nb, 2).shape == (0, 4, 4, 4)


@pytest.mark.parametrize("make, error, message", [
    (lambda x, w, b, nw, nb: (x.long(), w, b, nw, nb, EPS, 1), TypeError,
     "dwconv_layernorm: x.dtype torch.int64 is not supported"),
    (lambda x, w, b, nw, nb: (x[:, :3], w, b, nw, nb, EPS, 1), ValueError,
     r"dwconv_layernorm: weight must be a depthwise \[C, 1, K, K\] tensor with C=3"),
    (lambda x, w, b, nw, nb: (x, w, b, nw, nb, EPS, 3), ValueError, r"stride 3 is not supported; supported: \(1, 2\)"),
    (lambda x, w, b, nw, nb: (x, w, b, nw[:3], nb, EPS, 1), ValueError,
     r"norm_weight must be a floating \[C\] tensor with C=4 .*shape \(3,\)"),
    (lambda x, w, b, nw, nb: (x, w, b, nw, nb.int(), EPS, 1), ValueError,
     r"norm_bias must be a floating \[C\] tensor with C=4 .*torch.int32"),
    (lambda x, w, b, nw, nb: (x, w, b, nw.to("meta"), nb, EPS, 1), ValueError, r"norm_weight is on meta but x is on"),
    (lambda x, w, b, nw, nb: (x, w, b, nw, nb, 0.0, 1), ValueError, r"eps must be finite and > 0, got 0.0"),
    (lambda x, w, b, nw, nb: (x, w, b, nw, nb, float("nan"), 1), ValueError, r"eps must be finite and > 0, got nan"),
])
def test_bad_input_gets_a_clear_error(make, error, message):
    x = make_input((2, 4, 6, 6), torch.float32)
    with pytest.raises(error, match=message):
        fk.dwconv_layernorm(*make(x, *params(4, 3)))


@pytest.mark.skipif(fk.backends.load_error("cpu") is not None, reason="the C++ extension did not load")
def test_extension_checks_its_arguments():
    """The C++ op validates on its own (it is public as torch.ops.fastvit_kernels_C.*)."""
    x = make_input((1, 4, 5, 5), torch.float32, "channels_last")
    w, b, nw, nb = op_module.kernel_params(x, *params(4, 3))
    out = op_module.new_output(x, 3, 1)
    op = torch.ops.fastvit_kernels_C.dwconv_layernorm_out
    with pytest.raises(RuntimeError, match=r"dwconv_layernorm_out: eps must be finite and > 0, got -1"):
        op(x, w, b, nw, nb, 3, 1, -1.0, out)
    with pytest.raises(RuntimeError, match=r"dwconv_layernorm_out: norm_bias must be a contiguous \[C\] = \[4\]"):
        op(x, w, b, nw, nb[:2], 3, 1, EPS, out)
    with pytest.raises(RuntimeError, match=r"dwconv_layernorm_out: norm_weight must be Float"):
        op(x, w, b, nw.double(), nb, 3, 1, EPS, out)
    with pytest.raises(RuntimeError, match=r"dwconv_layernorm_out: stride must be 1 or 2, got 3"):
        op(x, w, b, nw, nb, 3, 3, EPS, out)
