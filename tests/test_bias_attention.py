"""bias_attention: every backend against the float64 reference and timm's LeViT attention, forward and
backward."""

import copy
import importlib
import math
from types import SimpleNamespace

import pytest
import torch

import fastvit_kernels as fk
from helpers import BACKENDS as DEVICE_BACKENDS, DEVICE, DTYPES, INTERPRETED, assert_close, cpu_vector_width

op_module = importlib.import_module("fastvit_kernels.ops.bias_attention")

# The backends this op implements (all of them: triton, cuda, cpu, reference).
BACKENDS = [b for b in DEVICE_BACKENDS if b in {i.backend for i in op_module.IMPLEMENTATIONS}]
BF16_INTERPRETER = "bf16 tl.dot gives wrong results in the Triton interpreter: tested on a GPU only"

# (B, heads, (R_h, R_w), stride, dk, dv): LeViT's resolutions (14, 7, 4) and the downsamples between
# them (14 -> 7, 7 -> 4 with ceil), odd grids, dk 16/32 with dv 2x/4x, heads 1..12, batch 1 and more;
# head dims that are not multiples of 8 (Triton's scalar-load variant) and dv < 32.
SHAPES = [
    (2, 4, (14, 14), 1, 16, 32),  # LeViT-128S stage 1
    (1, 6, (7, 7), 1, 32, 64),  # LeViT-256 stage 2 (heads 6)
    (2, 12, (4, 4), 1, 32, 64),  # LeViT-384 stage 3 (heads 12)
    (1, 8, (14, 14), 2, 16, 64),  # LeViT-128S downsample 14x14 -> 7x7
    (2, 3, (7, 7), 2, 32, 128),  # LeViT-256 downsample 7x7 -> 4x4 (ceil)
    (3, 2, (5, 5), 1, 16, 32),  # odd grid
    (1, 3, (9, 6), 2, 32, 128),  # odd, non-square, stride 2: 5x3 queries
    (2, 1, (9, 6), 1, 16, 16),  # one head, dv = dk
    (1, 2, (5, 5), 3, 12, 20),  # stride 3, head dims not multiples of 8
    (2, 2, (1, 1), 1, 16, 32),  # one token
]
# Larger grids and batches, for the backends that are not interpreted (the cpu kernel: several query
# blocks of 32 and a last one not full; the interpreter would take minutes).
LONG_SHAPES = [
    (2, 4, (28, 28), 1, 16, 32),  # 784 tokens
    (1, 2, (28, 28), 2, 32, 128),  # 784 keys, 196 queries
    (16, 8, (7, 7), 1, 32, 64),  # batch 16
    (1, 2, (13, 31), 2, 64, 96),  # non-square, dk 64, dv 96
]
LAYOUTS = ("packed", "contiguous", "conv", "offset")


def n_queries(resolution, stride):
    return math.ceil(resolution[0] / stride) * math.ceil(resolution[1] / stride)


def make_qkv(B, heads, resolution, stride, dk, dv, dtype=torch.float32, layout="packed", requires_grad=False):
    """Random N(0, 1) q [B, heads, Nq, dk], k [B, heads, Nk, dk], v [B, heads, Nk, dv] as a LeViT model
    hands them over:

    packed: views of timm's linear projections: qkv [B, N, heads * (2 dk + dv)] for stride 1, kv
      [B, Nk, heads * (dk + dv)] and q [B, Nq, heads * dk] for a downsample, split and permuted;
    contiguous: three separate contiguous tensors;
    conv: timm's use_conv layout, [B, heads * d, N] projections seen as [B, heads, N, d] (channel
      stride N);
    offset: packed, but the projection starts one element into its buffer (no aligned vector loads).
    """
    Nk, Nq = resolution[0] * resolution[1], n_queries(resolution, stride)

    def rand(*shape):
        return torch.randn(*shape, device=DEVICE).to(dtype)

    if layout == "contiguous":
        q, k, v = rand(B, heads, Nq, dk), rand(B, heads, Nk, dk), rand(B, heads, Nk, dv)
    elif layout in ("packed", "offset"):
        skip = 1 if layout == "offset" else 0
        if stride == 1:
            qkv = rand(B, Nk, heads * (2 * dk + dv) + skip)[..., skip:]
            q, k, v = qkv.view(B, Nk, heads, 2 * dk + dv).split([dk, dk, dv], dim=3)
        else:
            kv = rand(B, Nk, heads * (dk + dv) + skip)[..., skip:]
            k, v = kv.view(B, Nk, heads, dk + dv).split([dk, dv], dim=3)
            q = rand(B, Nq, heads * dk + skip)[..., skip:].view(B, Nq, heads, dk)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
    elif layout == "conv":
        if stride == 1:
            q, k, v = rand(B, heads * (2 * dk + dv), Nk).view(B, heads, 2 * dk + dv, Nk).split([dk, dk, dv], dim=2)
        else:
            k, v = rand(B, heads * (dk + dv), Nk).view(B, heads, dk + dv, Nk).split([dk, dv], dim=2)
            q = rand(B, heads * dk, Nq).view(B, heads, dk, Nq)
        q, k, v = (t.transpose(-1, -2) for t in (q, k, v))
    else:
        raise ValueError(layout)
    if requires_grad:  # leaves that keep the views' strides
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return q, k, v


