// CUDA kernels of the 3xfp16 emulated fp32 GEMM: the split, the tensor-core product
// (mma.sync m16n8k16, fp32 accumulation promoted out of the tensor core every k-tile) and
// the exact fp64 path for fallback rows/columns. Torch-free: see kernels.h.
#include "kernels.h"

#include <cuda_fp16.h>

#include <cstdlib>
#include <cstring>

#include "../split.h"

namespace torch_hpc {
namespace gemm {
namespace cuda {
namespace {

constexpr int kMaxGridYZ = 65535;
constexpr int kMaxDevices = 64;

// ---------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------
// Tensor-core product. Block tile 128x128x32, 8 warps (2 along M x 4 along N, 64x32 each),
// 3-stage cp.async pipeline. Per k-tile each warp computes, in one fresh fp32 fragment,
//   f = 2^-11 (hi_a lo_b + lo_a hi_b);  f += hi_a hi_b;  acc += f   (promotion, fp32 RN)
// so the tensor core never accumulates more than one k-tile of the main product.
constexpr int kBM = kTileRows, kBN = kTileRows, kBK = 32;
static_assert(kTileK % kBK == 0, "planes are padded to whole k-tiles");
constexpr int kStages = 3;
constexpr int kLds = kBK + 8;  // padded row (80 B): conflict-free ldmatrix
constexpr int kPlaneElems = kBM * kLds;
constexpr int kStageElems = 4 * kPlaneElems;  // a_hi, a_lo, b_hi, b_lo
constexpr int kGemmThreads = 256;
constexpr size_t kGemmSmemBytes = size_t(kStages) * kStageElems * sizeof(uint16_t);

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

struct GemmBatchPtrs {
  const uint16_t *a_hi, *a_lo, *b_hi, *b_lo;
};

__device__ __forceinline__ void load_stage(uint16_t* stage, const GemmBatchPtrs& g, int64_t m0,
                                           int64_t n0, int64_t k0, int64_t k_pad) {
  const int t = threadIdx.x;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int chunk = t + i * kGemmThreads;  // 512 chunks of 16 B per plane
    const int row = chunk >> 2, col = (chunk & 3) * 8;
    const int64_t a_off = (m0 + row) * k_pad + k0 + col;
    const int64_t b_off = (n0 + row) * k_pad + k0 + col;
    cp_async16(stage + 0 * kPlaneElems + row * kLds + col, g.a_hi + a_off);
    cp_async16(stage + 1 * kPlaneElems + row * kLds + col, g.a_lo + a_off);
    cp_async16(stage + 2 * kPlaneElems + row * kLds + col, g.b_hi + b_off);
    cp_async16(stage + 3 * kPlaneElems + row * kLds + col, g.b_lo + b_off);
  }
}

// A fragments of the warp's four m16 tiles and B fragments of its four n8 tiles, one k16 step.
__device__ __forceinline__ void load_a_frags(uint32_t (&a)[4][4], const uint16_t* plane, int warp_m,
                                             int ks, int lane) {
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
    const int row = warp_m * 64 + mi * 16 + (lane & 15);
    const int col = ks + (lane >> 4) * 8;
    ldmatrix_x4(a[mi], plane + row * kLds + col);
  }
}
__device__ __forceinline__ void load_b_frags(uint32_t (&b)[4][2], const uint16_t* plane, int warp_n,
                                             int ks, int lane) {
#pragma unroll
  for (int np = 0; np < 2; ++np) {
    const int row = warp_n * 32 + np * 16 + (lane & 7) + (lane >> 4) * 8;
    const int col = ks + ((lane >> 3) & 1) * 8;
    uint32_t r[4];
    ldmatrix_x4(r, plane + row * kLds + col);
    b[2 * np][0] = r[0];
    b[2 * np][1] = r[1];
    b[2 * np + 1][0] = r[2];
    b[2 * np + 1][1] = r[3];
  }
}

__global__ void __launch_bounds__(kGemmThreads, 1) gemm_sm80_kernel(GemmParams p, int64_t batch_offset) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) uint16_t smem[];
  const int64_t b = batch_offset + blockIdx.z;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int64_t a_plane = p.m_pad * p.k_pad, b_plane = p.n_pad * p.k_pad;
  const GemmBatchPtrs g{p.a_hi + b * a_plane, p.a_lo + b * a_plane, p.b_hi + b * b_plane,
                        p.b_lo + b * b_plane};
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warp_m = warp >> 2, warp_n = warp & 3;
  const int k_tiles = static_cast<int>(p.k_pad / kBK);

