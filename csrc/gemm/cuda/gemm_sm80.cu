// sm80 GEMM stage: the tensor-core product on mma.sync m16n8k16 (any GPU of compute capability
// >= 8.0), fp32 accumulation promoted out of the tensor core every k-tile. Torch-free: see
// kernels.h.
#include "kernels.h"

#include "../split.h"
#include "ptx.cuh"

namespace torch_hpc {
namespace gemm {
namespace cuda {
namespace {

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
    ptx::cp_async16(stage + 0 * kPlaneElems + row * kLds + col, g.a_hi + a_off);
    ptx::cp_async16(stage + 1 * kPlaneElems + row * kLds + col, g.a_lo + a_off);
    ptx::cp_async16(stage + 2 * kPlaneElems + row * kLds + col, g.b_hi + b_off);
    ptx::cp_async16(stage + 3 * kPlaneElems + row * kLds + col, g.b_lo + b_off);
  }
}

// A fragments of the warp's four m16 tiles and B fragments of its four n8 tiles, one k16 step.
__device__ __forceinline__ void load_a_frags(uint32_t (&a)[4][4], const uint16_t* plane, int warp_m,
                                             int ks, int lane) {
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
    const int row = warp_m * 64 + mi * 16 + (lane & 15);
    const int col = ks + (lane >> 4) * 8;
    ptx::ldmatrix_x4(a[mi], plane + row * kLds + col);
  }
}
__device__ __forceinline__ void load_b_frags(uint32_t (&b)[4][2], const uint16_t* plane, int warp_n,
                                             int ks, int lane) {
#pragma unroll
  for (int np = 0; np < 2; ++np) {
    const int row = warp_n * 32 + np * 16 + (lane & 7) + (lane >> 4) * 8;
    const int col = ks + ((lane >> 3) & 1) * 8;
    uint32_t r[4];
    ptx::ldmatrix_x4(r, plane + row * kLds + col);
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
    ptx::cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    ptx::cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < k_tiles)
      load_stage(smem + (next % kStages) * kStageElems, g, m0, n0, int64_t(next) * kBK, p.k_pad);
    ptx::cp_async_commit();

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
          ptx::mma_16816(f[mi][ni], ahi[mi], blo[ni][0], blo[ni][1]);
          ptx::mma_16816(f[mi][ni], alo[mi], bhi[ni][0], bhi[ni][1]);
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
        for (int ni = 0; ni < 4; ++ni) ptx::mma_16816(f[mi][ni], ahi[mi], bhi[ni][0], bhi[ni][1]);
    }
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mi][ni][e] += f[mi][ni][e];
  }
  ptx::cp_async_wait<0>();

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

}  // namespace

cudaError_t launch_gemm_sm80(const GemmParams& p, cudaStream_t stream) {
  if (p.n_pad / kBN > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  cudaError_t err = raise_smem_limit(reinterpret_cast<const void*>(gemm_sm80_kernel), kGemmSmemBytes);
  if (err != cudaSuccess) return err;
  for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridYZ) {
    const int64_t nb = p.batch - b0 < kMaxGridYZ ? p.batch - b0 : kMaxGridYZ;
    const dim3 grid(static_cast<unsigned>(p.m_pad / kBM), static_cast<unsigned>(p.n_pad / kBN),
                    static_cast<unsigned>(nb));
    gemm_sm80_kernel<<<grid, kGemmThreads, kGemmSmemBytes, stream>>>(p, b0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace gemm
}  // namespace torch_hpc
