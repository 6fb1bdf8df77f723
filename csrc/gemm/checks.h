// Argument checks and shapes shared by the CPU and CUDA implementations of the emulated GEMM.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace torch_hpc {
namespace gemm {

// Checks the arguments of torch_hpc::mm (dims == 2) or torch_hpc::bmm (dims == 3) and raises a
// ValueError naming the argument on bad input.
void check_matmul_args(const at::Tensor& a, const at::Tensor& b, int64_t dims, const char* op);

// Checks the bias of torch_hpc::mm_bias: float32, 1-D of b.size(1) elements, on b's device.
void check_bias_arg(const at::Tensor& bias, const at::Tensor& b, const char* op);

// Checks the argument of torch_hpc::split (2-D float32).
void check_split_arg(const at::Tensor& x);

// Checks the canonical operands of torch_hpc::attention / attention_forward / attention_backward:
// float32 query [B, H, L, E], key [B, H / G, S, E], value [B, H / G, S, Ev] on one device,
// E and Ev at most kMaxAttentionDim, L and S nonzero, mask (when defined) float32 and 4-D,
// broadcastable to [B, H, L, S].
constexpr int64_t kMaxAttentionDim = 128;
void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& mask, const char* op);

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// "torch.float64" for at::kDouble: dtypes in messages as Python users write them.
std::string dtype_name(at::ScalarType t);

}  // namespace gemm
}  // namespace torch_hpc