def make_table(heads, resolution, dtype=torch.float32, requires_grad=False):
    table = torch.randn(heads, resolution[0] * resolution[1], device=DEVICE).to(dtype)
    return table.requires_grad_() if requires_grad else table


def spec_index(resolution, stride):
    """The bias index written out token by token, independently of the op's bias_index."""
    R_h, R_w = resolution
    nqw = math.ceil(R_w / stride)
    idx = [[abs((i // nqw) * stride - j // R_w) * R_w + abs((i % nqw) * stride - j % R_w)
            for j in range(R_h * R_w)] for i in range(n_queries(resolution, stride))]
    return torch.tensor(idx, device=DEVICE)


def eager(q, k, v, table, resolution, stride=1, scale=None, act="none", dtype=None):
    """timm's attention core as one chain, in ``dtype`` (float64: the reference)."""
    dtype = dtype or q.dtype
    B, heads, Nq, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    q, k, v, table = (t.to(dtype) for t in (q, k, v, table))
    attn = (q @ k.transpose(-1, -2)) * scale + table[:, spec_index(resolution, stride)]
    o = attn.softmax(dim=-1) @ v
    if act == "hardswish":  # not F.hardswish: on CUDA it is float32-accurate in float64 too
        o = o * (o + 3).clamp(0, 6) / 6
    return o.transpose(1, 2).reshape(B, Nq, -1)


def _shape_id(shape):
    B, heads, (R_h, R_w), stride, dk, dv = shape
    return f"{B}x{heads}h-{R_h}x{R_w}s{stride}-dk{dk}dv{dv}"


def _act(shape):
    """Alternate the activation over the shapes, so both run on every backend and dtype."""
    return "hardswish" if (SHAPES + LONG_SHAPES).index(shape) % 2 else "none"


def forward_cases(backend):
    """Every dtype over every shape; long sequences only where nothing is interpreted; the other
    layouts in fp32 and fp16 (for the cpu backend, conv is the per-row path the CUDA kernel runs)."""
    dtypes = DTYPES[backend]
    shapes = SHAPES + ([] if backend == "triton" and INTERPRETED else LONG_SHAPES)
    cases = [(dt, shape, "packed") for dt in dtypes for shape in shapes]
    return cases + [(dt, shape, layout) for dt in dtypes[:2] for shape in (SHAPES[4], SHAPES[8])
                    for layout in LAYOUTS[1:]]


CASES = [(b,) + c for b in BACKENDS for c in forward_cases(b)]


def _id(case):
    backend, dtype, shape, layout = case
    return f"{backend}-{str(dtype)[6:]}-{_shape_id(shape)}-{layout}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_matches_reference(case):
    backend, dtype, shape, layout = case
    B, heads, res, stride, dk, dv = shape
    q, k, v = make_qkv(B, heads, res, stride, dk, dv, dtype, layout)
    table, act = make_table(heads, res), _act(shape)  # a float32 table, as in a model under autocast
    with fk.use_backend(backend):
        out = fk.bias_attention(q, k, v, table, res, stride, activation=act)
    assert out.dtype == dtype and out.is_contiguous() and out.shape == (B, n_queries(res, stride), heads * dv)
    assert_close(out, eager(q, k, v, table, res, stride, act=act, dtype=torch.float64),
                 eager(q, k, v, table, res, stride, act=act), _id(case))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_table_in_the_inputs_dtype(backend, dtype):
    if dtype not in DTYPES[backend]:
        pytest.skip(BF16_INTERPRETER if dtype == torch.bfloat16 else f"{backend} has no {dtype} kernel")
    shape = SHAPES[6]
    B, heads, res, stride, dk, dv = shape
    q, k, v = make_qkv(B, heads, res, stride, dk, dv, dtype)
    table = make_table(heads, res, dtype)
    with fk.use_backend(backend):
        out = fk.bias_attention(q, k, v, table, res, stride, activation="hardswish")
    assert_close(out, eager(q, k, v, table, res, stride, act="hardswish", dtype=torch.float64),
                 eager(q, k, v, table, res, stride, act="hardswish"), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(backend):
    if backend == "triton" and INTERPRETED:
        pytest.skip(BF16_INTERPRETER)
    q, k, v = make_qkv(2, 4, (7, 7), 2, 16, 64, torch.bfloat16)
    table = make_table(4, (7, 7))
    with fk.use_backend(backend):
        out = fk.bias_attention(q, k, v, table, (7, 7), 2, activation="hardswish")
    assert_close(out, eager(q, k, v, table, (7, 7), 2, act="hardswish", dtype=torch.float64),
                 eager(q, k, v, table, (7, 7), 2, act="hardswish"), backend)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend needs the C++ extension")
@pytest.mark.parametrize("width", ["32-byte", "64-byte"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_vector_widths_match_reference(monkeypatch, width, dtype):
    """Every shape through each register-tile width: the AVX-512 path pads keys and channels to 16
    floats instead of 8, so shapes whose key count or value width is not a multiple of 16 exercise
    padding that the AVX2 path does not have."""
    cpu_vector_width(monkeypatch, width)
    for shape in SHAPES + LONG_SHAPES:
        B, heads, res, stride, dk, dv = shape
        q, k, v = make_qkv(B, heads, res, stride, dk, dv, dtype)
        table, act = make_table(heads, res), _act(shape)
        with fk.use_backend("cpu"):
            out = fk.bias_attention(q, k, v, table, res, stride, activation=act)
        assert_close(out, eager(q, k, v, table, res, stride, act=act, dtype=torch.float64),
                     eager(q, k, v, table, res, stride, act=act), f"{width} {_shape_id(shape)}")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend needs the C++ extension")
@pytest.mark.parametrize("width", ["32-byte", "64-byte"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], LONG_SHAPES[1]], ids=_shape_id)
def test_cpu_values_read_in_place_and_gathered_agree_exactly(monkeypatch, width, shape):
    """The cpu kernel reads float32 values with contiguous channels (a multiple of 8) where they are and
    gathers any others into a buffer; both sum the same products in the same order, so the outputs are
    bitwise equal. Here the same values as a packed view (in place) and channel-strided (gathered)."""
    cpu_vector_width(monkeypatch, width)
    B, heads, res, stride, dk, dv = shape
    q, k, v = make_qkv(B, heads, res, stride, dk, dv)
    v_strided = torch.stack([v, torch.full_like(v, float("nan"))], dim=-1)[..., 0]  # channel stride 2
    assert v_strided.stride(-1) == 2 and torch.equal(v_strided, v)
    table = make_table(heads, res)
    with fk.use_backend("cpu"):
        in_place = fk.bias_attention(q, k, v, table, res, stride, activation="hardswish")
        gathered = fk.bias_attention(q, k, v_strided, table, res, stride, activation="hardswish")
    assert torch.equal(in_place, gathered)
    assert_close(in_place, eager(q, k, v, table, res, stride, act="hardswish", dtype=torch.float64),
                 eager(q, k, v, table, res, stride, act="hardswish"), _shape_id(shape))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_layout", ["contiguous", "strided"])
def test_every_output_element_is_written(backend, out_layout):
    """Implementations write into a NaN-poisoned output; any element left unwritten shows."""
    B, heads, res, stride, dk, dv = 2, 3, (5, 4), 2, 16, 32
    q, k, v = make_qkv(B, heads, res, stride, dk, dv)
    table = make_table(heads, res)
    Nq = n_queries(res, stride)
    if out_layout == "contiguous":
        out = torch.full((B, Nq, heads * dv), float("nan"), device=DEVICE)
    else:  # every other channel of a wider buffer: channel stride 2
        out = torch.full((B, Nq, 2 * heads * dv), float("nan"), device=DEVICE)[..., ::2]
    impl = {i.backend: i for i in op_module.IMPLEMENTATIONS}[backend]
    assert fk.backends.load_error(backend) is None  # also loads the extension: impl.run bypasses dispatch
    impl.run(q, k, v, table, res, stride, dk ** -0.5, op_module.ACTIVATIONS["hardswish"], out)
    assert_close(out, eager(q, k, v, table, res, stride, act="hardswish", dtype=torch.float64),
                 eager(q, k, v, table, res, stride, act="hardswish"), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,layout,act", [
    (SHAPES[5], "packed", "hardswish"), (SHAPES[4], "packed", "none"), (SHAPES[6], "conv", "hardswish"),
    (SHAPES[8], "offset", "hardswish"), (SHAPES[9], "contiguous", "none")],
    ids=lambda v: _shape_id(v) if isinstance(v, tuple) else v)
def test_backward_matches_reference(backend, shape, layout, act):
    """Gradients of q, k, v and the table against autograd through the float64 eager chain."""
    B, heads, res, stride, dk, dv = shape
    q, k, v = make_qkv(B, heads, res, stride, dk, dv, layout=layout, requires_grad=True)
    table = make_table(heads, res, requires_grad=True)
    grad = torch.randn(B, n_queries(res, stride), heads * dv, device=DEVICE)
    with fk.use_backend(backend):
        fk.bias_attention(q, k, v, table, res, stride, activation=act).backward(grad)

    def eager_grads(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, table)]
        eager(*leaves, res, stride, act=act).backward(grad.to(dtype))
        return [t.grad for t in leaves]

    for name, ours, g64, g32 in zip("qkv", (q, k, v), eager_grads(torch.float64), eager_grads(torch.float32)):
        assert ours.grad.dtype == ours.dtype and ours.grad.shape == ours.shape
        assert_close(ours.grad, g64, g32, f"grad {name} ({backend})")
    g64, g32 = eager_grads(torch.float64)[3], eager_grads(torch.float32)[3]
    assert table.grad.dtype == table.dtype
    assert_close(table.grad, g64, g32, f"grad table ({backend})")


def test_backward_large_grid_on_reference():
    B, heads, res, stride, dk, dv = LONG_SHAPES[1]
    q, k, v = make_qkv(B, heads, res, stride, dk, dv, requires_grad=True)
    table = make_table(heads, res, requires_grad=True)
    grad = torch.randn(B, n_queries(res, stride), heads * dv, device=DEVICE)
    with fk.use_backend("reference"):
        fk.bias_attention(q, k, v, table, res, stride, activation="hardswish").backward(grad)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, table)]
    eager(*leaves, res, stride, act="hardswish").backward(grad.double())
    for ours, ref in zip((q, k, v, table), leaves):
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu"] if DEVICE.type == "cpu" else ["reference", "cuda"])
def test_gradcheck_float64(backend):
    q, k, v = make_qkv(2, 2, (3, 2), 2, 3, 4, torch.float64, layout="conv", requires_grad=True)
    table = make_table(2, (3, 2), torch.float64, requires_grad=True)
    with fk.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda *t: fk.bias_attention(*t, (3, 2), 2, 0.7, "hardswish"), (q, k, v, table))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients_keep_dtype(dtype):
    q, k, v = make_qkv(2, 2, (4, 4), 1, 16, 32, dtype, requires_grad=True)
    table = make_table(2, (4, 4), requires_grad=True)  # float32, next to 16-bit activations
    fk.bias_attention(q, k, v, table, 4, activation="hardswish").float().sum().backward()
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in (q, k, v))
    assert table.grad.dtype == torch.float32 and torch.isfinite(table.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_and_int_resolution(backend):
    q, k, v = make_qkv(2, 3, (4, 4), 2, 16, 32)
    table = make_table(3, (4, 4))
    with fk.use_backend(backend):
        out = fk.bias_attention(q, k, v, table, 4, stride=2, scale=0.3)
    assert_close(out, eager(q, k, v, table, (4, 4), 2, 0.3, dtype=torch.float64),
                 eager(q, k, v, table, (4, 4), 2, 0.3), backend)


def test_the_current_table_is_read_every_call():
    """No cached bias: an in-place update of the table (an optimizer step) changes the next output."""
    q, k, v = make_qkv(1, 2, (4, 4), 1, 16, 32)
    table = make_table(2, (4, 4))
    before = fk.bias_attention(q, k, v, table, 4)
    with torch.no_grad():
        table[1, 3] += 5.0
    after = fk.bias_attention(q, k, v, table, 4)
    assert torch.equal(before[..., :32], after[..., :32]) and not torch.equal(before[..., 32:], after[..., 32:])
    assert_close(after, eager(q, k, v, table, (4, 4), dtype=torch.float64), eager(q, k, v, table, (4, 4)))


# ---------------------------------------------------------------------------------------------------
# timm: the bias index and the attention modules
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution,stride", [((14, 14), 1), ((7, 7), 1), ((4, 4), 1), ((5, 5), 1), ((9, 6), 1),
                                               ((14, 14), 2), ((7, 7), 2), ((9, 6), 2), ((5, 5), 3), ((1, 3), 2)])
