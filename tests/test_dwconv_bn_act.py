"""dwconv_bn_act: every backend against the float64 reference, forward and backward."""

import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F

import fastvit_kernels as fk
from helpers import BACKENDS, CHANNELS_LAST_LAYOUTS, DEVICE, DTYPES, INTERPRETED, LAYOUTS, assert_close, make_input

op_module = importlib.import_module("fastvit_kernels.ops.dwconv_bn_act")

ACT_FN = {"silu": F.silu, "relu": F.relu, "none": lambda t: t}
# Odd sizes, batch 1, a 1x1 image, channel counts that are not multiples of any block size.
SHAPES = [(1, 3, 7, 9), (2, 17, 13, 5), (3, 70, 8, 8), (1, 5, 1, 1), (2, 4, 2, 3)]


def eager(x, w, b, stride, act, dtype=None):
    """Plain PyTorch, in ``dtype`` (float64 for the reference)."""
    dtype = dtype or x.dtype
    K = w.shape[-1]
    y = F.conv2d(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), stride, K // 2, 1, x.shape[1])
    return ACT_FN[act](y)


def eager_same_dtype(x, w, b, stride, act):
    # CPU half conv is not available everywhere: its rounding is that of float32 rounded to x.dtype.
    dtype = x.dtype if DEVICE.type == "cuda" or x.dtype == torch.float64 else torch.float32
    return eager(x, w, b, stride, act, dtype).to(x.dtype)


def params(C, K, dtype=torch.float32, bias=True, requires_grad=False):
    w = (torch.randn(C, 1, K, K, device=DEVICE) / K).to(dtype).requires_grad_(requires_grad)
    b = torch.randn(C, device=DEVICE).to(dtype).requires_grad_(requires_grad) if bias else None
    return w, b


def forward_cases(backend):
    """Full matrix for compiled backends; a smaller one for the (slow) Triton interpreter."""
    if backend == "triton" and INTERPRETED:
        return [c for c in itertools.product(DTYPES[backend], (3, 5, 9), (1, 2), LAYOUTS, ("silu",),
                                             SHAPES[:3])] + \
               [(torch.float32, 7, 1, "nchw", act, SHAPES[1]) for act in ("relu", "none")] + \
               [(torch.float16, 1, 2, "channels_last", "silu", SHAPES[0])]
    return list(itertools.product(DTYPES[backend], (1, 3, 5, 7, 9), (1, 2), LAYOUTS, ("silu", "relu", "none"),
                                  SHAPES[:2])) + \
        [(dt, 3, s, "channels_last", "silu", shape) for dt in DTYPES[backend] for s in (1, 2) for shape in SHAPES[2:]]


CASES = [(b,) + c for b in BACKENDS for c in forward_cases(b)]


def _id(case):
    backend, dtype, K, stride, layout, act, shape = case
    return f"{backend}-{str(dtype)[6:]}-k{K}-s{stride}-{layout}-{act}-{'x'.join(map(str, shape))}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_matches_reference(case):
    backend, dtype, K, stride, layout, act, shape = case
    x = make_input(shape, dtype, layout)
    w, b = params(shape[1], K)
    with fk.use_backend(backend):
        out = fk.dwconv_bn_act(x, w, b, stride, act)
    assert out.dtype == dtype
    channels_last = layout in CHANNELS_LAST_LAYOUTS and shape[1] > 1  # eager conv keeps that layout too
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close(out, eager(x, w, b, stride, act, torch.float64), eager_same_dtype(x, w, b, stride, act), _id(case))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_format", [torch.contiguous_format, torch.channels_last])
def test_every_output_element_is_written(backend, out_format):
    """Kernels write into a NaN-poisoned output of either layout; any element left unwritten shows."""
    x = make_input((2, 19, 9, 11), torch.float32, "strided")
    w, b = params(19, 5)
    weight, bias = op_module.kernel_params(x, w, b)
    out = torch.full((2, 19, 5, 6), float("nan"), device=DEVICE).to(memory_format=out_format)
    assert fk.backends.load_error(backend) is None  # also loads the extension that registers its ops
    impl = {i.backend: i for i in op_module.IMPLEMENTATIONS}[backend]
    impl.run(x, weight, bias, 5, 2, op_module.ACTIVATIONS["silu"], out)
    assert_close(out, eager(x, w, b, 2, "silu", torch.float64), eager(x, w, b, 2, "silu"), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["silu", "relu", "none"])
