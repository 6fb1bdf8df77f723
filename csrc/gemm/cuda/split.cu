// Split stage: each row of x (a row of A or a column of B) becomes a power-of-two exponent and
// two fp16 planes, hi and lo, with row = 2^exponent (hi + 2^-11 lo) (see ../split.h), padded to
// whole tiles. Torch-free: see kernels.h.
#include "kernels.h"

#include "../split.h"

namespace torch_hpc {
namespace gemm {
namespace cuda {
namespace {

// Two routes. Rows that are contiguous in K and short enough (A row-major, B as a Linear weight)
// take one pass: a block holds whole rows in shared memory, reduces their statistics there and
// writes the planes, so x is read once. Other rows (B's columns, long K) take two passes that
// each spread over rows and K: pass 1 reduces each row's largest and smallest nonzero |x| into
// stats with atomics, pass 2 turns each 32 x 128 tile into hi/lo through shared memory, so that
// the global reads (whichever of the row/k strides is unit) and the plane writes are coalesced.
constexpr int kSplitRows = 32;
constexpr int kSplitK = 128;           // k per write-pass block
constexpr int kStatsChunk = 512;       // k per stats-pass block
constexpr int kBatchLoads = 8;         // independent loads in flight per thread
constexpr int kResidentThreads = 256;  // block of the one-pass route
constexpr int kResidentBytes = 64 * 1024;  // shared memory it may take (3 blocks per SM)
constexpr int kResidentMinK = 1024;        // shorter rows keep the two passes (tiny blocks otherwise)
constexpr int kResidentLoads = 16;         // loads in flight per thread while a block fills
constexpr int kResidentMaxBlocks = kResidentBytes / 4 / 64;  // 64-value blocks of the longest row
static_assert(kResidentMaxBlocks <= kResidentThreads, "block mode: a thread per block");

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

// Adds x[k * stride] for k = first, first + step, ... < end to stats, kBatchLoads loads at a time.
__device__ __forceinline__ void add_strided(RowStats& stats, const float* x, int64_t stride,
                                            int64_t first, int64_t end, int step) {
  for (int64_t k0 = first; k0 < end; k0 += int64_t(step) * kBatchLoads) {
    float v[kBatchLoads];
#pragma unroll
    for (int u = 0; u < kBatchLoads; ++u) {
      const int64_t k = k0 + int64_t(step) * u;
      v[u] = k < end ? x[k * stride] : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kBatchLoads; ++u) stats.add(v[u]);
  }
}

__device__ __forceinline__ void warp_reduce(uint32_t& mx, uint32_t& mn) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    mn = min(mn, __shfl_xor_sync(0xffffffffu, mn, off));
  }
}

// The rows and K range of a statistics block: 32 rows x kStatsChunk of batch b.
struct StatsSpan {
  int64_t b, r0, k_begin, k_end;
  const float* x;
  bool rows_fast;  // row stride 1 (B's columns): lanes along rows
};
__device__ __forceinline__ StatsSpan stats_span(const SplitParams& p, int64_t batch_offset) {
  const int64_t b = batch_offset + blockIdx.z;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * kStatsChunk;
  return {b, static_cast<int64_t>(blockIdx.x) * kSplitRows, k_begin, min(p.k, k_begin + kStatsChunk),
          p.x + b * p.stride_b, p.stride_r == 1 && p.stride_k != 1};
}

// Pass 1: 32 rows x kStatsChunk per block. K-contiguous (or any non-row-fast) rows: a warp reads
// 4 rows along K; row-fast rows (B's columns): lane = row, the 8 warps split the chunk's K.
__global__ void __launch_bounds__(256) split_stats_kernel(SplitParams p, int64_t batch_offset) {
  const StatsSpan span = stats_span(p, batch_offset);
  const int64_t b = span.b, r0 = span.r0, k_begin = span.k_begin, k_end = span.k_end;
  const float* x = span.x;
  const bool rows_fast = span.rows_fast;
  const int lane = threadIdx.x;
  if (!rows_fast) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t row = r0 + threadIdx.y + 8 * j;
      RowStats stats;
      if (row < p.rows) add_strided(stats, x + row * p.stride_r, p.stride_k, k_begin + lane, k_end, 32);
      uint32_t mx = stats.max_abs, mn = stats.min_nonzero_abs;
      warp_reduce(mx, mn);
      if (lane == 0 && row < p.rows) {
        const int64_t at = b * p.rows_pad + row;
        atomicMax(p.row_max + at, mx);
        atomicMin(p.row_min + at, mn);
      }
    }
    return;
  }
  __shared__ uint32_t part_max[8][kSplitRows], part_min[8][kSplitRows];
  const int64_t row = r0 + lane;
  RowStats stats;
  if (row < p.rows) add_strided(stats, x + row, p.stride_k, k_begin + threadIdx.y, k_end, 8);
  part_max[threadIdx.y][lane] = stats.max_abs;
  part_min[threadIdx.y][lane] = stats.min_nonzero_abs;
  __syncthreads();
  if (threadIdx.y == 0 && row < p.rows) {
#pragma unroll
    for (int w = 1; w < 8; ++w) stats.merge(part_max[w][lane], part_min[w][lane]);
    const int64_t at = b * p.rows_pad + row;
    atomicMax(p.row_max + at, stats.max_abs);
    atomicMin(p.row_min + at, stats.min_nonzero_abs);
  }
}

