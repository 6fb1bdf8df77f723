#include "settings.h"

#include <atomic>

namespace torch_hpc {
namespace gemm {
namespace {
std::atomic<bool> sgemm_fallback_enabled{true};
std::atomic<int> kernel{static_cast<int>(KernelChoice::kAuto)};
std::atomic<bool> block_exponents_enabled{false};
std::atomic<int> fused_attention_choice{static_cast<int>(FusedAttention::kAuto)};
}  // namespace

void set_sgemm_fallback(bool enabled) { sgemm_fallback_enabled.store(enabled, std::memory_order_relaxed); }
bool sgemm_fallback() { return sgemm_fallback_enabled.load(std::memory_order_relaxed); }

void set_kernel_choice(KernelChoice choice) { kernel.store(static_cast<int>(choice), std::memory_order_relaxed); }
KernelChoice kernel_choice() { return static_cast<KernelChoice>(kernel.load(std::memory_order_relaxed)); }

void set_block_exponents(bool enabled) { block_exponents_enabled.store(enabled, std::memory_order_relaxed); }
bool block_exponents() { return block_exponents_enabled.load(std::memory_order_relaxed); }

void set_fused_attention(FusedAttention choice) {
  fused_attention_choice.store(static_cast<int>(choice), std::memory_order_relaxed);
}
FusedAttention fused_attention() {
  return static_cast<FusedAttention>(fused_attention_choice.load(std::memory_order_relaxed));
}

}  // namespace gemm
}  // namespace torch_hpc
