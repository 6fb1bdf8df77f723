// The GEMM's run-time switches, set from Python as torch_hpc.backends.gemm.* (module.cpp) or
// from C++ directly. Read on every call without a lock.
#pragma once

namespace torch_hpc {
namespace gemm {

// Which tensor-core kernel runs: auto (wgmma on compute capability 9.0 when built, else
// mma.sync), or one of them forced.
enum class KernelChoice : int { kAuto = 0, kSm80 = 1, kSm90 = 2 };

// Products too small to fill the GPU go to cuBLAS SGEMM (TF32 off) instead. Default on.
void set_sgemm_fallback(bool enabled);
bool sgemm_fallback();

void set_kernel_choice(KernelChoice choice);
KernelChoice kernel_choice();

// A's rows split with one exponent per 64 k where a row needs it (../split.h, block mode), on
// the sm90 kernel and the CPU. Default off until measured on a GPU.
void set_block_exponents(bool enabled);
bool block_exponents();

// Where torch_hpc.scaled_dot_product_attention takes the fused kernel: never, where the call is
// large enough to win (auto, the default), or wherever the kernel applies.
enum class FusedAttention : int { kOff = 0, kAuto = 1, kOn = 2 };
void set_fused_attention(FusedAttention choice);
FusedAttention fused_attention();

}  // namespace gemm
}  // namespace torch_hpc