// Block mode: the statistics of one 64-value block of a row are complete in one stats block
// (kStatsChunk is a multiple of 64). Its largest |x| goes to the block's slot of `scale` (bits,
// turned into the factor by the write pass; kNoNonzero marks a block that falls back) and into
// `group` (the largest value of its base group, the smallest nonzero of its row), which the
// caller adds to row_max / row_min once per chunk; a block that falls back flags its row.
__device__ __forceinline__ void record_block(const SplitParams& p, int64_t b, int64_t row, int64_t kb,
                                             uint32_t mx, uint32_t mn, RowStats& group) {
  const RowScale s = row_scale(mx, mn);
  uint32_t* slot = reinterpret_cast<uint32_t*>(p.scale) + (b * (p.k_pad / kScaleBlock) + kb) * p.rows_pad + row;
  if (s.fallback) {
    *slot = kNoNonzero;
    p.fallback[b * p.rows_pad + row] = 1;
    return;
  }
  *slot = mx;
  group.merge(mx, mn);
}

__device__ __forceinline__ void add_group(const SplitParams& p, int64_t b, int64_t row, const RowStats& group) {
  if (group.max_abs != 0) atomicMax(p.row_max + b * p.rows_pad + row / p.base_rows, group.max_abs);
  if (group.min_nonzero_abs != kNoNonzero) atomicMin(p.row_min + b * p.rows_pad + row, group.min_nonzero_abs);
}

constexpr int kChunkBlocks = kStatsChunk / kScaleBlock;
static_assert(kStatsChunk % kScaleBlock == 0 && kScaleBlock == 64, "whole blocks per stats chunk");

