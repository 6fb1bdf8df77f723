// torch_hpc::scaled_dot_product_attention: F.scaled_dot_product_attention's semantics, on the
// fused emulated kernel (torch_hpc::attention, autograd in C++) where it applies and on torch's
// own call everywhere else (other dtypes or devices, dropout, head dimensions over 128, masks
// that require grad, symbolic shapes, functorch transforms, bad arguments: torch raises).
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "checks.h"
#include "ops.h"
#include "settings.h"
#include "torch_path.h"

namespace torch_hpc {

at::Tensor call_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& mask, bool is_causal, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_hpc::attention", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, bool, double)>();
  return op.call(q, k, v, mask, is_causal, scale);
}

std::tuple<at::Tensor, at::Tensor> call_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const std::optional<at::Tensor>& mask,
                                                          bool is_causal, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_hpc::attention_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const std::optional<at::Tensor>&,
                                                                 bool, double)>();
  return op.call(q, k, v, mask, is_causal, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_attention_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, bool is_causal, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_hpc::attention_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, bool, double)>();
  return op.call(grad, q, k, v, out, lse, mask, is_causal, scale);
}

at::Tensor call_sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
                     std::optional<double> scale, bool enable_gqa) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_hpc::scaled_dot_product_attention", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, double, bool, std::optional<double>,
                                         bool)>();
  return op.call(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa);
}

namespace gemm {
namespace {
AttentionFitsRule attention_fits = nullptr;
}  // namespace
void register_attention_fits_rule(AttentionFitsRule rule) { attention_fits = rule; }
}  // namespace gemm

namespace {

using gemm::attention_fits;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct AttentionFunction : public torch::autograd::Function<AttentionFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, bool is_causal, double scale) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = call_attention_forward(q, k, v, mask, is_causal, scale);
    ctx->save_for_backward({q, k, v, out, lse, mask.has_value() ? *mask : at::Tensor()});
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // (grad mode is on in backward only under create_graph=True)
    TORCH_CHECK_NOT_IMPLEMENTED(!at::GradMode::is_enabled(),
                                "torch_hpc.scaled_dot_product_attention: the fused kernel's backward is not itself "
                                "differentiable (create_graph=True); with torch_hpc.backends.attention.fused = False "
                                "torch's own call runs, whose math backend is");
    const variable_list s = ctx->get_saved_variables();
    const std::optional<at::Tensor> mask = s[5].defined() ? std::optional<at::Tensor>(s[5]) : std::nullopt;
    auto [dq, dk, dv] = call_attention_backward(grads[0], s[0], s[1], s[2], s[3], s[4], mask,
                                                ctx->saved_data["is_causal"].toBool(),
                                                ctx->saved_data["scale"].toDouble());
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& mask, bool is_causal, double scale) {
  if (at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad())) {
    TORCH_CHECK_VALUE(!(mask.has_value() && mask->defined() && mask->requires_grad()),
                      "torch_hpc.attention: a mask that requires grad is not supported (its gradient is not "
                      "computed); torch_hpc.scaled_dot_product_attention gives it torch's own call");
    return AttentionFunction::apply(q, k, v, mask, is_causal, scale);
  }
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_attention(q, k, v, mask, is_causal, scale);
}

const c10::DispatchKeySet kTransforms({c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::FuncTorchBatched,
                                       c10::DispatchKey::BatchedNestedTensor});

bool plain_cuda_float(const at::Tensor& t) {
  return t.defined() && t.is_cuda() && t.scalar_type() == at::kFloat && t.layout() == at::kStrided &&
         !t.unsafeGetTensorImpl()->has_symbolic_sizes_strides() && !t.key_set().has_any(kTransforms) &&
         !t._fw_grad(/*level=*/0).defined();
}

// Whether the fused kernel takes this call (shapes as torch's SDPA documents them: query
// (..., H, L, E), key (..., H / G, S, E), value (..., H / G, S, Ev)).
// torch_hpc.backends.attention.fused = "auto": calls with fewer query-key pairs (batch x heads x
// L x S, halved when causal) take torch's fp32 SDPA, which an H100 ran faster there (seq 256 x
// 32 heads: the kernel 0.41-0.79x; seq 1024 x 32 heads: 0.92-1.67x; benchmarks/README.md).
constexpr double kMinAutoPairs = 33554432.0;  // 2^25

