"""Attention whose heads are mixed by learned ``heads x heads`` matrices: talking heads and re-attention.

CaiT's talking heads (Touvron et al., arXiv:2103.17239, after Shazeer et al., arXiv:2003.02436) mix
the scores across heads before the softmax and the probabilities after it; DeepViT's re-attention
(Zhou et al., arXiv:2103.11886) mixes the probabilities and LayerNorms them across heads. Both need
every head's row of scores at once, so the fused kernels hold one query row for all heads, and the
``[B, heads, Nq, Nk]`` attention map is never written to memory. Equivalent PyTorch (``q``, ``k``,
``v`` ``[B, heads, N, d]``; each step only when its argument is given)::

    s = scale * q @ k.transpose(-1, -2)                                   # [B, heads, Nq, Nk]
    s = torch.einsum("bhij,hg->bgij", s, pre_mix)                         # talking heads, pre-softmax
    p = s.softmax(dim=-1)
    p = torch.einsum("bhij,hg->bgij", p, post_mix)                        # mixed probabilities
    p = F.layer_norm(p.permute(0, 2, 3, 1), (heads,), norm_weight, norm_bias, norm_eps).permute(0, 3, 1, 2)
    out = (p @ v).transpose(1, 2).reshape(B, Nq, heads * dv)

Scores, softmax, mixing and accumulation run in float32 (float64 for float64 input).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from .patch_attention import accumulation_dtype, check_qkv, new_cross_output

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def head_mixing_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                          pre_mix: Optional[Tensor] = None, post_mix: Optional[Tensor] = None,
                          norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None,
                          norm_eps: float = 1e-5) -> Tensor:
    """Multi-head attention with heads mixed before and/or after the softmax, and a LayerNorm over heads.

    Args:
        q: ``[B, heads, Nq, d]`` float16/bfloat16/float32/float64, any strides.
        k: ``[B, heads, Nk, d]``, v: ``[B, heads, Nk, dv]``: q's dtype and device, any strides.
        scale: the score scale, default ``d ** -0.5``.
        pre_mix: ``[heads, heads]`` or None: scores of head ``g`` become ``sum_h s[h] * pre_mix[h, g]``
            (CaiT's ``mix_heads_pre_attn``).
        post_mix: ``[heads, heads]`` or None: the same on the probabilities (CaiT's
            ``mix_heads_post_attn``, DeepViT's ``reattn_weights``).
        norm_weight, norm_bias: ``[heads]`` or None: a LayerNorm across heads of each mixed probability
            (DeepViT's ``reattn_norm``); ``norm_weight`` given turns it on, ``norm_bias`` may be None.
        norm_eps: that LayerNorm's eps.

    Returns ``[B, Nq, heads * dv]``, contiguous, channel ``h * dv + e``. See the module docstring for the
    equivalent PyTorch. Differentiable in every tensor argument.
    """
    args = (q, k, v, scale, pre_mix, post_mix, norm_weight, norm_bias, float(norm_eps))
    if backends.direct_call(q, k, v, pre_mix, post_mix, norm_weight, norm_bias):  # eager inference
        return _forward(*args)
    return torch.ops.fastvit_kernels.head_mixing_attention(*args)


# --------------------------------------------------------------------------------------------------
# Input checks: one place, run by the real and the fake implementation alike.
# --------------------------------------------------------------------------------------------------


def check_inputs(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], pre_mix: Optional[Tensor],
                 post_mix: Optional[Tensor], norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                 norm_eps: float) -> None:
    check_qkv("head_mixing_attention", q, k, v, scale)
    heads = q.shape[1]
    params = (("pre_mix", pre_mix, (heads, heads)), ("post_mix", post_mix, (heads, heads)),
              ("norm_weight", norm_weight, (heads,)), ("norm_bias", norm_bias, (heads,)))
    for name, t, shape in params:
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"head_mixing_attention: {name} must have shape {list(shape)} (heads = {heads}), "
                             f"got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"head_mixing_attention: {name}.dtype {t.dtype} is not a floating-point dtype")
        if t.device != q.device:
            raise ValueError(f"head_mixing_attention: {name} is on {t.device} but q is on {q.device}")
    if norm_bias is not None and norm_weight is None:
        raise ValueError("head_mixing_attention: norm_bias needs norm_weight (the LayerNorm over heads is on "
                         "when norm_weight is given)")
    if not (math.isfinite(norm_eps) and norm_eps > 0):
        raise ValueError(f"head_mixing_attention: norm_eps must be a positive number, got {norm_eps}")


def resolve_scale(q: Tensor, scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


# The output every backend writes into: contiguous [B, Nq, heads * dv] in q's dtype, as attention's.
new_output = new_cross_output


def _as(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


# --------------------------------------------------------------------------------------------------
# The math in plain PyTorch (reference and backward), on [B, heads, N, d] tensors.
# --------------------------------------------------------------------------------------------------


def mix_heads(t: Tensor, mix: Tensor) -> Tensor:
    """``t[b, g, i, j] = sum_h t[b, h, i, j] * mix[h, g]``."""
    return torch.einsum("bhij,hg->bgij", t, mix)


def forward_steps(q: Tensor, k: Tensor, scale: float, pre_mix, post_mix, norm_weight, norm_bias,
                  norm_eps: float) -> dict:
    """Every intermediate of the forward up to the map the values are multiplied with (the backward
    needs them; the output ``a @ v`` it does not): scores ``s``, mixed scores ``t``, probabilities
    ``p``, mixed probabilities ``m``, their normalised form ``m_hat`` and ``rstd``, the map ``a``."""
    steps = {"s": scale * (q @ k.transpose(-1, -2))}
    steps["t"] = mix_heads(steps["s"], pre_mix) if pre_mix is not None else steps["s"]
    steps["p"] = torch.softmax(steps["t"], dim=-1)
    steps["m"] = mix_heads(steps["p"], post_mix) if post_mix is not None else steps["p"]
    a = steps["m"]
    if norm_weight is not None:
        mean = a.mean(dim=1, keepdim=True)
        var = (a - mean).square().mean(dim=1, keepdim=True)
        steps["rstd"] = torch.rsqrt(var + norm_eps)
        steps["m_hat"] = (a - mean) * steps["rstd"]
        a = steps["m_hat"] * norm_weight.view(1, -1, 1, 1)
        if norm_bias is not None:
            a = a + norm_bias.view(1, -1, 1, 1)
    steps["a"] = a
    return steps


def backward_steps(q: Tensor, k: Tensor, v: Tensor, grad_o: Tensor, scale: float, pre_mix, post_mix,
                   norm_weight, norm_bias, norm_eps: float) -> Tuple[Optional[Tensor], ...]:
    """Gradients of (q, k, v, pre_mix, post_mix, norm_weight, norm_bias), written out step by step:

    dA = dO V^T, dV = A^T dO; LayerNorm over heads: dW = sum dA * M^, dB = sum dA,
    dM = rstd * (dM^ - mean_h dM^ - M^ mean_h(dM^ * M^)) with dM^ = dA * W; post mix: dWpost = sum P dM^T,
    dP = Wpost dM; softmax: dT = P * (dP - rowsum(dP * P)); pre mix: dWpre = sum S dT^T, dS = Wpre dT;
    dQ = scale dS K, dK = scale dS^T Q.
    """
    st = forward_steps(q, k, scale, pre_mix, post_mix, norm_weight, norm_bias, norm_eps)
    grad_a = grad_o @ v.transpose(-1, -2)
    grad_v = st["a"].transpose(-1, -2) @ grad_o
    grad_norm_weight = grad_norm_bias = grad_post = grad_pre = None
    if norm_weight is not None:
        grad_norm_weight = (grad_a * st["m_hat"]).sum(dim=(0, 2, 3))
        grad_norm_bias = grad_a.sum(dim=(0, 2, 3)) if norm_bias is not None else None
        g_hat = grad_a * norm_weight.view(1, -1, 1, 1)
        grad_m = st["rstd"] * (g_hat - g_hat.mean(dim=1, keepdim=True)
                               - st["m_hat"] * (g_hat * st["m_hat"]).mean(dim=1, keepdim=True))
    else:
        grad_m = grad_a
    if post_mix is not None:
        grad_post = torch.einsum("bhij,bgij->hg", st["p"], grad_m)
        grad_p = torch.einsum("bgij,hg->bhij", grad_m, post_mix)
    else:
        grad_p = grad_m
    grad_t = st["p"] * (grad_p - (grad_p * st["p"]).sum(dim=-1, keepdim=True))
    if pre_mix is not None:
        grad_pre = torch.einsum("bhij,bgij->hg", st["s"], grad_t)
        grad_s = torch.einsum("bgij,hg->bhij", grad_t, pre_mix)
    else:
        grad_s = grad_t
    grad_q = scale * (grad_s @ k)
    grad_k = scale * (grad_s.transpose(-1, -2) @ q)
    return grad_q, grad_k, grad_v, grad_pre, grad_post, grad_norm_weight, grad_norm_bias


# --------------------------------------------------------------------------------------------------
# Backends. Each takes (q, k, v, scale, pre_mix, post_mix, norm_weight, norm_bias, norm_eps, out).
# --------------------------------------------------------------------------------------------------


def reference(q: Tensor, k: Tensor, v: Tensor, scale: float, pre_mix, post_mix, norm_weight, norm_bias,
              norm_eps: float, out: Tensor) -> None:
    """The specification: every step materialised, in the accumulation dtype."""
    acc = accumulation_dtype(q.dtype)
    a = forward_steps(q.to(acc), k.to(acc), scale, _as(pre_mix, acc), _as(post_mix, acc), _as(norm_weight, acc),
                      _as(norm_bias, acc), norm_eps)["a"]
    o = a @ v.to(acc)
    out.copy_(o.transpose(1, 2).reshape(out.shape))


def _run_triton(*args) -> None:
    from ..triton.head_mixing_attention import head_mixing_attention_triton

    head_mixing_attention_triton(*args)


def _triton_unsupported(q: Tensor, k: Tensor, v: Tensor, *args) -> Optional[str]:
    # Only asked once triton imported (backends.why_not checks the load first).
    from ..triton.head_mixing_attention import unsupported

    reason = unsupported(q, k, v)
    return f"{reason} (the cuda or reference backend serves it)" if reason else None


def _run_extension(q: Tensor, k: Tensor, v: Tensor, scale: float, pre_mix, post_mix, norm_weight, norm_bias,
                   norm_eps: float, out: Tensor) -> None:
    torch.ops.fastvit_kernels_C.head_mixing_attention_out(q, k, v, scale, pre_mix, post_mix, norm_weight, norm_bias,
                                                          norm_eps, out)


def _cuda_unsupported(q: Tensor, k: Tensor, *args) -> Optional[str]:
    # The CUDA kernel holds one query row's [heads, Nk] map (twice) and its queries in shared memory.
    if not q.is_cuda:
        return None
    acc_bytes = 8 if q.dtype == torch.float64 else 4
    heads, nk, d = q.shape[1], k.shape[2], q.shape[3]
    need = acc_bytes * (2 * heads * nk + heads * d)
    limit = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
    if need > limit:
        return (f"heads {heads} x Nk {nk} needs {need} bytes of shared memory, more than the device's {limit} "
                f"(the reference backend serves it)")
    return None


# triton: heads <= 16 and Nk <= 512 (all keys of all heads in registers), fp32/fp16/bf16.
# cuda and cpu: the C++ extension (csrc/{cuda,cpu}/head_mixing_attention.*, one math header), any head
# dims, dtypes and strides; cuda is limited by shared memory (heads * Nk), see _cuda_unsupported.
IMPLEMENTATIONS = (
    backends.Implementation("triton", _run_triton, _triton_unsupported),
    backends.Implementation("cuda", _run_extension, _cuda_unsupported),
    backends.Implementation("cpu", _run_extension),
    backends.Implementation("reference", reference),
)


# --------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile (no graph break), fake impl for tracing,
# autograd through the written-out backward above (plain PyTorch, traceable by torch.compile).
# --------------------------------------------------------------------------------------------------


def _forward(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], pre_mix: Optional[Tensor],
             post_mix: Optional[Tensor], norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
             norm_eps: float) -> Tensor:
    check_inputs(q, k, v, scale, pre_mix, post_mix, norm_weight, norm_bias, norm_eps)
    out = new_output(q, v)
    if out.numel() == 0:
        return out
    backends.run("head_mixing_attention", IMPLEMENTATIONS, q.device, q, k, v, resolve_scale(q, scale), pre_mix,
                 post_mix, norm_weight, norm_bias, norm_eps, out)
    return out


_head_mixing_attention = torch.library.custom_op("fastvit_kernels::head_mixing_attention", _forward,
                                                 mutates_args=())


@_head_mixing_attention.register_fake
def _(q, k, v, scale, pre_mix, post_mix, norm_weight, norm_bias, norm_eps):
    check_inputs(q, k, v, scale, pre_mix, post_mix, norm_weight, norm_bias, norm_eps)
    return new_output(q, v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, pre_mix, post_mix, norm_weight, norm_bias, norm_eps = inputs
    # Only the inputs are kept: the backward recomputes the map, no [B, heads, Nq, Nk] buffer is held.
    ctx.save_for_backward(q, k, v, pre_mix, post_mix, norm_weight, norm_bias)
    ctx.scale, ctx.norm_eps = resolve_scale(q, scale), norm_eps


def _backward(ctx, grad_out: Tensor):
    q, k, v, pre_mix, post_mix, norm_weight, norm_bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if not any(needs):
        return (None,) * 9
    acc = accumulation_dtype(q.dtype)
    B, heads, Nq, _ = q.shape
    grad_o = grad_out.to(acc).reshape(B, Nq, heads, -1).transpose(1, 2)
    grads = backward_steps(q.to(acc), k.to(acc), v.to(acc), grad_o, ctx.scale, _as(pre_mix, acc),
                           _as(post_mix, acc), _as(norm_weight, acc), _as(norm_bias, acc), ctx.norm_eps)
    inputs = (q, k, v, pre_mix, post_mix, norm_weight, norm_bias)
    out = [g.to(t.dtype) if (g is not None and need) else None
           for g, t, need in zip(grads, inputs, (needs[0], needs[1], needs[2], needs[4], needs[5], needs[6],
                                                 needs[7]))]
    return out[0], out[1], out[2], None, out[3], out[4], out[5], out[6], None


_head_mixing_attention.register_autograd(_backward, setup_context=_setup_context)
