// Pieces shared by the attention kernels (attention_fwd.cu, attention_bwd.cu): shared-memory
// tile loads, operand fragments and the three-product emulated mma (ptx.cuh's mma.sync).
#pragma once

#include <cuda_fp16.h>
#include <math_constants.h>

#include <cstdint>

#include "attention.h"
#include "ptx.cuh"

namespace torch_hpc {
namespace gemm {
namespace cuda {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLoScale = 1.0f / 2048.0f;  // 2^-11: the lo planes' weight
constexpr float kProbScale = 14.0f;         // probabilities are split as p * 2^14
__device__ __forceinline__ float inf() { return CUDART_INF_F; }

template <int DP>
struct Layout {
  static constexpr int kLds = DP + 8;  // padded shared-memory row (halves): conflict-free ldmatrix
  static constexpr int kTile = kAttnTile * kLds;  // one plane of a 64-row tile
};

// rows x DP halves of a plane (rows of DP halves) into shared memory rows of kLds, by cp.async.
template <int DP, int Threads>
__device__ __forceinline__ void load_tile(uint16_t* dst, const uint16_t* src, int rows) {
  constexpr int kChunks = DP / 8;
  for (int i = threadIdx.x; i < rows * kChunks; i += Threads) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    ptx::cp_async16(dst + r * Layout<DP>::kLds + c, src + int64_t(r) * DP + c);
  }
}

// Fragments for mma_16816 from shared-memory tiles whose rows are `ld` halves long.
// A (16x16) of a tile stored [m][k]: rows m0.., columns k0...
__device__ __forceinline__ void a_frag(uint32_t (&r)[4], const uint16_t* tile, int ld, int m0, int k0, int lane) {
  ptx::ldmatrix_x4(r, tile + (m0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8);
}
// A of a tile stored [k][m] (transposed).
__device__ __forceinline__ void a_frag_trans(uint32_t (&r)[4], const uint16_t* tile, int ld, int m0, int k0,
                                             int lane) {
  const int i = lane >> 3;
  ptx::ldmatrix_x4_trans(r, tile + (k0 + (i >> 1) * 8 + (lane & 7)) * ld + m0 + (i & 1) * 8);
}
// B of two n8 tiles (n0.., n0 + 8..) of a tile stored [n][k]: {r0, r1}, {r2, r3}.
__device__ __forceinline__ void b_frags(uint32_t (&r)[4], const uint16_t* tile, int ld, int n0, int k0, int lane) {
  ptx::ldmatrix_x4(r, tile + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
}
// B of two n8 tiles of a tile stored [k][n] (transposed).
__device__ __forceinline__ void b_frags_trans(uint32_t (&r)[4], const uint16_t* tile, int ld, int n0, int k0,
                                              int lane) {
  ptx::ldmatrix_x4_trans(r, tile + (k0 + ((lane >> 3) & 1) * 8 + (lane & 7)) * ld + n0 + (lane >> 4) * 8);
}

// (x, y) -> fp16 pairs hi and lo with x = hi + 2^-11 lo (to fp32 rounding of the residual).
__device__ __forceinline__ void split_pair(float x, float y, uint32_t& hi, uint32_t& lo) {
  const __half2 h = __floats2half2_rn(x, y);
  const float2 back = __half22float2(h);
  const __half2 l = __floats2half2_rn((x - back.x) * 2048.0f, (y - back.y) * 2048.0f);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = *reinterpret_cast<const uint32_t*>(&l);
}

// A fragments (hi, lo) of k16 step t from accumulator tiles c[2t], c[2t + 1] of a 16-row strip.
__device__ __forceinline__ void c_to_a(const float (&c0)[4], const float (&c1)[4], uint32_t (&hi)[4],
                                       uint32_t (&lo)[4]) {
  split_pair(c0[0], c0[1], hi[0], lo[0]);
  split_pair(c0[2], c0[3], hi[1], lo[1]);
  split_pair(c1[0], c1[1], hi[2], lo[2]);
  split_pair(c1[2], c1[3], hi[3], lo[3]);
}

template <int N>
__device__ __forceinline__ void zero(float (&f)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) f[i][e] = 0.0f;
}
template <int N>
__device__ __forceinline__ void scale_all(float (&f)[N][4], float s) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) f[i][e] *= s;
}

// 2^(floor(log2 m) - 14) for a finite m > 0 (1 otherwise), clamped to normal floats: the
// split factor that puts m into [2^14, 2^15).
__device__ __forceinline__ int split_exponent(float m) {
  const uint32_t bits = __float_as_uint(m);
  if (!(m > 0.0f) || bits >= 0x7f800000u) return 0;
  const int e = (bits >> 23) == 0 ? -127 - 14 : int(bits >> 23) - 127 - 14;
  return max(e, -126);
}
__device__ __forceinline__ float pow2(int e) { return __uint_as_float(uint32_t(127 + e) << 23); }

}  // namespace attn
}  // namespace cuda
}  // namespace gemm
}  // namespace torch_hpc
