// Attention backward stage (flash-style): per CTA 64 keys (8 warps) against 64-query tiles of q
// and the output gradient. Per tile, with P recomputed from the saved log-sum-exp:
//   phase 1, warp = 16 keys x 32 queries: s^T = k q^T, dP^T = v dO^T, P^T, dS^T = P^T (dP^T - delta)
//   phase 2, warp = 16 keys x dim/2:     dV += P^T dO, dK += scale dS^T q
//   phase 3, warp = 16 queries x dim/2:  dQ += scale dS k (fp32 atomics into dq_accum)
// Every product is three fp16 products in a fresh fragment per tile, promoted into fp32 (as in
// attention_fwd.cu). P^T is split as P * 2^14, dS^T under one power of two per tile (its largest
// entry in [2^14, 2^15)); both go through shared memory for phases 2 and 3. Torch-free: see
// attention.h.
#include "attention_common.cuh"
#include "kernels.h"

namespace torch_hpc {
namespace gemm {
namespace cuda {
namespace {

using namespace attn;

constexpr int kBwdThreads = 256;
constexpr int kLdsP = kAttnTile + 8;  // rows of the P^T and dS^T tiles: 64 queries
constexpr int kPTile = kAttnTile * kLdsP;

template <int DP>
struct Bwd {
  static constexpr int kTile = Layout<DP>::kTile;
  // k hi/lo, v hi/lo, q hi/lo, dout hi/lo, then P^T hi/lo, dS^T hi/lo
  static constexpr int kHalves = 8 * kTile + 4 * kPTile;
  static constexpr size_t kSmemBytes = size_t(kHalves) * sizeof(uint16_t) + (2 * kAttnTile + 8) * sizeof(float);
};

// A fragments (hi, lo) of a 16-row strip over 64 k (four k16 steps) from a [m][k] tile, or, with
// Trans, from a [k][m] tile.
template <bool Trans>
__device__ __forceinline__ void a_strip(uint32_t (&ah)[4][4], uint32_t (&al)[4][4], const uint16_t* hi,
                                        const uint16_t* lo, int m0, int lane) {
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    if constexpr (Trans) {
      a_frag_trans(ah[t], hi, kLdsP, m0, 16 * t, lane);
      a_frag_trans(al[t], lo, kLdsP, m0, 16 * t, lane);
    } else {
      a_frag(ah[t], hi, kLdsP, m0, 16 * t, lane);
      a_frag(al[t], lo, kLdsP, m0, 16 * t, lane);
    }
  }
}

// f[2] (two n8 tiles, columns col..) = 3-product of A (a_strip) and B rows 0..63 of [k][n] tiles
// with rows ld halves long.
__device__ __forceinline__ void emulated_pair(float (&f)[2][4], const uint32_t (&ah)[4][4], const uint32_t (&al)[4][4],
                                              const uint16_t* b_hi, const uint16_t* b_lo, int ld, int col, int lane) {
  zero(f);
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    uint32_t r[4];
    b_frags_trans(r, b_lo, ld, col, 16 * t, lane);
    ptx::mma_16816(f[0], ah[t], r[0], r[1]);
    ptx::mma_16816(f[1], ah[t], r[2], r[3]);
    b_frags_trans(r, b_hi, ld, col, 16 * t, lane);
    ptx::mma_16816(f[0], al[t], r[0], r[1]);
    ptx::mma_16816(f[1], al[t], r[2], r[3]);
  }
  scale_all(f, kLoScale);
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    uint32_t r[4];
    b_frags_trans(r, b_hi, ld, col, 16 * t, lane);
    ptx::mma_16816(f[0], ah[t], r[0], r[1]);
    ptx::mma_16816(f[1], ah[t], r[2], r[3]);
  }
}

// acc (16 rows x N columns from col0) += c * the 3-product of A (a_strip) and B [k][n] tiles.
template <int N>
__device__ __forceinline__ void accumulate_strip(float (&acc)[N / 8][4], const uint32_t (&ah)[4][4],
                                                 const uint32_t (&al)[4][4], const uint16_t* b_hi, const uint16_t* b_lo,
                                                 int ld, int col0, float c, int lane) {
#pragma unroll
  for (int np = 0; np < N / 16; ++np) {
    float f[2][4];
    emulated_pair(f, ah, al, b_hi, b_lo, ld, col0 + 16 * np, lane);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      acc[2 * np][e] = fmaf(f[0][e], c, acc[2 * np][e]);
      acc[2 * np + 1][e] = fmaf(f[1][e], c, acc[2 * np + 1][e]);
    }
  }
}

