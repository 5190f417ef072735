// The one registration point of the extension fastvit_kernels._C: every op's schema, its argument
// checks (done here once, so the CPU and CUDA launchers can assume valid arguments) and its
// per-device implementations. The CUDA implementations exist only in builds with -DWITH_CUDA.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 with the casters for dtype, memory_format, sizes
#include <torch/library.h>

#include <cmath>

#include "cpu/simd.h"
#include "cpu_cache.h"

namespace fastvit_kernels {

// ---- launchers, defined in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu ------------------------------
// The CPU inference path's fused transformer MLP (csrc/cpu/fused_mlp.cpp): a plain function, not an
// op, because only eager CPU inference calls it (fastvit_kernels/memory.py).
void fused_mlp_cpu(const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                   const at::Tensor& w2, const c10::optional<at::Tensor>& b2, const c10::optional<at::Tensor>& gamma,
                   const c10::optional<at::Tensor>& residual, int64_t act, const at::Tensor& out);
void dwconv_bn_act_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       int64_t kernel_size, int64_t stride, int64_t act, const at::Tensor& out);
#ifdef WITH_CUDA
void dwconv_bn_act_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                        int64_t kernel_size, int64_t stride, int64_t act, const at::Tensor& out);
#endif
void dwconv_layernorm_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& norm_weight, const at::Tensor& norm_bias, int64_t kernel_size,
                          int64_t stride, double eps, const at::Tensor& out);
#ifdef WITH_CUDA
void dwconv_layernorm_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& norm_weight, const at::Tensor& norm_bias, int64_t kernel_size,
                           int64_t stride, double eps, const at::Tensor& out);
#endif
void patch_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t ph, int64_t pw,
                         double scale, const at::Tensor& out);
#ifdef WITH_CUDA
void patch_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t ph, int64_t pw,
                          double scale, const at::Tensor& out);
#endif
void xca_attention_cpu(const at::Tensor& qkv, int64_t num_heads, const at::Tensor& temperature, double eps,
                       const at::Tensor& out);
#ifdef WITH_CUDA
void xca_attention_cuda(const at::Tensor& qkv, int64_t num_heads, const at::Tensor& temperature, double eps,
                        const at::Tensor& out);
#endif
void bias_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                        int64_t res_h, int64_t res_w, int64_t stride, double scale, int64_t act,
                        const at::Tensor& out);
#ifdef WITH_CUDA
void bias_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                         int64_t res_h, int64_t res_w, int64_t stride, double scale, int64_t act,
                         const at::Tensor& out);
#endif

namespace {

// ---- dwconv_bn_act ------------------------------------------------------------------------------

// The depthwise conv's arguments, shared by dwconv_bn_act_out and dwconv_layernorm_out (`op`).
void check_dwconv(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  int64_t K, int64_t stride, const at::Tensor& out) {
  TORCH_CHECK(weight.device() == x.device() && bias.device() == x.device() && out.device() == x.device(),
              op, ": all tensors must be on one device, got x on ", x.device(), ", weight on ",
              weight.device(), ", bias on ", bias.device(), ", out on ", out.device());
  TORCH_CHECK(K >= 1 && K <= 9 && K % 2 == 1, op, ": kernel_size must be odd and in 1..9, got ", K);
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);

  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": x must be float32, float16, bfloat16 or float64, got ", dt);
  const auto acc_dt = dt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(weight.scalar_type() == acc_dt, op, ": weight must be ", acc_dt, " for x of dtype ", dt,
              ", got ", weight.scalar_type());
  TORCH_CHECK(bias.scalar_type() == acc_dt, op, ": bias must be ", acc_dt, " for x of dtype ", dt,
              ", got ", bias.scalar_type());
  TORCH_CHECK(out.scalar_type() == dt, op, ": out must have x's dtype ", dt, ", got ", out.scalar_type());

  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got shape ", x.sizes());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == C && weight.size(1) == K * K, op,
              ": weight must have shape [C, K*K] = [", C, ", ", K * K, "], got ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous, got strides ", weight.strides());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C, op, ": bias must have shape [C] = [", C, "], got ",
              bias.sizes());
  TORCH_CHECK(bias.is_contiguous(), op, ": bias must be contiguous, got strides ", bias.strides());

  // Floor division, as in PyTorch's conv output size (an empty image gives an empty output).
  const auto out_size = [&](int64_t in) {
    const int64_t num = in + 2 * (K / 2) - K;
    return (num >= 0 ? num / stride : -((-num + stride - 1) / stride)) + 1;
  };
  TORCH_CHECK(out.dim() == 4 && out.size(0) == N && out.size(1) == C && out.size(2) == out_size(H) &&
                  out.size(3) == out_size(W),
              op, ": out must have shape [", N, ", ", C, ", ", out_size(H), ", ", out_size(W),
              "] for x of shape ", x.sizes(), ", kernel_size ", K, " and stride ", stride, ", got ",
              out.sizes());
  // Every element of out is written once, from values of x: out may not overlap itself or x.
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
              ": out must not have overlapping elements, got strides ", out.strides());
  const auto overlap = at::get_overlap_status(out, x);
  TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op,
              ": out must not share memory with x (in-place is not supported)");
}

