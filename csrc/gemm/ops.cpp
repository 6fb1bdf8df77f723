// Every torch_hpc op schema (one TORCH_LIBRARY), and the composite ops (matmul, linear) built on mm/bmm.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"
#include "ops.h"
#include "torch_path.h"

namespace torch_hpc {

at::Tensor call_mm(const at::Tensor& a, const at::Tensor& b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_hpc::mm", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(a, b);
}

at::Tensor call_bmm(const at::Tensor& a, const at::Tensor& b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_hpc::bmm", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(a, b);
}

at::Tensor call_mm_bias(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_hpc::mm_bias", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(a, b, bias);
}

at::Tensor call_matmul(const at::Tensor& a, const at::Tensor& b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_hpc::matmul", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(a, b);
}

at::Tensor call_linear(const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_hpc::linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&)>();
  return op.call(input, weight, bias);
}

bool call_emulates(const at::Tensor& like, int64_t batch, int64_t m, int64_t n, int64_t k) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_hpc::emulates", "")
                       .typed<bool(const at::Tensor&, int64_t, int64_t, int64_t, int64_t)>();
  return op.call(like, batch, m, n, k);
}

namespace {

// float32 and not under autocast (which picks the precision itself): emulate; else the torch op.
bool emulated(const at::Tensor& t) {
  const c10::DeviceType device = t.device().type();
  return t.scalar_type() == at::kFloat &&
         !(at::autocast::is_autocast_available(device) && at::autocast::is_autocast_enabled(device));
}

c10::SymInt product(c10::ArrayRef<c10::SymInt> sizes) {
  c10::SymInt p = 1;
  for (const c10::SymInt& s : sizes) p = p * s;
  return p;
}

// t expanded to `expanded` and folded to `folded` (count, rows, cols); a 3-D operand that
// already has the batch as it lies is used as it is (no view nodes for backward to run).
at::Tensor as_batch(const at::Tensor& t, const std::vector<c10::SymInt>& expanded,
                    std::initializer_list<c10::SymInt> folded) {
  if (t.dim() == 3 && !t.unsafeGetTensorImpl()->has_symbolic_sizes_strides() &&
      t.sym_sizes() == c10::SymIntArrayRef(expanded))
    return t;
  return t.expand_symint(expanded).reshape_symint(folded);
}

// torch.matmul semantics (1-D promotion, batch broadcasting) over the emulated mm/bmm.
// Sizes are SymInts so that the composite traces under dynamic shapes.
at::Tensor matmul_composite(const at::Tensor& a, const at::Tensor& b) {
  if (!emulated(a) || !emulated(b)) return at::matmul(a, b);
  TORCH_CHECK_VALUE(a.dim() >= 1 && b.dim() >= 1,
                    "torch_hpc.matmul: both arguments must be at least 1-D, got 'a' of shape ",
                    a.sym_sizes(), " and 'b' of shape ", b.sym_sizes());
  const bool a_vec = a.dim() == 1, b_vec = b.dim() == 1;
  const at::Tensor a2 = a_vec ? a.unsqueeze(0) : a;
  const at::Tensor b2 = b_vec ? b.unsqueeze(1) : b;
  TORCH_CHECK_VALUE(a2.sym_size(-1) == b2.sym_size(-2),
                    "torch_hpc.matmul: inner dimensions differ: 'a' has shape ", a.sym_sizes(),
                    " and 'b' has shape ", b.sym_sizes());
  const c10::SymInt m = a2.sym_size(-2), k = a2.sym_size(-1), n = b2.sym_size(-1);
  at::Tensor out;
  if (a2.dim() == 2 && b2.dim() == 2) {
    out = call_mm(a2, b2);
  } else if (b2.dim() == 2) {
    // (..., M, K) @ (K, N): fold the batch into M.
    std::vector<c10::SymInt> shape(a2.sym_sizes().begin(), a2.sym_sizes().end() - 1);
    const c10::SymInt rows = product(shape);  // (not -1: ambiguous when K = 0)
    shape.push_back(n);
    out = call_mm(a2.reshape_symint({rows, k}), b2).view_symint(shape);
  } else {
    const auto a_batch = a2.sym_sizes().slice(0, a2.dim() - 2);
    const auto b_batch = b2.sym_sizes().slice(0, b2.dim() - 2);
    const std::vector<c10::SymInt> batch = at::infer_size_symint(a_batch, b_batch);
    std::vector<c10::SymInt> a_shape(batch), b_shape(batch), out_shape(batch);
    a_shape.insert(a_shape.end(), {m, k});
    b_shape.insert(b_shape.end(), {k, n});
    out_shape.insert(out_shape.end(), {m, n});
    const c10::SymInt count = product(batch);
    out = call_bmm(as_batch(a2, a_shape, {count, m, k}), as_batch(b2, b_shape, {count, k, n}));
    if (out.dim() != static_cast<int64_t>(out_shape.size())) out = out.view_symint(out_shape);
  }
  if (a_vec) out = out.squeeze(-2);
  if (b_vec) out = out.squeeze(-1);
  return out;
}

// F.linear semantics: input (..., K), weight (N, K), bias (N) or None.
at::Tensor linear_composite(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  if (!emulated(input) || !emulated(weight) || (has_bias && !emulated(*bias)))
    return at::linear(input, weight, bias);
  TORCH_CHECK_VALUE(weight.dim() == 2,
                    "torch_hpc.linear: expected argument 'weight' to be 2-D (out_features, "
                    "in_features), got shape ",
                    weight.sym_sizes());
  TORCH_CHECK_VALUE(input.dim() >= 1 && input.sym_size(-1) == weight.sym_size(1),
                    "torch_hpc.linear: expected argument 'input' to have last dimension ",
                    weight.sym_size(1), " (weight.shape[1]), got shape ", input.sym_sizes());
  if (has_bias) {
    TORCH_CHECK_VALUE(bias->dim() <= 1 && bias->sym_numel() == weight.sym_size(0),
                      "torch_hpc.linear: expected argument 'bias' of shape (", weight.sym_size(0),
                      ",), got shape ", bias->sym_sizes());
  }
  if (!input.unsafeGetTensorImpl()->has_symbolic_sizes_strides() &&
      !weight.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
    const int64_t n = weight.size(0), k = weight.size(1), m = k == 0 ? 0 : input.numel() / k;
    const bool grad = at::GradMode::is_enabled();
    if ((!has_bias || bias->device() == weight.device()) &&
        gemm::torch_op_is_equivalent(input, weight, 1, m, n, k, grad && input.requires_grad(),
                                     grad && weight.requires_grad())) {
      const gemm::TorchProductGuard torch_product;
      return at::linear(input, weight, bias);
    }
  }
  // 2-D input: no reshape/view (each would add an autograd node, as F.linear avoids too)
  const bool flat = input.dim() == 2;
  const at::Tensor input2 =
      flat ? input : input.reshape_symint({product(input.sym_sizes().slice(0, input.dim() - 1)),
                                           input.sym_size(-1)});
  at::Tensor out;
  if (has_bias && bias->dim() == 1) {  // bias fused into the product (one cuBLAS call where SGEMM runs)
    out = call_mm_bias(input2, weight.t(), *bias);
  } else {
    out = call_mm(input2, weight.t());
    if (has_bias) out = out + *bias;
  }
  if (flat) return out;
  std::vector<c10::SymInt> shape(input.sym_sizes().begin(), input.sym_sizes().end() - 1);
  shape.push_back(weight.sym_size(0));
  return out.view_symint(shape);
}

}  // namespace

