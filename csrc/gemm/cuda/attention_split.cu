// Attention split stage: each 64-row tile of q, k, v (or the output gradient) becomes fp16 hi/lo
// planes under one power-of-two factor (attention.h). Torch-free.
#include "attention.h"

#include <cuda_fp16.h>

#include "../split.h"

namespace torch_hpc {
namespace gemm {
namespace cuda {
namespace {

constexpr int kSplitThreads = 256;
// Factor exponents stay where 2^e and 2^-e are normal floats.
constexpr int kMinTileExponent = -126;

__global__ void __launch_bounds__(kSplitThreads) attention_split_kernel(AttentionSplitParams p) {
  __shared__ uint32_t warp_max[kSplitThreads / 32];
  const int64_t bh = blockIdx.y;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int64_t r0 = int64_t(blockIdx.x) * kAttnTile;
  const float* x = p.x + b * p.stride_b + h * p.stride_h;
  const int dim_pad = static_cast<int>(p.dim_pad);
  const int count = kAttnTile * dim_pad;

  uint32_t largest = 0;  // largest finite |x| of the tile, as bits
  for (int i = threadIdx.x; i < count; i += kSplitThreads) {
    const int64_t r = r0 + i / dim_pad, c = i % dim_pad;
    if (r < p.len && c < p.dim) {
      const uint32_t a = float_bits(x[r * p.stride_l + c * p.stride_d]) & 0x7fffffffu;
      if (a < kAbsInfBits && a > largest) largest = a;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) largest = max(largest, __shfl_xor_sync(0xffffffffu, largest, off));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = largest;
  __syncthreads();
  largest = 0;
#pragma unroll
  for (int w = 0; w < kSplitThreads / 32; ++w) largest = max(largest, warp_max[w]);

  int e = largest == 0 ? 0 : floor_log2_abs_bits(largest) - kHiTopExponent;
  e = max(e, kMinTileExponent);
  if (threadIdx.x == 0) p.factor[bh * (p.len_pad / kAttnTile) + blockIdx.x] = bits_float(uint32_t(127 + e) << 23);
  const float inverse = bits_float(uint32_t(127 - e) << 23);

  uint16_t* hi = p.hi + (bh * p.len_pad + r0) * p.dim_pad;
  uint16_t* lo = p.lo + (bh * p.len_pad + r0) * p.dim_pad;
  for (int i = threadIdx.x; i < count; i += kSplitThreads) {
    const int64_t r = r0 + i / dim_pad, c = i % dim_pad;
    const float v = (r < p.len && c < p.dim) ? x[r * p.stride_l + c * p.stride_d] : 0.0f;
    uint16_t vh, vl = 0;
    if ((float_bits(v) & 0x7fffffffu) < kAbsInfBits) {
      const float scaled = v * inverse;
      const __half head = __float2half_rn(scaled);
      vh = __half_as_ushort(head);
      vl = __half_as_ushort(__float2half_rn((scaled - __half2float(head)) * float(1 << kLoShift)));
    } else {
      vh = __half_as_ushort(__float2half_rn(v));  // inf/NaN as it is
    }
    hi[i] = vh;
    lo[i] = vl;
  }
}

}  // namespace

cudaError_t launch_attention_split(const AttentionSplitParams& p, cudaStream_t stream) {
  if (p.len_pad % kAttnTile != 0 || (p.dim_pad != 64 && p.dim_pad != 128) || p.batch * p.heads > 65535)
    return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(p.len_pad / kAttnTile), static_cast<unsigned>(p.batch * p.heads));
  attention_split_kernel<<<grid, kSplitThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gemm
}  // namespace torch_hpc
