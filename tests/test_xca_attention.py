"""xca_attention: every backend against the float64 reference, forward and backward, and against timm."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import fastvit_kernels as fk
from helpers import BACKENDS as DEVICE_BACKENDS, DEVICE, DTYPES, INTERPRETED, assert_close

op_module = importlib.import_module("fastvit_kernels.ops.xca_attention")

# The backends this op implements (all of them: triton, cuda, cpu, reference).
BACKENDS = [b for b in DEVICE_BACKENDS if b in {i.backend for i in op_module.IMPLEMENTATIONS}]
BF16_INTERPRETER = "bf16 tl.dot gives wrong results in the Triton interpreter: tested on a GPU only"

# (B, N, heads, head_dim): head dims that are not powers of two, 1 to 577 tokens (short enough for
# the interpreter), batch 1 and larger, 1 to 8 heads.
SHAPES = [
    (2, 7, 2, 12),  # EdgeNeXt-S stage 1 head dim
    (1, 1, 3, 20),  # one token
    (2, 2, 1, 6),  # two tokens, the narrowest head (scalar loads in Triton: 6 % 4 != 0)
    (1, 64, 4, 24),
    (2, 64, 8, 30),  # 8 heads, head dim 30 (scalar loads)
    (1, 577, 2, 32),  # token ranges split across programs (Triton) and threads (cpu)
    (1, 50, 1, 48),  # XCiT-S head dim
    (2, 33, 2, 64),  # XCiT-M head dim
    (1, 16, 3, 38),  # EdgeNeXt-S stage 3 head dim
    (1, 24, 2, 100),  # a 128-wide register tile (fp32 Triton: stats + apply launches, never fused)
]
# Long sequences, for the backends that are not interpreted.
LONG_SHAPES = [
    (1, 4096, 2, 12),  # EdgeNeXt stage 1 at 512 px: 64 x 64 tokens
    (2, 1024, 8, 12),  # EdgeNeXt-S stage 1 at 256 px
    (1, 576, 8, 48),  # XCiT-S at 384 px: 24 x 24 tokens
    (1, 2304, 1, 64),
    (3, 300, 4, 20),
]
LAYOUTS = ("contiguous", "sliced", "offset", "token_strided", "channels_first")


def make_qkv(B, N, heads, head_dim, dtype=torch.float32, layout="contiguous", requires_grad=False):
    """Random N(0, 1) qkv [B, N, 3*C] in one of the layouts a model can hand over."""
    c3 = 3 * heads * head_dim
    if layout == "contiguous":
        qkv = torch.randn(B, N, c3, device=DEVICE)
    elif layout == "sliced":  # the first 3C channels of a wider projection
        qkv = torch.randn(B, N, c3 + 8, device=DEVICE)[..., :c3]
    elif layout == "offset":  # a slice that starts one element in: no aligned vector loads
        qkv = torch.randn(B, N, c3 + 3, device=DEVICE)[..., 1:c3 + 1]
    elif layout == "token_strided":  # every other token
        qkv = torch.randn(B, 2 * N, c3, device=DEVICE)[:, ::2]
    elif layout == "channels_first":  # a [B, 3C, N] tensor seen as [B, N, 3C]: channel stride N
        qkv = torch.randn(B, c3, N, device=DEVICE).transpose(1, 2)
    else:
        raise ValueError(layout)
    qkv = qkv.to(dtype)
    return qkv.requires_grad_() if requires_grad else qkv


def make_temperature(heads, shape="timm", dtype=torch.float32, requires_grad=False):
    """A learnt-looking temperature (0.25..2.25; timm initialises ones), [heads, 1, 1] as timm has it."""
    t = torch.rand(heads, device=DEVICE) * 2 + 0.25
    t = (t.reshape(heads, 1, 1) if shape == "timm" else t).to(dtype)
    return t.requires_grad_() if requires_grad else t


def eager(qkv, num_heads, temperature, eps=1e-12, dtype=None):
    """timm's CrossCovarianceAttn core in ``dtype`` (float64: the reference)."""
    dtype = dtype or qkv.dtype
    B, N, c3 = qkv.shape
    q, k, v = qkv.to(dtype).reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 4, 1).unbind(0)
    attn = F.normalize(q, dim=-1, eps=eps) @ F.normalize(k, dim=-1, eps=eps).transpose(-2, -1)
    attn = (attn * temperature.to(dtype).reshape(num_heads, 1, 1)).softmax(dim=-1)
    return (attn @ v).permute(0, 3, 1, 2).reshape(B, N, c3 // 3)


def _shape_id(shape):
    B, N, heads, d = shape
    return f"{B}x{N}-h{heads}d{d}"


def forward_cases(backend):
    """Every dtype over every shape; long sequences only where nothing is interpreted."""
    dtypes = DTYPES[backend]
    shapes = SHAPES + ([] if backend == "triton" and INTERPRETED else LONG_SHAPES)
    cases = [(dt, shape, "contiguous") for dt in dtypes for shape in shapes]
    return cases + [(dt, shape, layout) for dt in dtypes[:2] for shape in (SHAPES[0], SHAPES[4])
                    for layout in LAYOUTS[1:]]


CASES = [(b,) + c for b in BACKENDS for c in forward_cases(b)]


def _id(case):
    backend, dtype, shape, layout = case
    return f"{backend}-{str(dtype)[6:]}-{_shape_id(shape)}-{layout}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_matches_reference(case):
    backend, dtype, (B, N, heads, d), layout = case
    qkv = make_qkv(B, N, heads, d, dtype, layout)
    t = make_temperature(heads)
    with fk.use_backend(backend):
        out = fk.xca_attention(qkv, heads, t)
    assert out.dtype == dtype and out.is_contiguous() and out.shape == (B, N, heads * d)
    assert_close(out, eager(qkv, heads, t, dtype=torch.float64), eager(qkv, heads, t), _id(case))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(backend):
    if backend == "triton" and INTERPRETED:
        pytest.skip(BF16_INTERPRETER)
    qkv = make_qkv(2, 40, 2, 20, torch.bfloat16)
    t = make_temperature(2)
    with fk.use_backend(backend):
        out = fk.xca_attention(qkv, 2, t)
    assert_close(out, eager(qkv, 2, t, dtype=torch.float64), eager(qkv, 2, t), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, dtype", [("flat", torch.float32), ("timm", torch.float32),
                                          ("flat", torch.float16), ("timm", torch.float64)])
