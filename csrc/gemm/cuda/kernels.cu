// CUDA kernels of the 3xfp16 emulated fp32 GEMM: the split, the tensor-core product
// (mma.sync m16n8k16, fp32 accumulation promoted out of the tensor core every k-tile) and
// the exact fp64 path for fallback rows/columns. Torch-free: see kernels.h.
#include "kernels.h"

#include <cuda_fp16.h>

#include "../split.h"

namespace torch_hpc {
namespace gemm {
namespace cuda {
namespace {

constexpr int kMaxGridYZ = 65535;
constexpr int kMaxDevices = 64;

// ---------------------------------------------------------------------------------------
// Split: one block of 32x8 threads per 32 rows. Pass 1 finds each row's range, pass 2
// writes hi/lo with K contiguous. Tiles go through shared memory so that both global reads
// (whichever of the row/k strides is unit) and the plane writes are coalesced.
constexpr int kSplitRows = 32;

__device__ __forceinline__ void load_split_tile(const SplitParams& p, const float* x, int64_t r0,
                                                int64_t k0, bool rows_fast,
                                                float (&tile)[kSplitRows][kSplitRows + 1]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int slow = threadIdx.y + 8 * j;
    const int fast = threadIdx.x;
    const int row = rows_fast ? fast : slow;
    const int kk = rows_fast ? slow : fast;
    const int64_t r = r0 + row, k = k0 + kk;
    tile[row][kk] = (r < p.rows && k < p.k) ? x[r * p.stride_r + k * p.stride_k] : 0.0f;
  }
}

__global__ void __launch_bounds__(256) split_kernel(SplitParams p, int64_t batch_offset) {
  __shared__ float tile[kSplitRows][kSplitRows + 1];
  __shared__ RowScale scales[kSplitRows];
  const int64_t b = batch_offset + blockIdx.y;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kSplitRows;
  const float* x = p.x + b * p.stride_b;
  const bool rows_fast = p.stride_r == 1 && p.stride_k != 1;
  const int lane = threadIdx.x;

  RowStats stats[4];
  for (int64_t k0 = 0; k0 < p.k; k0 += kSplitRows) {
    load_split_tile(p, x, r0, k0, rows_fast, tile);
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
    if (lane == 0) {
      const int row = threadIdx.y + 8 * j;
      const RowScale s = row_scale(mx, mn);
      scales[row] = s;
      const int64_t out = b * p.rows_pad + r0 + row;
      p.exponent[out] = s.exponent;
      p.fallback[out] = s.fallback ? 1 : 0;
    }
  }
  __syncthreads();

  for (int64_t k0 = 0; k0 < p.k_pad; k0 += kSplitRows) {
    load_split_tile(p, x, r0, k0, rows_fast, tile);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int row = threadIdx.y + 8 * j;
      uint16_t hi, lo;
      split_value(tile[row][lane], scales[row], hi, lo);
      const int64_t out = (b * p.rows_pad + r0 + row) * p.k_pad + k0 + lane;
      p.hi[out] = hi;
      p.lo[out] = lo;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------
// Tensor-core product. Block tile 128x128x32, 8 warps (2 along M x 4 along N, 64x32 each),
// 3-stage cp.async pipeline. Per k-tile each warp computes, in one fresh fp32 fragment,
//   f = 2^-11 (hi_a lo_b + lo_a hi_b);  f += hi_a hi_b;  acc += f   (promotion, fp32 RN)
// so the tensor core never accumulates more than one k-tile of the main product.
constexpr int kBM = kTileRows, kBN = kTileRows, kBK = kTileK;
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
// products of the original fp32 values (exact products, one final rounding to fp32), so
// inf/NaN follow IEEE fp64 and finite results beyond fp32 become +-inf. Blocks whose rows and
// columns are all regular exit at once: no host synchronisation is needed to find the work.
__global__ void __launch_bounds__(256) fallback_kernel(GemmParams p, int64_t batch_offset) {
  __shared__ int32_t fa[32], fb[32];
  const int64_t b = batch_offset + blockIdx.z;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * 32;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * 32;
  const int tx = threadIdx.x, ty = threadIdx.y;
  int flagged = 0;
  if (ty == 0) {
    fa[tx] = (m0 + tx < p.m) ? p.a_fallback[b * p.m_pad + m0 + tx] : 0;
    fb[tx] = (n0 + tx < p.n) ? p.b_fallback[b * p.n_pad + n0 + tx] : 0;
    flagged = fa[tx] | fb[tx];
  }
  if (!__syncthreads_or(flagged)) return;
  const float* a = p.a_orig + b * p.a_stride_b;
  const float* bm = p.b_orig + b * p.b_stride_b;
  const int64_t col = n0 + tx;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int r = ty + 8 * j;
    const int64_t row = m0 + r;
    if (row >= p.m || col >= p.n || !(fa[r] | fb[tx])) continue;
    double s = 0.0;
    for (int64_t k = 0; k < p.k; ++k)
      s = fma(static_cast<double>(a[row * p.a_stride_m + k * p.a_stride_k]),
              static_cast<double>(bm[k * p.b_stride_k + col * p.b_stride_n]), s);
    p.c[b * p.c_stride_b + row * p.c_stride_m + col * p.c_stride_n] = static_cast<float>(s);
  }
}

}  // namespace

cudaError_t launch_split(const SplitParams& p, cudaStream_t stream) {
  const dim3 block(32, 8);
  for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridYZ) {
    const int64_t nb = p.batch - b0 < kMaxGridYZ ? p.batch - b0 : kMaxGridYZ;
    const dim3 grid(static_cast<unsigned>(p.rows_pad / kSplitRows), static_cast<unsigned>(nb));
    split_kernel<<<grid, block, 0, stream>>>(p, b0);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t launch_gemm(const GemmParams& p, cudaStream_t stream) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static bool smem_raised[kMaxDevices] = {};
  if (device >= kMaxDevices) return cudaErrorInvalidDevice;
  if (!smem_raised[device]) {
    err = cudaFuncSetAttribute(gemm_sm80_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(kGemmSmemBytes));
    if (err != cudaSuccess) return err;
    smem_raised[device] = true;
  }
  const int64_t n_tiles = p.n_pad / kBN;
  if (n_tiles > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridYZ) {
    const int64_t nb = p.batch - b0 < kMaxGridYZ ? p.batch - b0 : kMaxGridYZ;
    const dim3 grid(static_cast<unsigned>(p.m_pad / kBM), static_cast<unsigned>(n_tiles),
                    static_cast<unsigned>(nb));
    gemm_sm80_kernel<<<grid, kGemmThreads, kGemmSmemBytes, stream>>>(p, b0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const dim3 fgrid(static_cast<unsigned>((p.m + 31) / 32), static_cast<unsigned>((p.n + 31) / 32),
                     static_cast<unsigned>(nb));
    if (fgrid.y > kMaxGridYZ) return cudaErrorInvalidConfiguration;
    fallback_kernel<<<fgrid, dim3(32, 8), 0, stream>>>(p, b0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace gemm
}  // namespace torch_hpc
