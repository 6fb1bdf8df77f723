#include "torch_path.h"

#include <ATen/Context.h>

#include <atomic>

namespace torch_hpc {
namespace gemm {
namespace {
std::atomic<SgemmRule> cuda_rule{nullptr};

bool plain(const at::Tensor& t) {
  static const c10::DispatchKeySet not_plain =
      c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                           c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchBatched,
                           c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::Conjugate,
                           c10::DispatchKey::Negative});
  return !t.key_set().has_any(not_plain);
}
}  // namespace

void register_cuda_sgemm_rule(SgemmRule rule) { cuda_rule.store(rule, std::memory_order_relaxed); }

bool torch_op_is_equivalent(const at::Tensor& a, const at::Tensor& b, int64_t batch, int64_t m,
                            int64_t n, int64_t k, bool grad_a, bool grad_b) {
  const SgemmRule rule = cuda_rule.load(std::memory_order_relaxed);
  if (rule == nullptr || !a.is_cuda() || a.device() != b.device() || !plain(a) || !plain(b))
    return false;
  if (at::globalContext().allowTF32CuBLAS()) return false;
  return rule(a, batch, m, n, k) && (!grad_a || rule(a, batch, m, k, n)) &&
         (!grad_b || rule(a, batch, k, n, m));
}

}  // namespace gemm
}  // namespace torch_hpc