void check_dwconv_bn_act(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         int64_t K, int64_t stride, int64_t act, const at::Tensor& out) {
  constexpr const char* op = "dwconv_bn_act_out";
  check_dwconv(op, x, weight, bias, K, stride, out);
  TORCH_CHECK(act == 0 || act == 1 || act == 2, op,
              ": act must be 0 (none), 1 (SiLU) or 2 (ReLU), got ", act);
}

void dwconv_bn_act_out_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           int64_t kernel_size, int64_t stride, int64_t act, const at::Tensor& out) {
  check_dwconv_bn_act(x, weight, bias, kernel_size, stride, act, out);
  dwconv_bn_act_cpu(x, weight, bias, kernel_size, stride, act, out);
}

#ifdef WITH_CUDA
void dwconv_bn_act_out_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            int64_t kernel_size, int64_t stride, int64_t act, const at::Tensor& out) {
  check_dwconv_bn_act(x, weight, bias, kernel_size, stride, act, out);
  dwconv_bn_act_cuda(x, weight, bias, kernel_size, stride, act, out);
}
#endif

// ---- dwconv_layernorm ---------------------------------------------------------------------------

void check_dwconv_layernorm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& norm_weight, const at::Tensor& norm_bias, int64_t K,
                            int64_t stride, double eps, const at::Tensor& out) {
  constexpr const char* op = "dwconv_layernorm_out";
  check_dwconv(op, x, weight, bias, K, stride, out);
  const int64_t C = x.size(1);
  const auto acc_dt = bias.scalar_type();  // checked above: float32, float64 for float64 x
  const char* names[] = {"norm_weight", "norm_bias"};
  const at::Tensor* params[] = {&norm_weight, &norm_bias};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& t = *params[i];
    TORCH_CHECK(t.device() == x.device(), op, ": ", names[i], " is on ", t.device(), " but x is on ",
                x.device());
    TORCH_CHECK(t.scalar_type() == acc_dt, op, ": ", names[i], " must be ", acc_dt, " for x of dtype ",
                x.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C && t.is_contiguous(), op, ": ", names[i],
                " must be a contiguous [C] = [", C, "] tensor, got shape ", t.sizes(), " and strides ",
                t.strides());
  }
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be finite and > 0, got ", eps);
  TORCH_CHECK(C >= 1, op, ": x must have at least one channel to normalise, got shape ", x.sizes());
}

void dwconv_layernorm_out_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& norm_weight, const at::Tensor& norm_bias, int64_t kernel_size,
                              int64_t stride, double eps, const at::Tensor& out) {
  check_dwconv_layernorm(x, weight, bias, norm_weight, norm_bias, kernel_size, stride, eps, out);
  dwconv_layernorm_cpu(x, weight, bias, norm_weight, norm_bias, kernel_size, stride, eps, out);
}

