// When torch's own op gives what the emulated op would: every product of the call (forward and
// the gradients autograd will need) takes the cuBLAS SGEMM fallback and TF32 is off, so torch's
// op, with its own autograd node, computes the same products at less host cost per call.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace torch_hpc {
namespace gemm {

// The fallback rule of a device's kernels: whether a product of this size runs SGEMM.
using SgemmRule = bool (*)(const at::Tensor& like, int64_t batch, int64_t m, int64_t n, int64_t k);

// The thread-local dispatch key of fp32_emulation()'s routing (emulation_mode.cpp).
constexpr c10::DispatchKey kEmulationModeKey = c10::DispatchKey::TESTING_ONLY_GenericMode;

// Held around torch_hpc's own calls of torch's products (the SGEMM fallback, torch's op where it
// is equivalent): inside fp32_emulation() they would otherwise be routed back to torch_hpc.
struct TorchProductGuard {
  c10::impl::ExcludeDispatchKeyGuard outside_the_mode{kEmulationModeKey};
};

// Set once by the CUDA kernels' file when it is built in.
void register_cuda_sgemm_rule(SgemmRule rule);

// Whether the fused attention kernel runs on a CUDA device at a head dimension (compute
// capability, shared memory); set once by the CUDA attention file when it is built in.
using AttentionFitsRule = bool (*)(int device, int64_t dim);
void register_attention_fits_rule(AttentionFitsRule rule);

// a @ b (a: [batch,] m x k, b: [batch,] k x n): whether torch's op computes it and the
// gradients it will need (of a when grad_a, of b when grad_b) exactly as torch_hpc would.
// False for traced, subclass or functorch tensors (the torch_hpc op stays in graphs).
bool torch_op_is_equivalent(const at::Tensor& a, const at::Tensor& b, int64_t batch, int64_t m,
                            int64_t n, int64_t k, bool grad_a, bool grad_b);

}  // namespace gemm
}  // namespace torch_hpc