def test_bias_index_matches_timm(resolution, stride):
    levit = pytest.importorskip("timm.models.levit")
    cls = levit.Attention if stride == 1 else levit.AttentionDownsample
    timm_idx = cls._compute_attention_bias_idxs(SimpleNamespace(resolution=resolution, stride=stride))
    ours = op_module.bias_index(resolution, stride)
    assert ours.shape == (n_queries(resolution, stride), resolution[0] * resolution[1])
    assert torch.equal(ours, timm_idx) and torch.equal(ours.to(DEVICE), spec_index(resolution, stride))


def _timm_module(kind, use_conv):
    levit = pytest.importorskip("timm.models.levit")
    torch.manual_seed(0)
    if kind == "attention":  # LeViT-128S stage 2 on an odd grid: heads 6, dk 16, dv 32
        m = levit.Attention(96, 16, num_heads=6, attn_ratio=2, resolution=(5, 7), use_conv=use_conv,
                            act_layer=torch.nn.Hardswish)
    else:  # a downsample 9x7 -> 5x4: heads 8, dk 16, dv 64
        m = levit.AttentionDownsample(128, 96, 16, num_heads=8, attn_ratio=4, stride=2, resolution=(9, 7),
                                      use_conv=use_conv, act_layer=torch.nn.Hardswish)
    with torch.no_grad():
        m.attention_biases.normal_()  # timm initialises them to zero
        for bn in [mod for mod in m.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]:
            for t in (bn.weight, bn.bias, bn.running_mean):
                t.normal_()
            bn.running_var.uniform_(0.5, 2)
    m.to(DEVICE).eval()  # (timm's Attention.train returns None: no chaining)
    return m


