// Split stage: each row of x (a row of A or a column of B) becomes a power-of-two exponent and
// two fp16 planes, hi and lo, with row = 2^exponent (hi + 2^-11 lo) (see ../split.h), padded to
// whole tiles. Torch-free: see kernels.h.
#include "kernels.h"

#include "../split.h"

namespace torch_hpc {
namespace gemm {
namespace cuda {
namespace {

// Split, in two passes that each spread over rows and K (a block per 32 rows alone leaves most
// SMs idle when there are few rows): pass 1 reduces each row's largest and smallest nonzero
// |x| into stats with atomics, pass 2 turns each 32 x 64 tile into hi/lo. Tiles go through
// shared memory so that the global reads (whichever of the row/k strides is unit) and the
// plane writes are coalesced.
constexpr int kSplitRows = 32;
constexpr int kSplitK = 64;            // k per write-pass block
constexpr int kStatsChunk = 512;       // k per stats-pass block

// tile[row][kk] = x[r0 + row, k0 + kk] for 32 rows x Cols (a multiple of 32), 0 outside.
template <int Cols>
__device__ __forceinline__ void load_split_tile(const SplitParams& p, const float* x, int64_t r0,
                                                int64_t k0, bool rows_fast,
                                                float (&tile)[kSplitRows][Cols + 1]) {
#pragma unroll
  for (int j = 0; j < kSplitRows * Cols / 256; ++j) {
    int row, kk;
    if (rows_fast) {
      row = threadIdx.x;
      kk = threadIdx.y + 8 * j;
    } else {
      row = (threadIdx.y + 8 * j) % kSplitRows;
      kk = threadIdx.x + 32 * ((threadIdx.y + 8 * j) / kSplitRows);
    }
    const int64_t r = r0 + row, k = k0 + kk;
    tile[row][kk] = (r < p.rows && k < p.k) ? x[r * p.stride_r + k * p.stride_k] : 0.0f;
  }
}

__global__ void __launch_bounds__(256) split_stats_kernel(SplitParams p, int64_t batch_offset) {
  __shared__ float tile[kSplitRows][kSplitRows + 1];
  const int64_t b = batch_offset + blockIdx.z;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kSplitRows;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * kStatsChunk;
  const int64_t k_end = min(p.k, k_begin + kStatsChunk);
  const float* x = p.x + b * p.stride_b;
  const bool rows_fast = p.stride_r == 1 && p.stride_k != 1;
  const int lane = threadIdx.x;

  RowStats stats[4];
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kSplitRows) {
    load_split_tile<kSplitRows>(p, x, r0, k0, rows_fast, tile);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 4; ++j) stats[j].add(tile[threadIdx.y + 8 * j][lane]);
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t mx = stats[j].max_abs, mn = stats[j].min_nonzero_abs;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      mn = min(mn, __shfl_xor_sync(0xffffffffu, mn, off));
    }
    const int64_t row = r0 + threadIdx.y + 8 * j;
    if (lane == 0 && row < p.rows) {
      const int64_t at = b * p.rows_pad + row;
      atomicMax(p.row_max + at, mx);
      atomicMin(p.row_min + at, mn);
    }
  }
}

__global__ void __launch_bounds__(256) split_write_kernel(SplitParams p, int64_t batch_offset) {
  __shared__ float tile[kSplitRows][kSplitK + 1];
  __shared__ RowScale scales[kSplitRows];
  const int64_t b = batch_offset + blockIdx.z;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kSplitRows;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kSplitK;
  const bool rows_fast = p.stride_r == 1 && p.stride_k != 1;
  const int lane = threadIdx.x;
  if (threadIdx.y == 0) {
    const int64_t at = b * p.rows_pad + r0 + lane;
    const RowScale s = row_scale(p.row_max[at], p.row_min[at]);
    scales[lane] = s;
    if (blockIdx.y == 0) {
      p.exponent[at] = s.exponent;
      p.fallback[at] = s.fallback ? 1 : 0;
    }
  }
  load_split_tile<kSplitK>(p, p.x + b * p.stride_b, r0, k0, rows_fast, tile);
  __syncthreads();
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int row = threadIdx.y + 8 * j;
    uint16_t hi0, lo0, hi1, lo1;
    split_value(tile[row][2 * lane], scales[row], hi0, lo0);
    split_value(tile[row][2 * lane + 1], scales[row], hi1, lo1);
    const int64_t out = (b * p.rows_pad + r0 + row) * p.k_pad + k0 + 2 * lane;
    reinterpret_cast<uint32_t*>(p.hi)[out / 2] = uint32_t(hi0) | (uint32_t(hi1) << 16);
    reinterpret_cast<uint32_t*>(p.lo)[out / 2] = uint32_t(lo0) | (uint32_t(lo1) << 16);
  }
}

}  // namespace

cudaError_t launch_split(const SplitParams& p, cudaStream_t stream) {
  static_assert(kTileK % kSplitK == 0 && kTileRows % kSplitRows == 0, "planes hold whole tiles");
  const size_t stat_bytes = size_t(p.batch * p.rows_pad) * sizeof(uint32_t);
  cudaError_t err = cudaMemsetAsync(p.row_max, 0, stat_bytes, stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(p.row_min, 0xff, stat_bytes, stream);  // kNoNonzero
  if (err != cudaSuccess) return err;
  const int64_t k_chunks = (p.k + kStatsChunk - 1) / kStatsChunk;
  if (k_chunks > kMaxGridYZ || p.k_pad / kSplitK > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 block(32, 8);
  for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridYZ) {
    const int64_t nb = p.batch - b0 < kMaxGridYZ ? p.batch - b0 : kMaxGridYZ;
    const unsigned row_blocks = static_cast<unsigned>(p.rows_pad / kSplitRows);
    split_stats_kernel<<<dim3(row_blocks, static_cast<unsigned>(k_chunks), static_cast<unsigned>(nb)),
                         block, 0, stream>>>(p, b0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    split_write_kernel<<<dim3(row_blocks, static_cast<unsigned>(p.k_pad / kSplitK),
                              static_cast<unsigned>(nb)),
                         block, 0, stream>>>(p, b0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace gemm
}  // namespace torch_hpc
