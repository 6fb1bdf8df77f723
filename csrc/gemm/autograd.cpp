// Autograd of torch_hpc::mm, bmm and mm_bias in C++ (no Python on the call path): the
// backward products are the emulated ops again, so higher-order gradients and tracing work.
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops.h"

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

// Without gradients to record, straight to the device kernel (no autograd node).
at::Tensor mm_autograd(const at::Tensor& a, const at::Tensor& b) {
  if (any_requires_grad({&a, &b})) return ProductFunction<2>::apply(a, b);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_mm(a, b);
}

at::Tensor bmm_autograd(const at::Tensor& a, const at::Tensor& b) {
  if (any_requires_grad({&a, &b})) return ProductFunction<3>::apply(a, b);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_bmm(a, b);
}

at::Tensor mm_bias_autograd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
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
