// The sm90 kernels' shared parts (gemm_sm90.cu, conv_sm90.cu): tile and pipeline constants, the
// stage ring, the consumer warpgroups' main loop and epilogue, TMA maps of split planes. One
// producer warpgroup fills each stage (A and B planes, 128B-swizzled, and the k-block's factors
// of A's rows and, for the convolution, of B's rows: block mode, ../split.h), two consumer
// warpgroups (64x128 of the 128x128 tile each) issue wgmma. Per k-block each consumer computes
//   fresh = A_hi B_hi per kPromote k (tensor core);   acc += f fresh (fp32, outside it)
//   corr  = A_hi B_lo + A_lo B_hi (tensor core);       acc += 2^-11 f corr
// with f = the block's factor of the row (times the column's), and writes 2^(e_row + e_col) acc.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <mutex>

#include "../split.h"
#include "kernels.h"
#include "ptx.cuh"

namespace torch_hpc {
namespace gemm {
namespace cuda {
namespace sm90 {

constexpr int kBM = kTileRows, kBN = kTileRows, kBK = 64;  // kBK fp16 = 128 B = one swizzle row
constexpr int kStages = 3;
constexpr int kPlaneBytes = kBM * kBK * 2;      // 16 KiB, a_hi / a_lo / b_hi / b_lo
constexpr int kFactorBytes = kBM * 4;           // one k-block's factors of a tile's 128 rows
constexpr int kStageBytes = 4 * kPlaneBytes + 2 * kFactorBytes;  // then A's and B's factors
constexpr int kThreads = 384;                   // warpgroup 0 loads, 1 and 2 compute
// k-products summed in the tensor core before each fp32 promotion. Measured on an H100: 64
// runs at the same speed but lost to plain fp32 on a K = 128 weight gradient (3.3e-7 vs 3.0e-7).
constexpr int kPromote = 32;
constexpr size_t kSmemBytes = size_t(kStages) * kStageBytes + 1024 + 2 * kStages * 8;

static_assert(kBK * 2 == 128, "one k-block row must be one 128-byte swizzle row");
static_assert(kBK == kScaleBlock, "a k-block is one block of the split's block mode");
static_assert(kStageBytes % 1024 == 0, "every stage's planes 1024-B aligned");
static_assert(kTileK % kBK == 0, "planes are padded to whole k-blocks");
static_assert(kTileRows % kBM == 0 && kTileRows % kBN == 0, "planes are padded to whole tiles");

// Device code exists only in the host pass and the sm_90a pass.
#if !defined(__CUDA_ARCH__) || defined(TORCH_HPC_SM90A_DEVICE)
constexpr int kConsumerWarps = 8;
constexpr int kAccRegs = 64;                    // m64n128 fp32 fragment per thread
constexpr int kGroupM = 8;                      // tile rows swept together (L2 reuse)
constexpr int kProducerRegs = 40, kConsumerRegs = 232;

struct TileCoord {
  int batch, row_tile, col_tile;
};

// Grouped order: kGroupM tile rows advance together across the columns, so the CTAs resident
// at one time share A and B panels in L2.
__device__ __forceinline__ TileCoord tile_coord(int tile, int tiles_m, int tiles_n) {
  const int per_batch = tiles_m * tiles_n;
  const int batch = tile / per_batch;
  const int t = tile - batch * per_batch;
  const int per_group = kGroupM * tiles_n;
  const int first_m = (t / per_group) * kGroupM;
  const int group_rows = min(tiles_m - first_m, kGroupM);
  const int in_group = t - (t / per_group) * per_group;
  return {batch, first_m + in_group % group_rows, in_group / group_rows};
}
#endif

#if !defined(__CUDA_ARCH__) || defined(TORCH_HPC_SM90A_DEVICE)
struct SharedStages {
  uint8_t* tiles;   // kStages x (a_hi, a_lo, b_hi, b_lo), each 1024-B aligned
  uint64_t* full;   // stage loaded (TMA bytes arrived)
  uint64_t* empty;  // stage consumed (every consumer warp arrived)
};

__device__ __forceinline__ uint8_t* stage_tiles(const SharedStages& sm, int stage) {
  return sm.tiles + stage * kStageBytes;
}
__device__ __forceinline__ float* a_factors(const SharedStages& sm, int stage) {
  return reinterpret_cast<float*>(stage_tiles(sm, stage) + 4 * kPlaneBytes);
}
__device__ __forceinline__ float* b_factors(const SharedStages& sm, int stage) {
  return a_factors(sm, stage) + kBM;
}

// Position in the ring of kStages stages; the phase flips at each wrap.
struct PipeState {
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
};

// A consumer thread's place in its warpgroup's 64 x 128 fragment: element 4j + {0,1,2,3} is
// (row, 8j + 2(lane%4) + {0,1,0,1}) with row = 16 warp + lane/4 (+8 for elements 2, 3).
struct FragmentPlace {
  int row;   // in the 128-row tile, first of the two
  int col;   // first column, j = 0
};

// acc += f fresh for the fragment: f = a0/a1 (the thread's two rows' factors) times, with
// kScaleB, the columns' factors from b (shared memory), read eight column pairs at a time
// (volatile loads and a compiler barrier after each group: loads the compiler schedules
// itself spill at 232 registers).
template <bool kScaleB>
__device__ __forceinline__ void promote(float (&acc)[kAccRegs], const float (&fresh)[kAccRegs], float a0,
                                        float a1, const float* b, int col) {
  constexpr int kGroup = 8;
#pragma unroll
  for (int g = 0; g < kAccRegs / 4; g += kGroup) {
    float b0[kGroup], b1[kGroup];
#pragma unroll
    for (int u = 0; u < kGroup; ++u) {
      b0[u] = b1[u] = 1.0f;
      if constexpr (kScaleB) {
        ptx::ld_shared_f32x2(ptx::smem_addr(b + col) + 32 * (g + u), b0[u], b1[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kGroup; ++u) {
      const int j = g + u;
      acc[4 * j] = fmaf(fresh[4 * j], a0 * b0[u], acc[4 * j]);
      acc[4 * j + 1] = fmaf(fresh[4 * j + 1], a0 * b1[u], acc[4 * j + 1]);
      acc[4 * j + 2] = fmaf(fresh[4 * j + 2], a1 * b0[u], acc[4 * j + 2]);
      acc[4 * j + 3] = fmaf(fresh[4 * j + 3], a1 * b1[u], acc[4 * j + 3]);
    }
    if constexpr (kScaleB) {
#pragma unroll
      for (int i = 4 * g; i < 4 * (g + kGroup); ++i) asm volatile("" : "+f"(acc[i])::"memory");
    }
  }
}

// wgmma groups of one k-block, 16 k per instruction (+32 B = +2 in a descriptor): the hi*hi
// product of the k-block's chunk `chunk` into fresh, and its corrections into corr (chunk 0
// starts corr afresh unless `carry`: the row loop sums them over the whole K).
struct BlockDescs {
  uint64_t a_hi, a_lo, b_hi, b_lo;
};
// The descriptors of a stage's planes: this consumer's 64 rows of A, all of B.
__device__ __forceinline__ BlockDescs stage_descs(const SharedStages& sm, int stage, int consumer) {
  const uint8_t* sa = stage_tiles(sm, stage) + consumer * 64 * 128;
  const uint8_t* sb = stage_tiles(sm, stage);
  return {ptx::smem_desc_sw128(sa), ptx::smem_desc_sw128(sa + kPlaneBytes),
          ptx::smem_desc_sw128(sb + 2 * kPlaneBytes), ptx::smem_desc_sw128(sb + 3 * kPlaneBytes)};
}
__device__ __forceinline__ void issue_main(float (&fresh)[kAccRegs], const BlockDescs& d, int chunk) {
  const int k0 = chunk * (kPromote / 16);
#pragma unroll
  for (int kk = 0; kk < kPromote / 16; ++kk)
    ptx::wgmma_m64n128k16(fresh, d.a_hi + 2 * (k0 + kk), d.b_hi + 2 * (k0 + kk), kk > 0);
  ptx::wgmma_commit();
}
__device__ __forceinline__ void issue_corrections(float (&corr)[kAccRegs], const BlockDescs& d, int chunk,
                                                  bool carry = false) {
  const int k0 = chunk * (kPromote / 16);
#pragma unroll
  for (int kk = 0; kk < kPromote / 16; ++kk) {
    ptx::wgmma_m64n128k16(corr, d.a_hi + 2 * (k0 + kk), d.b_lo + 2 * (k0 + kk), carry || k0 + kk > 0);
    ptx::wgmma_m64n128k16(corr, d.a_lo + 2 * (k0 + kk), d.b_hi + 2 * (k0 + kk), 1);
  }
  ptx::wgmma_commit();
}

// Consumer main loop over one tile's k-blocks: acc = the sum of every promoted product, each
// scaled by its k-block's factors. `pipe` carries across tiles. Per k-block, four wgmma groups
// (hi*hi chunk 0, corrections of chunk 0, corrections of chunk 1, hi*hi chunk 1): while the
// thread promotes one, the tensor core holds the next, except for the block's last hi*hi chunk.
// (No group stays in flight across k-blocks: ptxas serialises every wgmma when a loop reads an
// accumulator of a group issued in an earlier iteration.)
template <bool kScaleB>
__device__ __forceinline__ void consumer_mainloop(const SharedStages& sm, int consumer, const FragmentPlace& at,
                                                  int k_blocks, bool release_lane, PipeState& pipe,
                                                  float (&acc)[kAccRegs], float (&fresh)[kAccRegs],
                                                  float (&corr)[kAccRegs]) {
  static_assert(kBK / kPromote == 2, "two hi*hi chunks per k-block");
  constexpr float kLoScale = 1.0f / float(1 << kLoShift);
#pragma unroll
  for (int i = 0; i < kAccRegs; ++i) acc[i] = 0.0f;
#pragma unroll 1
  for (int kb = 0; kb < k_blocks; ++kb) {
    const int stage = pipe.stage;
    ptx::mbar_wait(&sm.full[stage], pipe.phase);
    const BlockDescs d = stage_descs(sm, stage, consumer);
    const float f0 = a_factors(sm, stage)[at.row], f1 = a_factors(sm, stage)[at.row + 8];
    const float* fb = b_factors(sm, stage);

    ptx::fence_regs(fresh);
    ptx::fence_regs(corr);
    ptx::wgmma_fence();
    issue_main(fresh, d, 0);
    issue_corrections(corr, d, 0);
    ptx::fence_regs(fresh);
    ptx::wgmma_wait<1>();  // chunk 0's hi*hi
    ptx::fence_regs(fresh);
    promote<kScaleB>(acc, fresh, f0, f1, fb, at.col);

    ptx::fence_regs(fresh);
    ptx::wgmma_fence();
    issue_corrections(corr, d, 1);
    issue_main(fresh, d, 1);
    ptx::fence_regs(corr);
    ptx::wgmma_wait<1>();  // the corrections
    ptx::fence_regs(corr);
    promote<kScaleB>(acc, corr, f0 * kLoScale, f1 * kLoScale, fb, at.col);
    ptx::fence_regs(fresh);
    ptx::wgmma_wait<0>();  // chunk 1's hi*hi
    ptx::fence_regs(fresh);
    promote<kScaleB>(acc, fresh, f0, f1, fb, at.col);
    if (release_lane) ptx::mbar_arrive(&sm.empty[stage]);
    pipe.advance();
  }
}

// The main loop of tiles whose A rows all fit one exponent (every factor 1): hi*hi promoted per
// kPromote k by FADD while that chunk's corrections run, the corrections accumulated over the
// whole K in the tensor core and added once at the end (acc += 2^-11 corr): two roundings of
// acc per k-block, where the block loop above has three, and no wait between k-blocks.
__device__ __forceinline__ void consumer_mainloop_rows(const SharedStages& sm, int consumer, int k_blocks,
                                                       bool release_lane, PipeState& pipe,
                                                       float (&acc)[kAccRegs], float (&fresh)[kAccRegs],
                                                       float (&corr)[kAccRegs]) {
  constexpr float kLoScale = 1.0f / float(1 << kLoShift);
#pragma unroll
  for (int i = 0; i < kAccRegs; ++i) acc[i] = 0.0f;
  int prev_stage = -1;
  for (int kb = 0; kb < k_blocks; ++kb) {
    const int stage = pipe.stage;
    ptx::mbar_wait(&sm.full[stage], pipe.phase);
    const BlockDescs d = stage_descs(sm, stage, consumer);
#pragma unroll 1
    for (int chunk = 0; chunk < kBK / kPromote; ++chunk) {
      ptx::fence_regs(fresh);
      ptx::fence_regs(corr);
      ptx::wgmma_fence();
      issue_main(fresh, d, chunk);
      issue_corrections(corr, d, chunk, kb > 0);
      ptx::fence_regs(fresh);
      ptx::wgmma_wait<1>();
      ptx::fence_regs(fresh);
#pragma unroll
      for (int i = 0; i < kAccRegs; ++i) acc[i] += fresh[i];
      if (chunk == 0 && prev_stage >= 0 && release_lane) ptx::mbar_arrive(&sm.empty[prev_stage]);
    }
    prev_stage = stage;
    pipe.advance();
  }
  ptx::fence_regs(corr);
  ptx::wgmma_wait<0>();
  ptx::fence_regs(corr);
  if (prev_stage >= 0 && release_lane) ptx::mbar_arrive(&sm.empty[prev_stage]);
#pragma unroll
  for (int i = 0; i < kAccRegs; ++i) acc[i] += corr[i] * kLoScale;
}

// Consumer epilogue: C = 2^(e_row + e_col) acc for this consumer's 64 x 128.
__device__ __forceinline__ void consumer_epilogue(const GemmParams& p, const TileCoord& tc,
                                                  const FragmentPlace& at, const float (&acc)[kAccRegs]) {
  const int64_t b = tc.batch;
  const int64_t row0 = int64_t(tc.row_tile) * kBM + at.row;
  const int64_t col_base = int64_t(tc.col_tile) * kBN + at.col;
  const int32_t* ea = p.a_exponent + b * p.m_pad;
  const int32_t* eb = p.b_exponent + b * p.n_pad;
  float* c = p.c + b * p.c_stride_b;
  const bool pairs = p.c_stride_n == 1 && p.c_stride_m % 2 == 0 && p.c_stride_b % 2 == 0 &&
                     (reinterpret_cast<uintptr_t>(p.c) & 7) == 0;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = row0 + 8 * half;
    if (row >= p.m) continue;
    const int e_row = ea[row];
    float* c_row = c + row * p.c_stride_m;
#pragma unroll
    for (int j = 0; j < kAccRegs / 4; ++j) {
      const int64_t col = col_base + 8 * j;
      if (col >= p.n) continue;
      const int r = 4 * j + 2 * half;
      const float v0 = ldexpf(acc[r], e_row + eb[col]);
      const float v1 = ldexpf(acc[r + 1], e_row + eb[col + 1]);
      if (pairs && col + 1 < p.n) {
        *reinterpret_cast<float2*>(c_row + col) = make_float2(v0, v1);
      } else {
        c_row[col * p.c_stride_n] = v0;
        if (col + 1 < p.n) c_row[(col + 1) * p.c_stride_n] = v1;
      }
    }
  }
}
// The stage ring in the kernel's dynamic shared memory (tiles 1024-B aligned, then the
// barriers), its barriers initialised (full: `full_arrivals` per phase; empty: every consumer
// warp) and visible to the whole block.
__device__ __forceinline__ SharedStages setup_stages(uint8_t* smem_raw, uint32_t full_arrivals) {
  uint8_t* tiles = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) &
                                              ~uintptr_t(1023));
  uint64_t* full = reinterpret_cast<uint64_t*>(tiles + kStages * kStageBytes);
  const SharedStages sm{tiles, full, full + kStages};
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      ptx::mbar_init(&sm.full[s], full_arrivals);
      ptx::mbar_init(&sm.empty[s], kConsumerWarps);
    }
    ptx::mbar_init_fence();
  }
  __syncthreads();
  return sm;
}

// The k-blocks [first, end) of a tile of batch `batch`: all of them, or with k_slice > 0 (a
// split K: batch b is slice b, its partial sums written at c + b c_stride_b) blocks
// b k_slice .. min(k_blocks, (b + 1) k_slice), never empty (the host's choice of k_slice).
struct KRange {
  int first, end;
};
__device__ __forceinline__ KRange k_range(int batch, int k_blocks, int k_slice) {
  if (k_slice <= 0) return {0, k_blocks};
  const int first = batch * k_slice;
  return {first, min(k_blocks, first + k_slice)};
}

// Consumer warpgroup `warpgroup` (1 or 2, rows (warpgroup - 1) * 64 .. +63 of each tile): every
// tile of this CTA, main loop then epilogue. kScaleB: B's rows carry factors too.
template <bool kScaleB>
__device__ __forceinline__ void consumer_tiles(const SharedStages& sm, const GemmParams& p, int warpgroup,
                                               int k_blocks, int k_slice, int tiles_m, int tiles_n,
                                               int total_tiles) {
  const int consumer = warpgroup - 1;
  const int t = threadIdx.x - 128 * warpgroup;
  const int warp = t / 32, lane = t % 32;
  const FragmentPlace at{consumer * 64 + warp * 16 + lane / 4, 2 * (lane % 4)};
  PipeState pipe;
  float acc[kAccRegs], fresh[kAccRegs], corr[kAccRegs];
  for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
    const TileCoord tc = tile_coord(tile, tiles_m, tiles_n);
    const KRange ks = k_range(tc.batch, k_blocks, k_slice);
    // tiles whose rows of A all fit one exponent take the row loop (the split says which)
    const bool blocks = kScaleB || (p.a_factor != nullptr && (p.a_block_tiles == nullptr ||
                                    p.a_block_tiles[int64_t(tc.batch) * tiles_m + tc.row_tile] != 0));
    if (blocks)
      consumer_mainloop<kScaleB>(sm, consumer, at, ks.end - ks.first, lane == 0, pipe, acc, fresh, corr);
    else
      consumer_mainloop_rows(sm, consumer, ks.end - ks.first, lane == 0, pipe, acc, fresh, corr);
    consumer_epilogue(p, tc, at, acc);
  }
}
#endif

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &status) == cudaSuccess &&
        status == cudaDriverEntryPointSuccess)
      encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  });
  return encode;
}