#ifdef WITH_CUDA
void dwconv_layernorm_out_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                               const at::Tensor& norm_weight, const at::Tensor& norm_bias, int64_t kernel_size,
                               int64_t stride, double eps, const at::Tensor& out) {
  check_dwconv_layernorm(x, weight, bias, norm_weight, norm_bias, kernel_size, stride, eps, out);
  dwconv_layernorm_cuda(x, weight, bias, norm_weight, norm_bias, kernel_size, stride, eps, out);
}
#endif

// ---- patch_attention ----------------------------------------------------------------------------

// True when the memory spans of a and b (lowest to highest element address) intersect: a conservative
// test that also sees through views at::get_overlap_status gives up on (q, k, v are strided views).
bool spans_intersect(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto span = [](const at::Tensor& t) {
    int64_t lo = 0, hi = 0;
    for (int64_t i = 0; i < t.dim(); ++i) (t.stride(i) < 0 ? lo : hi) += (t.size(i) - 1) * t.stride(i);
    const auto base = reinterpret_cast<uintptr_t>(t.data_ptr());
    return std::make_pair(base + lo * t.element_size(), base + (hi + 1) * t.element_size());
  };
  const auto [a_lo, a_hi] = span(a);
  const auto [b_lo, b_hi] = span(b);
  return a_lo < b_hi && b_lo < a_hi;
}