// f[4] (16 rows x 32 columns) = 3-product over DP of A rows (tile [m][d]) and B rows (tile [n][d]).
template <int DP>
__device__ __forceinline__ void emulated_rows(float (&f)[4][4], const uint16_t* a_hi, const uint16_t* a_lo, int m0,
                                              const uint16_t* b_hi, const uint16_t* b_lo, int n0, int lane) {
  constexpr int kLds = Layout<DP>::kLds;
  zero(f);
#pragma unroll 1
  for (int ks = 0; ks < DP; ks += 16) {
    uint32_t ah[4], al[4];
    a_frag(ah, a_hi, kLds, m0, ks, lane);
    a_frag(al, a_lo, kLds, m0, ks, lane);
#pragma unroll
    for (int np = 0; np < 2; ++np) {
      uint32_t r[4];
      b_frags(r, b_lo, kLds, n0 + 16 * np, ks, lane);
      ptx::mma_16816(f[2 * np], ah, r[0], r[1]);
      ptx::mma_16816(f[2 * np + 1], ah, r[2], r[3]);
      b_frags(r, b_hi, kLds, n0 + 16 * np, ks, lane);
      ptx::mma_16816(f[2 * np], al, r[0], r[1]);
      ptx::mma_16816(f[2 * np + 1], al, r[2], r[3]);
    }
  }
  scale_all(f, kLoScale);
#pragma unroll 1
  for (int ks = 0; ks < DP; ks += 16) {
    uint32_t ah[4];
    a_frag(ah, a_hi, kLds, m0, ks, lane);
#pragma unroll
    for (int np = 0; np < 2; ++np) {
      uint32_t r[4];
      b_frags(r, b_hi, kLds, n0 + 16 * np, ks, lane);
      ptx::mma_16816(f[2 * np], ah, r[0], r[1]);
      ptx::mma_16816(f[2 * np + 1], ah, r[2], r[3]);
    }
  }
}

// Stores value pairs of a 16 x 32 strip (accumulator layout) as fp16 hi/lo into [row][col] tiles.
__device__ __forceinline__ void store_split(const float (&f)[4][4], float scale, uint16_t* hi, uint16_t* lo, int row0,
                                            int col0, int lane) {
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      uint32_t h, l;
      split_pair(f[nt][2 * r] * scale, f[nt][2 * r + 1] * scale, h, l);
      const int off = (row0 + (lane >> 2) + 8 * r) * kLdsP + col0 + nt * 8 + (lane & 3) * 2;
      *reinterpret_cast<uint32_t*>(hi + off) = h;
      *reinterpret_cast<uint32_t*>(lo + off) = l;
    }
}

__device__ __forceinline__ void atomic_add_pair(float* dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x, y));
#else
  atomicAdd(dst, x);
  atomicAdd(dst + 1, y);
#endif
}

