// Host dispatch of the GEMM stages: which tensor-core kernel runs, then the exact path; the
// per-device shared-memory opt-in shared by the kernels. Torch-free: see kernels.h.
#include "kernels.h"

#include <mutex>
#include <set>
#include <utility>

namespace torch_hpc {
namespace gemm {
namespace cuda {

cudaError_t raise_smem_limit(const void* kernel, size_t bytes) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> raised;  // the attribute is per device context
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(mutex);
  if (raised.count({kernel, device})) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(bytes));
  if (err == cudaSuccess) raised.insert({kernel, device});
  return err;
}

cudaError_t launch_gemm(const GemmParams& p, GemmKernel kernel, cudaStream_t stream) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = kernel == GemmKernel::sm90 ? launch_gemm_sm90(p, sms, stream) : launch_gemm_sm80(p, stream);
  if (err != cudaSuccess) return err;
  return launch_exact(p, sms, stream);
}

}  // namespace cuda
}  // namespace gemm
}  // namespace torch_hpc