void check_patch_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t ph, int64_t pw,
                           double scale, const at::Tensor& out) {
  constexpr const char* op = "patch_attention_out";
  for (const at::Tensor* t : {&k, &v, &out}) {
    TORCH_CHECK(t->device() == q.device(), op, ": all tensors must be on one device, got q on ", q.device(),
                ", k on ", k.device(), ", v on ", v.device(), ", out on ", out.device());
  }
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": q must be float32, float16, bfloat16 or float64, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, op, ": k and v must have q's dtype ", dt,
              ", got ", k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(out.scalar_type() == dt, op, ": out must have q's dtype ", dt, ", got ", out.scalar_type());
  TORCH_CHECK(q.dim() == 5 && k.dim() == 5 && v.dim() == 5 && out.dim() == 5, op,
              ": q, k, v, out must be 5-D [B, heads, H, W, d] views, got shapes ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes(), ", ", out.sizes());
  const int64_t B = q.size(0), heads = q.size(1), Hq = q.size(2), Wq = q.size(3), d = q.size(4);
  const int64_t Hk = k.size(2), Wk = k.size(3), dv = v.size(4);
  TORCH_CHECK(heads >= 1 && d >= 1 && dv >= 1, op, ": heads and head dims must be >= 1, got q ", q.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK(k.size(0) == B && k.size(1) == heads && k.size(4) == d, op, ": k must have shape [", B, ", ", heads,
              ", Hk, Wk, ", d, "] for q of shape ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.size(0) == B && v.size(1) == heads && v.size(2) == Hk && v.size(3) == Wk, op, ": v must have shape [",
              B, ", ", heads, ", ", Hk, ", ", Wk, ", dv] for k of shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(ph >= 1 && pw >= 1, op, ": patch size (ph, pw) must be positive, got (", ph, ", ", pw, ")");
  TORCH_CHECK(Hq % ph == 0 && Wq % pw == 0, op, ": q's H x W = ", Hq, "x", Wq, " must be multiples of the patch size ",
              ph, "x", pw);
  TORCH_CHECK(Hk % ph == 0 && Wk % pw == 0, op, ": k's H x W = ", Hk, "x", Wk, " must be multiples of the patch size ",
              ph, "x", pw);
  TORCH_CHECK(Hq * Wq == 0 || Hk * Wk > 0, op, ": ", Hq * Wq, " queries need at least one key, got k of shape ",
              k.sizes());
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK(out.size(0) == B && out.size(1) == heads && out.size(2) == Hq && out.size(3) == Wq && out.size(4) == dv,
              op, ": out must have shape [", B, ", ", heads, ", ", Hq, ", ", Wq, ", ", dv, "] for q of shape ",
              q.sizes(), " and v of shape ", v.sizes(), ", got ", out.sizes());
  // Every element of out is written once, from values of q, k, v: out may not overlap itself or them.
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
              ": out must not have overlapping elements, got strides ", out.strides());
  const char* names[] = {"q", "k", "v"};
  const at::Tensor* inputs[] = {&q, &k, &v};
  for (int n = 0; n < 3; ++n) {
    TORCH_CHECK(!spans_intersect(out, *inputs[n]), op, ": out must not share memory with ", names[n],
                " (in-place is not supported)");
  }
}

void patch_attention_out_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t ph, int64_t pw,
                             double scale, const at::Tensor& out) {
  check_patch_attention(q, k, v, ph, pw, scale, out);
  patch_attention_cpu(q, k, v, ph, pw, scale, out);
}

#ifdef WITH_CUDA
void patch_attention_out_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t ph, int64_t pw,
                              double scale, const at::Tensor& out) {
  check_patch_attention(q, k, v, ph, pw, scale, out);
  patch_attention_cuda(q, k, v, ph, pw, scale, out);
}
#endif

// ---- xca_attention ------------------------------------------------------------------------------

void check_xca_attention(const at::Tensor& qkv, int64_t num_heads, const at::Tensor& temperature, double eps,
                         const at::Tensor& out) {
  constexpr const char* op = "xca_attention_out";
  TORCH_CHECK(temperature.device() == qkv.device() && out.device() == qkv.device(), op,
              ": all tensors must be on one device, got qkv on ", qkv.device(), ", temperature on ",
              temperature.device(), ", out on ", out.device());
  const auto dt = qkv.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": qkv must be float32, float16, bfloat16 or float64, got ", dt);
  TORCH_CHECK(out.scalar_type() == dt, op, ": out must have qkv's dtype ", dt, ", got ", out.scalar_type());
  const auto acc_dt = dt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(temperature.scalar_type() == acc_dt, op, ": temperature must be ", acc_dt, " for qkv of dtype ",
              dt, ", got ", temperature.scalar_type());
  TORCH_CHECK(qkv.dim() == 3, op, ": qkv must be 3-D [B, N, 3*C], got shape ", qkv.sizes());
  TORCH_CHECK(num_heads >= 1, op, ": num_heads must be >= 1, got ", num_heads);
  const int64_t B = qkv.size(0), N = qkv.size(1), C3 = qkv.size(2);
  TORCH_CHECK(C3 > 0 && C3 % (3 * num_heads) == 0, op,
              ": the last dim of qkv must be a positive multiple of 3 * num_heads = ", 3 * num_heads,
              " (laid out (3, num_heads, head_dim)), got ", C3);
  TORCH_CHECK(temperature.dim() == 1 && temperature.size(0) == num_heads && temperature.is_contiguous(), op,
              ": temperature must be a contiguous [num_heads] = [", num_heads, "] tensor, got shape ",
              temperature.sizes(), " and strides ", temperature.strides());
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(out.dim() == 3 && out.size(0) == B && out.size(1) == N && out.size(2) == C3 / 3, op,
              ": out must have shape [", B, ", ", N, ", ", C3 / 3, "] for qkv of shape ", qkv.sizes(), ", got ",
              out.sizes());
  // Every element of out is written once, from values of qkv: out may not overlap itself or qkv.
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
              ": out must not have overlapping elements, got strides ", out.strides());
  for (const at::Tensor* t : {&qkv, &temperature}) {
    const auto overlap = at::get_overlap_status(out, *t);
    TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op,
                ": out must not share memory with qkv or temperature (in-place is not supported)");
  }
}

void xca_attention_out_cpu(const at::Tensor& qkv, int64_t num_heads, const at::Tensor& temperature, double eps,
                           const at::Tensor& out) {
  check_xca_attention(qkv, num_heads, temperature, eps, out);
  xca_attention_cpu(qkv, num_heads, temperature, eps, out);
}

#ifdef WITH_CUDA
void xca_attention_out_cuda(const at::Tensor& qkv, int64_t num_heads, const at::Tensor& temperature, double eps,
                            const at::Tensor& out) {
  check_xca_attention(qkv, num_heads, temperature, eps, out);
  xca_attention_cuda(qkv, num_heads, temperature, eps, out);
}
#endif

// ---- bias_attention -----------------------------------------------------------------------------