TORCH_LIBRARY(torch_hpc, m) {
  m.set_python_module("torch_hpc.ops");
  m.def("split(Tensor x) -> (Tensor hi, Tensor lo, Tensor exponent, Tensor fallback)");
  m.def("mm(Tensor a, Tensor b) -> Tensor");
  m.def("bmm(Tensor a, Tensor b) -> Tensor");
  m.def("mm_bias(Tensor a, Tensor b, Tensor bias) -> Tensor");  // a @ b + bias, for linear
  // Whether a product of this size on `like`'s device runs the emulation (not the SGEMM fallback).
  m.def("emulates(Tensor like, int batch, int m, int n, int k) -> bool");
  m.def("matmul(Tensor a, Tensor b) -> Tensor");
  m.def("linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor");
  // CUDA only, for torch_hpc.nn.Linear's weight-split cache (see torch_hpc/nn.py)
  m.def("split_planes(Tensor x) -> (Tensor hi, Tensor lo, Tensor exponent, Tensor fallback)");
  m.def("mm_planes(Tensor a, Tensor b, Tensor b_hi, Tensor b_lo, Tensor b_exponent, "
        "Tensor b_fallback) -> Tensor");
  // CUDA (sm90) only: F.conv2d without bias, groups 1, channels_last, channel counts multiples
  // of 64 (torch_hpc/conv.py's implicit-GEMM route)
  m.def("conv2d_implicit(Tensor input, Tensor weight, int[2] stride, int[2] padding, "
        "int[2] dilation) -> Tensor");
  // CUDA only: x (N, C, H, W) channels_last as (C, N rounded up to `multiple`, H, W) channels_last,
  // zeros past N (the same route's weight gradient)
  m.def("images_as_channels(Tensor x, int multiple) -> Tensor");
  // Fused attention (CUDA, compute capability >= 8.0): query (B, H, L, E), key (B, H / G, S, E),
  // value (B, H / G, S, Ev), E and Ev <= 128, mask float32 broadcastable to (B, H, L, S);
  // lse: log2 of each row's sum of 2^(scores log2 e), rows padded to 128
  m.def("attention(Tensor query, Tensor key, Tensor value, Tensor? mask, bool is_causal, float scale) -> Tensor");
  m.def("attention_forward(Tensor query, Tensor key, Tensor value, Tensor? mask, bool is_causal, float scale) "
        "-> (Tensor out, Tensor lse)");
  m.def("attention_backward(Tensor grad, Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, "
        "Tensor? mask, bool is_causal, float scale) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
  // F.scaled_dot_product_attention's semantics: the fused op where it applies, torch's call elsewhere
  m.def("scaled_dot_product_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
        "float dropout_p=0.0, bool is_causal=False, *, float? scale=None, bool enable_gqa=False) -> Tensor");
  // [outputs the exact path recomputed, outputs computed] on like's device since the last reset
  // (torch_hpc.exact_path_stats)
  m.def("exact_path_counts(Tensor like, bool reset=False) -> int[]");
}

TORCH_LIBRARY_IMPL(torch_hpc, CompositeImplicitAutograd, m) {
  m.impl("matmul", &matmul_composite);
  m.impl("linear", &linear_composite);
}

}  // namespace torch_hpc