template <int DP>
__global__ void __launch_bounds__(kBwdThreads, DP == 64 ? 2 : 1) attention_backward_kernel(AttentionBackwardParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) uint16_t smem[];
  constexpr int kLds = Layout<DP>::kLds, kTile = Layout<DP>::kTile;
  constexpr int kHalf = DP / 2;  // output columns per warp in phases 2 and 3
  const AttentionShape& sh = p.shape;
  const int64_t bh = blockIdx.y;
  const int64_t b = bh / sh.heads, h = bh % sh.heads;
  const int64_t kvh = b * (sh.heads / sh.group) + h / sh.group;
  const int kb = blockIdx.x;
  const int64_t n0 = int64_t(kb) * kAttnTile;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int kw = warp & 3, qw = warp >> 2;  // phase 1: keys 16 kw.., queries 32 qw..; later: dim half qw

  uint16_t* const sk_hi = smem;
  uint16_t* const sk_lo = smem + kTile;
  uint16_t* const sv_hi = smem + 2 * kTile;
  uint16_t* const sv_lo = smem + 3 * kTile;
  uint16_t* const sq_hi = smem + 4 * kTile;
  uint16_t* const sq_lo = smem + 5 * kTile;
  uint16_t* const so_hi = smem + 6 * kTile;  // output gradient
  uint16_t* const so_lo = smem + 7 * kTile;
  uint16_t* const sp_hi = smem + 8 * kTile;  // P^T * 2^14 [key][query]
  uint16_t* const sp_lo = sp_hi + kPTile;
  uint16_t* const sd_hi = sp_hi + 2 * kPTile;  // dS^T * 2^-e [key][query]
  uint16_t* const sd_lo = sp_hi + 3 * kPTile;
  float* const s_lse = reinterpret_cast<float*>(smem + Bwd<DP>::kHalves);
  float* const s_delta = s_lse + kAttnTile;
  float* const s_max = s_delta + kAttnTile;

  const int64_t kv_off = (kvh * p.k.len_pad + n0) * DP;
  load_tile<DP, kBwdThreads>(sk_hi, p.k.hi + kv_off, kAttnTile);
  load_tile<DP, kBwdThreads>(sk_lo, p.k.lo + kv_off, kAttnTile);
  load_tile<DP, kBwdThreads>(sv_hi, p.v.hi + kv_off, kAttnTile);
  load_tile<DP, kBwdThreads>(sv_lo, p.v.lo + kv_off, kAttnTile);
  const float k_factor = p.k.factor[kvh * (p.k.len_pad / kAttnTile) + kb];
  const float v_factor = p.v.factor[kvh * (p.v.len_pad / kAttnTile) + kb];

  const int q_tiles = static_cast<int>((sh.q_len + kAttnTile - 1) / kAttnTile);
  const int first = sh.causal ? kb : 0;  // causal: query tiles before the key block see none of it
  auto load_q = [&](int qt) {
    const int64_t off = (bh * p.q.len_pad + int64_t(qt) * kAttnTile) * DP;
    load_tile<DP, kBwdThreads>(sq_hi, p.q.hi + off, kAttnTile);
    load_tile<DP, kBwdThreads>(sq_lo, p.q.lo + off, kAttnTile);
    load_tile<DP, kBwdThreads>(so_hi, p.dout.hi + off, kAttnTile);
    load_tile<DP, kBwdThreads>(so_lo, p.dout.lo + off, kAttnTile);
    const int64_t row = bh * p.q.len_pad + int64_t(qt) * kAttnTile;
    if (threadIdx.x < 16) ptx::cp_async16(s_lse + 4 * threadIdx.x, p.lse2 + row + 4 * threadIdx.x);
    else if (threadIdx.x < 32) ptx::cp_async16(s_delta + 4 * (threadIdx.x - 16), p.delta + row + 4 * (threadIdx.x - 16));
  };
  if (first < q_tiles) load_q(first);
  ptx::cp_async_commit();

  const float* mask = sh.mask == nullptr ? nullptr : sh.mask + b * sh.mask_sb + h * sh.mask_sh;
  float dv[kHalf / 8][4], dk[kHalf / 8][4];
  zero(dv);
  zero(dk);

  for (int qt = first; qt < q_tiles; ++qt) {
    ptx::cp_async_wait<0>();
    __syncthreads();
    const int64_t q0 = int64_t(qt) * kAttnTile;
    const float q_factor = p.q.factor[bh * (p.q.len_pad / kAttnTile) + qt];
    const float do_factor = p.dout.factor[bh * (p.dout.len_pad / kAttnTile) + qt];

    // phase 1: this warp's 16 keys x 32 queries of s^T and dP^T
    float st[4][4], dpt[4][4];
    emulated_rows<DP>(st, sk_hi, sk_lo, 16 * kw, sq_hi, sq_lo, 32 * qw, lane);
    emulated_rows<DP>(dpt, sv_hi, sv_lo, 16 * kw, so_hi, so_lo, 32 * qw, lane);
    const float c_s = q_factor * k_factor * sh.scale * kLog2e, c_dp = v_factor * do_factor;
    float ds_max = 0.0f;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int jl = 16 * kw + (lane >> 2) + 8 * r;  // key, relative to n0
      const int64_t j = n0 + jl;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int il = 32 * qw + nt * 8 + (lane & 3) * 2 + e;  // query, relative to q0
          const int64_t i = q0 + il;
          float s2 = st[nt][2 * r + e] * c_s;
          const bool masked = j >= sh.kv_len || i >= sh.q_len || (sh.causal && j > i);
          if (!masked && mask != nullptr) s2 = fmaf(mask[i * sh.mask_si + j * sh.mask_sj], kLog2e, s2);
          const float p_scaled = masked ? 0.0f : exp2f(s2 - s_lse[il] + kProbScale);
          const float ds = p_scaled * (1.0f / 16384.0f) * (dpt[nt][2 * r + e] * c_dp - s_delta[il]);
          st[nt][2 * r + e] = p_scaled;
          dpt[nt][2 * r + e] = ds;
          ds_max = fmaxf(ds_max, fabsf(ds));
        }
    }
    store_split(st, 1.0f, sp_hi, sp_lo, 16 * kw, 32 * qw, lane);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) ds_max = fmaxf(ds_max, __shfl_xor_sync(0xffffffffu, ds_max, off));
    if (lane == 0) s_max[warp] = ds_max;
    __syncthreads();
    float tile_max = 0.0f;