void check_bias_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                          int64_t res_h, int64_t res_w, int64_t stride, double scale, int64_t act,
                          const at::Tensor& out) {
  constexpr const char* op = "bias_attention_out";
  for (const at::Tensor* t : {&k, &v, &table, &out}) {
    TORCH_CHECK(t->device() == q.device(), op, ": all tensors must be on one device, got q on ", q.device(),
                ", k on ", k.device(), ", v on ", v.device(), ", table on ", table.device(), ", out on ",
                out.device());
  }
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": q must be float32, float16, bfloat16 or float64, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, op, ": k and v must have q's dtype ", dt,
              ", got ", k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(table.scalar_type() == dt || table.scalar_type() == at::kFloat, op,
              ": table must be float32 or q's dtype ", dt, ", got ", table.scalar_type());
  TORCH_CHECK(out.scalar_type() == dt, op, ": out must have q's dtype ", dt, ", got ", out.scalar_type());
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": q, k, v must be 4-D [B, heads, N, d], got shapes ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const int64_t B = q.size(0), heads = q.size(1), Nq = q.size(2), dk = q.size(3), Nk = k.size(2), dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == heads && k.size(3) == dk, op, ": k must have shape [", B, ", ",
              heads, ", Nk, ", dk, "] for q of shape ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.size(0) == B && v.size(1) == heads && v.size(2) == Nk, op, ": v must have shape [", B, ", ",
              heads, ", ", Nk, ", dv] for k of shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(dk >= 1 && dv >= 1, op, ": head dims must be >= 1, got dk = ", dk, ", dv = ", dv);
  TORCH_CHECK(res_h >= 1 && res_w >= 1 && stride >= 1, op, ": resolution (", res_h, ", ", res_w,
              ") and stride ", stride, " must be positive");
  TORCH_CHECK(Nk == res_h * res_w, op, ": k has ", Nk, " tokens, expected resolution ", res_h, "x", res_w,
              " = ", res_h * res_w);
  const int64_t nq_expected = ((res_h + stride - 1) / stride) * ((res_w + stride - 1) / stride);
  TORCH_CHECK(Nq == nq_expected, op, ": q has ", Nq, " tokens, expected ", nq_expected, " for resolution ", res_h,
              "x", res_w, " and stride ", stride);
  TORCH_CHECK(table.dim() == 2 && table.size(0) == heads && table.size(1) == Nk, op,
              ": table must have shape [", heads, ", ", Nk, "], got ", table.sizes());
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK(act == 0 || act == 1, op, ": act must be 0 (none) or 1 (hardswish), got ", act);
  TORCH_CHECK(out.dim() == 3 && out.size(0) == B && out.size(1) == Nq && out.size(2) == heads * dv, op,
              ": out must have shape [", B, ", ", Nq, ", ", heads * dv, "], got ", out.sizes());
  // Every element of out is written once, from values of the inputs: out may not overlap itself or them.
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
              ": out must not have overlapping elements, got strides ", out.strides());
  const char* names[] = {"q", "k", "v", "table"};
  const at::Tensor* inputs[] = {&q, &k, &v, &table};
  for (int n = 0; n < 4; ++n) {
    const auto overlap = at::get_overlap_status(out, *inputs[n]);
    TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op,
                ": out must not share memory with ", names[n], " (in-place is not supported)");
  }
}

void bias_attention_out_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                            int64_t res_h, int64_t res_w, int64_t stride, double scale, int64_t act,
                            const at::Tensor& out) {
  check_bias_attention(q, k, v, table, res_h, res_w, stride, scale, act, out);
  bias_attention_cpu(q, k, v, table, res_h, res_w, stride, scale, act, out);
}

#ifdef WITH_CUDA
void bias_attention_out_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& table, int64_t res_h, int64_t res_w, int64_t stride, double scale,
                             int64_t act, const at::Tensor& out) {
  check_bias_attention(q, k, v, table, res_h, res_w, stride, scale, act, out);
  bias_attention_cuda(q, k, v, table, res_h, res_w, stride, scale, act, out);
}
#endif

}  // namespace
}  // namespace fastvit_kernels

