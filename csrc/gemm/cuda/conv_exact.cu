// Exact path of the implicit-GEMM convolution: outputs that read a flagged input pixel (its
// channels' range wider than the split's window, inf or NaN) or a flagged weight row are
// recomputed as a direct convolution of the fp32 originals with fp64 accumulation. The work is
// found on the device (a mark per output pixel, a list of weight rows) and spread over a fixed
// grid, so nothing waits on the host and the cost follows the number of flagged outputs.
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

// Output position o along one dimension that tap `tap` reads from input position i, or -1.
__device__ __forceinline__ int reached_by(int i, int tap, int stride, int pad, int dilation, int out) {
  const int num = i + pad - tap * dilation;
  if (num < 0 || num % stride != 0) return -1;
  const int o = num / stride;
  return o < out ? o : -1;
}

// Thread i: input pixel i marks the outputs it reaches when flagged; weight row i joins the list.
__global__ void __launch_bounds__(kThreads) conv_collect_kernel(ConvParams p) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t in_pixels = int64_t(p.in_h) * p.in_w;
  if (i < int64_t(p.images) * in_pixels && p.x_fallback[i]) {
    const int64_t image = i / in_pixels;
    const int ih = static_cast<int>((i - image * in_pixels) / p.in_w);
    const int iw = static_cast<int>((i - image * in_pixels) % p.in_w);
    int64_t marked = 0;
    for (int r = 0; r < p.kernel_h; ++r) {
      const int oh = reached_by(ih, r, p.stride_h, p.pad_h, p.dilation_h, p.out_h);
      if (oh < 0) continue;
      for (int s = 0; s < p.kernel_w; ++s) {
        const int ow = reached_by(iw, s, p.stride_w, p.pad_w, p.dilation_w, p.out_w);
        if (ow < 0) continue;
        p.marks[(image * p.out_h + oh) * p.out_w + ow] = 1;
        ++marked;
      }
    }
    if (p.gemm.exact_outputs != nullptr && marked > 0)
      atomicAdd(p.gemm.exact_outputs, static_cast<unsigned long long>(marked * p.gemm.n));
  }
  if (i < p.gemm.n && p.gemm.b_fallback[i]) {
    p.w_list[atomicAdd(p.w_count, 1)] = static_cast<int32_t>(i);
    if (p.gemm.exact_outputs != nullptr)
      atomicAdd(p.gemm.exact_outputs, static_cast<unsigned long long>(p.gemm.m));
  }
}

// Marked output pixels (a warp each, lanes over the output channels), then every output of the
// listed weight rows (a thread each).
__global__ void __launch_bounds__(kThreads) conv_exact_kernel(ConvParams p) {
  const int64_t m_total = p.gemm.m, cout = p.gemm.n;
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  for (int64_t m = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32; m < m_total; m += warps) {
    if (!p.marks[m]) continue;
    for (int64_t k = lane; k < cout; k += 32)
      p.gemm.c[m * p.gemm.c_stride_m + k * p.gemm.c_stride_n] = direct_output(p, m, static_cast<int>(k));
  }
  const int64_t items = int64_t(*p.w_count) * m_total;
  const int64_t threads = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < items; i += threads) {
    const int64_t m = i % m_total;
    const int k = p.w_list[i / m_total];
    p.gemm.c[m * p.gemm.c_stride_m + k * p.gemm.c_stride_n] = direct_output(p, m, k);
  }
}

}  // namespace

cudaError_t launch_conv_exact(const ConvParams& p, int sm_count, cudaStream_t stream) {
  const int64_t in_pixels = int64_t(p.images) * p.in_h * p.in_w;
  const int64_t collect = in_pixels > p.gemm.n ? in_pixels : p.gemm.n;
  if (p.gemm.m == 0 || collect == 0) return cudaSuccess;
  if ((collect + kThreads - 1) / kThreads > INT32_MAX) return cudaErrorInvalidValue;
  cudaError_t err = cudaMemsetAsync(p.marks, 0, size_t(p.gemm.m) * sizeof(int32_t), stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(p.w_count, 0, sizeof(int32_t), stream);
  if (err != cudaSuccess) return err;
  conv_collect_kernel<<<static_cast<unsigned>((collect + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  conv_exact_kernel<<<2 * sm_count, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gemm
}  // namespace torch_hpc
