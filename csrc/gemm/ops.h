// Calls of the torch_hpc ops through the dispatcher (autograd, tracing and the device kernel
// all apply), for the composites and the backward formulas.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace torch_hpc {

at::Tensor call_mm(const at::Tensor& a, const at::Tensor& b);
at::Tensor call_bmm(const at::Tensor& a, const at::Tensor& b);
at::Tensor call_mm_bias(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias);
at::Tensor call_matmul(const at::Tensor& a, const at::Tensor& b);
at::Tensor call_linear(const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias);
at::Tensor call_sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
                     std::optional<double> scale, bool enable_gqa);
bool call_emulates(const at::Tensor& like, int64_t batch, int64_t m, int64_t n, int64_t k);

}  // namespace torch_hpc