TORCH_LIBRARY(fastvit_kernels_C, m) {
  // Writes act(depthwise_conv(x, weight) + bias) into out; weight [C, K*K], bias [C] (BN folded).
  m.def(
      "dwconv_bn_act_out(Tensor x, Tensor weight, Tensor bias, int kernel_size, int stride, int act, "
      "Tensor(a!) out) -> ()");
  // Writes LayerNorm over the channels of each pixel of depthwise_conv(x, weight) + bias into out:
  // (y - mean_c y) / sqrt(var_c y + eps) * norm_weight + norm_bias; weight [C, K*K], the rest [C].
  m.def(
      "dwconv_layernorm_out(Tensor x, Tensor weight, Tensor bias, Tensor norm_weight, Tensor norm_bias, "
      "int kernel_size, int stride, float eps, Tensor(a!) out) -> ()");
  // Writes patch-grouped multi-head attention softmax(scale q k^T) v into out [B, heads, Hq, Wq, dv]; q
  // [B, heads, Hq, Wq, d], k [B, heads, Hk, Wk, d], v [B, heads, Hk, Wk, dv]: any strides (MobileViT: three
  // views of one image-ordered qkv; cross attention: [B, heads, 1, N, d] views with ph = pw = 1). Queries
  // at offset (y % ph, x % pw) inside their patch attend to the keys at the same offset.
  m.def("patch_attention_out(Tensor q, Tensor k, Tensor v, int ph, int pw, float scale, Tensor(a!) out) -> ()");
  // Writes cross-covariance attention (XCiT / EdgeNeXt) of qkv [B, N, 3*C] (last dim (3, heads, d)) into
  // out [B, N, C]: per head, softmax(temperature[h] * normalize(q) normalize(k)^T) over channels, times v.
  m.def(
      "xca_attention_out(Tensor qkv, int num_heads, Tensor temperature, float eps, Tensor(a!) out) -> ()");
  // Writes LeViT attention act(softmax(scale q k^T + table[h, |dy| * res_w + |dx|]) v) into out
  // [B, Nq, heads * dv]; q [B, heads, Nq, dk] on the res_h x res_w key grid subsampled by stride,
  // k [B, heads, Nk, dk], v [B, heads, Nk, dv], table [heads, Nk]; act 0 = none, 1 = hardswish.
  m.def(
      "bias_attention_out(Tensor q, Tensor k, Tensor v, Tensor table, int res_h, int res_w, int stride, "
      "float scale, int act, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fastvit_kernels_C, CPU, m) {
  m.impl("dwconv_bn_act_out", &fastvit_kernels::dwconv_bn_act_out_cpu);
  m.impl("dwconv_layernorm_out", &fastvit_kernels::dwconv_layernorm_out_cpu);
  m.impl("patch_attention_out", &fastvit_kernels::patch_attention_out_cpu);
  m.impl("xca_attention_out", &fastvit_kernels::xca_attention_out_cpu);
  m.impl("bias_attention_out", &fastvit_kernels::bias_attention_out_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(fastvit_kernels_C, CUDA, m) {
  m.impl("dwconv_bn_act_out", &fastvit_kernels::dwconv_bn_act_out_cuda);
  m.impl("dwconv_layernorm_out", &fastvit_kernels::dwconv_layernorm_out_cuda);
  m.impl("patch_attention_out", &fastvit_kernels::patch_attention_out_cuda);
  m.impl("xca_attention_out", &fastvit_kernels::xca_attention_out_cuda);
  m.impl("bias_attention_out", &fastvit_kernels::bias_attention_out_cuda);
}
#endif

// ---- head_mixing_attention (declarations, checks, schema and implementations in one block) -------

namespace fastvit_kernels {

void head_mixing_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                               const c10::optional<at::Tensor>& pre_mix, const c10::optional<at::Tensor>& post_mix,
                               const c10::optional<at::Tensor>& norm_weight,
                               const c10::optional<at::Tensor>& norm_bias, double norm_eps, const at::Tensor& out);
#ifdef WITH_CUDA
void head_mixing_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                const c10::optional<at::Tensor>& pre_mix,
                                const c10::optional<at::Tensor>& post_mix,
                                const c10::optional<at::Tensor>& norm_weight,
                                const c10::optional<at::Tensor>& norm_bias, double norm_eps, const at::Tensor& out);
#endif

namespace {

void check_head_mixing_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                 const c10::optional<at::Tensor>& pre_mix,
                                 const c10::optional<at::Tensor>& post_mix,
                                 const c10::optional<at::Tensor>& norm_weight,
                                 const c10::optional<at::Tensor>& norm_bias, double norm_eps,
                                 const at::Tensor& out) {
  constexpr const char* op = "head_mixing_attention_out";
  const char* names[] = {"k", "v", "out", "pre_mix", "post_mix", "norm_weight", "norm_bias"};
  const c10::optional<at::Tensor> tensors[] = {k, v, out, pre_mix, post_mix, norm_weight, norm_bias};
  for (int n = 0; n < 7; ++n) {
    TORCH_CHECK(!tensors[n].has_value() || tensors[n]->device() == q.device(), op, ": ", names[n], " is on ",
                tensors[n]->device(), " but q is on ", q.device(), " (all tensors must be on one device)");
  }
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": q must be float32, float16, bfloat16 or float64, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, op, ": k and v must have q's dtype ", dt,
              ", got ", k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(out.scalar_type() == dt, op, ": out must have q's dtype ", dt, ", got ", out.scalar_type());
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": q, k, v must be 4-D [B, heads, N, d], got shapes ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const int64_t B = q.size(0), heads = q.size(1), Nq = q.size(2), d = q.size(3), Nk = k.size(2), dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == heads && k.size(3) == d, op, ": k must have shape [", B, ", ", heads,
              ", Nk, ", d, "] for q of shape ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.size(0) == B && v.size(1) == heads && v.size(2) == Nk, op, ": v must have shape [", B, ", ",
              heads, ", ", Nk, ", dv] for k of shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(heads >= 1 && d >= 1 && dv >= 1, op, ": heads and head dims must be >= 1, got heads = ", heads,
              ", d = ", d, ", dv = ", dv);
  TORCH_CHECK(Nq == 0 || Nk >= 1, op, ": ", Nq, " queries need at least one key, got k of shape ", k.sizes());
  for (int n = 3; n < 7; ++n) {
    if (!tensors[n].has_value()) continue;
    const at::Tensor& t = *tensors[n];
    const bool ok = n < 5 ? (t.dim() == 2 && t.size(0) == heads && t.size(1) == heads)
                          : (t.dim() == 1 && t.size(0) == heads);
    TORCH_CHECK(ok, op, ": ", names[n], " must have shape ", (n < 5 ? "[heads, heads]" : "[heads]"),
                " (heads = ", heads, "), got ", t.sizes());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", names[n], " must be a floating-point tensor, got ",
                t.scalar_type());
  }
  TORCH_CHECK(!norm_bias.has_value() || norm_weight.has_value(), op,
              ": norm_bias needs norm_weight (the LayerNorm over heads is on when norm_weight is given)");
  TORCH_CHECK(std::isfinite(norm_eps) && norm_eps > 0, op, ": norm_eps must be finite and > 0, got ", norm_eps);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK(out.dim() == 3 && out.size(0) == B && out.size(1) == Nq && out.size(2) == heads * dv, op,
              ": out must have shape [", B, ", ", Nq, ", ", heads * dv, "], got ", out.sizes());
  // Every element of out is written once, from values of the inputs: out may not overlap itself or them.
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
              ": out must not have overlapping elements, got strides ", out.strides());
  const char* input_names[] = {"q", "k", "v", "pre_mix", "post_mix", "norm_weight", "norm_bias"};
  const c10::optional<at::Tensor> inputs[] = {q, k, v, pre_mix, post_mix, norm_weight, norm_bias};
  for (int n = 0; n < 7; ++n) {
    if (!inputs[n].has_value()) continue;
    const auto overlap = at::get_overlap_status(out, *inputs[n]);
    TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op,
                ": out must not share memory with ", input_names[n], " (in-place is not supported)");
  }
}