__global__ void __launch_bounds__(256) split_block_stats_kernel(SplitParams p, int64_t batch_offset) {
  const StatsSpan span = stats_span(p, batch_offset);
  const int64_t b = span.b, r0 = span.r0, k_begin = span.k_begin, k_end = span.k_end;
  const float* x = span.x;
  const bool rows_fast = span.rows_fast;
  const int lane = threadIdx.x;
  if (!rows_fast) {  // a warp per row, lanes along K: block j is loads 2j and 2j + 1
#pragma unroll 1
    for (int j = 0; j < 4; ++j) {
      const int64_t row = r0 + threadIdx.y + 8 * j;
      if (row >= p.rows) continue;
      const float* xr = x + row * p.stride_r;
      float v[2 * kChunkBlocks];
#pragma unroll
      for (int u = 0; u < 2 * kChunkBlocks; ++u) {
        const int64_t k = k_begin + 32 * u + lane;
        v[u] = k < k_end ? xr[k * p.stride_k] : 0.0f;
      }
      RowStats group;
#pragma unroll
      for (int blk = 0; blk < kChunkBlocks; ++blk) {
        if (k_begin + kScaleBlock * blk >= k_end) break;
        RowStats stats;
        stats.add(v[2 * blk]);
        stats.add(v[2 * blk + 1]);
        uint32_t mx = stats.max_abs, mn = stats.min_nonzero_abs;
        warp_reduce(mx, mn);
        if (lane == 0) record_block(p, b, row, k_begin / kScaleBlock + blk, mx, mn, group);
      }
      if (lane == 0) add_group(p, b, row, group);
    }
    return;
  }
  // lane = row (B's columns), the 8 warps split each block's 64 values
  __shared__ uint32_t part_max[8][kSplitRows], part_min[8][kSplitRows];
  const int64_t row = r0 + lane;
  RowStats group;
#pragma unroll 1
  for (int blk = 0; blk < kChunkBlocks; ++blk) {
    const int64_t kb0 = k_begin + kScaleBlock * blk;
    if (kb0 >= k_end) break;  // uniform over the block
    RowStats stats;
    if (row < p.rows) add_strided(stats, x + row, p.stride_k, kb0 + threadIdx.y, min(k_end, kb0 + kScaleBlock), 8);
    part_max[threadIdx.y][lane] = stats.max_abs;
    part_min[threadIdx.y][lane] = stats.min_nonzero_abs;
    __syncthreads();
    if (threadIdx.y == 0 && row < p.rows) {
#pragma unroll
      for (int w = 1; w < 8; ++w) stats.merge(part_max[w][lane], part_min[w][lane]);
      record_block(p, b, row, kb0 / kScaleBlock, stats.max_abs, stats.min_nonzero_abs, group);
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && row < p.rows) add_group(p, b, row, group);
}

// Pass 2: 32 rows x kSplitK k per block (16 loads in flight per thread), written as two halves
// of 64 k so that a warp's stores stay 128-byte rows of each plane.
__global__ void __launch_bounds__(256) split_write_kernel(SplitParams p, int64_t batch_offset) {
  __shared__ float tile[kSplitRows][kSplitK + 1];
  __shared__ RowScale scales[kSplitK / kScaleBlock][kSplitRows];  // per 64 k (block mode)
  const int64_t b = batch_offset + blockIdx.z;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kSplitRows;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kSplitK;
  const bool rows_fast = p.stride_r == 1 && p.stride_k != 1;
  const int lane = threadIdx.x;
  if (threadIdx.y == 0 && p.scale == nullptr) {
    const int64_t at = b * p.rows_pad + r0 + lane;
    const RowScale s = row_scale(p.row_max[at], p.row_min[at]);
    scales[0][lane] = scales[1][lane] = s;
    if (blockIdx.y == 0) {
      p.exponent[at] = s.exponent;
      p.fallback[at] = s.fallback ? 1 : 0;
    }
  } else if (threadIdx.y == 0) {  // block mode: the two blocks' factors, in place of their statistics
    const int64_t row = r0 + lane, at = b * p.rows_pad + row;
    const int base = row < p.rows ? base_exponent(p.row_max[b * p.rows_pad + row / p.base_rows]) : 0;
    // with a base per row, a row that fits one exponent keeps it for every block (factors 1)
    const bool fits = p.base_rows == 1 && row < p.rows && !p.fallback[at] &&
                      !row_scale(p.row_max[at], p.row_min[at]).fallback;
    if (p.block_tiles != nullptr && row < p.rows && !fits && blockIdx.y == 0)
      p.block_tiles[at / kTileRows] = 1;
    if (blockIdx.y == 0) p.exponent[at] = base;
#pragma unroll
    for (int h = 0; h < kSplitK / kScaleBlock; ++h) {
      const int64_t kb = k0 / kScaleBlock + h;
      if (kb >= p.k_pad / kScaleBlock) break;
      float* slot = p.scale + (b * (p.k_pad / kScaleBlock) + kb) * p.rows_pad + row;
      RowScale s{0, false};
      float factor = 0.0f;
      if (fits) {
        s = RowScale{base, false};
        factor = 1.0f;
      } else if (row < p.rows) {
        const uint32_t bits = *reinterpret_cast<const uint32_t*>(slot);
        s = bits == kNoNonzero ? RowScale{0, true} : row_scale(bits, bits);
        factor = block_factor(s, base, p.max_shift);
        if (factor == 0.0f && bits != 0 && !s.fallback) {  // too far below the base
          s.fallback = true;
          p.fallback[at] = 1;
        }
      }
      *slot = factor;
      scales[h][lane] = s;
    }
  }
  load_split_tile<kSplitK>(p, p.x + b * p.stride_b, r0, k0, rows_fast, tile);
  __syncthreads();
#pragma unroll
  for (int half = 0; half < kSplitK / 64; ++half) {
    if (k0 + 64 * half >= p.k_pad) break;  // k_pad is a multiple of 64 only
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int row = threadIdx.y + 8 * j;
      const int kk = 64 * half + 2 * lane;
      uint16_t hi0, lo0, hi1, lo1;
      split_value(tile[row][kk], scales[half][row], hi0, lo0);
      split_value(tile[row][kk + 1], scales[half][row], hi1, lo1);
      const int64_t out = (b * p.rows_pad + r0 + row) * p.k_pad + k0 + kk;
      reinterpret_cast<uint32_t*>(p.hi)[out / 2] = uint32_t(hi0) | (uint32_t(hi1) << 16);
      reinterpret_cast<uint32_t*>(p.lo)[out / 2] = uint32_t(lo0) | (uint32_t(lo1) << 16);
    }
  }
}