def test_temperature_shapes_and_dtypes(backend, shape, dtype):
    """temperature as [heads] or timm's [heads, 1, 1], in float32 or qkv's dtype."""
    qkv_dtype = torch.float32 if dtype == torch.float32 else dtype
    if qkv_dtype not in DTYPES[backend]:
        pytest.skip(f"{backend} has no {qkv_dtype} kernel")
    qkv = make_qkv(2, 9, 3, 12, qkv_dtype)
    t = make_temperature(3, shape, dtype)
    with fk.use_backend(backend):
        out = fk.xca_attention(qkv, 3, t)
    assert_close(out, eager(qkv, 3, t, dtype=torch.float64), eager(qkv, 3, t), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_layout", ["contiguous", "strided"])
def test_every_output_element_is_written(backend, out_layout):
    """Implementations write into a NaN-poisoned output; any element left unwritten shows."""
    B, N, heads, d = 2, 37, 2, 20
    qkv = make_qkv(B, N, heads, d, layout="sliced")
    t = make_temperature(heads, "flat")
    C = heads * d
    if out_layout == "contiguous":
        out = torch.full((B, N, C), float("nan"), device=DEVICE)
    else:  # every other channel of a wider buffer: channel stride 2
        out = torch.full((B, N, 2 * C), float("nan"), device=DEVICE)[..., ::2]
    impl = {i.backend: i for i in op_module.IMPLEMENTATIONS}[backend]
    assert fk.backends.load_error(backend) is None  # also loads the extension: impl.run bypasses dispatch
    impl.run(qkv, heads, t, 1e-12, out)
    assert_close(out, eager(qkv, heads, t, dtype=torch.float64), eager(qkv, heads, t), backend)


@pytest.mark.parametrize("splits", [1, 3, 10])
def test_triton_token_splits_agree(splits):
    """The fused kernel (1 range per head) and the stats + apply kernels (token ranges reduced
    through the workspace) give the reference's result; 10 ranges of 64 tokens leave the last one
    short."""
    if DEVICE.type == "cpu" and not INTERPRETED:
        pytest.skip("Triton cannot take CPU tensors without the interpreter")
    from fastvit_kernels.triton.xca_attention import xca_attention_triton

    qkv = make_qkv(1, 600, 2, 24, torch.float16, layout="sliced")
    t = make_temperature(2, "flat")
    out = torch.full((1, 600, 48), float("nan"), dtype=torch.float16, device=DEVICE)
    xca_attention_triton(qkv, 2, t, 1e-12, out, splits=splits)
    assert_close(out, eager(qkv, 2, t, dtype=torch.float64), eager(qkv, 2, t), f"{splits} splits")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the C++ cpu kernel")
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_cpu_thread_counts_agree(threads):
    """One thread: one chunk per head; more threads than heads: tokens split into chunks whose
    partial statistics are summed."""
    qkv = make_qkv(1, 1000, 2, 20)
    t = make_temperature(2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with fk.use_backend("cpu"):
            out = fk.xca_attention(qkv, 2, t)
    finally:
        torch.set_num_threads(before)
    assert_close(out, eager(qkv, 2, t, dtype=torch.float64), eager(qkv, 2, t), f"{threads} threads")


def test_small_norms_take_the_eps_floor():
    """Channels whose norm is under eps are divided by eps (F.normalize), not by their norm."""
    qkv = make_qkv(2, 10, 2, 12, torch.float64)
    qkv[..., :5] *= 1e-3  # the first 5 q channels of head 0
    qkv[..., 24 + 3] = 0  # a k channel of head 0 that is all zeros
    t = make_temperature(2, dtype=torch.float64)
    for backend in BACKENDS:
        if torch.float64 not in DTYPES[backend]:
            continue
        with fk.use_backend(backend):
            out = fk.xca_attention(qkv, 2, t, eps=0.05)
        torch.testing.assert_close(out, eager(qkv, 2, t, eps=0.05), rtol=1e-12, atol=1e-12, msg=backend)


# ---------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,layout", [
    (SHAPES[0], "contiguous"), (SHAPES[3], "offset"), (SHAPES[1], "contiguous"), (SHAPES[6], "token_strided"),
    (SHAPES[4], "channels_first")], ids=lambda v: _shape_id(v) if isinstance(v, tuple) else v)
