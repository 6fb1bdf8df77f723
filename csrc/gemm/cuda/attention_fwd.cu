// Attention forward stage: per CTA 128 queries (8 warps x 16 rows) against 64-key tiles of k and
// v in a two-stage cp.async pipeline, online softmax in registers (flash-style), mma.sync
// m16n8k16 (any GPU of compute capability >= 8.0). Each product is three fp16 products in a
// fresh fp32 fragment per tile, promoted into the fp32 accumulator: s = 2^-11 (qh kl + ql kh) +
// qh kh, times the tiles' factors; o += (2^-11 (ph vl + pl vh) + ph vh) times v's factor.
// Torch-free: see attention.h.
#include "attention_common.cuh"
#include "kernels.h"

namespace torch_hpc {
namespace gemm {
namespace cuda {
namespace {

using namespace attn;

constexpr int kFwdThreads = 256;

template <int DP>
struct Fwd {
  static constexpr int kQPlane = kAttnQueryBlock * Layout<DP>::kLds;
  static constexpr int kStage = 4 * Layout<DP>::kTile;  // k hi, k lo, v hi, v lo
  static constexpr size_t kSmemBytes = size_t(2 * kQPlane + 2 * kStage) * sizeof(uint16_t);
};

template <int DP>
__global__ void __launch_bounds__(kFwdThreads, DP == 64 ? 2 : 1) attention_forward_kernel(AttentionForwardParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) uint16_t smem[];
  constexpr int kLds = Layout<DP>::kLds, kTile = Layout<DP>::kTile;
  constexpr int kNT = DP / 8;  // n8 tiles of the output strip
  const AttentionShape& sh = p.shape;
  const int qb = sh.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;  // causal: longest rows first
  const int64_t bh = blockIdx.y;
  const int64_t b = bh / sh.heads, h = bh % sh.heads;
  const int64_t kvh = b * (sh.heads / sh.group) + h / sh.group;
  const int64_t m0 = int64_t(qb) * kAttnQueryBlock;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row0 = m0 + 16 * warp + (lane >> 2);  // this thread's rows: row0, row0 + 8

  uint16_t* const sq_hi = smem;
  uint16_t* const sq_lo = smem + Fwd<DP>::kQPlane;
  auto stage = [&](int s) { return smem + 2 * Fwd<DP>::kQPlane + s * Fwd<DP>::kStage; };

  const uint16_t* k_hi = p.k.hi + kvh * p.k.len_pad * DP;
  const uint16_t* k_lo = p.k.lo + kvh * p.k.len_pad * DP;
  const uint16_t* v_hi = p.v.hi + kvh * p.v.len_pad * DP;
  const uint16_t* v_lo = p.v.lo + kvh * p.v.len_pad * DP;
  const float* k_factor = p.k.factor + kvh * (p.k.len_pad / kAttnTile);
  const float* v_factor = p.v.factor + kvh * (p.v.len_pad / kAttnTile);

  int tiles = static_cast<int>((sh.kv_len + kAttnTile - 1) / kAttnTile);
  if (sh.causal) tiles = static_cast<int>(min(int64_t(tiles), (m0 + kAttnQueryBlock - 1) / kAttnTile + 1));

  auto load_kv = [&](int t) {
    uint16_t* st = stage(t & 1);
    const int64_t off = int64_t(t) * kAttnTile * DP;
    load_tile<DP, kFwdThreads>(st, k_hi + off, kAttnTile);
    load_tile<DP, kFwdThreads>(st + kTile, k_lo + off, kAttnTile);
    load_tile<DP, kFwdThreads>(st + 2 * kTile, v_hi + off, kAttnTile);
    load_tile<DP, kFwdThreads>(st + 3 * kTile, v_lo + off, kAttnTile);
  };
  load_tile<DP, kFwdThreads>(sq_hi, p.q.hi + (bh * p.q.len_pad + m0) * DP, kAttnQueryBlock);
  load_tile<DP, kFwdThreads>(sq_lo, p.q.lo + (bh * p.q.len_pad + m0) * DP, kAttnQueryBlock);
  if (tiles > 0) load_kv(0);
  ptx::cp_async_commit();

