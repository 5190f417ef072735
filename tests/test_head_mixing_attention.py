"""head_mixing_attention: every backend against the float64 reference (CaiT's talking heads, DeepViT's
re-attention and the combinations between), forward and backward."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import fastvit_kernels as fk
from helpers import BACKENDS as DEVICE_BACKENDS, DEVICE, DTYPES, INTERPRETED, assert_close

op_module = importlib.import_module("fastvit_kernels.ops.head_mixing_attention")

# The backends this op implements.
BACKENDS = [b for b in DEVICE_BACKENDS if b in {i.backend for i in op_module.IMPLEMENTATIONS}]
BF16_INTERPRETER = "bf16 tl.dot gives wrong results in the Triton interpreter: tested on a GPU only"

# Which optional steps run: (pre_mix, post_mix, norm_weight, norm_bias).
FLAGS = {
    "talking_heads": (True, True, False, False),  # CaiT
    "reattention": (False, True, True, True),  # DeepViT
    "reattention_no_bias": (False, True, True, False),
    "pre_only": (True, False, False, False),
    "none": (False, False, False, False),  # plain multi-head attention
    "post_norm_pre": (True, True, True, True),  # everything at once
}
FLAG_NAMES = list(FLAGS)

# (B, heads, Nq, Nk, d): self attention (Nq == Nk: DeepViT, CaiT's trunk; 17, 50, 65, 197 tokens)
# and class attention (Nq = 1: CaiT's last blocks), heads 1..12, head dims 16..64 and odd ones.
SHAPES = [
    (2, 4, 17, 17, 16),
    (1, 3, 17, 17, 24),
    (2, 1, 9, 9, 32),  # one head: the LayerNorm over heads is the bias (var 0)
    (1, 8, 1, 50, 48),  # class attention
    (3, 12, 1, 17, 64),  # class attention, 12 heads
    (1, 4, 13, 13, 13),  # odd head dim, odd N
    (2, 8, 5, 5, 16),
]
# Longer sequences and larger batches, for the backends that are not interpreted.
LONG_SHAPES = [
    (2, 8, 65, 65, 32),  # DeepViT-like
    (1, 12, 197, 197, 64),  # ViT-B/16 at 224: 197 tokens, 12 heads
    (2, 3, 50, 50, 48),
    (8, 8, 1, 197, 64),  # CaiT class attention over 197 tokens, batch 8
    (16, 4, 17, 17, 16),  # batch 16
    (1, 4, 65, 65, 23),  # odd head dim
]
LAYOUTS = ("packed", "contiguous", "transposed", "offset")


def make_qkv(B, heads, Nq, Nk, d, dtype=torch.float32, layout="packed", requires_grad=False):
    """Random N(0, 1) q [B, heads, Nq, d], k and v [B, heads, Nk, d] as a model hands them over:

    packed: chunks of one Linear output viewed [B, N, 3, heads, d] and permuted (self attention), or
      for class attention (Nq = 1) q from its own Linear and k, v from one packed [B, Nk, 2 heads d];
    contiguous: three separate contiguous tensors;
    transposed: channel stride != 1 (the cpu backend's per-element path, the CUDA kernel's math);
    offset: packed, starting one element into the buffer (no aligned vector loads).
    """
    def rand(*shape):
        return torch.randn(*shape, device=DEVICE).to(dtype)

    if layout == "contiguous":
        q, k, v = rand(B, heads, Nq, d), rand(B, heads, Nk, d), rand(B, heads, Nk, d)
    elif layout == "transposed":
        q, k, v = (rand(B, heads, d, n).transpose(-1, -2) for n in (Nq, Nk, Nk))
    elif layout in ("packed", "offset"):
        skip = 1 if layout == "offset" else 0
        if Nq == Nk:
            qkv = rand(B, Nk, 3 * heads * d + skip)[..., skip:]
            q, k, v = qkv.view(B, Nk, 3, heads, d).permute(2, 0, 3, 1, 4)
        else:
            kv = rand(B, Nk, 2 * heads * d + skip)[..., skip:]
            k, v = kv.view(B, Nk, 2, heads, d).permute(2, 0, 3, 1, 4)
            q = rand(B, Nq, heads * d + skip)[..., skip:].view(B, Nq, heads, d).permute(0, 2, 1, 3)
    else:
        raise ValueError(layout)
    if requires_grad:  # leaves that keep the views' strides
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return q, k, v


def make_params(heads, flags, dtype=torch.float32, requires_grad=False):
    """(pre_mix, post_mix, norm_weight, norm_bias), None where the flag is off. The mixing matrices
    are near the identity plus noise (as trained ones are: a pure-noise mix makes the softmax input
    huge); norm weights around 1."""
    def make(on, t):
        if not on:
            return None
        t = t.to(dtype)
        return t.requires_grad_() if requires_grad else t

    eye = torch.eye(heads, device=DEVICE)
    pre, post, w, b = flags
    return (make(pre, eye + 0.3 * torch.randn(heads, heads, device=DEVICE)),
            make(post, eye + 0.3 * torch.randn(heads, heads, device=DEVICE)),
            make(w, 1 + 0.2 * torch.randn(heads, device=DEVICE)),
            make(b, 0.2 * torch.randn(heads, device=DEVICE)))


def eager(q, k, v, params, scale=None, eps=1e-5, dtype=None):
    """The docstring's PyTorch chain (timm's CaiT TalkingHeads / vit-pytorch's DeepViT), in ``dtype``
    (float64: the reference), written independently of the op's forward_steps."""
    dtype = dtype or q.dtype
    pre, post, w, b = (None if t is None else t.to(dtype) for t in params)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    B, heads, Nq, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    attn = (q @ k.transpose(-1, -2)) * scale
    if pre is not None:
        attn = torch.einsum("bhij,hg->bgij", attn, pre)
    attn = attn.softmax(dim=-1)
    if post is not None:
        attn = torch.einsum("bhij,hg->bgij", attn, post)
    if w is not None:
        attn = F.layer_norm(attn.permute(0, 2, 3, 1), (heads,), w, b, eps).permute(0, 3, 1, 2)
    return (attn @ v).transpose(1, 2).reshape(B, Nq, -1)