bool fused_applies(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                   double dropout_p, bool is_causal, bool enable_gqa) {
  const gemm::FusedAttention choice = gemm::fused_attention();
  if (choice == gemm::FusedAttention::kOff) return false;
  if (!plain_cuda_float(q) || !plain_cuda_float(k) || !plain_cuda_float(v)) return false;
  if (k.device() != q.device() || v.device() != q.device() || dropout_p != 0.0) return false;
  if (at::autocast::is_autocast_enabled(c10::DeviceType::CUDA)) return false;
  // the backward adds dQ with atomics: torch's call where deterministic algorithms are asked for
  if (at::globalContext().deterministicAlgorithms() && at::GradMode::is_enabled() &&
      (q.requires_grad() || k.requires_grad() || v.requires_grad()))
    return false;
  const int64_t dims = q.dim();
  if (dims < 3 || k.dim() != dims || v.dim() != dims) return false;
  for (int64_t d = 0; d < dims - 3; ++d)
    if (k.size(d) != q.size(d) || v.size(d) != q.size(d)) return false;
  const int64_t heads = q.size(-3), kv_heads = k.size(-3);
  if (v.size(-3) != kv_heads || kv_heads == 0 || (heads != kv_heads && !(enable_gqa && heads % kv_heads == 0)))
    return false;
  const int64_t L = q.size(-2), S = k.size(-2), E = q.size(-1), Ev = v.size(-1);
  if (v.size(-2) != S || k.size(-1) != E || L == 0 || S == 0 || q.numel() == 0) return false;
  if (E > gemm::kMaxAttentionDim || Ev > gemm::kMaxAttentionDim || Ev == 0) return false;
  if (q.numel() / (L * E) > 65535) return false;
  const double pairs = static_cast<double>(q.numel() / (L * E)) * static_cast<double>(L) * static_cast<double>(S);
  if (choice == gemm::FusedAttention::kAuto && pairs * (is_causal ? 0.5 : 1.0) < kMinAutoPairs) return false;
  if (mask.defined()) {
    if (is_causal || mask.device() != q.device() || mask.layout() != at::kStrided ||
        (mask.scalar_type() != at::kFloat && mask.scalar_type() != at::kBool) || mask.requires_grad() ||
        mask.unsafeGetTensorImpl()->has_symbolic_sizes_strides() || mask.key_set().has_any(kTransforms) ||
        mask.dim() > dims)
      return false;
    for (int64_t d = 1; d <= mask.dim(); ++d) {
      const int64_t full = d == 1 ? S : d == 2 ? L : d == 3 ? heads : q.size(dims - d);
      if (mask.size(-d) != 1 && mask.size(-d) != full) return false;
    }
  }
  return attention_fits != nullptr && attention_fits(q.get_device(), std::max(E, Ev));
}

// x (..., H, L, D) as (B, H, L, D).
at::Tensor as_4d(const at::Tensor& x) {
  if (x.dim() == 4) return x;
  if (x.dim() == 3) return x.unsqueeze(0);
  return x.reshape({-1, x.size(-3), x.size(-2), x.size(-1)});
}

at::Tensor sdpa_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
                          std::optional<double> scale, bool enable_gqa) {
  const at::Tensor mask = attn_mask.has_value() ? *attn_mask : at::Tensor();
  if (!fused_applies(q, k, v, mask, dropout_p, is_causal, enable_gqa)) {
    const gemm::TorchProductGuard outside_the_mode;
    return at::scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa);
  }
  const int64_t S = k.size(-2), E = q.size(-1);
  std::optional<at::Tensor> mask4;
  if (mask.defined()) {
    at::Tensor m = mask.scalar_type() == at::kBool
                       ? at::zeros(mask.sizes(), q.options()).masked_fill_(mask.logical_not(),
                                                                           -std::numeric_limits<float>::infinity())
                       : mask;
    std::vector<int64_t> full(q.sizes().begin(), q.sizes().end() - 1);
    full.push_back(S);
    m = m.expand(full);
    mask4 = as_4d(m);
  }
  const double softmax_scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(E));
  at::Tensor out = call_attention(as_4d(q), as_4d(k), as_4d(v), mask4, is_causal, softmax_scale);
  std::vector<int64_t> shape(q.sizes().begin(), q.sizes().end() - 1);
  shape.push_back(v.size(-1));
  return out.view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_hpc, Autograd, m) { m.impl("attention", &attention_autograd); }

TORCH_LIBRARY_IMPL(torch_hpc, CompositeImplicitAutograd, m) {
  m.impl("scaled_dot_product_attention", &sdpa_composite);
}

}  // namespace torch_hpc
