"""patch_attention: every backend against the float64 reference, forward and backward."""

import importlib

import pytest
import torch

import fastvit_kernels as fk
from helpers import BACKENDS as DEVICE_BACKENDS, DEVICE, DTYPES, INTERPRETED, assert_close, cpu_vector_width

op_module = importlib.import_module("fastvit_kernels.ops.patch_attention")

# The backends this op implements (all of them: triton, cuda, cpu, reference).
BACKENDS = [b for b in DEVICE_BACKENDS if b in {i.backend for i in op_module.IMPLEMENTATIONS}]
BF16_INTERPRETER = "bf16 tl.dot gives wrong results in the Triton interpreter: tested on a GPU only"

# (B, H, W, heads, head_dim, patch): odd head dims, sequences of 1 to 64 tokens (short enough for the
# interpreter), batch 1 and larger, every patch shape, head dims that use the scalar-load kernel (30).
SHAPES = [
    (2, 8, 8, 4, 20, (2, 2)),  # MobileViT's last stage: 16 tokens per sequence
    (1, 6, 10, 2, 36, (2, 2)),  # 15 tokens
    (3, 4, 6, 1, 60, (2, 1)),  # 12 tokens, a 2x1 patch
    (2, 9, 6, 2, 24, (3, 3)),  # 6 tokens, a 3x3 patch
    (1, 1, 1, 2, 16, (1, 1)),  # one token
    (2, 1, 50, 3, 20, (1, 1)),  # plain attention over a 50-token sequence (ViT-style H = 1)
    (1, 10, 14, 2, 30, (2, 2)),  # 35 tokens, head dim 30 (not a multiple of 4: scalar loads)
    (1, 16, 16, 1, 64, (2, 2)),  # 64 tokens
    (1, 2, 4, 1, 128, (2, 2)),  # 2 tokens, the widest head
]
# Long sequences, for the backends that are not interpreted (the cpu kernel: several query blocks of
# 32, and a last block that is not full).
LONG_SHAPES = [
    (1, 32, 32, 2, 36, (2, 2)),  # 256 tokens (MobileViT-S stage 3 at 256 px)
    (1, 64, 32, 1, 48, (2, 2)),  # 512 tokens
    (2, 32, 32, 1, 20, (1, 1)),  # 1024 tokens
    (1, 1, 1030, 2, 24, (1, 1)),  # 1030 tokens: not a multiple of any block
    (64, 8, 8, 4, 24, (2, 2)),  # a large batch (4096 sequences x heads of 16 tokens)
]
LAYOUTS = ("contiguous", "sliced", "offset", "spatial", "channels_first")


def make_qkv(B, H, W, heads, head_dim, dtype=torch.float32, layout="contiguous", requires_grad=False):
    """Random N(0, 1) qkv [B, H, W, 3*C] in one of the layouts a model can hand over."""
    c3 = 3 * heads * head_dim
    if layout == "contiguous":
        qkv = torch.randn(B, H, W, c3, device=DEVICE)
    elif layout == "sliced":  # the first 3C channels of a wider projection
        qkv = torch.randn(B, H, W, c3 + 8, device=DEVICE)[..., :c3]
    elif layout == "offset":  # a slice that starts one element in: no aligned vector loads
        qkv = torch.randn(B, H, W, c3 + 3, device=DEVICE)[..., 1:c3 + 1]
    elif layout == "spatial":  # every other column of a wider map
        qkv = torch.randn(B, H, 2 * W, c3, device=DEVICE)[:, :, ::2]
    elif layout == "channels_first":  # a [B, 3C, H, W] tensor seen channels-last: channel stride H*W
        qkv = torch.randn(B, c3, H, W, device=DEVICE).permute(0, 2, 3, 1)
    else:
        raise ValueError(layout)
    qkv = qkv.to(dtype)
    return qkv.requires_grad_() if requires_grad else qkv