// One pass: `rows` whole rows (k_pad values each, zeros past k and past p.rows) per block in
// shared memory; statistics reduced in the block; planes, exponent and fallback written (block
// mode with one base per row: each block's statistics by one thread, then the factors).
__global__ void __launch_bounds__(kResidentThreads) split_resident_kernel(SplitParams p, int rows,
                                                                          int64_t batch_offset) {
  extern __shared__ float held[];  // [rows][k_pad]
  __shared__ uint32_t part_max[kResidentThreads / 32], part_min[kResidentThreads / 32];
  __shared__ RowScale scale;
  __shared__ RowScale blocks[kResidentMaxBlocks];  // block mode: each block's exponent
  __shared__ uint32_t block_max[kResidentMaxBlocks];
  __shared__ int lost;                              // a block too far below the base
  __shared__ bool fits;                             // block mode: the row fits one exponent
  const int64_t b = batch_offset + blockIdx.z;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows;
  const float* x = p.x + b * p.stride_b;
  const int64_t k_pad = p.k_pad;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  for (int r = 0; r < rows; ++r) {
    const int64_t row = r0 + r;
    const float* xr = x + row * p.stride_r;
    float* hr = held + int64_t(r) * k_pad;
    const int64_t k_end = row < p.rows ? p.k : 0;
    for (int64_t k0 = tid; k0 < k_pad; k0 += int64_t(kResidentThreads) * kResidentLoads) {
      float v[kResidentLoads];
#pragma unroll
      for (int u = 0; u < kResidentLoads; ++u) {
        const int64_t k = k0 + int64_t(kResidentThreads) * u;
        v[u] = k < k_end ? xr[k] : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kResidentLoads; ++u) {
        const int64_t k = k0 + int64_t(kResidentThreads) * u;
        if (k < k_pad) hr[k] = v[u];
      }
    }
  }
  __syncthreads();
  for (int r = 0; r < rows; ++r) {
    const int64_t at = b * p.rows_pad + r0 + r;
    const float* hf = held + int64_t(r) * k_pad;
    const float2* hr = reinterpret_cast<const float2*>(hf);
    RowStats stats;
    if (p.scale == nullptr) {
      for (int64_t i = tid; i < k_pad / 2; i += kResidentThreads) {
        const float2 v = hr[i];
        stats.add(v.x);
        stats.add(v.y);
      }
    } else if (tid < k_pad / kScaleBlock) {  // block mode: thread j reduces block j
      RowStats mine;
#pragma unroll 8
      for (int u = 0; u < kScaleBlock; ++u)  // rotated start: the 32 lanes read 32 banks
        mine.add(hf[tid * kScaleBlock + ((u + tid) & (kScaleBlock - 1))]);
      const RowScale s = row_scale(mine.max_abs, mine.min_nonzero_abs);
      blocks[tid] = s;
      block_max[tid] = mine.max_abs;
      // the reduction below: the row's largest and smallest nonzero |x|, a block that falls
      // back counting as inf (the row falls back)
      stats.max_abs = s.fallback ? kAbsInfBits : mine.max_abs;
      stats.min_nonzero_abs = mine.min_nonzero_abs;
    }
    uint32_t mx = stats.max_abs, mn = stats.min_nonzero_abs;
    warp_reduce(mx, mn);
    if (lane == 0) {
      part_max[warp] = mx;
      part_min[warp] = mn;
    }
    __syncthreads();
    if (tid == 0) {
      RowStats all;
#pragma unroll
      for (int w = 0; w < kResidentThreads / 32; ++w) all.merge(part_max[w], part_min[w]);
      scale = row_scale(all.max_abs, all.min_nonzero_abs);
      // block mode: a row that fits one exponent keeps it (factors 1), others take their blocks'
      fits = p.scale == nullptr || !scale.fallback;
      if (!fits) {
        const bool flagged = all.max_abs >= kAbsInfBits;
        scale = RowScale{flagged ? 0 : base_exponent(all.max_abs), flagged};
        if (p.block_tiles != nullptr) p.block_tiles[at / kTileRows] = 1;
      }
      lost = 0;
    }
    __syncthreads();
    const RowScale s = scale;
    if (p.scale != nullptr && tid < k_pad / kScaleBlock) {
      float factor = 1.0f;
      if (fits) {
        blocks[tid] = s;
      } else {
        factor = block_factor(blocks[tid], s.exponent, p.max_shift);
        if (factor == 0.0f && block_max[tid] != 0) {
          blocks[tid].fallback = true;
          lost = 1;
        }
      }
      p.scale[(b * (k_pad / kScaleBlock) + tid) * p.rows_pad + r0 + r] = factor;
    }
    if (p.scale != nullptr) __syncthreads();
    if (tid == 0) {
      p.exponent[at] = s.exponent;
      p.fallback[at] = s.fallback || lost ? 1 : 0;
    }
    uint32_t* hi = reinterpret_cast<uint32_t*>(p.hi + at * k_pad);
    uint32_t* lo = reinterpret_cast<uint32_t*>(p.lo + at * k_pad);
    for (int64_t i = tid; i < k_pad / 2; i += kResidentThreads) {
      const float2 v = hr[i];
      const RowScale vs = p.scale == nullptr ? s : blocks[(2 * i) / kScaleBlock];
      uint16_t hi0, lo0, hi1, lo1;
      split_value(v.x, vs, hi0, lo0);
      split_value(v.y, vs, hi1, lo1);
      hi[i] = uint32_t(hi0) | (uint32_t(hi1) << 16);
      lo[i] = uint32_t(lo0) | (uint32_t(lo1) << 16);
    }
    __syncthreads();  // scale, blocks and part_* are reused by the next row
  }
}