def _ours_through_timm(m, x, kind, use_conv, backend):
    """timm's forward with the attention core (bias add, softmax, attn @ v and proj.act) replaced by
    our op on views of timm's own projections."""
    heads, dk, dv, res = m.num_heads, m.key_dim, m.val_dim, m.resolution
    stride = 1 if kind == "attention" else m.stride
    B = x.shape[0]
    if use_conv:
        N = x.shape[2] * x.shape[3]
        if kind == "attention":
            q, k, v = m.qkv(x).view(B, heads, -1, N).split([dk, dk, dv], dim=2)
        else:
            k, v = m.kv(x).view(B, heads, -1, N).split([dk, dv], dim=2)
            q = m.q(x).view(B, heads, dk, -1)
        q, k, v = (t.transpose(-1, -2) for t in (q, k, v))
    else:
        N = x.shape[1]
        if kind == "attention":
            q, k, v = m.qkv(x).view(B, N, heads, -1).split([dk, dk, dv], dim=3)
        else:
            k, v = m.kv(x).view(B, N, heads, -1).split([dk, dv], dim=3)
            q = m.q(x).view(B, -1, heads, dk)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
    with fk.use_backend(backend):
        out = fk.bias_attention(q, k, v, m.attention_biases, res, stride, activation="hardswish")
    if use_conv:
        hq, wq = math.ceil(res[0] / stride), math.ceil(res[1] / stride)
        out = out.transpose(1, 2).reshape(B, -1, hq, wq)
    return m.proj.ln(out)  # proj.act is Hardswish: the op applied it


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_conv", [False, True], ids=["linear", "conv"])
@pytest.mark.parametrize("kind", ["attention", "downsample"])
def test_matches_timm_levit_attention(backend, kind, use_conv):
    """Our op on views of timm's projections, then timm's proj.ln == timm's Attention /
    AttentionDownsample forward: exactly in float64 (1e-10), by the 2x rule in float32."""
    m = _timm_module(kind, use_conv)
    B, C, (H, W) = 2, (96 if kind == "attention" else 128), m.resolution
    x = torch.randn(B, C, H, W, device=DEVICE) if use_conv else torch.randn(B, H * W, C, device=DEVICE)
    with torch.no_grad():
        timm64 = float64_on_the_cpu(m, x)
        m.double()
        if backend != "triton":  # no float64 Triton kernel
            ours64 = _ours_through_timm(m, x.double(), kind, use_conv, backend)
            torch.testing.assert_close(ours64, timm64, rtol=1e-10, atol=1e-10)
        timm32 = m.float()(x)
        ours32 = _ours_through_timm(m, x, kind, use_conv, backend)
    assert_close(ours32, timm64, timm32, f"vs timm {kind} ({backend})")