def test_backward_matches_reference(backend, shape, layout):
    B, N, heads, d = shape
    qkv = make_qkv(B, N, heads, d, layout=layout, requires_grad=True)
    t = make_temperature(heads, requires_grad=True)
    grad = torch.randn(B, N, heads * d, device=DEVICE)
    with fk.use_backend(backend):
        fk.xca_attention(qkv, heads, t).backward(grad)

    def eager_grads(dtype):
        q = qkv.detach().to(dtype).requires_grad_()
        tt = t.detach().to(dtype).requires_grad_()
        eager(q, heads, tt).backward(grad.to(dtype))
        return q.grad, tt.grad

    q64, t64 = eager_grads(torch.float64)
    q32, t32 = eager_grads(torch.float32)
    assert qkv.grad.dtype == qkv.dtype and qkv.grad.shape == qkv.shape
    assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
    assert_close(qkv.grad, q64, q32, f"grad qkv ({backend})")
    assert_close(t.grad, t64, t32, f"grad temperature ({backend})")


def test_backward_long_sequence_on_reference():
    B, N, heads, d = LONG_SHAPES[2]
    qkv = make_qkv(B, N, heads, d, requires_grad=True)
    t = make_temperature(heads, "flat", requires_grad=True)
    grad = torch.randn(B, N, heads * d, device=DEVICE)
    with fk.use_backend("reference"):
        fk.xca_attention(qkv, heads, t).backward(grad)
    q64, t64 = qkv.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    eager(q64, heads, t64).backward(grad.double())
    q32, t32 = qkv.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    eager(q32, heads, t32).backward(grad)
    assert_close(qkv.grad, q64.grad, q32.grad, "grad qkv")
    assert_close(t.grad, t64.grad, t32.grad, "grad temperature")


@pytest.mark.parametrize("eps", [1e-12, 0.5])
def test_gradcheck_float64(eps):
    """Through the normalisation: eps = 0.5 puts the scaled-down channels under the floor."""
    qkv = make_qkv(2, 5, 2, 3, torch.float64, layout="token_strided")
    with torch.no_grad():
        qkv[..., 1] *= 0.1
        qkv[..., 7] *= 0.1
    qkv.requires_grad_()
    t = make_temperature(2, dtype=torch.float64, requires_grad=True)
    backend = "cpu" if DEVICE.type == "cpu" else "reference"
    with fk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b: fk.xca_attention(a, 2, b, eps=eps), (qkv, t))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients_keep_dtype(dtype):
    qkv = make_qkv(2, 16, 2, 20, dtype, requires_grad=True)
    t = make_temperature(2, requires_grad=True)
    fk.xca_attention(qkv, 2, t).float().sum().backward()
    assert qkv.grad.dtype == dtype and torch.isfinite(qkv.grad).all()
    assert t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()


def test_gradient_of_one_input_only():
    qkv = make_qkv(1, 8, 2, 6, requires_grad=True)
    t = make_temperature(2)
    fk.xca_attention(qkv, 2, t).sum().backward()
    assert qkv.grad is not None
    qkv = make_qkv(1, 8, 2, 6)
    t = make_temperature(2, requires_grad=True)
    fk.xca_attention(qkv, 2, t).sum().backward()
    assert t.grad is not None and t.grad.shape == (2, 1, 1)