@pytest.mark.parametrize("stride,layout", [(1, "nchw"), (2, "channels_last"), (2, "strided_cl")])
def test_backward_matches_reference(backend, act, stride, layout):
    shape, K = (2, 6, 9, 7), 3
    x = make_input(shape, torch.float32, layout, requires_grad=True)
    w, b = params(shape[1], K, requires_grad=True)
    grad = torch.randn(2, 6, (9 - 1) // stride + 1, (7 - 1) // stride + 1, device=DEVICE)
    with fk.use_backend(backend):
        fk.dwconv_bn_act(x, w, b, stride, act).backward(grad)

    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    eager(x64, w64, b64, stride, act).backward(grad.double())
    x32, w32, b32 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    eager(x32, w32, b32, stride, act).backward(grad)
    for name, ours, ref64, ref32 in (("x", x, x64, x32), ("weight", w, w64, w32), ("bias", b, b64, b32)):
        assert ours.grad.dtype == ours.dtype
        assert_close(ours.grad, ref64.grad, ref32.grad, f"grad {name} ({backend})")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_gradcheck_float64(backend):
    x = make_input((1, 3, 5, 4), torch.float64, "channels_last", requires_grad=True)
    w, b = params(3, 3, torch.float64, requires_grad=True)
    with fk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *t: fk.dwconv_bn_act(*t, 2, "silu"), (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients_keep_dtypes(dtype):
    x = make_input((2, 4, 6, 6), dtype, "channels_last", requires_grad=True)
    w, b = params(4, 3, torch.float32, requires_grad=True)  # folded weights stay float32
    fk.dwconv_bn_act(x, w, b, 1, "silu").float().sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


def test_bias_is_optional():
    x = make_input((2, 5, 6, 7), torch.float32)
    w, _ = params(5, 3)
    assert_close(fk.dwconv_bn_act(x, w, None, 1, "relu"), eager(x, w, None, 1, "relu", torch.float64),
                 eager(x, w, None, 1, "relu"))


def test_opcheck():
    samples = [
        (make_input((2, 5, 7, 6), torch.float32, "channels_last", requires_grad=True), 3, 2, "silu", True),
        (make_input((1, 4, 5, 5), torch.float32, "nchw", requires_grad=True), 5, 1, "none", False),
    ]
    for x, K, stride, act, bias in samples:
        w, b = params(x.shape[1], K, bias=bias, requires_grad=True)
        torch.library.opcheck(torch.ops.fastvit_kernels.dwconv_bn_act.default, (x, w, b, stride, act))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x = make_input((2, 8, 10, 10), torch.float32, "channels_last")
    w, b = params(8, 3)
    fn = torch.compile(lambda t: fk.dwconv_bn_act(t, w, b, 2, "silu") * 2, fullgraph=True)
    torch.testing.assert_close(fn(x), fk.dwconv_bn_act(x, w, b, 2, "silu") * 2)


# ---------------------------------------------------------------------------------------------------
# Dispatch and bad input
# ---------------------------------------------------------------------------------------------------


def test_environment_variable_selects_backend(monkeypatch):
    x = make_input((1, 2, 3, 3), torch.float32)
    w, b = params(2, 3)
    monkeypatch.setenv("FASTVIT_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTVIT_KERNELS_BACKEND.*'nonsense'.*reference"):
        fk.dwconv_bn_act(x, w, b)
    monkeypatch.setenv("FASTVIT_KERNELS_BACKEND", "reference")
    calls = []
    monkeypatch.setattr(op_module, "IMPLEMENTATIONS", tuple(
        fk.backends.Implementation(i.backend, lambda *a, _r=i.run, _n=i.backend: calls.append(_n) or _r(*a))
        for i in op_module.IMPLEMENTATIONS))
    fk.dwconv_bn_act(x, w, b)
    with fk.use_backend(BACKENDS[0]):  # the context manager wins over the environment
        fk.dwconv_bn_act(x, w, b)
    assert calls == ["reference", BACKENDS[0]]


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with fk.use_backend("fast"):
            pass


@pytest.mark.skipif(DEVICE.type != "cpu", reason="asks for a CUDA-only backend with CPU tensors")
def test_cuda_backend_on_cpu_tensor_says_why():
    x = make_input((1, 2, 3, 3), torch.float32)
    w, b = params(2, 3)
    with pytest.raises(fk.BackendUnavailable, match="backend 'cuda' cannot run dwconv_bn_act"):
        with fk.use_backend("cuda"):
            fk.dwconv_bn_act(x, w, b)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = make_input((1, 2, 3, 3), torch.float32, device="cpu")
    w, b = (t.cpu() for t in params(2, 3))
    with pytest.raises(fk.BackendUnavailable, match="TRITON_INTERPRET=1"):
        with fk.use_backend("triton"):
            fk.dwconv_bn_act(x, w, b)


def test_triton_refuses_float64():
    x = make_input((1, 2, 3, 3), torch.float64)
    w, b = params(2, 3, torch.float64)
    if not INTERPRETED and DEVICE.type == "cpu":
        pytest.skip("Triton cannot take CPU tensors without the interpreter")
    with pytest.raises(fk.BackendUnavailable, match="float64 is not supported by the Triton kernel"):
        with fk.use_backend("triton"):
            fk.dwconv_bn_act(x, w, b)


def test_empty_batch_gives_empty_output_like_eager():
    x = torch.randn(0, 4, 8, 8, device=DEVICE)
    w, b = params(4, 3)
    out = fk.dwconv_bn_act(x, w, b, 2, "silu")
    assert out.shape == eager(x, w, b, 2, "silu").shape == (0, 4, 4, 4)


@pytest.mark.parametrize("make, error, message", [
    (lambda x, w, b: (x.long(), w, b, 1, "silu"), TypeError, "x.dtype torch.int64 is not supported"),
    (lambda x, w, b: (x[0], w, b, 1, "silu"), ValueError, r"4-D \[N, C, H, W\] tensor, got shape \(4, 6, 6\)"),
    (lambda x, w, b: (x[:, :3], w, b, 1, "silu"), ValueError, r"C=3 .*got shape \(4, 1, 3, 3\)"),
    (lambda x, w, b: (x, w[..., :2, :2], b, 1, "silu"), ValueError, r"kernel size 2 is not supported"),
    (lambda x, w, b: (x, w.expand(4, 2, 3, 3), b, 1, "silu"), ValueError, r"depthwise \[C, 1, K, K\]"),
    (lambda x, w, b: (x, w.int(), b, 1, "silu"), TypeError, "weight.dtype torch.int32"),
    (lambda x, w, b: (x, w, b[:2], 1, "silu"), ValueError, r"bias must be a floating \[C\] tensor with C=4"),
    (lambda x, w, b: (x, w, b, 3, "silu"), ValueError, r"stride 3 is not supported; supported: \(1, 2\)"),
    (lambda x, w, b: (x, w, b, 1, "gelu"), ValueError, r"act 'gelu' is not supported"),
    (lambda x, w, b: (x[:, :, :0], w, b, 1, "silu"), ValueError, r"H, W >= 1, got 0x6"),
    (lambda x, w, b: (x, w.to("meta"), b, 1, "silu"), ValueError, r"weight is on meta but x is on"),
])
def test_bad_input_gets_a_clear_error(make, error, message):
    x = make_input((2, 4, 6, 6), torch.float32)
    w, b = params(4, 3)
    with pytest.raises(error, match=message):
        fk.dwconv_bn_act(*make(x, w, b))