  float acc[4][4][4];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(smem + s * kStageElems, g, m0, n0, int64_t(s) * kBK, p.k_pad);
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < k_tiles)
      load_stage(smem + (next % kStages) * kStageElems, g, m0, n0, int64_t(next) * kBK, p.k_pad);
    cp_async_commit();

    const uint16_t* stage = smem + (kt % kStages) * kStageElems;
    const uint16_t* s_ahi = stage;
    const uint16_t* s_alo = stage + kPlaneElems;
    const uint16_t* s_bhi = stage + 2 * kPlaneElems;
    const uint16_t* s_blo = stage + 3 * kPlaneElems;

    float f[4][4][4];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) f[mi][ni][e] = 0.0f;

#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      uint32_t ahi[4][4], alo[4][4], bhi[4][2], blo[4][2];
      load_a_frags(ahi, s_ahi, warp_m, ks, lane);
      load_a_frags(alo, s_alo, warp_m, ks, lane);
      load_b_frags(bhi, s_bhi, warp_n, ks, lane);
      load_b_frags(blo, s_blo, warp_n, ks, lane);
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          mma_16816(f[mi][ni], ahi[mi], blo[ni][0], blo[ni][1]);
          mma_16816(f[mi][ni], alo[mi], bhi[ni][0], bhi[ni][1]);
        }
    }
    constexpr float kLoScale = 1.0f / float(1 << kLoShift);
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) f[mi][ni][e] *= kLoScale;
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      uint32_t ahi[4][4], bhi[4][2];
      load_a_frags(ahi, s_ahi, warp_m, ks, lane);
      load_b_frags(bhi, s_bhi, warp_n, ks, lane);
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_16816(f[mi][ni], ahi[mi], bhi[ni][0], bhi[ni][1]);
    }
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mi][ni][e] += f[mi][ni][e];
  }
  cp_async_wait<0>();

  const int32_t* ea = p.a_exponent + b * p.m_pad;
  const int32_t* eb = p.b_exponent + b * p.n_pad;
  float* c = p.c + b * p.c_stride_b;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = m0 + warp_m * 64 + mi * 16 + (lane >> 2) + half * 8;
      if (row >= p.m) continue;
      const int e_row = ea[row];
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int64_t col = n0 + warp_n * 32 + ni * 8 + (lane & 3) * 2 + j;
          if (col < p.n)
            c[row * p.c_stride_m + col * p.c_stride_n] =
                ldexpf(acc[mi][ni][half * 2 + j], e_row + eb[col]);
        }
      }
    }
  }
#endif
}

// ---------------------------------------------------------------------------------------
// Exact path: outputs whose row of A or column of B fell back are recomputed as fp64 dot
// products of the original fp32 values (exact products summed in k order, one final rounding
// to fp32), so inf/NaN follow IEEE fp64 and finite results beyond fp32 become +-inf. Random
// data has such rows too (one entry of N(0,1) in ~10^8 lies 28 binades below its row's
// maximum), so the work is found on the GPU without a host round trip: collect_fallback lists
// the flagged rows and columns, and fallback_kernel's blocks sweep 32 listed rows x 32 columns
// (then 32 rows x 32 listed columns) as tiled fp64 products.
constexpr int kFallbackTile = 32;

__global__ void __launch_bounds__(256) collect_fallback_kernel(GemmParams p, int64_t batch_offset) {
  const int64_t b = batch_offset + blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < p.m && p.a_fallback[b * p.m_pad + i])
    p.fallback_rows[b * p.m_pad + atomicAdd(&p.fallback_counts[2 * b], 1)] = static_cast<int32_t>(i);
  if (i < p.n && p.b_fallback[b * p.n_pad + i])
    p.fallback_cols[b * p.n_pad + atomicAdd(&p.fallback_counts[2 * b + 1], 1)] = static_cast<int32_t>(i);
}