def float64_on_the_cpu(m, x, grad=None):
    """timm's module run in float64 on the CPU (its output, or with ``grad`` the gradients of
    attention_biases and the q, kv weights), back on x's device. On CUDA, timm's nn.Hardswish is
    float32-accurate even in float64 (see fastvit_kernels.ops.bias_attention.hardswish)."""
    m64 = copy.deepcopy(m).cpu().double()
    out = m64(x.cpu().double())
    if grad is None:
        return out.to(x.device)
    out.backward(grad.cpu().double())
    return [p.grad.to(x.device) for p in (m64.attention_biases, m64.kv.linear.weight, m64.q.ln.linear.weight)]


def test_gradients_match_timm_attention():
    """Training: the gradients of timm's attention_biases and of the qkv projection match timm's."""
    m = _timm_module("downsample", False).double()
    m.train()
    x = torch.randn(2, 63, 128, device=DEVICE, dtype=torch.float64)
    grad = torch.randn(2, 20, 96, device=DEVICE, dtype=torch.float64)
    timm_grads = float64_on_the_cpu(m, x, grad)
    _ours_through_timm(m, x, "downsample", False, DEVICE.type).backward(grad)
    for ours, ref in zip((m.attention_biases, m.kv.linear.weight, m.q.ln.linear.weight), timm_grads):
        torch.testing.assert_close(ours.grad, ref, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------------
# torch.library integration
# ---------------------------------------------------------------------------------------------------


def test_opcheck():
    def sample(B, heads, res, stride, dk, dv, layout, scale, act, dtype=torch.float32):
        q, k, v = make_qkv(B, heads, res, stride, dk, dv, dtype, layout, requires_grad=True)
        return (q, k, v, make_table(heads, res, requires_grad=True), list(res), stride, scale, act)

    for args in [sample(2, 3, (4, 5), 1, 16, 32, "packed", None, "none"),
                 sample(1, 2, (5, 5), 2, 8, 16, "conv", 0.25, "hardswish"),
                 sample(1, 1, (3, 2), 3, 4, 4, "contiguous", None, "hardswish", torch.float64)]:
        torch.library.opcheck(torch.ops.fastvit_kernels.bias_attention.default, args)


def test_compile_fullgraph_forward_and_backward():
    """The op is opaque to dynamo (no graph break) and its backward traces into the compiled graph."""
    torch._dynamo.reset()
    q, k, v = make_qkv(2, 3, (5, 4), 2, 16, 32, requires_grad=True)
    table = make_table(3, (5, 4), requires_grad=True)
    grad = torch.randn(2, 6, 96, device=DEVICE)
    fn = torch.compile(lambda *t: fk.bias_attention(*t, (5, 4), 2, activation="hardswish") * 2,
                       fullgraph=True, backend="aot_eager")
    out = fn(q, k, v, table)
    out.backward(grad)
    compiled = [t.grad for t in (q, k, v, table)]
    for t in (q, k, v, table):
        t.grad = None
    expected = fk.bias_attention(q, k, v, table, (5, 4), 2, activation="hardswish") * 2
    expected.backward(grad)
    torch.testing.assert_close(out, expected)
    for c, t in zip(compiled, (q, k, v, table)):
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
    fk.bias_attention(*make_qkv(1, 1, (2, 2), 1, 16, 32), make_table(1, (2, 2)), 2)
    assert calls == ["cpu"]


def test_backend_for_another_device_says_why():
    """Asking for the other device's C++ backend raises, naming the device (no silent fallback)."""
    other = "cuda" if DEVICE.type == "cpu" else "cpu"
    with pytest.raises(fk.BackendUnavailable, match=f"backend '{other}' cannot run bias_attention: .+"):
        with fk.use_backend(other):
            fk.bias_attention(*make_qkv(1, 1, (2, 2), 1, 16, 32), make_table(1, (2, 2)), 2)


def test_extension_checks_its_arguments():
    """The C++ op validates what the Python layer normally guarantees, naming the argument."""
    assert fk.backends.extension() is not None  # loads torch.ops.fastvit_kernels_C
    q, k, v = make_qkv(1, 2, (4, 4), 2, 16, 32)
    dense = make_qkv(1, 2, (4, 4), 2, 16, 32, layout="contiguous")  # overlap is only detected on dense tensors
    table = make_table(2, (4, 4))
    run = torch.ops.fastvit_kernels_C.bias_attention_out

    def out(*shape, dtype=torch.float32):
        return torch.empty(*shape, device=DEVICE, dtype=dtype)

    cases = [
        ((q, k, v, table, 4, 4, 2, 0.2, 1, out(1, 4, 32)), r"out must have shape \[1, 4, 64\], got \[1, 4, 32\]"),
        ((q, k, v, table, 4, 4, 2, 0.2, 1, out(1, 4, 64, dtype=torch.float64)), "out must have q's dtype Float"),
        ((q, k, v, table, 4, 4, 2, 0.2, 1, out(1, 1, 1).expand(1, 4, 64)), "out must not have overlapping"),
        ((*dense, table, 4, 4, 2, 0.2, 1, dense[2].view(-1)[:256].view(1, 4, 64)),
         "out must not share memory with v"),
        ((q, k, v, table, 4, 4, 1, 0.2, 1, out(1, 4, 64)),
         r"q has 4 tokens, expected 16 for resolution 4x4 and stride 1"),
        ((q, k, v, table, 4, 5, 2, 0.2, 1, out(1, 4, 64)), r"k has 16 tokens, expected resolution 4x5 = 20"),
        ((q, k, v, table[:1], 4, 4, 2, 0.2, 1, out(1, 4, 64)), r"table must have shape \[2, 16\], got \[1, 16\]"),
        ((q, k, v, table.double(), 4, 4, 2, 0.2, 1, out(1, 4, 64)), "table must be float32 or q's dtype Float"),
        ((q, k, v, table, 4, 4, 2, 0.2, 3, out(1, 4, 64)), r"act must be 0 \(none\) or 1 \(hardswish\), got 3"),
        ((q, k[..., :8], v, table, 4, 4, 2, 0.2, 1, out(1, 4, 64)), r"k must have shape \[1, 2, Nk, 16\]"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            run(*args)


def test_extension_handles_large_head_dims():
    """Head dims above the CUDA kernel's accumulator chunk and above Triton's limits (dk 64, dv 128)."""
    q, k, v = make_qkv(1, 2, (3, 4), 1, 80, 200)
    table = make_table(2, (3, 4))
    with fk.use_backend(DEVICE.type):
        out = fk.bias_attention(q, k, v, table, (3, 4), activation="hardswish")
    assert_close(out, eager(q, k, v, table, (3, 4), act="hardswish", dtype=torch.float64),
                 eager(q, k, v, table, (3, 4), act="hardswish"), "dk 80, dv 200")


@pytest.mark.parametrize("dtype, dk, dv, message", [
    (torch.float64, 16, 32, "float64 is not supported by the Triton kernel"),
    (torch.float32, 80, 32, "dk 80 is not supported by the Triton kernel"),
    (torch.float32, 16, 130, "dv 130 is not supported by the Triton kernel"),
])
def test_triton_refuses_what_it_cannot_run(dtype, dk, dv, message):
    if DEVICE.type == "cpu" and not INTERPRETED:
        pytest.skip("Triton cannot take CPU tensors without the interpreter")
    with pytest.raises(fk.BackendUnavailable, match=message):
        with fk.use_backend("triton"):
            fk.bias_attention(*make_qkv(1, 1, (2, 2), 1, dk, dv, dtype), make_table(1, (2, 2)), 2)


def test_empty_batch_gives_empty_output():
    q, k, v = make_qkv(0, 2, (4, 4), 2, 16, 32)
    out = fk.bias_attention(q, k, v, make_table(2, (4, 4)), 4, 2)
    assert out.shape == (0, 4, 64)


def _bad(**change):
    """Valid arguments (B 2, heads 3, 5x4 keys, stride 2: 6 queries, dk 16, dv 32) with some replaced."""
    q, k, v = make_qkv(2, 3, (5, 4), 2, 16, 32)
    args = dict(q=q, k=k, v=v, table=make_table(3, (5, 4)), resolution=(5, 4), stride=2, scale=None,
                activation="none")
    for name, fn in change.items():
        args[name] = fn(args[name]) if callable(fn) else fn
    return args


@pytest.mark.parametrize("args, error, message", [
    (_bad(q=lambda t: t[0]), ValueError, r"q must be a 4-D \[B, heads, N, d\] tensor, got shape \(3, 6, 16\)"),
    (_bad(q=lambda t: t.long()), TypeError, "q.dtype torch.int64 is not supported"),
    (_bad(v=lambda t: t.double()), TypeError, "v.dtype torch.float64 must equal q.dtype torch.float32"),
    (_bad(table=lambda t: t.half()), TypeError, "table.dtype torch.float16 is not supported for q.dtype "
                                                "torch.float32; supported: float32 or q's dtype"),
    (_bad(k=lambda t: t[..., :8]), ValueError, r"k must have shape \[B, heads, Nk, dk\] = \[2, 3, Nk, 16\] "
                                               r".*got \(2, 3, 20, 8\)"),
    (_bad(k=lambda t: t[:, :2]), ValueError, r"k must have shape .* got \(2, 2, 20, 16\)"),
    (_bad(v=lambda t: t[:, :, :19]), ValueError, r"v must have shape \[B, heads, Nk, dv\] = \[2, 3, 20, dv\]"),
    (_bad(resolution=(4, 4)), ValueError, r"k and v have Nk=20 tokens, but resolution 4x4 has 16 keys"),
    (_bad(resolution=(2, 10)), ValueError, r"q has Nq=6 tokens, but resolution 2x10 with stride 2 has "
                                           r"1x5 = 5 queries"),
    (_bad(stride=1), ValueError, r"q has Nq=6 tokens, but resolution 5x4 with stride 1 has 5x4 = 20 queries"),
    (_bad(stride=0), ValueError, "stride must be >= 1, got 0"),
    (_bad(resolution=(5,)), ValueError, r"resolution must be two positive ints \(R_h, R_w\), got \(5,\)"),
    (_bad(resolution=(0, 4)), ValueError, r"resolution must be two positive ints \(R_h, R_w\), got \(0, 4\)"),
    (_bad(table=lambda t: t[:2]), ValueError, r"table must have shape \[heads, R_h \* R_w\] = \[3, 20\], "
                                              r"got \(2, 20\)"),
    (_bad(table=lambda t: t.t()), ValueError, r"table must have shape .* got \(20, 3\)"),
    (_bad(activation="silu"), ValueError, r"activation 'silu' is not supported; supported: \('none', 'hardswish'\)"),
    (_bad(scale=float("inf")), ValueError, "scale must be a finite number or None, got inf"),
], ids=lambda v: None)
def test_bad_input_gets_a_clear_error(args, error, message):
    with pytest.raises(error, match=message):
        fk.bias_attention(**args)