def _shape_id(shape):
    B, heads, Nq, Nk, d = shape
    return f"{B}x{heads}h-q{Nq}k{Nk}-d{d}"


def forward_cases(backend):
    """Every dtype over every shape, the flag combination rotating with shape and dtype (so each
    backend and dtype sees every combination); the other layouts in the first two dtypes."""
    dtypes = DTYPES[backend]
    shapes = SHAPES + ([] if backend == "triton" and INTERPRETED else LONG_SHAPES)
    cases = [(dt, shape, "packed", FLAG_NAMES[(n + m) % len(FLAG_NAMES)])
             for m, dt in enumerate(dtypes) for n, shape in enumerate(shapes)]
    return cases + [(dt, shape, layout, flags) for dt in dtypes[:2] for shape in (SHAPES[0], SHAPES[3])
                    for layout in LAYOUTS[1:] for flags in ("talking_heads", "reattention")]


CASES = [(b,) + c for b in BACKENDS for c in forward_cases(b)]


def _id(case):
    backend, dtype, shape, layout, flags = case
    return f"{backend}-{str(dtype)[6:]}-{_shape_id(shape)}-{layout}-{flags}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_matches_reference(case):
    backend, dtype, shape, layout, flags = case
    B, heads, Nq, Nk, d = shape
    q, k, v = make_qkv(B, heads, Nq, Nk, d, dtype, layout)
    params = make_params(heads, FLAGS[flags])  # float32 parameters, as in a model under autocast
    with fk.use_backend(backend):
        out = fk.head_mixing_attention(q, k, v, None, *params)
    assert out.dtype == dtype and out.is_contiguous() and out.shape == (B, Nq, heads * d)
    assert_close(out, eager(q, k, v, params, dtype=torch.float64), eager(q, k, v, params), _id(case))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flags", FLAG_NAMES + ["post_only", "norm_only"])