__global__ void __launch_bounds__(1024) fallback_kernel(GemmParams p, int64_t batch_offset) {
  constexpr int T = kFallbackTile;
  __shared__ float sa[T][T + 1], sb[T][T + 1];
  __shared__ int32_t rows[T], cols[T];
  const int64_t b = batch_offset + blockIdx.y;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t n_rows = p.fallback_counts[2 * b], n_cols = p.fallback_counts[2 * b + 1];
  const int64_t col_tiles = (p.n + T - 1) / T, row_tiles = (p.m + T - 1) / T;
  const int64_t row_items = (n_rows + T - 1) / T * col_tiles;
  const int64_t items = row_items + (n_cols + T - 1) / T * row_tiles;
  const float* a = p.a_orig + b * p.a_stride_b;
  const float* bm = p.b_orig + b * p.b_stride_b;
  const int32_t* a_flag = p.a_fallback + b * p.m_pad;
  const bool a_k_fast = p.a_stride_k == 1, b_n_fast = p.b_stride_n == 1;

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const bool listed_rows = item < row_items;
    if (ty == 0) {
      if (listed_rows) {
        const int64_t g = item / col_tiles, tile = item % col_tiles;
        rows[tx] = g * T + tx < n_rows ? p.fallback_rows[b * p.m_pad + g * T + tx] : -1;
        cols[tx] = tile * T + tx < p.n ? static_cast<int32_t>(tile * T + tx) : -1;
      } else {
        const int64_t g = (item - row_items) / row_tiles, tile = (item - row_items) % row_tiles;
        const int32_t row = tile * T + tx < p.m ? static_cast<int32_t>(tile * T + tx) : -1;
        // rows that fell back themselves were done by the listed-row items
        rows[tx] = row >= 0 && !a_flag[row] ? row : -1;
        cols[tx] = g * T + tx < n_cols ? p.fallback_cols[b * p.n_pad + g * T + tx] : -1;
      }
    }
    __syncthreads();
    double s = 0.0;
    for (int64_t k0 = 0; k0 < p.k; k0 += T) {
      {  // sa[r][kk] = A[rows[r], k0 + kk], read along whichever of A's strides is unit
        const int r = a_k_fast ? ty : tx, kk = a_k_fast ? tx : ty;
        const int64_t k = k0 + kk;
        sa[r][kk] = rows[r] >= 0 && k < p.k ? a[rows[r] * p.a_stride_m + k * p.a_stride_k] : 0.0f;
      }
      {  // sb[kk][c] = B[k0 + kk, cols[c]]
        const int c = b_n_fast ? tx : ty, kk = b_n_fast ? ty : tx;
        const int64_t k = k0 + kk;
        sb[kk][c] = cols[c] >= 0 && k < p.k ? bm[k * p.b_stride_k + cols[c] * p.b_stride_n] : 0.0f;
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < T; ++kk)
        if (k0 + kk < p.k) s = fma(static_cast<double>(sa[ty][kk]), static_cast<double>(sb[kk][tx]), s);
      __syncthreads();
    }
    if (rows[ty] >= 0 && cols[tx] >= 0)
      p.c[b * p.c_stride_b + rows[ty] * p.c_stride_m + cols[tx] * p.c_stride_n] = static_cast<float>(s);
    __syncthreads();
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

cudaError_t choose_gemm_kernel(int device, GemmKernel* kernel) {
  *kernel = GemmKernel::sm80;
  const char* forced = std::getenv("TORCH_HPC_GEMM_KERNEL");
  if (forced != nullptr && std::strcmp(forced, "sm80") == 0) return cudaSuccess;
  int major = 0, minor = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) return err;
  if (major == 9 && minor == 0 && sm90_kernel_built()) *kernel = GemmKernel::sm90;
  return cudaSuccess;
}

cudaError_t launch_gemm(const GemmParams& p, GemmKernel kernel, cudaStream_t stream) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device >= kMaxDevices) return cudaErrorInvalidDevice;
  if (p.n_pad / kBN > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  int sms = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  if (kernel == GemmKernel::sm90) {
    err = launch_gemm_sm90(p, sms, stream);
    if (err != cudaSuccess) return err;
  } else {
    static bool smem_raised[kMaxDevices] = {};
    if (!smem_raised[device]) {
      err = cudaFuncSetAttribute(gemm_sm80_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(kGemmSmemBytes));
      if (err != cudaSuccess) return err;
      smem_raised[device] = true;
    }
    for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridYZ) {
      const int64_t nb = p.batch - b0 < kMaxGridYZ ? p.batch - b0 : kMaxGridYZ;
      const dim3 grid(static_cast<unsigned>(p.m_pad / kBM), static_cast<unsigned>(p.n_pad / kBN),
                      static_cast<unsigned>(nb));
      gemm_sm80_kernel<<<grid, kGemmThreads, kGemmSmemBytes, stream>>>(p, b0);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  err = cudaMemsetAsync(p.fallback_counts, 0, size_t(2 * p.batch) * sizeof(int32_t), stream);
  if (err != cudaSuccess) return err;
  const int64_t list_len = p.m_pad > p.n_pad ? p.m_pad : p.n_pad;
  for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridYZ) {
    const int64_t nb = p.batch - b0 < kMaxGridYZ ? p.batch - b0 : kMaxGridYZ;
    collect_fallback_kernel<<<dim3(static_cast<unsigned>((list_len + 255) / 256),
                                   static_cast<unsigned>(nb)), 256, 0, stream>>>(p, b0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    // Two blocks of 1024 threads per SM, spread over the batch; blocks without work exit.
    const int64_t per_batch = (2 * int64_t(sms) + nb - 1) / nb;
    fallback_kernel<<<dim3(static_cast<unsigned>(per_batch), static_cast<unsigned>(nb)),
                      dim3(kFallbackTile, kFallbackTile), 0, stream>>>(p, b0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace gemm
}  // namespace torch_hpc