# ---------------------------------------------------------------------------------------------------
# Against timm's modules
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("module", ["edgenext", "xcit"])
def test_matches_timm_cross_covariance_attention(backend, module):
    """Our op between timm's own qkv and proj Linears == the timm module's forward."""
    if module == "edgenext":
        attn_cls = pytest.importorskip("timm.models.edgenext").CrossCovarianceAttn
        C, heads, N = 96, 8, 64  # EdgeNeXt-S stage 1 (8 x 8 tokens here): head dim 12
    else:
        attn_cls = pytest.importorskip("timm.models.xcit").XCA
        C, heads, N = 192, 4, 49  # XCiT-T: head dim 48
    torch.manual_seed(0)
    attn = attn_cls(C, num_heads=heads, qkv_bias=True).to(DEVICE).eval()
    with torch.no_grad():
        attn.temperature.copy_(make_temperature(heads))
    x = torch.randn(2, N, C, device=DEVICE)

    def ours(dtype):
        a = attn.to(dtype)
        with fk.use_backend(backend):
            return a.proj(fk.xca_attention(a.qkv(x.to(dtype)), heads, a.temperature))

    with torch.no_grad():
        timm64 = attn.to(torch.float64)(x.double())
        timm32 = attn.to(torch.float32)(x)
        ours32 = ours(torch.float32)
        if backend != "triton":  # no float64 Triton kernel
            torch.testing.assert_close(ours(torch.float64), timm64, rtol=1e-10, atol=1e-10)
    assert_close(ours32, timm64, timm32, f"vs timm {module} ({backend})")


# ---------------------------------------------------------------------------------------------------
# torch.library integration
# ---------------------------------------------------------------------------------------------------


def test_opcheck():
    samples = [
        (make_qkv(2, 9, 2, 20, layout="sliced", requires_grad=True), 2, make_temperature(2, requires_grad=True),
         1e-12),
        (make_qkv(1, 1, 1, 16, requires_grad=True), 1, make_temperature(1, "flat"), 1e-6),
        (make_qkv(1, 5, 3, 4, layout="channels_first"), 3, make_temperature(3, requires_grad=True), 0.1),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.fastvit_kernels.xca_attention.default, args)


def test_compile_fullgraph_forward_and_backward():
    """The op is opaque to dynamo (no graph break) and its backward traces into the compiled graph."""
    torch._dynamo.reset()
    qkv = make_qkv(2, 12, 2, 20, requires_grad=True)
    t = make_temperature(2, requires_grad=True)
    grad = torch.randn(2, 12, 40, device=DEVICE)
    fn = torch.compile(lambda a, b: fk.xca_attention(a, 2, b) * 2, fullgraph=True, backend="aot_eager")
    out = fn(qkv, t)
    out.backward(grad)
    compiled = qkv.grad, t.grad
    qkv.grad = t.grad = None
    expected = fk.xca_attention(qkv, 2, t) * 2
    expected.backward(grad)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(compiled[0], qkv.grad)
    torch.testing.assert_close(compiled[1], t.grad)


# ---------------------------------------------------------------------------------------------------
# Dispatch and bad input
# ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the default choice on CPU tensors")
def test_cpu_tensors_default_to_the_cpu_kernel(monkeypatch):
    """With no preference, CPU tensors take the C++ cpu backend (DEFAULT_ORDER), not the reference."""
    monkeypatch.delenv(fk.backends.ENV_VAR, raising=False)
    calls = []
    monkeypatch.setattr(op_module, "IMPLEMENTATIONS", tuple(
        fk.backends.Implementation(i.backend, lambda *a, _r=i.run, _n=i.backend: calls.append(_n) or _r(*a),
                                   i.unsupported)
        for i in op_module.IMPLEMENTATIONS))
    fk.xca_attention(make_qkv(1, 4, 1, 16), 1, make_temperature(1))
    assert calls == ["cpu"]


def test_backend_for_another_device_says_why():
    """Asking for the other device's C++ backend raises, naming the device (no silent fallback)."""
    other = "cuda" if DEVICE.type == "cpu" else "cpu"
    with pytest.raises(fk.BackendUnavailable, match=f"backend '{other}' cannot run xca_attention: .+"):
        with fk.use_backend(other):
            fk.xca_attention(make_qkv(1, 4, 1, 16), 1, make_temperature(1))