def test_every_flag_combination(backend, flags):
    spec = FLAGS.get(flags) or {"post_only": (False, True, False, False), "norm_only": (False, False, True, True)}[flags]
    q, k, v = make_qkv(2, 3, 7, 7, 16)
    params = make_params(3, spec)
    with fk.use_backend(backend):
        out = fk.head_mixing_attention(q, k, v, 0.3, *params, norm_eps=1e-3)
    assert_close(out, eager(q, k, v, params, 0.3, 1e-3, torch.float64), eager(q, k, v, params, 0.3, 1e-3),
                 f"{backend} {flags}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_params_in_the_inputs_dtype(backend, dtype):
    if dtype not in DTYPES[backend]:
        pytest.skip(BF16_INTERPRETER if dtype == torch.bfloat16 else f"{backend} has no {dtype} kernel")
    q, k, v = make_qkv(2, 4, 17, 17, 16, dtype)
    params = make_params(4, FLAGS["post_norm_pre"], dtype)
    with fk.use_backend(backend):
        out = fk.head_mixing_attention(q, k, v, None, *params)
    assert_close(out, eager(q, k, v, params, dtype=torch.float64), eager(q, k, v, params), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_params_with_float32_input(backend):
    q, k, v = make_qkv(1, 4, 9, 9, 16)
    params = make_params(4, FLAGS["post_norm_pre"], torch.float64)
    with fk.use_backend(backend):
        out = fk.head_mixing_attention(q, k, v, None, *params)
    assert_close(out, eager(q, k, v, params, dtype=torch.float64), eager(q, k, v, params), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_layout", ["contiguous", "strided"])
def test_every_output_element_is_written(backend, out_layout):
    """Implementations write into a NaN-poisoned output; any element left unwritten shows."""
    B, heads, N, d = 2, 3, 11, 16
    q, k, v = make_qkv(B, heads, N, N, d)
    params = make_params(heads, FLAGS["post_norm_pre"])
    if out_layout == "contiguous":
        out = torch.full((B, N, heads * d), float("nan"), device=DEVICE)
    else:  # every other channel of a wider buffer: channel stride 2
        out = torch.full((B, N, 2 * heads * d), float("nan"), device=DEVICE)[..., ::2]
    impl = {i.backend: i for i in op_module.IMPLEMENTATIONS}[backend]
    assert fk.backends.load_error(backend) is None  # also loads the extension: impl.run bypasses dispatch
    impl.run(q, k, v, d ** -0.5, *params, 1e-5, out)
    assert_close(out, eager(q, k, v, params, dtype=torch.float64), eager(q, k, v, params), backend)


GRAD_NAMES = ("q", "k", "v", "pre_mix", "post_mix", "norm_weight", "norm_bias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,layout,flags", [
    (SHAPES[0], "packed", "post_norm_pre"), (SHAPES[1], "packed", "talking_heads"),
    (SHAPES[3], "packed", "reattention"), (SHAPES[5], "transposed", "reattention_no_bias"),
    (SHAPES[6], "contiguous", "pre_only"), (SHAPES[2], "offset", "post_norm_pre")],
    ids=lambda v: _shape_id(v) if isinstance(v, tuple) else v)
def test_backward_matches_reference(backend, shape, layout, flags):
    """All seven gradients against autograd through the float64 eager chain."""
    B, heads, Nq, Nk, d = shape
    q, k, v = make_qkv(B, heads, Nq, Nk, d, layout=layout, requires_grad=True)
    params = make_params(heads, FLAGS[flags], requires_grad=True)
    grad = torch.randn(B, Nq, heads * d, device=DEVICE)
    with fk.use_backend(backend):
        fk.head_mixing_attention(q, k, v, None, *params).backward(grad)
    inputs = (q, k, v) + params

    def eager_grads(dtype):
        leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs]
        eager(*leaves[:3], leaves[3:]).backward(grad.to(dtype))
        return [None if t is None else t.grad for t in leaves]

    for name, ours, g64, g32 in zip(GRAD_NAMES, inputs, eager_grads(torch.float64), eager_grads(torch.float32)):
        if ours is None:
            continue
        assert ours.grad is not None and ours.grad.dtype == ours.dtype and ours.grad.shape == ours.shape, name
        assert_close(ours.grad, g64, g32, f"grad {name} ({backend}, {flags})")


def test_backward_half_precision_gradients_have_the_inputs_dtypes():
    q, k, v = make_qkv(1, 4, 9, 9, 16, torch.float16, requires_grad=True)
    params = make_params(4, FLAGS["post_norm_pre"], requires_grad=True)  # float32 parameters
    fk.head_mixing_attention(q, k, v, None, *params).float().sum().backward()
    assert all(t.grad.dtype == torch.float16 for t in (q, k, v))
    assert all(t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all() for t in params)


# ---------------------------------------------------------------------------------------------------
# torch.library integration
# ---------------------------------------------------------------------------------------------------


def test_opcheck():
    def sample(B, heads, Nq, Nk, d, layout, scale, flags, dtype=torch.float32):
        q, k, v = make_qkv(B, heads, Nq, Nk, d, dtype, layout, requires_grad=True)
        return (q, k, v, scale, *make_params(heads, FLAGS[flags], dtype, requires_grad=True), 1e-5)

    for args in [sample(2, 3, 5, 5, 16, "packed", None, "talking_heads"),
                 sample(1, 2, 1, 6, 8, "packed", 0.25, "reattention"),
                 sample(1, 4, 3, 3, 4, "transposed", None, "post_norm_pre", torch.float64),
                 sample(1, 2, 4, 4, 8, "contiguous", None, "none")]:
        torch.library.opcheck(torch.ops.fastvit_kernels.head_mixing_attention.default, args)


def test_compile_fullgraph_forward_and_backward():
    """The op is opaque to dynamo (no graph break) and its backward traces into the compiled graph;
    the forward runs on the C++ kernel of the device (cpu here)."""
    torch._dynamo.reset()
    q, k, v = make_qkv(2, 3, 7, 7, 16, requires_grad=True)
    params = make_params(3, FLAGS["post_norm_pre"], requires_grad=True)
    grad = torch.randn(2, 7, 48, device=DEVICE)
    leaves = (q, k, v) + params
    fn = torch.compile(lambda q, k, v, *p: fk.head_mixing_attention(q, k, v, None, *p) * 2, fullgraph=True,
                       backend="aot_eager")
    with fk.use_backend(DEVICE.type):
        out = fn(*leaves)
        out.backward(grad)
    compiled = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    expected = fk.head_mixing_attention(q, k, v, None, *params) * 2
    expected.backward(grad)
    torch.testing.assert_close(out, expected)
    for c, t in zip(compiled, leaves):
        torch.testing.assert_close(c, t.grad)


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
    fk.head_mixing_attention(*make_qkv(1, 2, 3, 3, 16), None, *make_params(2, FLAGS["reattention"]))
    assert calls == ["cpu"]


def test_backend_for_another_device_says_why():
    other = "cuda" if DEVICE.type == "cpu" else "cpu"
    with pytest.raises(fk.BackendUnavailable, match=f"backend '{other}' cannot run head_mixing_attention: .+"):
        with fk.use_backend(other):
            fk.head_mixing_attention(*make_qkv(1, 2, 3, 3, 16))


def test_extension_checks_its_arguments():
    """The C++ op validates what the Python layer normally guarantees, naming the argument."""
    assert fk.backends.extension() is not None  # loads torch.ops.fastvit_kernels_C
    q, k, v = make_qkv(1, 2, 4, 4, 16, layout="contiguous")
    pre, post, w, b = make_params(2, FLAGS["post_norm_pre"])
    run = torch.ops.fastvit_kernels_C.head_mixing_attention_out

    def out(*shape, dtype=torch.float32):
        return torch.empty(*shape, device=DEVICE, dtype=dtype)

    good = (q, k, v, 0.25, pre, post, w, b, 1e-5)
    cases = [
        ((*good, out(1, 4, 16)), r"out must have shape \[1, 4, 32\], got \[1, 4, 16\]"),
        ((*good, out(1, 4, 32, dtype=torch.float64)), "out must have q's dtype Float"),
        ((*good, out(1, 1, 1).expand(1, 4, 32)), "out must not have overlapping"),
        ((*good, v.reshape(-1)[:128].view(1, 4, 32)), "out must not share memory with v"),
        ((q, k, v, 0.25, pre[:1], post, w, b, 1e-5, out(1, 4, 32)),
         r"pre_mix must have shape \[heads, heads\] \(heads = 2\), got \[1, 2\]"),
        ((q, k, v, 0.25, pre, post.view(-1), w, b, 1e-5, out(1, 4, 32)), r"post_mix must have shape \[heads, heads\]"),
        ((q, k, v, 0.25, pre, post, w[:1], b, 1e-5, out(1, 4, 32)), r"norm_weight must have shape \[heads\]"),
        ((q, k, v, 0.25, pre, post, w, b.long(), 1e-5, out(1, 4, 32)), "norm_bias must be a floating-point tensor"),
        ((q, k, v, 0.25, pre, post, None, b, 1e-5, out(1, 4, 32)), "norm_bias needs norm_weight"),
        ((q, k, v, 0.25, pre, post, w, b, 0.0, out(1, 4, 32)), "norm_eps must be finite and > 0, got 0"),
        ((q, k, v, float("nan"), pre, post, w, b, 1e-5, out(1, 4, 32)), "scale must be finite, got nan"),
        ((q, k[..., :8], v, 0.25, pre, post, w, b, 1e-5, out(1, 4, 32)), r"k must have shape \[1, 2, Nk, 16\]"),
        ((q, k, v[:, :, :3], 0.25, pre, post, w, b, 1e-5, out(1, 4, 32)), r"v must have shape \[1, 2, 4, dv\]"),
        ((q, k.double(), v, 0.25, pre, post, w, b, 1e-5, out(1, 4, 32)), "k and v must have q's dtype Float"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            run(*args)


def test_extension_handles_large_head_dims_and_long_sequences():
    """Head dims and key counts past the Triton kernel's limits go to the C++ kernel of the device."""
    q, k, v = make_qkv(1, 2, 3, 600, 80, layout="contiguous")
    params = make_params(2, FLAGS["post_norm_pre"])
    with fk.use_backend(DEVICE.type):
        out = fk.head_mixing_attention(q, k, v, None, *params)
    assert_close(out, eager(q, k, v, params, dtype=torch.float64), eager(q, k, v, params), "d 80, Nk 600")


def test_value_dim_may_differ_from_key_dim():
    q, k, _ = make_qkv(2, 3, 5, 7, 16, layout="contiguous")
    v = torch.randn(2, 3, 7, 24, device=DEVICE)
    params = make_params(3, FLAGS["reattention"])
    out = fk.head_mixing_attention(q, k, v, None, *params)
    assert out.shape == (2, 5, 72)
    assert_close(out, eager(q, k, v, params, dtype=torch.float64), eager(q, k, v, params), "dv 24")


def test_empty_batch_gives_empty_output():
    q, k, v = make_qkv(0, 2, 4, 4, 16, layout="contiguous")
    out = fk.head_mixing_attention(q, k, v, None, *make_params(2, FLAGS["talking_heads"]))
    assert out.shape == (0, 4, 32)


def _bad(**change):
    """Valid arguments (B 2, heads 3, N 5, d 16, every step on) with some replaced."""
    q, k, v = make_qkv(2, 3, 5, 5, 16)
    pre, post, w, b = make_params(3, FLAGS["post_norm_pre"])
    args = dict(q=q, k=k, v=v, scale=None, pre_mix=pre, post_mix=post, norm_weight=w, norm_bias=b, norm_eps=1e-5)
    for name, fn in change.items():
        args[name] = fn(args[name]) if callable(fn) else fn
    return args


@pytest.mark.parametrize("args, error, message", [
    (_bad(q=lambda t: t[0]), ValueError, r"q must be a 4-D \[B, heads, N, d\] tensor, got shape \(3, 5, 16\)"),
    (_bad(q=lambda t: t.long()), TypeError, "q.dtype torch.int64 is not supported"),
    (_bad(v=lambda t: t.double()), TypeError, "v.dtype torch.float64 must equal q.dtype torch.float32"),
    (_bad(k=lambda t: t[..., :8]), ValueError, r"k must have shape \[B, heads, Nk, d\] = \[2, 3, Nk, 16\]"),
    (_bad(v=lambda t: t[:, :, :4]), ValueError, r"v must have shape \[B, heads, Nk, dv\] = \[2, 3, 5, dv\]"),
    (_bad(k=lambda t: t[:, :, :0], v=lambda t: t[:, :, :0]), ValueError, "5 queries need at least one key"),
    (_bad(pre_mix=lambda t: t[:2]), ValueError, r"pre_mix must have shape \[3, 3\] \(heads = 3\), got \(2, 3\)"),
    (_bad(post_mix=lambda t: t.long()), TypeError, "post_mix.dtype torch.int64 is not a floating-point dtype"),
    (_bad(norm_weight=lambda t: t[:2]), ValueError, r"norm_weight must have shape \[3\] \(heads = 3\)"),
    (_bad(norm_bias=lambda t: t.view(1, 3)), ValueError, r"norm_bias must have shape \[3\]"),
    (_bad(norm_weight=None), ValueError, "norm_bias needs norm_weight"),
    (_bad(norm_eps=0.0), ValueError, "norm_eps must be a positive number, got 0.0"),
    (_bad(scale=float("inf")), ValueError, "scale must be a finite number or None, got inf"),
], ids=lambda v: None)
def test_bad_input_gets_a_clear_error(args, error, message):
    with pytest.raises(error, match=message):
        fk.head_mixing_attention(**args)


@pytest.mark.parametrize("dtype, heads, n_k, message", [
    (torch.float64, 2, 4, "float64 is not supported by the Triton kernel"),
    (torch.float32, 17, 4, "heads 17 x Nk 4 is not supported by the Triton kernel"),
    (torch.float32, 8, 513, "heads 8 x Nk 513 is not supported by the Triton kernel"),
])
def test_triton_refuses_what_it_cannot_run(dtype, heads, n_k, message):
    if DEVICE.type == "cpu" and not INTERPRETED:
        pytest.skip("Triton cannot take CPU tensors without the interpreter")
    with pytest.raises(fk.BackendUnavailable, match=message):
        with fk.use_backend("triton"):
            fk.head_mixing_attention(*make_qkv(1, heads, 1, n_k, 16, dtype, layout="contiguous"))