void head_mixing_attention_out_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                   const c10::optional<at::Tensor>& pre_mix,
                                   const c10::optional<at::Tensor>& post_mix,
                                   const c10::optional<at::Tensor>& norm_weight,
                                   const c10::optional<at::Tensor>& norm_bias, double norm_eps,
                                   const at::Tensor& out) {
  check_head_mixing_attention(q, k, v, scale, pre_mix, post_mix, norm_weight, norm_bias, norm_eps, out);
  head_mixing_attention_cpu(q, k, v, scale, pre_mix, post_mix, norm_weight, norm_bias, norm_eps, out);
}

#ifdef WITH_CUDA
void head_mixing_attention_out_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                    const c10::optional<at::Tensor>& pre_mix,
                                    const c10::optional<at::Tensor>& post_mix,
                                    const c10::optional<at::Tensor>& norm_weight,
                                    const c10::optional<at::Tensor>& norm_bias, double norm_eps,
                                    const at::Tensor& out) {
  check_head_mixing_attention(q, k, v, scale, pre_mix, post_mix, norm_weight, norm_bias, norm_eps, out);
  head_mixing_attention_cuda(q, k, v, scale, pre_mix, post_mix, norm_weight, norm_bias, norm_eps, out);
}
#endif

}  // namespace
}  // namespace fastvit_kernels

