// Exact path of the implicit-GEMM convolution: outputs of images or output channels whose
// split was flagged (a range the fp16 planes cannot hold, inf or NaN) are recomputed as a
// direct convolution of the fp32 originals with fp64 accumulation. One block per image and per
// output channel; blocks of unflagged ones return at once, so nothing waits on the host.
// Torch-free: see kernels.h.
#include "kernels.h"

namespace torch_hpc {
namespace gemm {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ float direct_output(const ConvParams& p, int64_t m, int k) {
  const int64_t pixels = int64_t(p.out_h) * p.out_w;
  const int64_t image = m / pixels;
  const int64_t pixel = m - image * pixels;
  const int oh = static_cast<int>(pixel / p.out_w), ow = static_cast<int>(pixel % p.out_w);
  double sum = 0.0;
  for (int r = 0; r < p.kernel_h; ++r) {
    const int ih = oh * p.stride_h - p.pad_h + r * p.dilation_h;
    if (ih < 0 || ih >= p.in_h) continue;
    for (int s = 0; s < p.kernel_w; ++s) {
      const int iw = ow * p.stride_w - p.pad_w + s * p.dilation_w;
      if (iw < 0 || iw >= p.in_w) continue;
      const float* x = p.x + ((image * p.in_h + ih) * p.in_w + iw) * p.channels;
      const float* w = p.w + ((int64_t(k) * p.kernel_h + r) * p.kernel_w + s) * p.channels;
      for (int c = 0; c < p.channels; ++c) sum += double(x[c]) * double(w[c]);
    }
  }
  return static_cast<float>(sum);
}

__global__ void __launch_bounds__(kThreads) conv_exact_kernel(ConvParams p) {
  const int64_t cout = p.gemm.n;
  const bool by_image = blockIdx.x < static_cast<unsigned>(p.images);
  const int index = by_image ? static_cast<int>(blockIdx.x) : static_cast<int>(blockIdx.x) - p.images;
  if (by_image ? p.x_fallback[index] == 0 : p.gemm.b_fallback[index] == 0) return;
  const int64_t pixels = int64_t(p.out_h) * p.out_w;
  const int64_t count = by_image ? pixels * cout : p.gemm.m;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) {
    const int64_t m = by_image ? index * pixels + i / cout : i;
    const int k = by_image ? static_cast<int>(i % cout) : index;
    p.gemm.c[m * p.gemm.c_stride_m + k * p.gemm.c_stride_n] = direct_output(p, m, k);
  }
}

}  // namespace

cudaError_t launch_conv_exact(const ConvParams& p, cudaStream_t stream) {
  const int64_t blocks = int64_t(p.images) + p.gemm.n;
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  conv_exact_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gemm
}  // namespace torch_hpc