// Absolute block mode (base_rows 0), x contiguous [rows, k] with k a multiple of 64: the 64-value
// blocks are consecutive chunks of x, each split on its own (split.h, absolute_block_factor), so
// one pass reads x once. A warp takes kChunksPerWarp chunks, a lane two values of each.
constexpr int kChunksPerWarp = 4;

__global__ void __launch_bounds__(256) split_chunks_kernel(SplitParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t blocks_per_row = p.k / kScaleBlock, chunks = p.rows * blocks_per_row;
  const float2* x = reinterpret_cast<const float2*>(p.x);
  float2 v[kChunksPerWarp];
#pragma unroll
  for (int j = 0; j < kChunksPerWarp; ++j) {
    const int64_t chunk = warp * kChunksPerWarp + j;
    v[j] = chunk < chunks ? __ldg(x + chunk * (kScaleBlock / 2) + lane) : make_float2(0.0f, 0.0f);
  }
#pragma unroll
  for (int j = 0; j < kChunksPerWarp; ++j) {
    const int64_t chunk = warp * kChunksPerWarp + j;
    if (chunk >= chunks) break;  // uniform over the warp
    RowStats stats;
    stats.add(v[j].x);
    stats.add(v[j].y);
    uint32_t mx = stats.max_abs, mn = stats.min_nonzero_abs;
    warp_reduce(mx, mn);
    RowScale s = row_scale(mx, mn);
    const float factor = absolute_block_factor(s);
    if (factor == 0.0f && mx != 0) s.fallback = true;
    uint16_t hi0, lo0, hi1, lo1;
    split_value(v[j].x, s, hi0, lo0);
    split_value(v[j].y, s, hi1, lo1);
    const int64_t out = chunk * (kScaleBlock / 2) + lane;  // k_pad == k: planes are x's layout
    reinterpret_cast<uint32_t*>(p.hi)[out] = uint32_t(hi0) | (uint32_t(hi1) << 16);
    reinterpret_cast<uint32_t*>(p.lo)[out] = uint32_t(lo0) | (uint32_t(lo1) << 16);
    if (lane == 0) {
      const int64_t row = chunk / blocks_per_row, kb = chunk - row * blocks_per_row;
      p.scale[kb * p.rows_pad + row] = factor;
      if (s.fallback) p.fallback[row] = 1;
    }
  }
}

}  // namespace