// [batch, rows_pad, k_pad] fp16 plane -> tensor map with 128-row x 64-k boxes, 128B swizzle.
inline bool plane_map(CUtensorMap* map, const uint16_t* plane, int64_t batch, int64_t rows_pad,
               int64_t k_pad) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[3] = {cuuint64_t(k_pad), cuuint64_t(rows_pad), cuuint64_t(batch)};
  const cuuint64_t strides[2] = {cuuint64_t(k_pad) * 2, cuuint64_t(rows_pad * k_pad) * 2};
  const cuuint32_t box[3] = {kBK, kBM, 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3, const_cast<uint16_t*>(plane), dims,
                strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// [batch, k_blocks, rows_pad] fp32 factors (block mode) -> tensor map with 128-row boxes.
inline bool factor_map(CUtensorMap* map, const float* factors, int64_t batch, int64_t rows_pad,
                       int64_t k_blocks) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[3] = {cuuint64_t(rows_pad), cuuint64_t(k_blocks), cuuint64_t(batch)};
  const cuuint64_t strides[2] = {cuuint64_t(rows_pad) * 4, cuuint64_t(rows_pad * k_blocks) * 4};
  const cuuint32_t box[3] = {kBM, 1, 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 3, const_cast<float*>(factors), dims, strides,
                box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace sm90
}  // namespace cuda
}  // namespace gemm
}  // namespace torch_hpc