TORCH_LIBRARY_FRAGMENT(fastvit_kernels_C, m) {
  // Writes attention with heads mixed before / after the softmax and a LayerNorm across heads into
  // out [B, Nq, heads * dv] (channel g * dv + e); q [B, heads, Nq, d], k [B, heads, Nk, d],
  // v [B, heads, Nk, dv], any strides; pre_mix / post_mix [heads, heads] (t[g] = sum_h s[h] mix[h, g]),
  // norm_weight / norm_bias [heads]; each step only when its tensor is given.
  m.def(
      "head_mixing_attention_out(Tensor q, Tensor k, Tensor v, float scale, Tensor? pre_mix, Tensor? post_mix, "
      "Tensor? norm_weight, Tensor? norm_bias, float norm_eps, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fastvit_kernels_C, CPU, m) {
  m.impl("head_mixing_attention_out", &fastvit_kernels::head_mixing_attention_out_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(fastvit_kernels_C, CUDA, m) {
  m.impl("head_mixing_attention_out", &fastvit_kernels::head_mixing_attention_out_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvit_kernels C++/CUDA kernels; the ops are in torch.ops.fastvit_kernels_C";
  m.def(
      "has_cuda",
      [] {
#ifdef WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when this build contains the CUDA kernels.");
  m.def("cpu_cached_empty", &fastvit_kernels::cpu_cached_empty, pybind11::arg("sizes"), pybind11::arg("dtype"),
        pybind11::arg("memory_format"),
        "Uninitialised CPU tensor whose storage comes from the caching allocator (csrc/cpu_cache.h).");
  m.def("cpu_cache_stats", &fastvit_kernels::cpu_cache_stats,
        "(bytes in live tensors from the CPU cache, bytes cached idle, idle limit).");
  m.def("cpu_cache_release", &fastvit_kernels::cpu_cache_release, "Returns the idle cached blocks to the OS.");
  m.def("cpu_has_avx512", &fastvit_kernels::cpu_has_avx512,
        "Whether CPU kernels with an AVX-512 variant take it (an x86-64-v4 CPU, FASTVIT_KERNELS_CPU_AVX512 not 0).");
  m.def("cpu_cache_set_limit", &fastvit_kernels::cpu_cache_set_limit, pybind11::arg("bytes"),
        "Idle blocks beyond this many bytes are freed instead of cached.");
  m.def("fused_mlp", &fastvit_kernels::fused_mlp_cpu, pybind11::arg("x"), pybind11::arg("w1"), pybind11::arg("b1"),
        pybind11::arg("w2"), pybind11::arg("b2"), pybind11::arg("gamma"), pybind11::arg("residual"),
        pybind11::arg("act"), pybind11::arg("out"),
        "out = residual + gamma * (act(x w1^T + b1) w2^T + b2), act 0 none, 1 GELU, 2 Hardswish, 3 SiLU; float32 CPU rows (csrc/cpu/fused_mlp.cpp).");
}