// Rows per block of the one-pass route (a divisor of kTileRows), 0 where it does not apply.
static int resident_rows(const SplitParams& p) {
  if ((p.stride_k != 1 && p.k > 1) || p.k_pad < kResidentMinK) return 0;
  if (p.scale != nullptr && p.base_rows != 1) return 0;  // a group's base needs every row first
  const int64_t row_bytes = p.k_pad * int64_t(sizeof(float));
  if (row_bytes > kResidentBytes) return 0;
  int rows = 1;  // more rows per block only while the grid keeps at least 512 blocks (small weights: one each)
  while (rows * 2 * row_bytes <= kResidentBytes && rows * 2 <= 8 && p.batch * p.rows_pad / (rows * 2) >= 512)
    rows *= 2;
  return rows;
}

cudaError_t launch_split(const SplitParams& p, cudaStream_t stream) {
  if (p.scale != nullptr && p.base_rows == 0) {  // absolute block mode
    if (p.batch != 1 || p.k % kScaleBlock != 0 || p.k_pad != p.k || p.stride_k != 1 || p.stride_r != p.k)
      return cudaErrorInvalidValue;
    const size_t rows_bytes = size_t(p.rows_pad) * sizeof(int32_t);
    cudaError_t err = cudaMemsetAsync(p.fallback, 0, rows_bytes, stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(p.exponent, 0, rows_bytes, stream);
    if (err != cudaSuccess) return err;
    const int64_t warps = (p.rows * (p.k / kScaleBlock) + kChunksPerWarp - 1) / kChunksPerWarp;
    if (warps == 0) return cudaSuccess;
    split_chunks_kernel<<<static_cast<unsigned>((warps + 7) / 8), 256, 0, stream>>>(p);
    return cudaGetLastError();
  }
  if (p.block_tiles != nullptr) {
    cudaError_t err = cudaMemsetAsync(p.block_tiles, 0, size_t(p.batch * (p.rows_pad / kTileRows)) * sizeof(int32_t),
                                      stream);
    if (err != cudaSuccess) return err;
  }
  static_assert(kTileK % 64 == 0 && kSplitK % 64 == 0 && kTileRows % kSplitRows == 0,
                "planes hold whole tiles, written 64 k at a time");
  static_assert(kTileK % 2 == 0 && kTileRows % 8 == 0, "the one-pass route writes pairs, 8 rows at most");
  const int rows = resident_rows(p);
  if (rows > 0) {
    const size_t bytes = size_t(rows) * size_t(p.k_pad) * sizeof(float);
    cudaError_t err = raise_smem_limit(reinterpret_cast<const void*>(split_resident_kernel), kResidentBytes);
    if (err != cudaSuccess) return err;
    for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridYZ) {
      const int64_t nb = p.batch - b0 < kMaxGridYZ ? p.batch - b0 : kMaxGridYZ;
      split_resident_kernel<<<dim3(static_cast<unsigned>(p.rows_pad / rows), 1, static_cast<unsigned>(nb)),
                              kResidentThreads, bytes, stream>>>(p, rows, b0);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  const size_t stat_bytes = size_t(p.batch * p.rows_pad) * sizeof(uint32_t);
  cudaError_t err = cudaMemsetAsync(p.row_max, 0, stat_bytes, stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(p.row_min, 0xff, stat_bytes, stream);  // kNoNonzero
  if (err == cudaSuccess && p.scale != nullptr)  // block mode: blocks flag their rows
    err = cudaMemsetAsync(p.fallback, 0, stat_bytes, stream);
  if (err != cudaSuccess) return err;
  const int64_t k_chunks = (p.k + kStatsChunk - 1) / kStatsChunk;
  const int64_t k_blocks = (p.k_pad + kSplitK - 1) / kSplitK;
  if (k_chunks > kMaxGridYZ || k_blocks > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 block(32, 8);
  for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridYZ) {
    const int64_t nb = p.batch - b0 < kMaxGridYZ ? p.batch - b0 : kMaxGridYZ;
    const unsigned row_blocks = static_cast<unsigned>(p.rows_pad / kSplitRows);
    const dim3 grid(row_blocks, static_cast<unsigned>(k_chunks), static_cast<unsigned>(nb));
    if (p.scale == nullptr)
      split_stats_kernel<<<grid, block, 0, stream>>>(p, b0);
    else
      split_block_stats_kernel<<<grid, block, 0, stream>>>(p, b0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    split_write_kernel<<<dim3(row_blocks, static_cast<unsigned>(k_blocks),
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
