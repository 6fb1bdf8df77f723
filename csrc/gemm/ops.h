// Calls of the torch_hpc ops through the dispatcher (autograd, tracing and the device kernel
// all apply), for the composites and the backward formulas.
#pragma once

#include <ATen/core/Tensor.h>

namespace torch_hpc {

at::Tensor call_mm(const at::Tensor& a, const at::Tensor& b);
at::Tensor call_bmm(const at::Tensor& a, const at::Tensor& b);

}  // namespace torch_hpc
