// Calls of the torch_hpc ops through the dispatcher (autograd, tracing and the device kernel
// all apply), for the composites and the backward formulas.
#pragma once

#include <ATen/core/Tensor.h>

namespace torch_hpc {

at::Tensor call_mm(const at::Tensor& a, const at::Tensor& b);
at::Tensor call_bmm(const at::Tensor& a, const at::Tensor& b);
at::Tensor call_mm_bias(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias);

}  // namespace torch_hpc