#pragma unroll
    for (int w = 0; w < 8; ++w) tile_max = fmaxf(tile_max, s_max[w]);
    const int e_ds = split_exponent(tile_max);
    store_split(dpt, pow2(-e_ds), sd_hi, sd_lo, 16 * kw, 32 * qw, lane);
    __syncthreads();

    // phase 2: dV and dK for keys 16 kw.., columns qw * kHalf..
    {
      uint32_t ah[4][4], al[4][4];
      a_strip<false>(ah, al, sp_hi, sp_lo, 16 * kw, lane);
      accumulate_strip<kHalf>(dv, ah, al, so_hi, so_lo, kLds, qw * kHalf, do_factor * (1.0f / 16384.0f), lane);
      a_strip<false>(ah, al, sd_hi, sd_lo, 16 * kw, lane);
      accumulate_strip<kHalf>(dk, ah, al, sq_hi, sq_lo, kLds, qw * kHalf, pow2(e_ds) * q_factor * sh.scale, lane);
    }
    __syncthreads();  // q and the output gradient are free: the next tile loads under phase 3
    if (qt + 1 < q_tiles) load_q(qt + 1);
    ptx::cp_async_commit();

    // phase 3: dQ for queries 16 kw.., columns qw * kHalf.. (dS = (dS^T)^T from shared memory)
    {
      uint32_t ah[4][4], al[4][4];
      a_strip<true>(ah, al, sd_hi, sd_lo, 16 * kw, lane);
      const float c_dq = pow2(e_ds) * k_factor * sh.scale;
      float* dq = p.dq_accum + (bh * p.q.len_pad + q0 + 16 * kw + (lane >> 2)) * DP;
#pragma unroll
      for (int np = 0; np < kHalf / 16; ++np) {
        float f[2][4];
        const int col = qw * kHalf + 16 * np;
        emulated_pair(f, ah, al, sk_hi, sk_lo, kLds, col, lane);
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int r = 0; r < 2; ++r)
            atomic_add_pair(dq + 8 * r * DP + col + 8 * n + (lane & 3) * 2, f[n][2 * r] * c_dq,
                            f[n][2 * r + 1] * c_dq);
      }
    }
  }
  ptx::cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t j = n0 + 16 * kw + (lane >> 2) + 8 * r;
    if (j >= sh.kv_len) continue;
#pragma unroll
    for (int nt = 0; nt < kHalf / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t col = qw * kHalf + nt * 8 + (lane & 3) * 2 + e;
        if (col < sh.dim) p.dk[(bh * sh.kv_len + j) * sh.dim + col] = dk[nt][2 * r + e];
        if (col < sh.value_dim) p.dv[(bh * sh.kv_len + j) * sh.value_dim + col] = dv[nt][2 * r + e];
      }
  }
#endif
}

template <int DP>
cudaError_t launch(const AttentionBackwardParams& p, cudaStream_t stream) {
  cudaError_t err = raise_smem_limit(reinterpret_cast<const void*>(attention_backward_kernel<DP>),
                                     Bwd<DP>::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.shape.kv_len + kAttnTile - 1) / kAttnTile),
                  static_cast<unsigned>(p.shape.batch * p.shape.heads));
  attention_backward_kernel<DP><<<grid, kBwdThreads, Bwd<DP>::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

size_t attention_backward_smem_bytes(int dim_pad) {
  return dim_pad == 64 ? Bwd<64>::kSmemBytes : Bwd<128>::kSmemBytes;
}

cudaError_t launch_attention_backward(const AttentionBackwardParams& p, cudaStream_t stream) {
  if (p.shape.batch * p.shape.heads > 65535 || p.shape.kv_len <= 0 || p.q.len_pad % kAttnTile != 0)
    return cudaErrorInvalidValue;
  if (p.shape.dim_pad == 64) return launch<64>(p, stream);
  if (p.shape.dim_pad == 128) return launch<128>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace gemm
}  // namespace torch_hpc