  const float q_scale =
      p.q.factor[bh * (p.q.len_pad / kAttnTile) + (m0 + 16 * warp) / kAttnTile] * sh.scale * kLog2e;
  const float* mask = sh.mask == nullptr ? nullptr : sh.mask + b * sh.mask_sb + h * sh.mask_sh;

  float acc[kNT][4];
  zero(acc);
  float row_max[2] = {-inf(), -inf()}, row_sum[2] = {0.0f, 0.0f};

  for (int t = 0; t < tiles; ++t) {
    ptx::cp_async_wait<0>();
    __syncthreads();
    if (t + 1 < tiles) load_kv(t + 1);
    ptx::cp_async_commit();
    const int64_t n0 = int64_t(t) * kAttnTile;
    if (sh.causal && m0 + 16 * warp + 15 < n0) continue;  // the warp's rows see none of this tile
    const uint16_t* sk_hi = stage(t & 1);
    const uint16_t* sk_lo = sk_hi + kTile;
    const uint16_t* sv_hi = sk_hi + 2 * kTile;
    const uint16_t* sv_lo = sk_hi + 3 * kTile;

    // s = q k^T for the warp's 16 rows x 64 keys
    float s[8][4];
    zero(s);
#pragma unroll 1
    for (int ks = 0; ks < DP; ks += 16) {
      uint32_t qh[4], ql[4];
      a_frag(qh, sq_hi, kLds, 16 * warp, ks, lane);
      a_frag(ql, sq_lo, kLds, 16 * warp, ks, lane);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t r[4];
        b_frags(r, sk_lo, kLds, 16 * np, ks, lane);
        ptx::mma_16816(s[2 * np], qh, r[0], r[1]);
        ptx::mma_16816(s[2 * np + 1], qh, r[2], r[3]);
        b_frags(r, sk_hi, kLds, 16 * np, ks, lane);
        ptx::mma_16816(s[2 * np], ql, r[0], r[1]);
        ptx::mma_16816(s[2 * np + 1], ql, r[2], r[3]);
      }
    }
    scale_all(s, kLoScale);
#pragma unroll 1
    for (int ks = 0; ks < DP; ks += 16) {
      uint32_t qh[4];
      a_frag(qh, sq_hi, kLds, 16 * warp, ks, lane);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t r[4];
        b_frags(r, sk_hi, kLds, 16 * np, ks, lane);
        ptx::mma_16816(s[2 * np], qh, r[0], r[1]);
        ptx::mma_16816(s[2 * np + 1], qh, r[2], r[3]);
      }
    }

    // scores in log2 units, masks, running maximum
    const float c = q_scale * k_factor[t];
    float tile_max[2] = {-inf(), -inf()};
    int last[2];  // last unmasked key of each row, relative to n0
    const float* mask_row[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = row0 + 8 * r;
      int64_t end = min(sh.kv_len - n0, int64_t(kAttnTile)) - 1;
      if (sh.causal) end = min(end, i - n0);
      last[r] = static_cast<int>(max(end, int64_t(-1)));
      mask_row[r] = (mask != nullptr && i < sh.q_len) ? mask + i * sh.mask_si + n0 * sh.mask_sj : nullptr;
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, j = nt * 8 + (lane & 3) * 2 + (e & 1);
        float v = s[nt][e] * c;
        if (j > last[r]) {
          v = -inf();
        } else if (mask_row[r] != nullptr) {
          v = fmaf(mask_row[r][j * sh.mask_sj], kLog2e, v);
        }
        s[nt][e] = v;
        tile_max[r] = fmaxf(tile_max[r], v);
      }
    float base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float new_max = fmaxf(row_max[r], tile_max[r]);
      const float use = new_max == -inf() ? 0.0f : new_max;  // a row with nothing unmasked yet
      const float alpha = exp2f(row_max[r] - use);
      row_max[r] = new_max;
      row_sum[r] *= alpha;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        acc[nt][2 * r] *= alpha;
        acc[nt][2 * r + 1] *= alpha;
      }
      base[r] = use - kProbScale;
    }
    // p * 2^14 and its fp16 split as A fragments (k = keys)
    uint32_t ph[4][4], pl[4][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - base[e >> 1]);
        row_sum[e >> 1] += s[nt][e];
      }
