"""attention (cross attention on separate q, k, v): every backend against the float64 reference,
forward and backward. The fused backends are patch_attention's kernels with a 1 x 1 patch."""

import importlib

import pytest
import torch

import fastvit_kernels as fk
from helpers import BACKENDS as DEVICE_BACKENDS, DEVICE, DTYPES, INTERPRETED, assert_close

op_module = importlib.import_module("fastvit_kernels.ops.patch_attention")

BACKENDS = [b for b in DEVICE_BACKENDS if b in {i.backend for i in op_module.CROSS_IMPLEMENTATIONS}]
BF16_INTERPRETER = "bf16 tl.dot gives wrong results in the Triton interpreter: tested on a GPU only"

# (B, heads, Nq, Nk, d, dv): Nq != Nk both ways, Nq = 1 (CaiT class attention), Nk = 1, the head dims
# of the families that use this op, an odd one (13), dv != d; short enough for the interpreter.
SHAPES = [
    (2, 4, 10, 37, 16, 16),  # CvT-like: strided (fewer) keys than queries would be the reverse; here more keys
    (1, 2, 1, 50, 48, 48),  # CaiT class attention: one query over the class token + patches
    (3, 3, 21, 1, 24, 24),  # one key
    (2, 2, 33, 9, 8, 8),  # CvT: 3x3 strided k/v under 33 queries
    (1, 3, 17, 17, 20, 20),  # MobileViT-like head dim, square
    (2, 1, 5, 12, 36, 36),
    (1, 2, 8, 16, 64, 64),  # ViT / DeiT
    (2, 2, 7, 11, 13, 13),  # an odd head dim: scalar loads in Triton
    (1, 2, 9, 6, 16, 40),  # dv != d
    (2, 1, 4, 5, 36, 12),  # dv < d
]
# Longer sequences for the backends that are not interpreted: several CPU query blocks of 32.
LONG_SHAPES = [
    (1, 4, 197, 197, 64, 64),  # DeiT-S-like: 197 tokens
    (8, 6, 1, 197, 64, 64),  # CaiT class attention, a larger batch
    (2, 2, 784, 49, 24, 24),  # CvT stage 1: 56x56 queries over 7x7 strided keys
]
# T2T-ViT (vit-pytorch): one head of 147 and 1323 channels; beyond the triton and cuda kernels' limits.
T2T_SHAPES = [(1, 1, 40, 40, 147, 147), (1, 1, 9, 9, 1323, 1323)]
LAYOUTS = ("contiguous", "linear", "packed_kv", "transposed")


def make_qkv(B, heads, Nq, Nk, d, dv, dtype=torch.float32, layout="contiguous", requires_grad=False):
    """Random N(0, 1) q [B, heads, Nq, d], k [B, heads, Nk, d], v [B, heads, Nk, dv] in a layout a model
    hands over."""
    if layout == "contiguous":
        q = torch.randn(B, heads, Nq, d, device=DEVICE)
        k = torch.randn(B, heads, Nk, d, device=DEVICE)
        v = torch.randn(B, heads, Nk, dv, device=DEVICE)
    elif layout == "linear":  # separate Linear outputs [B, N, heads * d] split into heads (rearrange)
        q = torch.randn(B, Nq, heads, d, device=DEVICE).transpose(1, 2)
        k = torch.randn(B, Nk, heads, d, device=DEVICE).transpose(1, 2)
        v = torch.randn(B, Nk, heads, dv, device=DEVICE).transpose(1, 2)
    elif layout == "packed_kv":  # q from its Linear, k and v chunks of one kv Linear (CrossViT, CvT)
        q = torch.randn(B, Nq, heads * d + 3, device=DEVICE)[..., 1:heads * d + 1].unflatten(2, (heads, d))
        q = q.transpose(1, 2)
        kv = torch.randn(B, Nk, heads * (d + dv), device=DEVICE)
        k, v = kv.split([heads * d, heads * dv], dim=-1)
        k, v = k.unflatten(2, (heads, d)).transpose(1, 2), v.unflatten(2, (heads, dv)).transpose(1, 2)
    elif layout == "transposed":  # channel stride != 1 (the kernels' per-row / scalar-load paths)
        q = torch.randn(B, heads, d, Nq, device=DEVICE).transpose(2, 3)
        k = torch.randn(B, heads, d, Nk, device=DEVICE).transpose(2, 3)
        v = torch.randn(B, dv, heads, Nk, device=DEVICE).permute(0, 2, 3, 1)
    else:
        raise ValueError(layout)
    out = [t.to(dtype) for t in (q, k, v)]
    return [t.requires_grad_() for t in out] if requires_grad else out