def eager(qkv, num_heads, patch_size=(2, 2), scale=None, dtype=None):
    """timm's unfold -> attention -> fold as one reshape chain, in ``dtype`` (float64: the reference)."""
    dtype = dtype or qkv.dtype
    B, H, W, c3 = qkv.shape
    ph, pw = patch_size
    C = c3 // 3
    d, P, N = C // num_heads, ph * pw, (H // ph) * (W // pw)
    scale = d ** -0.5 if scale is None else scale
    t = qkv.to(dtype).reshape(B, H // ph, ph, W // pw, pw, 3, num_heads, d)
    q, k, v = t.permute(5, 0, 2, 4, 6, 1, 3, 7).reshape(3, B * P, num_heads, N, d)
    attn = ((q * scale) @ k.transpose(-1, -2)).softmax(dim=-1)
    o = (attn @ v).reshape(B, ph, pw, num_heads, H // ph, W // pw, d)
    return o.permute(0, 4, 1, 5, 2, 3, 6).reshape(B, H, W, C)


def _shape_id(shape):
    B, H, W, heads, d, (ph, pw) = shape
    return f"{B}x{H}x{W}-h{heads}d{d}-p{ph}x{pw}"


def forward_cases(backend):
    """Every dtype over every shape; long sequences only where nothing is interpreted."""
    dtypes = DTYPES[backend]
    shapes = SHAPES + ([] if backend == "triton" and INTERPRETED else LONG_SHAPES)
    cases = [(dt, shape, "contiguous") for dt in dtypes for shape in shapes]
    return cases + [(dt, shape, layout) for dt in dtypes[:2] for shape in (SHAPES[1], SHAPES[6])
                    for layout in LAYOUTS[1:]]


CASES = [(b,) + c for b in BACKENDS for c in forward_cases(b)]


def _id(case):
    backend, dtype, shape, layout = case
    return f"{backend}-{str(dtype)[6:]}-{_shape_id(shape)}-{layout}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_matches_reference(case):
    backend, dtype, (B, H, W, heads, d, patch), layout = case
    qkv = make_qkv(B, H, W, heads, d, dtype, layout)
    with fk.use_backend(backend):
        out = fk.patch_attention(qkv, heads, patch)
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, eager(qkv, heads, patch, dtype=torch.float64), eager(qkv, heads, patch), _id(case))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend needs the C++ extension")
@pytest.mark.parametrize("width", ["32-byte", "64-byte"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_vector_widths_match_reference(monkeypatch, width, dtype):
    """Every shape, and a cross attention (Nq != Nk, value dim != key dim), through each register-tile
    width: the AVX-512 path pads keys and channels to 16 floats instead of 8."""
    cpu_vector_width(monkeypatch, width)
    for B, H, W, heads, d, patch in SHAPES + LONG_SHAPES:
        qkv = make_qkv(B, H, W, heads, d, dtype)
        with fk.use_backend("cpu"):
            out = fk.patch_attention(qkv, heads, patch)
        assert_close(out, eager(qkv, heads, patch, dtype=torch.float64), eager(qkv, heads, patch),
                     f"{width} {B}x{H}x{W} {heads}h d{d} p{patch}")
    q, k, v = torch.randn(2, 3, 7, 20, dtype=dtype), torch.randn(2, 3, 37, 20, dtype=dtype), torch.randn(
        2, 3, 37, 24, dtype=dtype)
    with fk.use_backend("cpu"):
        out = fk.attention(q, k, v)
    ref = lambda t: (t(q) @ t(k).transpose(-1, -2) * 20 ** -0.5).softmax(-1) @ t(v)  # noqa: E731
    assert_close(out, ref(lambda t: t.double()).transpose(1, 2).flatten(2),
                 ref(lambda t: t).transpose(1, 2).flatten(2), f"{width} cross attention")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(backend):
    if backend == "triton" and INTERPRETED:
        pytest.skip(BF16_INTERPRETER)
    qkv = make_qkv(2, 8, 6, 2, 36, torch.bfloat16)
    with fk.use_backend(backend):
        out = fk.patch_attention(qkv, 2, (2, 2))
    assert_close(out, eager(qkv, 2, (2, 2), dtype=torch.float64), eager(qkv, 2, (2, 2)), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_layout", ["contiguous", "strided"])
def test_every_output_element_is_written(backend, out_layout):
    """Implementations write into a NaN-poisoned output; any element left unwritten shows."""
    B, H, W, heads, d, patch = 2, 6, 4, 2, 20, (2, 2)
    qkv = make_qkv(B, H, W, heads, d, layout="sliced")
    C = heads * d
    if out_layout == "contiguous":
        out = torch.full((B, H, W, C), float("nan"), device=DEVICE)
    else:  # every other channel of a wider buffer: channel stride 2
        out = torch.full((B, H, W, 2 * C), float("nan"), device=DEVICE)[..., ::2]
    impl = {i.backend: i for i in op_module.IMPLEMENTATIONS}[backend]
    assert fk.backends.load_error(backend) is None  # also loads the extension: impl.run bypasses dispatch
    impl.run(qkv, heads, patch, d ** -0.5, out)
    assert_close(out, eager(qkv, heads, patch, dtype=torch.float64), eager(qkv, heads, patch), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,layout", [
    (SHAPES[0], "contiguous"), (SHAPES[2], "offset"), (SHAPES[4], "contiguous"), (SHAPES[5], "spatial"),
    (SHAPES[6], "channels_first")], ids=lambda v: _shape_id(v) if isinstance(v, tuple) else v)
def test_backward_matches_reference(backend, shape, layout):
    B, H, W, heads, d, patch = shape
    qkv = make_qkv(B, H, W, heads, d, layout=layout, requires_grad=True)
    grad = torch.randn(B, H, W, heads * d, device=DEVICE)
    with fk.use_backend(backend):
        fk.patch_attention(qkv, heads, patch).backward(grad)

    q64 = qkv.detach().double().requires_grad_()
    eager(q64, heads, patch).backward(grad.double())
    q32 = qkv.detach().clone().requires_grad_()
    eager(q32, heads, patch).backward(grad)
    assert qkv.grad.dtype == qkv.dtype and qkv.grad.shape == qkv.shape
    assert_close(qkv.grad, q64.grad, q32.grad, f"grad qkv ({backend})")


@pytest.mark.parametrize("shape", [LONG_SHAPES[0], LONG_SHAPES[3]], ids=_shape_id)
def test_backward_long_sequences_on_reference(shape):
    B, H, W, heads, d, patch = shape
    qkv = make_qkv(B, H, W, heads, d, requires_grad=True)
    grad = torch.randn(B, H, W, heads * d, device=DEVICE)
    with fk.use_backend("reference"):
        fk.patch_attention(qkv, heads, patch).backward(grad)
    q64 = qkv.detach().double().requires_grad_()
    eager(q64, heads, patch).backward(grad.double())
    q32 = qkv.detach().clone().requires_grad_()
    eager(q32, heads, patch).backward(grad)
    assert_close(qkv.grad, q64.grad, q32.grad, "grad qkv")


def test_gradcheck_float64():
    qkv = make_qkv(1, 4, 2, 2, 3, torch.float64, layout="spatial", requires_grad=True)
    with fk.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda t: fk.patch_attention(t, 2, (2, 1), 0.7), (qkv,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients_keep_dtype(dtype):
    qkv = make_qkv(2, 4, 4, 2, 20, dtype, requires_grad=True)
    fk.patch_attention(qkv, 2).float().sum().backward()
    assert qkv.grad.dtype == dtype and torch.isfinite(qkv.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_and_int_patch_size(backend):
    qkv = make_qkv(2, 4, 6, 3, 16)
    with fk.use_backend(backend):
        out = fk.patch_attention(qkv, 3, 2, scale=0.3)
    assert_close(out, eager(qkv, 3, (2, 2), 0.3, torch.float64), eager(qkv, 3, (2, 2), 0.3), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_timm_mobilevit_unfold_attention_fold(backend):
    """Our op on image-ordered qkv == timm MobileVitBlock's unfold -> transformer Attention -> fold."""
    timm_mobilevit = pytest.importorskip("timm.models.mobilevit")
    from timm.models.vision_transformer import Attention

    B, C, H, W, heads, (ph, pw) = 2, 80, 8, 6, 4, (2, 2)  # mobilevit_xxs stage 4: head_dim 20
    block = timm_mobilevit.MobileVitBlock(C, C, transformer_dim=C, transformer_depth=1, num_heads=heads,
                                          patch_size=ph).to(DEVICE).eval()
    attn = block.transformer[0].attn
    assert isinstance(attn, Attention) and attn.num_heads == heads
    x = torch.randn(B, C, H, W, device=DEVICE)  # the block's conv_1x1 output

    def timm_path(dtype):
        a = attn.to(dtype)
        nh, nw = H // ph, W // pw
        N, P = nh * nw, ph * pw
        # MobileVitBlock.forward, unfold: [B, C, H, W] -> [B * P, N, C]
        t = x.to(dtype).reshape(B * C * nh, ph, nw, pw).transpose(1, 2)
        t = t.reshape(B, C, N, P).transpose(1, 3).reshape(B * P, N, -1)
        t = a(t)
        # fold: [B * P, N, C] -> [B, C, H, W]
        t = t.contiguous().view(B, P, N, -1).transpose(1, 3).reshape(B * C * nh, nw, ph, pw)
        return t.transpose(1, 2).reshape(B, C, nh * ph, nw * pw)

    def ours(dtype):
        a = attn.to(dtype)
        tokens = x.to(dtype).permute(0, 2, 3, 1)  # image order, channels last
        with fk.use_backend(backend):
            out = fk.patch_attention(a.qkv(tokens), heads, (ph, pw))
        return a.proj(out).permute(0, 3, 1, 2)

    with torch.no_grad():
        timm64 = timm_path(torch.float64)
        timm32 = timm_path(torch.float32)
        ours32 = ours(torch.float32)
        if backend != "triton":  # no float64 Triton kernel
            torch.testing.assert_close(ours(torch.float64), timm64, rtol=1e-12, atol=1e-12)
    assert_close(ours32, timm64, timm32, f"vs timm ({backend})")


# ---------------------------------------------------------------------------------------------------
# torch.library integration
# ---------------------------------------------------------------------------------------------------


def test_opcheck():
    samples = [
        (make_qkv(2, 4, 6, 2, 20, layout="sliced", requires_grad=True), 2, [2, 2], None),
        (make_qkv(1, 1, 5, 1, 16, requires_grad=True), 1, [1, 1], 0.25),
        (make_qkv(1, 3, 2, 3, 4, layout="channels_first"), 3, [3, 1], None),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.fastvit_kernels.patch_attention.default, args)


def test_compile_fullgraph_forward_and_backward():
    """The op is opaque to dynamo (no graph break) and its backward traces into the compiled graph."""
    torch._dynamo.reset()
    qkv = make_qkv(2, 4, 6, 2, 20, requires_grad=True)
    grad = torch.randn(2, 4, 6, 40, device=DEVICE)
    fn = torch.compile(lambda t: fk.patch_attention(t, 2, (2, 2)) * 2, fullgraph=True)
    out = fn(qkv)
    out.backward(grad)
    compiled_grad, qkv.grad = qkv.grad, None
    expected = fk.patch_attention(qkv, 2, (2, 2)) * 2
    expected.backward(grad)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(compiled_grad, qkv.grad)


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
    fk.patch_attention(make_qkv(1, 2, 2, 1, 16), 1)
    assert calls == ["cpu"]


def test_backend_for_another_device_says_why():
    """Asking for the other device's C++ backend raises, naming the device (no silent fallback)."""
    other = "cuda" if DEVICE.type == "cpu" else "cpu"
    with pytest.raises(fk.BackendUnavailable, match=f"backend '{other}' cannot run patch_attention: .+"):
        with fk.use_backend(other):
            fk.patch_attention(make_qkv(1, 2, 2, 1, 16), 1)


def _extension(qkv, heads, ph, pw, out, scale=0.2, **replace):
    """The C++ op on qkv's q, k, v views (any of them replaced by ``replace``) and out's view."""
    views = dict(zip("qkv", op_module.qkv_views(qkv, heads)), **replace)
    torch.ops.fastvit_kernels_C.patch_attention_out(views["q"], views["k"], views["v"], ph, pw, scale,
                                                    op_module.out_view(out, heads))


@pytest.mark.parametrize("make_out, message", [
    (lambda q: torch.empty(1, 4, 6, 20, device=DEVICE), r"out must have shape \[1, 2, 4, 6, 20\] .*got \[1, 2, 4, 6, 10\]"),
    (lambda q: torch.empty(1, 4, 6, 40, device=DEVICE, dtype=torch.float64), "out must have q's dtype Float"),
    (lambda q: q.view(-1)[:960].view(1, 4, 6, 40), "out must not share memory with q"),
    (lambda q: torch.empty(1, 1, 1, 1, device=DEVICE).expand(1, 4, 6, 40), "out must not have overlapping"),
])
def test_extension_checks_its_arguments(make_out, message):
    """The C++ op validates what the Python layer normally guarantees, naming the argument."""
    qkv = make_qkv(1, 4, 6, 2, 20)
    with pytest.raises(RuntimeError, match=message):
        _extension(qkv, 2, 2, 2, make_out(qkv))
    out = torch.empty(1, 4, 6, 40, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"q's H x W = 4x6 must be multiples of the patch size 3x2"):
        _extension(qkv, 2, 3, 2, out)
    k = op_module.qkv_views(qkv, 2)[1]
    with pytest.raises(RuntimeError, match=r"k must have shape \[1, 2, Hk, Wk, 20\] .*got \[1, 2, 4, 6, 10\]"):
        _extension(qkv, 2, 2, 2, out, k=k[..., :10])
    with pytest.raises(RuntimeError, match=r"v must have shape \[1, 2, 4, 6, dv\] .*got \[1, 2, 4, 3, 20\]"):
        _extension(qkv, 2, 2, 2, out, v=k[:, :, :, :3])
    with pytest.raises(RuntimeError, match=r"k and v must have q's dtype Float"):
        _extension(qkv, 2, 2, 2, out, v=k.double())


@pytest.mark.parametrize("kind", sorted({"cpu", DEVICE.type}))
def test_extension_handles_large_head_dims(kind):
    """The C++ kernels take any head dim (the CUDA one in 64-channel chunks), even above the limit of
    128 the dispatch gives them (HEAD_DIM_LIMITS); with no preference, 150 runs on the reference."""
    if fk.backends.load_error(kind):
        pytest.skip(fk.backends.load_error(kind))
    qkv = make_qkv(1, 4, 4, 1, 150).to(kind)
    out = torch.full((1, 4, 4, 150), float("nan"), device=kind)
    _extension(qkv, 1, 2, 2, out, 150 ** -0.5)
    assert_close(out.to(DEVICE), eager(qkv, 1, (2, 2), dtype=torch.float64).to(DEVICE),
                 eager(qkv, 1, (2, 2)).to(DEVICE), "head_dim 150")
    with pytest.raises(fk.BackendUnavailable, match=f"the {kind} kernel serves head dims <= 128"):
        with fk.use_backend(kind):
            fk.patch_attention(qkv, 1, (2, 2))
    with fk.use_backend(None):
        fk.patch_attention(qkv, 1, (2, 2))


@pytest.mark.parametrize("dtype, heads, head_dim, message", [
    (torch.float64, 1, 16, "float64 is not supported by the Triton kernel"),
    (torch.float32, 1, 130, "head_dim 130 is not supported by the Triton kernel"),
])
def test_triton_refuses_what_it_cannot_run(dtype, heads, head_dim, message):
    if DEVICE.type == "cpu" and not INTERPRETED:
        pytest.skip("Triton cannot take CPU tensors without the interpreter")
    with pytest.raises(fk.BackendUnavailable, match=message):
        with fk.use_backend("triton"):
            fk.patch_attention(make_qkv(1, 2, 2, heads, head_dim, dtype), heads)


def test_empty_batch_gives_empty_output():
    out = fk.patch_attention(torch.randn(0, 4, 4, 48, device=DEVICE), 2)
    assert out.shape == (0, 4, 4, 16)


@pytest.mark.parametrize("make, error, message", [
    (lambda q: (q.long(), 2), TypeError, "qkv.dtype torch.int64 is not supported"),
    (lambda q: (q[0], 2), ValueError, r"4-D \[B, H, W, 3\*C\] tensor .*got shape \(8, 6, 60\)"),
    (lambda q: (q[..., :50], 2), ValueError, r"multiple of 3 \* num_heads = 6 .*got 50"),
    (lambda q: (q, 7), ValueError, r"multiple of 3 \* num_heads = 21 .*got 60"),
    (lambda q: (q, 0), ValueError, "num_heads must be >= 1, got 0"),
    (lambda q: (q[:, :7], 2), ValueError, r"H x W = 7x6 must be multiples of patch_size 2x2"),
    (lambda q: (q, 2, (3, 4)), ValueError, r"H x W = 8x6 must be multiples of patch_size 3x4"),
    (lambda q: (q[:, :1], 2), ValueError, r"H x W = 1x6 is smaller than patch_size 2x2"),
    (lambda q: (q, 2, (1, 8)), ValueError, r"H x W = 8x6 is smaller than patch_size 1x8"),
    (lambda q: (q, 2, (2,)), ValueError, r"patch_size must be two positive ints \(ph, pw\), got \(2,\)"),
    (lambda q: (q, 2, (0, 2)), ValueError, r"patch_size must be two positive ints \(ph, pw\), got \(0, 2\)"),
    (lambda q: (q, 2, (2, 2), float("nan")), ValueError, "scale must be a finite number or None, got nan"),
])
def test_bad_input_gets_a_clear_error(make, error, message):
    qkv = make_qkv(2, 8, 6, 2, 10)
    with pytest.raises(error, match=message):
        fk.patch_attention(*make(qkv))
