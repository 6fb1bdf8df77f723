// Autograd of torch_hpc::mm and torch_hpc::bmm in C++ (no Python on the call path): the
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

at::Tensor mm_autograd(const at::Tensor& a, const at::Tensor& b) {
  return ProductFunction<2>::apply(a, b);
}

at::Tensor bmm_autograd(const at::Tensor& a, const at::Tensor& b) {
  return ProductFunction<3>::apply(a, b);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_hpc, Autograd, m) {
  m.impl("mm", &mm_autograd);
  m.impl("bmm", &bmm_autograd);
}

}  // namespace torch_hpc