def eager(q, k, v, scale=None, dtype=None):
    """The attention as a model writes it, in ``dtype`` (float64: the reference): [B, Nq, heads * dv]."""
    dtype = dtype or q.dtype
    q, k, v = (t.to(dtype) for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o = ((q * scale) @ k.transpose(-1, -2)).softmax(dim=-1) @ v
    return o.transpose(1, 2).flatten(2)


def _shape_id(shape):
    B, heads, Nq, Nk, d, dv = shape
    return f"{B}x{heads}-q{Nq}k{Nk}-d{d}" + (f"v{dv}" if dv != d else "")


def forward_cases(backend):
    dtypes = DTYPES[backend]
    interpreted = backend == "triton" and INTERPRETED
    shapes = SHAPES + ([] if interpreted else LONG_SHAPES + T2T_SHAPES)
    cases = [(dt, shape, "contiguous") for dt in dtypes for shape in shapes]
    return cases + [(dt, shape, layout) for dt in dtypes[:2] for shape in (SHAPES[0], SHAPES[7], SHAPES[8])
                    for layout in LAYOUTS[1:]]


CASES = [(b,) + c for b in BACKENDS for c in forward_cases(b)]


def _id(case):
    backend, dtype, shape, layout = case
    return f"{backend}-{str(dtype)[6:]}-{_shape_id(shape)}-{layout}"


def _served_by(backend, q, k, v):
    """The backend that runs when ``backend`` is asked for: itself, or the reference beyond its head-dim
    limit (the caller then asks for the reference explicitly)."""
    impl = {i.backend: i for i in op_module.CROSS_IMPLEMENTATIONS}[backend]
    return "reference" if impl.unsupported(q, k, v) else backend


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_matches_reference(case):
    backend, dtype, shape, layout = case
    q, k, v = make_qkv(*shape, dtype, layout)
    with fk.use_backend(_served_by(backend, q, k, v)):
        out = fk.attention(q, k, v)
    B, heads, Nq, _, _, dv = shape
    assert out.dtype == dtype and out.is_contiguous() and out.shape == (B, Nq, heads * dv)
    assert_close(out, eager(q, k, v, dtype=torch.float64), eager(q, k, v), _id(case))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(backend):
    if backend == "triton" and INTERPRETED:
        pytest.skip(BF16_INTERPRETER)
    q, k, v = make_qkv(2, 2, 9, 14, 36, 36, torch.bfloat16, "linear")
    with fk.use_backend(backend):
        out = fk.attention(q, k, v)
    assert_close(out, eager(q, k, v, dtype=torch.float64), eager(q, k, v), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_layout", ["contiguous", "strided"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[8]], ids=_shape_id)
def test_every_output_element_is_written(backend, out_layout, shape):
    """Implementations write into a NaN-poisoned output; any element left unwritten shows."""
    B, heads, Nq, Nk, d, dv = shape
    q, k, v = make_qkv(*shape, layout="packed_kv")
    if out_layout == "contiguous":
        out = torch.full((B, Nq, heads * dv), float("nan"), device=DEVICE)
    else:  # every other channel of a wider buffer: channel stride 2
        out = torch.full((B, Nq, 2 * heads * dv), float("nan"), device=DEVICE)[..., ::2]
    impl = {i.backend: i for i in op_module.CROSS_IMPLEMENTATIONS}[backend]
    assert fk.backends.load_error(backend) is None  # also loads the extension: impl.run bypasses dispatch
    impl.run(q, k, v, d ** -0.5, out)
    assert_close(out, eager(q, k, v, dtype=torch.float64), eager(q, k, v), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,layout", [
    # (Nk = 1 is left to the forward tests: its k gradient is exactly zero, so any rounding fails the rule.)
    (SHAPES[0], "contiguous"), (SHAPES[1], "linear"), (SHAPES[3], "packed_kv"), (SHAPES[8], "transposed"),
    (SHAPES[7], "contiguous")], ids=lambda v: _shape_id(v) if isinstance(v, tuple) else v)
def test_backward_matches_reference(backend, shape, layout):
    B, heads, Nq, Nk, d, dv = shape
    q, k, v = make_qkv(*shape, layout=layout, requires_grad=True)
    grad = torch.randn(B, Nq, heads * dv, device=DEVICE)
    with fk.use_backend(backend):
        fk.attention(q, k, v).backward(grad)

    t64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    eager(*t64).backward(grad.double())
    t32 = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    eager(*t32).backward(grad)
    for name, t, r64, r32 in zip("qkv", (q, k, v), t64, t32):
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
        assert_close(t.grad, r64.grad, r32.grad, f"grad {name} ({backend})")


def test_extension_kernels_take_t2t_head_dims():
    """The C++ kernels compute any head dim (the limit is the dispatch's): called directly."""
    if fk.backends.load_error(DEVICE.type):
        pytest.skip(fk.backends.load_error(DEVICE.type))
    impl = {i.backend: i for i in op_module.CROSS_IMPLEMENTATIONS}[DEVICE.type]
    for shape in T2T_SHAPES:
        q, k, v = make_qkv(*shape)
        out = torch.full((1, shape[2], shape[-1]), float("nan"), device=DEVICE)
        impl.run(q, k, v, shape[4] ** -0.5, out)
        assert_close(out, eager(q, k, v, dtype=torch.float64), eager(q, k, v), _shape_id(shape))


def test_backward_t2t_head_dim():
    q, k, v = make_qkv(*T2T_SHAPES[1], requires_grad=True)
    grad = torch.randn(1, 9, 1323, device=DEVICE)
    fk.attention(q, k, v).backward(grad)
    t64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    eager(*t64).backward(grad.double())
    t32 = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    eager(*t32).backward(grad)
    for name, t, r64, r32 in zip("qkv", (q, k, v), t64, t32):
        assert_close(t.grad, r64.grad, r32.grad, f"grad {name}")


def test_gradcheck_float64():
    q, k, v = make_qkv(1, 2, 3, 4, 3, 2, torch.float64, layout="linear", requires_grad=True)
    with fk.use_backend("cpu" if DEVICE.type == "cpu" else "reference"):
        assert torch.autograd.gradcheck(lambda a, b, c: fk.attention(a, b, c, 0.7), (q, k, v))


def test_only_needed_gradients_are_computed():
    q, k, v = make_qkv(1, 2, 3, 4, 8, 8)
    k.requires_grad_()
    fk.attention(q, k, v).sum().backward()
    assert q.grad is None and v.grad is None and k.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale(backend):
    q, k, v = make_qkv(2, 3, 5, 7, 16, 16)
    with fk.use_backend(backend):
        out = fk.attention(q, k, v, scale=0.3)
    assert_close(out, eager(q, k, v, 0.3, torch.float64), eager(q, k, v, 0.3), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_patch_attention_with_a_1x1_patch(backend):
    """Self attention through attention == patch_attention over the same tokens with a 1 x 1 patch."""
    B, N, heads, d = 2, 13, 2, 20
    qkv = torch.randn(B, 1, N, 3 * heads * d, device=DEVICE)
    q, k, v = qkv[:, 0].unflatten(2, (3, heads, d)).permute(2, 0, 3, 1, 4)
    with fk.use_backend(backend):
        torch.testing.assert_close(fk.attention(q, k, v), fk.patch_attention(qkv, heads, 1)[:, 0])


# ---------------------------------------------------------------------------------------------------
# Head-dim limits and dispatch
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", T2T_SHAPES, ids=_shape_id)
def test_t2t_head_dims_run_with_no_preference(shape):
    """147 and 1323 (one head) run with the automatic choice: on the reference (over every kernel's 128)."""
    q, k, v = make_qkv(*shape)
    with fk.use_backend(None):
        out = fk.attention(q, k, v)
    assert_close(out, eager(q, k, v, dtype=torch.float64), eager(q, k, v), _shape_id(shape))


@pytest.mark.parametrize("backend, head_dim, message", [
    ("triton", 147, "head_dim 147 is not supported by the Triton kernel"),
    ("cuda", 1323, "the cuda kernel serves head dims <= 128"),
    ("cpu", 147, "the cpu kernel serves head dims <= 128"),
])
def test_kernels_refuse_head_dims_over_their_limit(backend, head_dim, message):
    impl = {i.backend: i for i in op_module.CROSS_IMPLEMENTATIONS}[backend]
    q, k, v = make_qkv(1, 1, 2, 3, head_dim, head_dim)
    assert message in impl.unsupported(q, k, v)
    assert impl.unsupported(*make_qkv(1, 1, 2, 3, 128, 128)) is None
    assert impl.unsupported(*make_qkv(1, 1, 2, 3, 16, 130)) is not None  # dv over the limit too


def test_triton_refuses_float64():
    if DEVICE.type == "cpu" and not INTERPRETED:
        pytest.skip("Triton cannot take CPU tensors without the interpreter")
    with pytest.raises(fk.BackendUnavailable, match="float64 is not supported by the Triton kernel"):
        with fk.use_backend("triton"):
            fk.attention(*make_qkv(1, 1, 2, 3, 16, 16, torch.float64))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the default choice on CPU tensors")
def test_cpu_tensors_default_to_the_cpu_kernel(monkeypatch):
    monkeypatch.delenv(fk.backends.ENV_VAR, raising=False)
    calls = []
    monkeypatch.setattr(op_module, "CROSS_IMPLEMENTATIONS", tuple(
        fk.backends.Implementation(i.backend, lambda *a, _r=i.run, _n=i.backend: calls.append(_n) or _r(*a),
                                   i.unsupported)
        for i in op_module.CROSS_IMPLEMENTATIONS))
    fk.attention(*make_qkv(1, 1, 2, 3, 16, 16))
    assert calls == ["cpu"]


def test_info_lists_the_head_dim_limits(capsys):
    from fastvit_kernels import info

    info.main()
    text = capsys.readouterr().out
    assert "attention" in text and "head dims <= 128" in text


# ---------------------------------------------------------------------------------------------------
# torch.library integration
# ---------------------------------------------------------------------------------------------------


def test_opcheck():
    samples = [
        (*make_qkv(2, 2, 5, 7, 20, 20, layout="linear", requires_grad=True), None),
        (*make_qkv(1, 1, 1, 6, 16, 8, layout="packed_kv", requires_grad=True), 0.25),
        (*make_qkv(1, 3, 4, 1, 4, 4, layout="transposed"), None),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.fastvit_kernels.attention.default, args)


def test_compile_fullgraph_forward_and_backward_on_the_cpu_backend():
    """The op is opaque to dynamo (no graph break) and its backward traces into the compiled graph."""
    if fk.backends.load_error("cpu"):
        pytest.skip(fk.backends.load_error("cpu"))
    torch._dynamo.reset()
    q, k, v = (t.cpu() for t in make_qkv(2, 2, 5, 9, 20, 20, layout="linear"))
    for t in (q, k, v):
        t.requires_grad_()
    grad = torch.randn(2, 5, 40)
    fn = torch.compile(lambda a, b, c: fk.attention(a, b, c) * 2, fullgraph=True)
    with fk.use_backend("cpu"):
        out = fn(q, k, v)
        out.backward(grad)
        compiled = [t.grad for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        expected = fk.attention(q, k, v) * 2
        expected.backward(grad)
    torch.testing.assert_close(out, expected)
    for a, b in zip(compiled, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------


def test_empty_inputs_give_empty_output():
    q, k, v = make_qkv(0, 2, 3, 4, 8, 8)
    assert fk.attention(q, k, v).shape == (0, 3, 16)
    q, k, v = make_qkv(2, 2, 0, 4, 8, 8)
    assert fk.attention(q, k, v).shape == (2, 0, 16)


@pytest.mark.parametrize("make, error, message", [
    (lambda q, k, v: (q.long(), k, v), TypeError, "q.dtype torch.int64 is not supported"),
    (lambda q, k, v: (q, k.double(), v), TypeError, "k.dtype torch.float64 must equal q.dtype"),
    (lambda q, k, v: (q[0], k, v), ValueError, r"q must be a 4-D \[B, heads, N, d\] tensor"),
    (lambda q, k, v: (q, k[..., :4], v), ValueError, r"k must have shape \[B, heads, Nk, d\] = \[2, 2, Nk, 8\]"),
    (lambda q, k, v: (q, k[:, :1], v), ValueError, r"k must have shape \[B, heads, Nk, d\]"),
    (lambda q, k, v: (q, k, v[:, :, :3]), ValueError, r"v must have shape \[B, heads, Nk, dv\] = \[2, 2, 5, dv\]"),
    (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), ValueError, "3 queries need at least one key"),
    (lambda q, k, v: (q, k, v, float("inf")), ValueError, "scale must be a finite number or None, got inf"),
])
def test_bad_input_gets_a_clear_error(make, error, message):
    q, k, v = make_qkv(2, 2, 3, 5, 8, 6)
    with pytest.raises(error, match=message):
        fk.attention(*make(q, k, v))


def test_extension_checks_its_arguments():
    """The C++ op validates what the Python layer normally guarantees, naming the argument."""
    if fk.backends.load_error(DEVICE.type):
        pytest.skip(fk.backends.load_error(DEVICE.type))
    q, k, v = make_qkv(2, 2, 3, 5, 8, 6)
    out = torch.empty(2, 3, 12, device=DEVICE)
    run = {i.backend: i for i in op_module.CROSS_IMPLEMENTATIONS}[DEVICE.type].run
    with pytest.raises(RuntimeError, match=r"out must have shape \[2, 2, 1, 3, 6\]"):
        run(q, k, v, 0.3, torch.empty(2, 3, 16, device=DEVICE))
    with pytest.raises(RuntimeError, match=r"v must have shape \[2, 2, 1, 5, dv\]"):
        run(q, k, v[:, :, :4], 0.3, out)
    with pytest.raises(RuntimeError, match="out must not share memory with k"):
        run(q, k, v, 0.3, k.reshape(-1)[:72].view(2, 3, 12))
    with pytest.raises(RuntimeError, match="queries need at least one key"):
        run(q, k[:, :, :0], v[:, :, :0], 0.3, out)