@pytest.mark.parametrize("make_args, message", [
    (lambda q, t: (q, t, torch.empty(1, 6, 20, device=DEVICE)), r"out must have shape \[1, 6, 40\] .*got \[1, 6, 20\]"),
    (lambda q, t: (q, t, torch.empty(1, 6, 40, device=DEVICE, dtype=torch.float64)), "out must have qkv's dtype Float"),
    (lambda q, t: (q, t.double(), torch.empty(1, 6, 40, device=DEVICE)), "temperature must be Float for qkv of dtype Float"),
    (lambda q, t: (q, t[:1], torch.empty(1, 6, 40, device=DEVICE)), r"temperature must be a contiguous \[num_heads\] = \[2\]"),
    (lambda q, t: (q, t, q.view(-1)[:240].view(1, 6, 40)), "out must not share memory with qkv"),
    (lambda q, t: (q, t, torch.empty(1, 1, 1, device=DEVICE).expand(1, 6, 40)), "out must not have overlapping"),
])
def test_extension_checks_its_arguments(make_args, message):
    """The C++ op validates what the Python layer normally guarantees, naming the argument."""
    qkv, t = make_qkv(1, 6, 2, 20), make_temperature(2, "flat")
    q, t, out = make_args(qkv, t)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastvit_kernels_C.xca_attention_out(q, 2, t, 1e-12, out)
    with pytest.raises(RuntimeError, match=r"multiple of 3 \* num_heads = 21 .*got 120"):
        torch.ops.fastvit_kernels_C.xca_attention_out(qkv, 7, make_temperature(7, "flat"), 1e-12,
                                                      torch.empty(1, 6, 40, device=DEVICE))


def test_extension_handles_large_head_dims():
    """Head dims above Triton's 128, on the C++ kernel of this device."""
    qkv = make_qkv(1, 40, 1, 150)
    t = make_temperature(1)
    with fk.use_backend(DEVICE.type):
        out = fk.xca_attention(qkv, 1, t)
    assert_close(out, eager(qkv, 1, t, dtype=torch.float64), eager(qkv, 1, t), "head_dim 150")


@pytest.mark.parametrize("dtype, heads, head_dim, message", [
    (torch.float64, 1, 16, "float64 is not supported by the Triton kernel"),
    (torch.float32, 1, 130, "head_dim 130 is not supported by the Triton kernel"),
])
def test_triton_refuses_what_it_cannot_run(dtype, heads, head_dim, message):
    if DEVICE.type == "cpu" and not INTERPRETED:
        pytest.skip("Triton cannot take CPU tensors without the interpreter")
    with pytest.raises(fk.BackendUnavailable, match=message):
        with fk.use_backend("triton"):
            fk.xca_attention(make_qkv(1, 2, heads, head_dim, dtype), heads, make_temperature(heads, dtype=dtype))


@pytest.mark.parametrize("B, N", [(0, 4), (2, 0)])
def test_empty_input_gives_empty_output(B, N):
    out = fk.xca_attention(torch.randn(B, N, 48, device=DEVICE), 2, make_temperature(2))
    assert out.shape == (B, N, 16)


@pytest.mark.parametrize("make, error, message", [
    (lambda q, t: (q.long(), 2, t), TypeError, "qkv.dtype torch.int64 is not supported"),
    (lambda q, t: (q[0], 2, t), ValueError, r"3-D \[B, N, 3\*C\] tensor, got shape \(8, 60\)"),
    (lambda q, t: (q[..., :50], 2, t), ValueError, r"multiple of 3 \* num_heads = 6 .*got 50"),
    (lambda q, t: (q, 7, t), ValueError, r"multiple of 3 \* num_heads = 21 .*got 60"),
    (lambda q, t: (q, 0, t), ValueError, "num_heads must be >= 1, got 0"),
    (lambda q, t: (q, 2, t[:1]), ValueError, r"temperature must have num_heads = 2 elements .*got shape \(1, 1, 1\)"),
    (lambda q, t: (q, 2, t.double()), TypeError, "temperature.dtype torch.float64 is not supported for qkv of dtype "
                                                 "torch.float32; supported: float32 or qkv's dtype"),
    (lambda q, t: (q, 2, t.to("meta")), ValueError, "temperature must be on qkv's device"),
    (lambda q, t: (q, 2, t, float("nan")), ValueError, "eps must be a finite number >= 0, got nan"),
    (lambda q, t: (q, 2, t, -1.0), ValueError, "eps must be a finite number >= 0, got -1.0"),
])
def test_bad_input_gets_a_clear_error(make, error, message):
    qkv, t = make_qkv(2, 8, 2, 10), make_temperature(2)
    with pytest.raises(error, match=message):
        fk.xca_attention(*make(qkv, t))
