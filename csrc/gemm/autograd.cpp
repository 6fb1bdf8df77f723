// Autograd of torch_hpc::mm, bmm and mm_bias in C++ (no Python on the call path): the
// backward products are the emulated ops again, so higher-order gradients and tracing work.
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops.h"
#include "torch_path.h"

namespace torch_hpc {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// d(a @ b) = grad @ b^T, a^T @ grad; dims == 3 transposes the last two dimensions.
template <int Dims>
struct ProductFunction : public torch::autograd::Function<ProductFunction<Dims>> {
  static at::Tensor product(const at::Tensor& a, const at::Tensor& b) {
    return Dims == 2 ? call_mm(a, b) : call_bmm(a, b);
  }

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b) {
    // (needs_input_grad is not known yet when no input requires grad)
    ctx->save_for_backward({b.requires_grad() ? a : at::Tensor(), a.requires_grad() ? b : at::Tensor()});
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return product(a, b);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad = grads[0];
    at::Tensor grad_a, grad_b;
    if (ctx->needs_input_grad(0)) grad_a = product(grad, saved[1].transpose(-2, -1));
    if (ctx->needs_input_grad(1)) grad_b = product(saved[0].transpose(-2, -1), grad);
    return {grad_a, grad_b};
  }
};

// d(a @ b + bias): the product's gradients and grad summed over rows for the bias.
struct ProductBiasFunction : public torch::autograd::Function<ProductBiasFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b,
                            const at::Tensor& bias) {
    ctx->save_for_backward({b.requires_grad() ? a : at::Tensor(), a.requires_grad() ? b : at::Tensor()});
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_mm_bias(a, b, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad = grads[0];
    at::Tensor grad_a, grad_b, grad_bias;
    if (ctx->needs_input_grad(0)) grad_a = call_mm(grad, saved[1].t());
    if (ctx->needs_input_grad(1)) grad_b = call_mm(saved[0].t(), grad);
    if (ctx->needs_input_grad(2)) grad_bias = grad.sum(0);
    return {grad_a, grad_b, grad_bias};
  }
};

bool any_requires_grad(std::initializer_list<const at::Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : tensors)
    if (t->requires_grad()) return true;
  return false;
}

// Well-formed float32 operands of a [batch x] (m x k) @ (k x n) product whose every product
// torch's own op computes as torch_hpc would (torch_path.h): then torch's op and autograd node.
bool use_torch_op(const at::Tensor& a, const at::Tensor& b, int64_t dims) {
  if (!a.is_cuda() || a.unsafeGetTensorImpl()->has_symbolic_sizes_strides() ||
      b.unsafeGetTensorImpl()->has_symbolic_sizes_strides())
    return false;  // (symbolic sizes: traced under dynamic shapes, the op stays in the graph)
  if (a.dim() != dims || b.dim() != dims || a.scalar_type() != at::kFloat ||
      b.scalar_type() != at::kFloat || a.size(-1) != b.size(-2) || (dims == 3 && a.size(0) != b.size(0)))
    return false;
  const bool grad = at::GradMode::is_enabled();
  const int64_t batch = dims == 3 ? a.size(0) : 1;
  // one matrix in a bmm: torch's batched call can be slower than the mm the fallback makes
  if (dims == 3 && batch == 1) return false;
  return gemm::torch_op_is_equivalent(a, b, batch, a.size(-2), b.size(-1), a.size(-1),
                                grad && a.requires_grad(), grad && b.requires_grad());
}

// Without gradients to record, straight to the device kernel (no autograd node).
at::Tensor mm_autograd(const at::Tensor& a, const at::Tensor& b) {
  if (use_torch_op(a, b, 2)) {
    const gemm::TorchProductGuard torch_product;
    return at::mm(a, b);
  }
  if (any_requires_grad({&a, &b})) return ProductFunction<2>::apply(a, b);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_mm(a, b);
}

at::Tensor bmm_autograd(const at::Tensor& a, const at::Tensor& b) {
  if (use_torch_op(a, b, 3)) {
    const gemm::TorchProductGuard torch_product;
    return at::bmm(a, b);
  }
  if (any_requires_grad({&a, &b})) return ProductFunction<3>::apply(a, b);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_bmm(a, b);
}

at::Tensor mm_bias_autograd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  if (use_torch_op(a, b, 2) && bias.dim() == 1 && bias.scalar_type() == at::kFloat &&
      bias.device() == b.device() && !bias.unsafeGetTensorImpl()->has_symbolic_sizes_strides() &&
      bias.size(0) == b.size(1)) {
    const gemm::TorchProductGuard torch_product;
    return at::addmm(bias, a, b);
  }
  if (any_requires_grad({&a, &b, &bias})) return ProductBiasFunction::apply(a, b, bias);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_mm_bias(a, b, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_hpc, Autograd, m) {
  m.impl("mm", &mm_autograd);
  m.impl("bmm", &bmm_autograd);
  m.impl("mm_bias", &mm_bias_autograd);
}

}  // namespace torch_hpc
