// The one registration point of the extension fastvit_kernels._C: every op's schema, its argument
// checks (done here once, so the CPU and CUDA launchers can assume valid arguments) and its
// per-device implementations. The CUDA implementations exist only in builds with -DWITH_CUDA.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <cmath>

namespace fastvit_kernels {

// ---- launchers, defined in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu ------------------------------
void dwconv_bn_act_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       int64_t kernel_size, int64_t stride, int64_t act, const at::Tensor& out);
#ifdef WITH_CUDA
void dwconv_bn_act_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                        int64_t kernel_size, int64_t stride, int64_t act, const at::Tensor& out);
#endif
void patch_attention_cpu(const at::Tensor& qkv, int64_t num_heads, int64_t ph, int64_t pw, double scale,
                         const at::Tensor& out);
#ifdef WITH_CUDA
void patch_attention_cuda(const at::Tensor& qkv, int64_t num_heads, int64_t ph, int64_t pw, double scale,
                          const at::Tensor& out);
#endif

namespace {

// ---- dwconv_bn_act ------------------------------------------------------------------------------

void check_dwconv_bn_act(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         int64_t K, int64_t stride, int64_t act, const at::Tensor& out) {
  constexpr const char* op = "dwconv_bn_act_out";
  TORCH_CHECK(weight.device() == x.device() && bias.device() == x.device() && out.device() == x.device(),
              op, ": all tensors must be on one device, got x on ", x.device(), ", weight on ",
              weight.device(), ", bias on ", bias.device(), ", out on ", out.device());
  TORCH_CHECK(K >= 1 && K <= 9 && K % 2 == 1, op, ": kernel_size must be odd and in 1..9, got ", K);
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
  TORCH_CHECK(act == 0 || act == 1 || act == 2, op,
              ": act must be 0 (none), 1 (SiLU) or 2 (ReLU), got ", act);

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

// ---- patch_attention ----------------------------------------------------------------------------

void check_patch_attention(const at::Tensor& qkv, int64_t num_heads, int64_t ph, int64_t pw, double scale,
                           const at::Tensor& out) {
  constexpr const char* op = "patch_attention_out";
  TORCH_CHECK(out.device() == qkv.device(), op, ": all tensors must be on one device, got qkv on ",
              qkv.device(), ", out on ", out.device());
  const auto dt = qkv.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": qkv must be float32, float16, bfloat16 or float64, got ", dt);
  TORCH_CHECK(out.scalar_type() == dt, op, ": out must have qkv's dtype ", dt, ", got ", out.scalar_type());
  TORCH_CHECK(qkv.dim() == 4, op, ": qkv must be 4-D [B, H, W, 3*C] (image order, channels last), got shape ",
              qkv.sizes());
  TORCH_CHECK(num_heads >= 1, op, ": num_heads must be >= 1, got ", num_heads);
  const int64_t B = qkv.size(0), H = qkv.size(1), W = qkv.size(2), C3 = qkv.size(3);
  TORCH_CHECK(C3 > 0 && C3 % (3 * num_heads) == 0, op,
              ": the last dim of qkv must be a positive multiple of 3 * num_heads = ", 3 * num_heads,
              " (laid out (3, num_heads, head_dim)), got ", C3);
  TORCH_CHECK(ph >= 1 && pw >= 1, op, ": patch size (ph, pw) must be positive, got (", ph, ", ", pw, ")");
  TORCH_CHECK(H % ph == 0 && W % pw == 0, op, ": qkv's H x W = ", H, "x", W,
              " must be multiples of the patch size ", ph, "x", pw);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK(out.dim() == 4 && out.size(0) == B && out.size(1) == H && out.size(2) == W &&
                  out.size(3) == C3 / 3,
              op, ": out must have shape [", B, ", ", H, ", ", W, ", ", C3 / 3, "] for qkv of shape ",
              qkv.sizes(), ", got ", out.sizes());
  // Every element of out is written once, from values of qkv: out may not overlap itself or qkv.
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
              ": out must not have overlapping elements, got strides ", out.strides());
  const auto overlap = at::get_overlap_status(out, qkv);
  TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op,
              ": out must not share memory with qkv (in-place is not supported)");
}

void patch_attention_out_cpu(const at::Tensor& qkv, int64_t num_heads, int64_t ph, int64_t pw, double scale,
                             const at::Tensor& out) {
  check_patch_attention(qkv, num_heads, ph, pw, scale, out);
  patch_attention_cpu(qkv, num_heads, ph, pw, scale, out);
}

#ifdef WITH_CUDA
void patch_attention_out_cuda(const at::Tensor& qkv, int64_t num_heads, int64_t ph, int64_t pw, double scale,
                              const at::Tensor& out) {
  check_patch_attention(qkv, num_heads, ph, pw, scale, out);
  patch_attention_cuda(qkv, num_heads, ph, pw, scale, out);
}
#endif

}  // namespace
}  // namespace fastvit_kernels

TORCH_LIBRARY(fastvit_kernels_C, m) {
  // Writes act(depthwise_conv(x, weight) + bias) into out; weight [C, K*K], bias [C] (BN folded).
  m.def(
      "dwconv_bn_act_out(Tensor x, Tensor weight, Tensor bias, int kernel_size, int stride, int act, "
      "Tensor(a!) out) -> ()");
  // Writes patch-grouped multi-head attention of qkv [B, H, W, 3*C] (image order; last dim
  // (3, heads, d)) into out [B, H, W, C]: sequence (h % ph, w % pw) of each image, scores scaled by scale.
  m.def("patch_attention_out(Tensor qkv, int num_heads, int ph, int pw, float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fastvit_kernels_C, CPU, m) {
  m.impl("dwconv_bn_act_out", &fastvit_kernels::dwconv_bn_act_out_cpu);
  m.impl("patch_attention_out", &fastvit_kernels::patch_attention_out_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(fastvit_kernels_C, CUDA, m) {
  m.impl("dwconv_bn_act_out", &fastvit_kernels::dwconv_bn_act_out_cuda);
  m.impl("patch_attention_out", &fastvit_kernels::patch_attention_out_cuda);
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
}