#pragma unroll
    for (int t2 = 0; t2 < 4; ++t2) c_to_a(s[2 * t2], s[2 * t2 + 1], ph[t2], pl[t2]);

    // o += p v, two n8 tiles (16 output columns) at a time
    const float vc = v_factor[t];  // (p's 2^14 cancels against the row sum's)
#pragma unroll
    for (int np = 0; np < DP / 16; ++np) {
      float f[2][4];
      zero(f);
#pragma unroll
      for (int t2 = 0; t2 < 4; ++t2) {
        uint32_t r[4];
        b_frags_trans(r, sv_lo, kLds, 16 * np, 16 * t2, lane);
        ptx::mma_16816(f[0], ph[t2], r[0], r[1]);
        ptx::mma_16816(f[1], ph[t2], r[2], r[3]);
        b_frags_trans(r, sv_hi, kLds, 16 * np, 16 * t2, lane);
        ptx::mma_16816(f[0], pl[t2], r[0], r[1]);
        ptx::mma_16816(f[1], pl[t2], r[2], r[3]);
      }
      scale_all(f, kLoScale);
#pragma unroll
      for (int t2 = 0; t2 < 4; ++t2) {
        uint32_t r[4];
        b_frags_trans(r, sv_hi, kLds, 16 * np, 16 * t2, lane);
        ptx::mma_16816(f[0], ph[t2], r[0], r[1]);
        ptx::mma_16816(f[1], ph[t2], r[2], r[3]);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[2 * np][e] = fmaf(f[0][e], vc, acc[2 * np][e]);
        acc[2 * np + 1][e] = fmaf(f[1][e], vc, acc[2 * np + 1][e]);
      }
    }
  }
  ptx::cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
    const int64_t i = row0 + 8 * r;
    const bool empty = row_sum[r] == 0.0f;  // every key masked: torch gives 0
    if ((lane & 3) == 0)
      p.lse2[bh * p.q.len_pad + i] =
          (i >= sh.q_len || empty) ? inf() : row_max[r] + log2f(row_sum[r]) - kProbScale;
    if (i >= sh.q_len) continue;
    float* out = p.out + (bh * sh.q_len + i) * sh.value_dim;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t col = nt * 8 + (lane & 3) * 2 + e;
        if (col < sh.value_dim) out[col] = empty ? 0.0f : acc[nt][2 * r + e] / row_sum[r];
      }
  }
#endif
}

template <int DP>
cudaError_t launch(const AttentionForwardParams& p, cudaStream_t stream) {
  cudaError_t err = raise_smem_limit(reinterpret_cast<const void*>(attention_forward_kernel<DP>),
                                     Fwd<DP>::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(p.q.len_pad / kAttnQueryBlock),
                  static_cast<unsigned>(p.shape.batch * p.shape.heads));
  attention_forward_kernel<DP><<<grid, kFwdThreads, Fwd<DP>::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

size_t attention_forward_smem_bytes(int dim_pad) {
  return dim_pad == 64 ? Fwd<64>::kSmemBytes : Fwd<128>::kSmemBytes;
}

cudaError_t launch_attention_forward(const AttentionForwardParams& p, cudaStream_t stream) {
  if (p.q.len_pad % kAttnQueryBlock != 0 || p.shape.batch * p.shape.heads > 65535 ||
      p.q.len_pad / kAttnQueryBlock > 65535)
    return cudaErrorInvalidValue;
  if (p.shape.dim_pad == 64) return launch<64>(p, stream);
  if (p.shape.dim_pad == 128) return launch<128>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace gemm
}  // namespace torch_hpc
