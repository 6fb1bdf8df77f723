// Exact path of the implicit-GEMM convolution, as corrections: the split leaves a 64-value block
// it cannot hold (a range wider than its window, inf or NaN, a factor out of range) as zeros in
// the planes (factor 0), so the kernel's output lacks exactly those blocks' products. Here they
// are added: each flagged input block (pixel, 64 channels) times the fp32 weights of every
// output it reaches, each flagged weight block (output channel, tap, 64 channels) times the
// fp32 input of every output pixel (except input blocks already corrected), summed in fp64 and
// added to the output. The cost follows the flagged blocks (64 products per output they reach),
// not the outputs' whole reductions (which for the weight gradient run over every pixel of the
// batch). The work is found on the device; nothing waits on the host. Torch-free: see kernels.h.
#include "kernels.h"

namespace torch_hpc {
namespace gemm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBlock = 64;  // values per factor (split.h kScaleBlock)

// Output position o along one dimension that tap `tap` reads from input position i, or -1.
__device__ __forceinline__ int reached_by(int i, int tap, int stride, int pad, int dilation, int out) {
  const int num = i + pad - tap * dilation;
  if (num < 0 || num % stride != 0) return -1;
  const int o = num / stride;
  return o < out ? o : -1;
}

__device__ __forceinline__ double block_dot(const float* x, const float* w) {
  double sum = 0.0;
#pragma unroll 8
  for (int c = 0; c < kBlock; ++c) sum += double(x[c]) * double(w[c]);
  return sum;
}

__device__ __forceinline__ float* output_at(const ConvParams& p, int64_t m, int64_t k) {
  return p.gemm.c + m * p.gemm.c_stride_m + k * p.gemm.c_stride_n;
}

// Flagged weight rows join the list; each adds the outputs its flagged blocks reach to the count.
__global__ void __launch_bounds__(kThreads) conv_collect_kernel(ConvParams p) {
  const int64_t k = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (k >= p.gemm.n || !p.gemm.b_fallback[k]) return;
  p.w_list[atomicAdd(p.w_count, 1)] = static_cast<int32_t>(k);
  if (p.gemm.exact_outputs == nullptr) return;
  unsigned long long blocks = 0;
  for (int64_t kb = 0; kb < p.gemm.k_pad / kBlock; ++kb) blocks += p.w_factor[kb * p.gemm.n_pad + k] == 0.0f;
  atomicAdd(p.gemm.exact_outputs, blocks * static_cast<unsigned long long>(p.gemm.m));
}

// Flagged input blocks: a warp scans 32 blocks (lanes along pixels, so the factor reads are
// coalesced) and corrects each flagged one together, lanes over the output channels.
__global__ void __launch_bounds__(kThreads) conv_input_corrections_kernel(ConvParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t pixels = int64_t(p.images) * p.in_h * p.in_w;
  const int64_t total = int64_t(p.channels / kBlock) * pixels;
  const int64_t cout = p.gemm.n;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  for (int64_t base = (int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32) * 32; base < total;
       base += warps * 32) {
    const int64_t mine = base + lane;
    const bool flagged = mine < total && p.x_factor[(mine / pixels) * p.x_rows_pad + mine % pixels] == 0.0f;
    unsigned todo = __ballot_sync(0xffffffffu, flagged);
    while (todo != 0) {
      const int64_t block = base + __ffs(todo) - 1;
      todo &= todo - 1;
      const int64_t cb = block / pixels, pixel = block % pixels;
      const int64_t in_pixels = int64_t(p.in_h) * p.in_w;
      const int64_t image = pixel / in_pixels;
      const int ih = static_cast<int>((pixel - image * in_pixels) / p.in_w);
      const int iw = static_cast<int>((pixel - image * in_pixels) % p.in_w);
      const float* x = p.x + pixel * p.channels + cb * kBlock;
      int64_t reached = 0;
      for (int r = 0; r < p.kernel_h; ++r) {
        const int oh = reached_by(ih, r, p.stride_h, p.pad_h, p.dilation_h, p.out_h);
        if (oh < 0) continue;
        for (int s = 0; s < p.kernel_w; ++s) {
          const int ow = reached_by(iw, s, p.stride_w, p.pad_w, p.dilation_w, p.out_w);
          if (ow < 0) continue;
          const int64_t m = (image * p.out_h + oh) * p.out_w + ow;
          for (int64_t k = lane; k < cout; k += 32) {
            const float* w = p.w + ((k * p.kernel_h + r) * p.kernel_w + s) * p.channels + cb * kBlock;
            atomicAdd(output_at(p, m, k), static_cast<float>(block_dot(x, w)));
          }
          ++reached;
        }
      }
      if (lane == 0 && p.gemm.exact_outputs != nullptr && reached > 0)
        atomicAdd(p.gemm.exact_outputs, static_cast<unsigned long long>(reached * cout));
    }
  }
}

// Flagged blocks of the listed weight rows: a thread per (block, output pixel), pixels fastest.
__global__ void __launch_bounds__(kThreads) conv_weight_corrections_kernel(ConvParams p) {
  const int64_t m_total = p.gemm.m, k_blocks = p.gemm.k_pad / kBlock;
  const int64_t items = int64_t(*p.w_count) * k_blocks * m_total;
  const int64_t threads = int64_t(gridDim.x) * kThreads;
  const int64_t pixels = int64_t(p.out_h) * p.out_w;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < items; i += threads) {
    const int64_t row_block = i / m_total, m = i - row_block * m_total;
    const int64_t k = p.w_list[row_block / k_blocks], kb = row_block % k_blocks;
    if (p.w_factor[kb * p.gemm.n_pad + k] != 0.0f) continue;
    const int64_t tap = kb * kBlock / p.channels, c0 = kb * kBlock - tap * p.channels;
    const int r = static_cast<int>(tap / p.kernel_w), s = static_cast<int>(tap % p.kernel_w);
    const int64_t image = m / pixels;
    const int oh = static_cast<int>((m - image * pixels) / p.out_w), ow = static_cast<int>((m - image * pixels) % p.out_w);
    const int ih = oh * p.stride_h - p.pad_h + r * p.dilation_h, iw = ow * p.stride_w - p.pad_w + s * p.dilation_w;
    if (ih < 0 || ih >= p.in_h || iw < 0 || iw >= p.in_w) continue;
    const int64_t pixel = (image * p.in_h + ih) * p.in_w + iw;
    if (p.x_factor[(c0 / kBlock) * p.x_rows_pad + pixel] == 0.0f) continue;  // corrected as an input block
    const double sum = block_dot(p.x + pixel * p.channels + c0, p.w + k * p.gemm.k + kb * kBlock);
    atomicAdd(output_at(p, m, k), static_cast<float>(sum));
  }
}

}  // namespace

cudaError_t launch_conv_exact(const ConvParams& p, int sm_count, cudaStream_t stream) {
  if (p.gemm.m == 0 || p.gemm.n == 0) return cudaSuccess;
  if (p.channels % kBlock != 0 || p.gemm.k_pad != p.gemm.k) return cudaErrorInvalidValue;
  cudaError_t err = cudaMemsetAsync(p.w_count, 0, sizeof(int32_t), stream);
  if (err != cudaSuccess) return err;
  conv_collect_kernel<<<static_cast<unsigned>((p.gemm.n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  conv_input_corrections_kernel<<<2 * sm_count, kThreads, 0, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  conv_weight_corrections_kernel<<<2 * sm_count, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gemm
}  // namespace torch_hpc
